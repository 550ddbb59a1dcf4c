//! Points in time: naming one (`--at`), and materializing a volume as it was at one from its
//! base image and journal. A consumer of the journal only: it never touches a running
//! device. Version-1 journals are read too (read-only: serving one needs
//! `sealvm-blk journal upgrade`).

use crate::journal::{self, Bookmark, JournalError};
use sealvm_journal::consumer::{self, Consumer, ConsumerError, ReaderHold};
use sealvm_journal::extent_map::{ExtentMap, Source, SECTOR};
use sealvm_journal::format::{self, RecordKind};
use sealvm_journal::reader::Reader;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A point in time in a volume's history.
#[derive(Debug, Clone, PartialEq)]
pub enum PointInTime {
    /// After the record with this sequence number.
    Seq(u64),
    /// At this bookmark.
    Bookmark(String),
    /// After the last record written at or before this time (nanoseconds since the epoch).
    Time(u64),
    /// After the last valid record.
    Latest,
}

impl std::str::FromStr for PointInTime {
    type Err = PitError;

    /// `latest`, a sequence number (`1234`), a Unix time (`@1732500000.25`),
    /// `bookmark:NAME`, or a bare bookmark name (bookmarks cannot be named like the others,
    /// see [`journal::bookmark::check_name`]).
    fn from_str(text: &str) -> Result<Self, PitError> {
        if let Some(name) = text.strip_prefix(journal::bookmark::PREFIX) {
            if name.is_empty() {
                return Err(PitError::BadPoint(text.into()));
            }
            return Ok(PointInTime::Bookmark(name.into()));
        }
        if text == "latest" {
            return Ok(PointInTime::Latest);
        }
        if let Some(time) = text.strip_prefix('@') {
            let seconds: f64 = time.parse().map_err(|_| PitError::BadPoint(text.into()))?;
            if !seconds.is_finite() || seconds < 0.0 {
                return Err(PitError::BadPoint(text.into()));
            }
            return Ok(PointInTime::Time((seconds * 1e9) as u64));
        }
        if let Ok(seq) = text.parse() {
            return Ok(PointInTime::Seq(seq));
        }
        if text.is_empty() {
            return Err(PitError::BadPoint(text.into()));
        }
        Ok(PointInTime::Bookmark(text.into()))
    }
}

/// Errors finding or restoring a point in time.
#[derive(Debug, thiserror::Error)]
pub enum PitError {
    /// The directory is not a journal.
    #[error("{0} is not a journal directory")]
    NotAJournal(PathBuf),
    /// `--at` could not be understood.
    #[error("{0:?} is not a point in time (use latest, a sequence number, @UNIX_SECONDS, bookmark:NAME or a bookmark name)")]
    BadPoint(String),
    /// No bookmark has that name.
    #[error("the journal has no bookmark named {0:?}")]
    NoSuchBookmark(String),
    /// Several bookmarks have that name (a journal written before names had to be unique).
    #[error(
        "the journal has {} bookmarks named {name:?} (seqs {seqs:?}); name the point by its \
         sequence number instead", seqs.len()
    )]
    AmbiguousBookmark {
        /// The name.
        name: String,
        /// The seqs of the bookmarks with that name.
        seqs: Vec<u64>,
    },
    /// The sequence number is beyond the journal.
    #[error("sequence number {asked} is beyond the journal's last record {last}")]
    BeyondJournal {
        /// Asked for.
        asked: u64,
        /// The last record.
        last: u64,
    },
    /// The point lies in history that retention has folded away.
    #[error(
        "sequence number {asked} is older than the journal reaches: history up to seq {base_seq} \
         has been folded into the base (retention); the oldest point in time is {base_seq}"
    )]
    FoldedAway {
        /// Asked for.
        asked: u64,
        /// The last folded sequence number, the oldest point left.
        base_seq: u64,
    },
    /// Reading the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The base image could not be read.
    #[error("cannot read the base image {path}")]
    Base {
        /// The base image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the target failed (the cause names the file and the step).
    #[error("cannot write the restored volume")]
    Write(#[source] sealvm_os::durable::ReplaceError),
}

/// How far back a journal reaches: what `pit list` and the API's `points` show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Points {
    /// The oldest point in time (history before it is folded into the base).
    pub oldest_seq: u64,
    /// The newest point in time.
    pub last_seq: u64,
    /// Records between the two.
    pub records: u64,
    /// History up to here is folded into the base (0: nothing folded).
    pub folded_through_seq: u64,
    /// Time of the oldest record within reach, if any.
    pub oldest_time_ns: Option<u64>,
    /// Time of the newest record.
    pub newest_time_ns: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes of valid records.
    pub journal_bytes: u64,
    /// Bytes of a torn last record (cut off when the volume is next served).
    pub torn_tail_bytes: u64,
    /// The journal's format version (1: read-only until upgraded).
    pub format_version: u16,
    /// Bookmarks within reach, oldest first.
    pub bookmarks: Vec<Bookmark>,
    /// Named consumers (replication, backups): how far each has consumed, and whether
    /// it was marked for resync because the journal passed its consumer budget.
    pub consumers: Vec<Consumer>,
}

