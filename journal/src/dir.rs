//! The journal directory: which files it holds, the journal state (`state.json`: identity,
//! folded history, the guest's cache mode), and the checks that a journal, its segments,
//! the volume's image and the folded base belong together.
//!
//! Files in a journal directory:
//! - `segment-<first seq, 12 digits>.svj`: the segments ([`crate::format`]);
//! - `state.json`: [`JournalState`], replaced crash-safely ([`sealvm_os::durable`]);
//! - `folded-base.raw`: the image with every folded record applied, once anything is folded;
//! - `consumers/<name>.json`: consumer cursors ([`crate::consumer`]);
//! - `serve.lock` (one writer per journal) and `fold.lock` (taken shared while a reader
//!   places a hold, exclusively by the folder).

use crate::format::{self, Identity, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::segment::SegmentBytes;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Prefix of segment file names.
const SEGMENT_PREFIX: &str = "segment-";
/// Suffix of segment file names.
const SEGMENT_SUFFIX: &str = ".svj";
/// The journal state.
pub const STATE_NAME: &str = "state.json";
/// The folded base: the base image with every folded record applied.
pub const FOLDED_BASE_NAME: &str = "folded-base.raw";
/// Held shared by readers that hold the whole history (version-1 journals, and readers
/// without a consumer cursor), exclusively by the folder while it folds.
pub const FOLD_LOCK_NAME: &str = "fold.lock";
/// Held exclusively by the one writer of a journal.
pub const SERVE_LOCK_NAME: &str = "serve.lock";
/// How many bytes of the volume's image its fingerprint covers.
pub const FINGERPRINT_BYTES: usize = 64 << 10;

/// Errors reading a journal directory, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file could not be opened, read or written.
    #[error("cannot read or write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record that does not check out is followed by valid records: the damage is inside
    /// the journal, not a torn tail from a crash, and cutting there would lose records.
    #[error(
        "journal segment {path} is damaged at byte {offset} (record seq {seq}); valid records \
         follow from byte {next_valid}, so this is not a torn tail. Refusing to cut the \
         journal there: copy the segment aside and restore from a replica or backup"
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// The sequence number the damaged record should have had.
        seq: u64,
        /// Byte offset of the first valid record after it.
        next_valid: u64,
    },
    /// A segment that is not the last one does not end cleanly, or a segment does not start
    /// where the one before it ended: records are missing from the middle of the journal.
    #[error(
        "journal segment {path} breaks the journal at byte {offset}: the next record should \
         be seq {seq}, and later segments follow, so records are missing or damaged in the \
         middle. Refusing to use it: copy the journal aside and restore from a replica or \
         backup"
    )]
    Gap {
        /// The segment.
        path: PathBuf,
        /// Where its valid records end.
        offset: u64,
        /// The sequence number the next record should have had.
        seq: u64,
    },
    /// A record of a kind this version cannot read past.
    #[error("journal segment {path}: record seq {seq} at byte {offset} cannot be read")]
    UnknownKind {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// Its seq.
        seq: u64,
        /// Which kind.
        #[source]
        source: format::FormatError,
    },
    /// A segment's header is not a version-2 segment header.
    #[error("journal segment {path} does not start with a valid segment header")]
    BadSegmentHeader {
        /// The segment.
        path: PathBuf,
    },
    /// The journal state is unreadable.
    #[error("the journal state {path} is unreadable: {reason}")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two things that must belong together do not.
    #[error(
        "{path} does not belong to this journal: its {what} is {found}, the journal's is \
         {expected}. Pair the journal with the image it was started on"
    )]
    Mismatch {
        /// The file that does not match.
        path: PathBuf,
        /// Which field.
        what: &'static str,
        /// The journal's value.
        expected: String,
        /// The file's value.
        found: String,
    },
    /// The journal is format version 1 and the operation writes.
    #[error(
        "journal {dir} is format version 1; it can be read (pit list, restore, expose) but \
         not written. Convert it with `sealvm-blk journal upgrade --base IMAGE --journal {dir}`"
    )]
    NeedsUpgrade {
        /// The journal directory.
        dir: PathBuf,
    },
    /// The records asked for have been folded into the base.
    #[error(
        "sequence number {asked} is older than the journal reaches: history up to seq \
         {base_seq} has been folded into the base"
    )]
    FoldedAway {
        /// Asked for.
        asked: u64,
        /// The last folded sequence number, the oldest point left.
        base_seq: u64,
    },
}

impl JournalError {
    /// An I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
        move |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The journal state, `state.json`. Version 1 journals wrote `{"base_seq": N}` only; they
/// have no identity and still read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JournalState {
    /// The format version of the journal (1 when absent).
    #[serde(default = "version_one")]
    pub version: u16,
    /// Whom the journal belongs to (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    /// CRC32C of the first [`FINGERPRINT_BYTES`] of the volume's image (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_fingerprint: Option<u32>,
    /// History up to this seq is folded into the folded base (0: nothing folded).
    #[serde(default, alias = "base_seq")]
    pub base_seq: u64,
    /// The guest's driver turned the write cache off: every write is made durable before
    /// it is acknowledged, also after a restart (the frontend does not say it again).
    #[serde(default)]
    pub write_through: bool,
}

