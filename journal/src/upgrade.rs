//! Converting a version-1 journal to version 2 (`sealvm-blk journal upgrade`).
//!
//! Version-1 journals are read as they are (pit list, restore, expose); only writing needs
//! version 2, because a writer checks every segment's identity. The upgrade:
//!
//! 1. takes `serve.lock` (no server may run meanwhile);
//! 2. names the journal and its volume: writes `state.json` version 2 with new UUIDs, the
//!    image's size and fingerprint (kept across a rerun: once written, it is checked);
//! 3. rewrites each version-1 segment as version 2: a segment header, then every record
//!    with the same seq and time. A write whose data is all zeroes becomes a zero extent; a
//!    sync point names the offset of its own place in the new file (all of which is
//!    durable once the file is). The new segment is written to a temporary name,
//!    fdatasync'ed and renamed over the old one, then the directory is fsync'ed.
//!
//! A crash at any point leaves each segment whole in version 1 or version 2, and a journal
//! with both reads correctly (the version is per segment); running the upgrade again
//! finishes it. A damaged segment is refused as on any open; a torn tail is cut.

use crate::dir::{self, JournalError, JournalState};
use crate::format::{self, Identity, NewRecord, RecordKind, SegmentHeader, Uuid};
use crate::segment::SegmentScanner;
use crate::storage::{Disk, Storage};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// What an upgrade did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Upgraded {
    /// Segments rewritten from version 1.
    pub segments: u64,
    /// Records they held.
    pub records: u64,
    /// Writes of all-zero data that became zero extents.
    pub zero_writes: u64,
    /// Bytes of segments before and after.
    pub bytes_before: u64,
    /// Bytes of segments after.
    pub bytes_after: u64,
}

/// Upgrades the journal in `dir`, whose volume image is `base`, to format version 2.
/// Upgrading a version-2 journal does nothing.
pub fn upgrade(dir: &Path, base: &Path) -> Result<Upgraded, JournalError> {
    upgrade_with(dir, base, &Disk)
}

/// [`upgrade`] with its writes, syncs and renames going through `storage` (the crash
/// simulator's seam).
pub fn upgrade_with(
    dir: &Path,
    base: &Path,
    storage: &dyn Storage,
) -> Result<Upgraded, JournalError> {
    use sealvm_os::lock::{lock_file, LockFileError, LockMode, Wait};
    let lock_path = dir.join(dir::SERVE_LOCK_NAME);
    let _lock = lock_file(&lock_path, LockMode::Exclusive, Wait::NoWait).map_err(|e| match e {
        LockFileError::Held { path } => JournalError::Io {
            source: io::Error::other(format!(
                "{} is locked by another process: stop the sealvm-blk that serves this journal",
                path.display()
            )),
            path,
        },
        LockFileError::Open { path, source } | LockFileError::Lock { path, source } => {
            JournalError::Io { path, source }
        }
    })?;
    let mut state = dir::read_state(dir)?;
    let identity = match state.identity {
        Some(identity) => identity,
        None => {
            let image = File::open(base).map_err(JournalError::io(base))?;
            let volume_bytes = image.metadata().map_err(JournalError::io(base))?.len();
            let random = |_| JournalError::Io {
                path: dir.to_path_buf(),
                source: io::Error::other("no randomness for a journal UUID"),
            };
            let identity = Identity {
                journal: Uuid::random().map_err(random)?,
                volume: Uuid::random().map_err(random)?,
                volume_bytes,
                sector_bytes: format::SECTOR_BYTES,
            };
            state = JournalState {
                version: format::VERSION,
                identity: Some(identity),
                base_fingerprint: Some(dir::fingerprint(&image, base)?),
                ..state
            };
            dir::write_state_with(storage, dir, &state)?;
            identity
        }
    };
    dir::check_base(dir, base, &state)?;
    let mut report = Upgraded::default();
    let mut last_seq = None;
    for (first_seq, path) in dir::segments(dir)? {
        let opened = dir::open_segment(&path, first_seq, Some(&identity), false)?;
        let before = opened
            .file
            .metadata()
            .map_err(JournalError::io(&path))?
            .len();
        report.bytes_before += before;
        if opened.version != 1 {
            report.bytes_after += before;
            last_seq = None;
            continue;
        }
        if let Some(last) = last_seq {
            if first_seq != last + 1 {
                return Err(JournalError::Gap {
                    path,
                    offset: 0,
                    seq: last + 1,
                });
            }
        }
        let (records, zero_writes, after, last) =
            rewrite_segment(storage, &path, opened.file, first_seq, &identity)?;
        report.segments += 1;
        report.records += records;
        report.zero_writes += zero_writes;
        report.bytes_after += after;
        last_seq = Some(last);
    }
    tracing::info!(
        journal = %dir.display(),
        segments = report.segments,
        records = report.records,
        "journal upgraded to format version 2"
    );
    Ok(report)
}

/// Rewrites one version-1 segment as version 2; returns (records, zero writes, new bytes,
/// last seq).
fn rewrite_segment(
    storage: &dyn Storage,
    path: &Path,
    old: File,
    first_seq: u64,
    identity: &Identity,
) -> Result<(u64, u64, u64, u64), JournalError> {
    let tmp = path.with_extension("svj.upgrade");
    let mut out = Vec::new();
    out.extend_from_slice(&format::encode_segment_header(&SegmentHeader {
        identity: *identity,
        first_seq,
    }));
    let mut scanner = SegmentScanner::new(&old, 1, 0, first_seq - 1);
    let (mut records, mut zero_writes) = (0, 0);
    let segment_err = |e| match e {
        crate::segment::SegmentError::Io(source) => JournalError::Io {
            path: path.to_path_buf(),
            source,
        },
        crate::segment::SegmentError::Corrupt {
            offset,
            seq,
            next_valid,
        } => JournalError::Corrupt {
            path: path.to_path_buf(),
            offset,
            seq,
            next_valid,
        },
        crate::segment::SegmentError::UnknownKind {
            offset,
            seq,
            source,
        } => JournalError::UnknownKind {
            path: path.to_path_buf(),
            offset,
            seq,
            source,
        },
    };
    while let Some((header, _)) = scanner.next_record().map_err(segment_err)? {
        let payload = scanner.payload();
        let mut record = NewRecord {
            kind: header.kind,
            seq: header.seq,
            time_ns: header.time_ns,
            offset: header.offset,
            flags: 0,
        };
        let len_bytes;
        let end_bytes;
        let payload: &[u8] = match header.kind {
            RecordKind::Write if payload.iter().all(|&b| b == 0) => {
                record.kind = RecordKind::ZeroExtent;
                zero_writes += 1;
                len_bytes = (payload.len() as u64).to_le_bytes();
                &len_bytes
            }
            RecordKind::Sync => {
                end_bytes = (out.len() as u64).to_le_bytes();
                &end_bytes
            }
            _ => payload,
        };
        if !header.is_annotation() {
            records += 1;
        }
        out.extend_from_slice(&format::encode(&record, payload));
    }
    let last_seq = scanner.summary().last_seq;
    let write = || -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        storage.write_at(&tmp, &file, &out, 0)?;
        storage.sync_data(&tmp, &file)?;
        storage.rename(&tmp, path)?;
        storage.sync_dir(&sealvm_os::durable::parent_dir(path))
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok((records, zero_writes, out.len() as u64, last_seq))
}