/// Reads how far back the journal in `journal_dir` reaches, holding its history meanwhile.
pub fn points(journal_dir: &Path) -> Result<Points, PitError> {
    if !journal_dir.is_dir() {
        return Err(PitError::NotAJournal(journal_dir.to_path_buf()));
    }
    let _hold = hold_oldest(journal_dir)?;
    let state = journal::read_state(journal_dir)?;
    let base_seq = state.base_seq;
    let mut bookmarks = Vec::new();
    let mut oldest_time_ns = None;
    let summary = journal::scan(journal_dir, |header, _, payload| {
        if header.seq > base_seq {
            oldest_time_ns.get_or_insert(header.time_ns);
            if header.kind == RecordKind::Bookmark {
                bookmarks.push(Bookmark::from_record(header, payload));
            }
        }
        true
    })?;
    let last_seq = summary.last_seq.max(base_seq);
    Ok(Points {
        oldest_seq: base_seq,
        last_seq,
        records: last_seq - base_seq,
        folded_through_seq: base_seq,
        oldest_time_ns,
        newest_time_ns: summary.last_time_ns,
        segments: journal::segments(journal_dir)?.len(),
        journal_bytes: summary.bytes,
        torn_tail_bytes: summary.dropped_len,
        format_version: state.version,
        bookmarks,
        consumers: consumer::list(journal_dir).map_err(consumer_error)?,
    })
}

/// Resolves `point` to the last sequence number it includes. A point older than the folded
/// history is [`PitError::FoldedAway`].
pub fn resolve(journal_dir: &Path, point: &PointInTime) -> Result<u64, PitError> {
    let _hold = hold_oldest(journal_dir)?;
    let base_seq = journal::read_state(journal_dir)?.base_seq;
    let seq = resolve_in(journal_dir, point)?;
    if seq < base_seq {
        return Err(PitError::FoldedAway {
            asked: seq,
            base_seq,
        });
    }
    Ok(seq)
}

fn resolve_in(journal_dir: &Path, point: &PointInTime) -> Result<u64, PitError> {
    let mut found = Vec::new();
    let summary = journal::scan(journal_dir, |header, _, payload| match point {
        PointInTime::Bookmark(name) => {
            if header.kind == RecordKind::Bookmark && payload == name.as_bytes() {
                found.push(header.seq);
            }
            true
        }
        PointInTime::Time(t) => {
            if header.time_ns <= *t {
                found = vec![header.seq];
                true
            } else {
                false
            }
        }
        PointInTime::Seq(_) | PointInTime::Latest => true,
    })?;
    let base_seq = journal::read_state(journal_dir)?.base_seq;
    let last_seq = summary.last_seq.max(base_seq);
    match point {
        PointInTime::Latest => Ok(last_seq),
        PointInTime::Seq(seq) if *seq > last_seq => Err(PitError::BeyondJournal {
            asked: *seq,
            last: last_seq,
        }),
        PointInTime::Seq(seq) => Ok(*seq),
        PointInTime::Bookmark(name) => match found[..] {
            [] => Err(PitError::NoSuchBookmark(name.clone())),
            [seq] => Ok(seq),
            _ => Err(PitError::AmbiguousBookmark {
                name: name.clone(),
                seqs: found,
            }),
        },
        PointInTime::Time(_) => Ok(found.first().copied().unwrap_or(0)),
    }
}

/// The map of a volume at `seq`: for each extent, its newest data at or before `seq`;
/// sources name segments by their index in the returned list of segment files.
pub fn map_at(journal_dir: &Path, seq: u64) -> Result<(ExtentMap, Vec<File>), PitError> {
    let mut map = ExtentMap::new();
    let mut files: Vec<File> = Vec::new();
    let mut names: Vec<u64> = Vec::new();
    let mut reader = Reader::open(journal_dir)?;
    while let Some((header, at)) = reader.next_record()? {
        if header.seq > seq {
            break;
        }
        if names.last() != Some(&at.segment) {
            let path = journal::segment_path(journal_dir, at.segment);
            files.push(File::open(&path).map_err(|source| JournalError::Io { path, source })?);
            names.push(at.segment);
        }
        let ordinal = (names.len() - 1) as u32;
        let (len, source) = match header.kind {
            RecordKind::Write => (
                u64::from(header.len),
                Source::Data {
                    segment: ordinal,
                    offset: (at.offset + format::HEADER_LEN as u64) as u32,
                },
            ),
            RecordKind::ZeroExtent => (
                format::zero_extent_len(&header, reader.payload()).unwrap_or(0),
                Source::Zero { segment: ordinal },
            ),
            _ => continue,
        };
        map.insert(header.offset / SECTOR, len / SECTOR, source);
    }
    Ok((map, files))
}