fn version_one() -> u16 {
    1
}

/// The path of the segment whose first record is `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_seq:012}{SEGMENT_SUFFIX}"))
}

/// The segment files in `dir`, in order, as (first seq, path). A directory that does not
/// exist has none.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::io(dir)(source)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(JournalError::io(dir))?;
        let name = entry.file_name();
        let first = name
            .to_str()
            .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first.filter(|&f| f > 0) {
            found.push((first, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Reads the journal state; a journal without one is a version-1 journal that has folded
/// nothing (or a new one).
pub fn read_state(dir: &Path) -> Result<JournalState, JournalError> {
    let path = dir.join(STATE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| JournalError::BadState {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(JournalState {
            version: 1,
            ..JournalState::default()
        }),
        Err(source) => Err(JournalError::Io { path, source }),
    }
}

/// Replaces the journal state crash-safely: a crash leaves the old or the new one.
pub fn write_state(dir: &Path, state: &JournalState) -> Result<(), JournalError> {
    write_state_with(&crate::storage::Disk, dir, state)
}

/// [`write_state`] through a storage seam (write-temp, fdatasync, rename, fsync-dir).
pub fn write_state_with(
    storage: &dyn crate::storage::Storage,
    dir: &Path,
    state: &JournalState,
) -> Result<(), JournalError> {
    let path = dir.join(STATE_NAME);
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| JournalError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    crate::storage::replace(storage, &path, &bytes)
        .map_err(|source| JournalError::Io { path, source })
}

/// The image a journal's records apply to: the folded base once history has been folded,
/// the volume's own image `base` before.
pub fn effective_base(dir: &Path, base: &Path) -> PathBuf {
    let folded = dir.join(FOLDED_BASE_NAME);
    if folded.exists() {
        folded
    } else {
        base.to_path_buf()
    }
}

/// CRC32C of the first [`FINGERPRINT_BYTES`] of `image`: tells a journal's own image from
/// another of the same size.
pub fn fingerprint(image: &File, path: &Path) -> Result<u32, JournalError> {
    let mut buf = vec![0u8; FINGERPRINT_BYTES];
    let got = image.read_at(&mut buf, 0).map_err(JournalError::io(path))?;
    Ok(crc32c::crc32c(&buf[..got]))
}

/// Checks that the volume's image `base` (and the folded base, if any) belong to the
/// journal whose state is `state`. Version-1 journals carry no identity; only sizes are
/// compared then (against `expected_bytes`).
pub fn check_base(dir: &Path, base: &Path, state: &JournalState) -> Result<u64, JournalError> {
    let image = File::open(base).map_err(JournalError::io(base))?;
    let size = image.len_bytes().map_err(JournalError::io(base))?;
    if let Some(identity) = &state.identity {
        if size != identity.volume_bytes {
            return Err(JournalError::Mismatch {
                path: base.to_path_buf(),
                what: "size in bytes",
                expected: identity.volume_bytes.to_string(),
                found: size.to_string(),
            });
        }
        if let Some(expected) = state.base_fingerprint {
            let found = fingerprint(&image, base)?;
            if found != expected {
                return Err(JournalError::Mismatch {
                    path: base.to_path_buf(),
                    what: "fingerprint (CRC32C of its first 64 KiB)",
                    expected: format!("{expected:08x}"),
                    found: format!("{found:08x}"),
                });
            }
        }
    }
    let folded = dir.join(FOLDED_BASE_NAME);
    match std::fs::metadata(&folded) {
        Ok(meta) if meta.len() != size => Err(JournalError::Mismatch {
            path: folded,
            what: "size in bytes",
            expected: size.to_string(),
            found: meta.len().to_string(),
        }),
        Ok(_) => Ok(size),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(size),
        Err(source) => Err(JournalError::Io {
            path: folded,
            source,
        }),
    }
}

/// An open segment: its file and format version.
pub struct OpenSegment {
    /// The file, opened as asked.
    pub file: File,
    /// Its format version.
    pub version: u16,
    /// The header was missing or torn: a segment created by a writer that crashed or lost
    /// power before the header was durable. Readers stop there; it holds nothing flushed
    /// unless a sync point in it or after it says otherwise (then it is damage).
    pub torn_header: bool,
}

/// Opens segment `path` (first record `first_seq`), reads its version and, for version 2,
/// checks its header against `identity`.
pub fn open_segment(
    path: &Path,
    first_seq: u64,
    identity: Option<&Identity>,
    write: bool,
) -> Result<OpenSegment, JournalError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(JournalError::io(path))?;
    let mut head = [0u8; SEGMENT_HEADER_LEN];
    let got = file.read_at(&mut head, 0).map_err(JournalError::io(path))?;
    let version = match format::segment_version(&head[..got]) {
        // An empty file in a named (version-2) journal: a segment created by rotation whose
        // header a power loss dropped.
        Some(1) if got == 0 && identity.is_some() => 2,
        Some(version) => version,
        // Zeroes where a header should be: a segment whose creation did not reach the disk.
        None if head[..got].iter().all(|&b| b == 0) => 2,
        None => {
            return Err(JournalError::BadSegmentHeader {
                path: path.to_path_buf(),
            })
        }
    };
    if version == 1 {
        return Ok(OpenSegment {
            file,
            version,
            torn_header: false,
        });
    }
    let header = match format::decode_segment_header(&head[..got]) {
        Ok(header) => header,
        Err(_)
            if head[..got].iter().all(|&b| b == 0)
                || file.len_bytes().map_err(JournalError::io(path))?
                    <= SEGMENT_HEADER_LEN as u64 =>
        {
            return Ok(OpenSegment {
                file,
                version,
                torn_header: true,
            })
        }
        Err(_) => {
            return Err(JournalError::BadSegmentHeader {
                path: path.to_path_buf(),
            })
        }
    };
    check_segment_header(path, &header, first_seq, identity)?;
    Ok(OpenSegment {
        file,
        version,
        torn_header: false,
    })
}

fn check_segment_header(
    path: &Path,
    header: &SegmentHeader,
    first_seq: u64,
    identity: Option<&Identity>,
) -> Result<(), JournalError> {
    let mismatch = |what, expected: String, found: String| {
        Err(JournalError::Mismatch {
            path: path.to_path_buf(),
            what,
            expected,
            found,
        })
    };
    if header.first_seq != first_seq {
        return mismatch(
            "first seq",
            first_seq.to_string(),
            header.first_seq.to_string(),
        );
    }
    let Some(identity) = identity else {
        return Ok(());
    };
    let found = &header.identity;
    if found.journal != identity.journal {
        return mismatch(
            "journal UUID",
            identity.journal.to_string(),
            found.journal.to_string(),
        );
    }
    if found.volume != identity.volume {
        return mismatch(
            "volume UUID",
            identity.volume.to_string(),
            found.volume.to_string(),
        );
    }
    if found.volume_bytes != identity.volume_bytes {
        return mismatch(
            "volume size in bytes",
            identity.volume_bytes.to_string(),
            found.volume_bytes.to_string(),
        );
    }
    if found.sector_bytes != identity.sector_bytes {
        return mismatch(
            "sector size",
            identity.sector_bytes.to_string(),
            found.sector_bytes.to_string(),
        );
    }
    Ok(())
}

/// A shared hold on a journal's whole history (`fold.lock`): while it is held, the writer
/// folds nothing away. Readers without a consumer cursor take one.
pub struct HistoryHold {
    _file: File,
}

/// Takes a shared hold on the history of the journal in `dir`, waiting for a fold in
/// progress to finish. A journal directory that does not exist needs no hold.
pub fn hold_history(dir: &Path) -> Result<Option<HistoryHold>, JournalError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = dir.join(FOLD_LOCK_NAME);
    let file = sealvm_os::lock::lock_file(
        &path,
        sealvm_os::lock::LockMode::Shared,
        sealvm_os::lock::Wait::Block,
    )
    .map_err(|e| JournalError::Io {
        path,
        source: io::Error::other(e),
    })?;
    Ok(Some(HistoryHold { _file: file }))
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_one_state_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_NAME), br#"{"base_seq": 42}"#).unwrap();
        let state = read_state(dir.path()).unwrap();
        assert_eq!((state.version, state.base_seq), (1, 42));
        assert_eq!(state.identity, None);
    }

    #[test]
    fn an_image_of_another_volume_is_refused_with_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![1u8; 8192]).unwrap();
        let identity = Identity {
            journal: format::Uuid::random().unwrap(),
            volume: format::Uuid::random().unwrap(),
            volume_bytes: 8192,
            sector_bytes: 512,
        };
        let file = File::open(&base).unwrap();
        let state = JournalState {
            version: 2,
            identity: Some(identity),
            base_fingerprint: Some(fingerprint(&file, &base).unwrap()),
            ..JournalState::default()
        };
        assert_eq!(check_base(dir.path(), &base, &state).unwrap(), 8192);
        std::fs::write(&base, vec![2u8; 8192]).unwrap();
        let err = check_base(dir.path(), &base, &state).unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
        std::fs::write(&base, vec![1u8; 4096]).unwrap();
        let err = check_base(dir.path(), &base, &state).unwrap_err();
        assert!(err.to_string().contains("size in bytes is 4096"), "{err}");
    }
}
