//! Points in time: naming one (`--at`), and materializing a volume as it was at one from its
//! base image and journal. A consumer of the journal only: it never touches a running
//! device.

use crate::journal::format::RecordKind;
use crate::journal::{self, JournalError};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
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

    /// `latest`, a sequence number (`1234`), a Unix time (`@1732500000.25`), or a bookmark
    /// name.
    fn from_str(text: &str) -> Result<Self, PitError> {
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
    #[error("{0:?} is not a point in time (use latest, a sequence number, @UNIX_SECONDS or a bookmark name)")]
    BadPoint(String),
    /// No bookmark has that name.
    #[error("the journal has no bookmark named {0:?}")]
    NoSuchBookmark(String),
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
    /// Writing the target failed.
    #[error("cannot write the restored volume {path}")]
    Write {
        /// The target.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
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
    /// Bookmarks within reach, oldest first.
    pub bookmarks: Vec<journal::Bookmark>,
}

/// Reads how far back the journal in `journal_dir` reaches, holding its history meanwhile.
pub fn points(journal_dir: &Path) -> Result<Points, PitError> {
    if !journal_dir.is_dir() {
        return Err(PitError::NotAJournal(journal_dir.to_path_buf()));
    }
    let _hold = journal::hold_history(journal_dir)?;
    let base_seq = journal::read_state(journal_dir)?.base_seq;
    let mut bookmarks = Vec::new();
    let mut oldest_time_ns = None;
    let summary = journal::scan(journal_dir, |header, _, payload| {
        if header.seq > base_seq {
            oldest_time_ns.get_or_insert(header.time_ns);
            if header.kind == RecordKind::Bookmark {
                bookmarks.push(journal::Bookmark {
                    name: String::from_utf8_lossy(payload).into_owned(),
                    seq: header.seq,
                    time_ns: header.time_ns,
                });
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
        bookmarks,
    })
}

/// Resolves `point` to the last sequence number it includes. A point older than the folded
/// history is [`PitError::FoldedAway`].
pub fn resolve(journal_dir: &Path, point: &PointInTime) -> Result<u64, PitError> {
    let _hold = journal::hold_history(journal_dir)?;
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
    let mut found = None;
    let summary = journal::scan(journal_dir, |header, _, payload| match point {
        PointInTime::Bookmark(name) => {
            if header.kind == RecordKind::Bookmark && payload == name.as_bytes() {
                found = Some(header.seq);
            }
            true
        }
        PointInTime::Time(t) => {
            if header.time_ns <= *t {
                found = Some(header.seq);
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
        PointInTime::Bookmark(name) => found.ok_or_else(|| PitError::NoSuchBookmark(name.clone())),
        PointInTime::Time(_) => Ok(found.unwrap_or(0)),
    }
}

/// Writes the volume as it was after record `seq` to `to`: a copy of the base (the folded
/// base once history has been folded) with every journaled write up to `seq` applied. The file appears only when complete (written to a
/// temporary name, fdatasync'ed, renamed). `progress` is called with (records applied, of).
pub fn restore(
    base: &Path,
    journal_dir: &Path,
    seq: u64,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), PitError> {
    let write_err = |source| PitError::Write {
        path: to.to_path_buf(),
        source,
    };
    std::fs::metadata(base).map_err(|source| PitError::Base {
        path: base.to_path_buf(),
        source,
    })?;
    let _hold = journal::hold_history(journal_dir)?;
    let base_seq = journal::read_state(journal_dir)?.base_seq;
    if seq < base_seq {
        return Err(PitError::FoldedAway {
            asked: seq,
            base_seq,
        });
    }
    let base = journal::effective_base(journal_dir, base);
    let partial = to.with_extension("partial");
    let result = restore_into(&base, journal_dir, seq, &partial, &mut progress);
    if result.is_err() {
        // A half-built image is of no use; leave nothing behind but the error.
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(|e| match e {
        RestoreFailure::Journal(e) => PitError::Journal(e),
        RestoreFailure::Write(source) => write_err(source),
    })?;
    std::fs::rename(&partial, to).map_err(write_err)?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

enum RestoreFailure {
    Journal(JournalError),
    Write(io::Error),
}

/// Copies `base` to `partial` and applies the journal up to `seq`, fdatasync'ed.
fn restore_into(
    base: &Path,
    journal_dir: &Path,
    seq: u64,
    partial: &Path,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), RestoreFailure> {
    std::fs::copy(base, partial).map_err(RestoreFailure::Write)?;
    let target = OpenOptions::new()
        .write(true)
        .open(partial)
        .map_err(RestoreFailure::Write)?;
    let first = journal::segments(journal_dir)
        .map_err(RestoreFailure::Journal)?
        .first()
        .map_or(1, |&(first, _)| first);
    let total = (seq + 1).saturating_sub(first);
    let mut failure = None;
    let mut applied = 0;
    journal::scan(journal_dir, |header, _, payload| {
        if header.seq > seq {
            return false;
        }
        if header.kind == RecordKind::Write {
            if let Err(e) = target.write_all_at(payload, header.offset) {
                failure = Some(e);
                return false;
            }
        }
        applied += 1;
        if applied % 1024 == 0 || applied == total {
            progress(applied, total);
        }
        true
    })
    .map_err(RestoreFailure::Journal)?;
    if let Some(e) = failure {
        return Err(RestoreFailure::Write(e));
    }
    target.sync_all().map_err(RestoreFailure::Write)
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

    #[test]
    fn restore_refuses_a_journal_damaged_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 8 * 512]).unwrap();
        let journal = dir.path().join("j");
        {
            let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
            volume.write_at(0, &[1; 512]).unwrap();
            volume.write_at(512, &[2; 512]).unwrap();
            volume.bookmark("after").unwrap();
        }
        let segment = journal::segment_path(&journal, 1);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[100] ^= 1; // inside the first record's payload
        std::fs::write(&segment, &bytes).unwrap();
        let corrupt = |e: &PitError| {
            matches!(
                e,
                PitError::Journal(JournalError::Corrupt { offset: 0, .. })
            )
        };
        let err = resolve(&journal, &PointInTime::Latest).unwrap_err();
        assert!(corrupt(&err), "{err}");
        let out = dir.path().join("out.raw");
        let err = restore(&base, &journal, 1, &out, |_, _| {}).unwrap_err();
        assert!(corrupt(&err), "{err}");
        assert!(!out.exists() && !out.with_extension("partial").exists());
        let err = crate::image_access::PointInTimeImage::open(&base, &journal, 1, false)
            .err()
            .expect("expose of a damaged journal opened");
        assert!(err.to_string().contains("damaged at byte 0"), "{err}");
    }
}