/// Writes the volume as it was after record `seq` to `to`: a copy of the base (the folded
/// base once history has been folded) with the newest data of every extent at `seq`
/// written over it, each sector once. The file appears only when complete, through
/// [`sealvm_os::durable::replace_stream`] (temporary file, fdatasync, rename, directory
/// fsync; a failure of any step is returned). `progress` is called with (extents written,
/// of).
pub fn restore(
    base: &Path,
    journal_dir: &Path,
    seq: u64,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), PitError> {
    let base_meta = std::fs::metadata(base).map_err(|source| PitError::Base {
        path: base.to_path_buf(),
        source,
    })?;
    let _hold = hold(journal_dir, seq)?;
    let state = journal::read_state(journal_dir)?;
    sealvm_journal::dir::check_base(journal_dir, base, &state)?;
    let base = journal::effective_base(journal_dir, base);
    let (map, files) = map_at(journal_dir, seq)?;
    let mode = base_meta.permissions().mode() & 0o7777;
    sealvm_os::durable::replace_stream(to, mode, |target| {
        restore_into(&base, &map, &files, target, &mut progress)
    })
    .map_err(PitError::Write)
}

/// A reader's hold at `seq` on the journal in `journal_dir`: folding does not pass it while
/// it lives. A journal directory that does not exist needs none.
pub fn hold(journal_dir: &Path, seq: u64) -> Result<Option<ReaderHold>, PitError> {
    if !journal_dir.is_dir() {
        return Ok(None);
    }
    ReaderHold::take(journal_dir, seq)
        .map(Some)
        .map_err(consumer_error)
}

/// A reader's hold on the whole history still in reach of the journal in `journal_dir`.
fn hold_oldest(journal_dir: &Path) -> Result<Option<ReaderHold>, PitError> {
    if !journal_dir.is_dir() {
        return Ok(None);
    }
    ReaderHold::take_oldest(journal_dir)
        .map(Some)
        .map_err(consumer_error)
}

/// A consumer error as a point-in-time error.
fn consumer_error(e: ConsumerError) -> PitError {
    match e {
        ConsumerError::Journal(e) => PitError::Journal(e),
        ConsumerError::FoldedAway { asked, base_seq } => PitError::FoldedAway { asked, base_seq },
        other => PitError::Journal(JournalError::BadState {
            path: PathBuf::from(consumer::CONSUMERS_DIR),
            reason: other.to_string(),
        }),
    }
}

/// Copies `base` into `target` and writes the extents of `map` over it.
fn restore_into(
    base: &Path,
    map: &ExtentMap,
    files: &[File],
    target: &mut File,
    progress: &mut impl FnMut(u64, u64),
) -> io::Result<()> {
    io::copy(&mut File::open(base)?, target)?;
    let total = map.len() as u64;
    let mut buf = Vec::new();
    for (done, extent) in map.iter().enumerate() {
        let at = extent.start * SECTOR;
        // Extents are written in pieces of at most 1 MiB, so a zero extent of the whole
        // device needs no more memory than a small one.
        let mut written = 0;
        let len = extent.sectors * SECTOR;
        while written < len {
            let n = (len - written).min(1 << 20);
            buf.resize(n as usize, 0);
            match extent.source {
                Source::Zero { .. } => buf.fill(0),
                Source::Data { segment, offset } => {
                    files[segment as usize].read_exact_at(&mut buf, u64::from(offset) + written)?
                }
            }
            target.write_all_at(&buf, at + written)?;
            written += n;
        }
        let done = done as u64 + 1;
        if done % 1024 == 0 || done == total {
            progress(done, total);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::JournaledVolume;
    use sealvm_virtio_blk::BlockBackend;

    #[test]
    fn points_in_time_parse() {
        assert_eq!(
            "latest".parse::<PointInTime>().unwrap(),
            PointInTime::Latest
        );
        assert_eq!("42".parse::<PointInTime>().unwrap(), PointInTime::Seq(42));
        assert_eq!(
            "@2.5".parse::<PointInTime>().unwrap(),
            PointInTime::Time(2_500_000_000)
        );
        assert_eq!(
            "before".parse::<PointInTime>().unwrap(),
            PointInTime::Bookmark("before".into())
        );
        assert_eq!(
            "bookmark:42".parse::<PointInTime>().unwrap(),
            PointInTime::Bookmark("42".into())
        );
        assert!("bookmark:".parse::<PointInTime>().is_err());
        assert!("@x".parse::<PointInTime>().is_err());
        assert!("@-1".parse::<PointInTime>().is_err());
    }

    #[test]
    fn restore_at_seq_bookmark_and_time_matches_captured_images() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 8 * 512]).unwrap();
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
        let capture = |volume: &JournaledVolume| {
            let mut image = vec![0u8; 8 * 512];
            volume.read_at(0, &mut image).unwrap();
            image
        };
        volume.write_at(0, &[1; 1024]).unwrap();
        let after_first = capture(&volume);
        let bookmark = volume.bookmark("mid").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let time_mid = journal::now_ns();
        std::thread::sleep(std::time::Duration::from_millis(5));
        volume.write_at(512, &[2; 2048]).unwrap();
        volume.write_at(3072, &[3; 512]).unwrap();
        let latest = capture(&volume);
        volume.flush().unwrap();

        let restored = |point: PointInTime| {
            let seq = resolve(&journal, &point).unwrap();
            let out = dir.path().join("out.raw");
            restore(&base, &journal, seq, &out, |_, _| {}).unwrap();
            std::fs::read(&out).unwrap()
        };
        assert_eq!(restored(PointInTime::Seq(1)), after_first);
        assert_eq!(restored(PointInTime::Bookmark("mid".into())), after_first);
        assert_eq!(
            resolve(&journal, &PointInTime::Bookmark("mid".into())).unwrap(),
            bookmark.seq
        );
        assert_eq!(restored(PointInTime::Time(time_mid)), after_first);
        assert_eq!(restored(PointInTime::Latest), latest);
        assert_eq!(restored(PointInTime::Seq(0)), vec![0u8; 8 * 512]);
        assert!(matches!(
            resolve(&journal, &PointInTime::Bookmark("nope".into())),
            Err(PitError::NoSuchBookmark(_))
        ));
        assert!(matches!(
            resolve(&journal, &PointInTime::Seq(99)),
            Err(PitError::BeyondJournal { .. })
        ));
    }

    /// An 8-sector zeroed base in `dir` and a journal ("j") holding one sector write of
    /// `fill` per entry of `fills` (sector i gets fills[i]), then a bookmark "after".
    fn journaled(dir: &Path, fills: &[u8]) -> (PathBuf, PathBuf) {
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 8 * 512]).unwrap();
        let journal = dir.join("j");
        let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
        for (sector, fill) in fills.iter().enumerate() {
            volume.write_at(sector as u64 * 512, &[*fill; 512]).unwrap();
        }
        volume.bookmark("after").unwrap();
        (base, journal)
    }

    #[test]
    fn restore_refuses_a_journal_damaged_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let (base, journal) = journaled(dir.path(), &[1, 2]);
        let segment = journal::segment_path(&journal, 1);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[64 + 100] ^= 1; // inside the first record's payload (after the segment header)
        std::fs::write(&segment, &bytes).unwrap();
        let corrupt = |e: &PitError| {
            matches!(
                e,
                PitError::Journal(JournalError::Corrupt { offset: 64, .. })
            )
        };
        let err = resolve(&journal, &PointInTime::Latest).unwrap_err();
        assert!(corrupt(&err), "{err}");
        let out = dir.path().join("out.raw");
        let err = restore(&base, &journal, 1, &out, |_, _| {}).unwrap_err();
        assert!(corrupt(&err), "{err}");
        assert!(!out.exists());
        assert_no_temporary_files(dir.path());
        let err = crate::image_access::PointInTimeImage::open(&base, &journal, 1, false)
            .err()
            .expect("expose of a damaged journal opened");
        assert!(err.to_string().contains("damaged at byte 64"), "{err}");
    }

    /// Only the fixture's own files: a failed restore leaves no temporary file behind.
    fn assert_no_temporary_files(dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name();
            let name = name.to_string_lossy();
            assert!(!name.starts_with('.'), "temporary file {name} left behind");
        }
    }

    /// A directory fsync cannot be made to fail for real, so this arms the failpoint seam
    /// of `sealvm_os::durable` (feature `failpoints`, on for this crate's tests).
    #[test]
    fn restore_returns_a_failed_directory_sync() {
        use sealvm_os::durable::{failpoint, Step};
        let dir = tempfile::tempdir().unwrap();
        let (base, journal) = journaled(dir.path(), &[7]);
        let out = dir.path().join("out.raw");
        failpoint::fail_next(Step::SyncDir);
        let err = restore(&base, &journal, 1, &out, |_, _| {}).unwrap_err();
        failpoint::clear();
        match &err {
            PitError::Write(replace) => assert_eq!(replace.step, Step::SyncDir, "{err}"),
            other => panic!("not a write error: {other}"),
        }
        // Without the failpoint the same restore succeeds and holds the journal's data.
        restore(&base, &journal, 1, &out, |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap()[..512], [7; 512]);
        assert_no_temporary_files(dir.path());
    }
}
