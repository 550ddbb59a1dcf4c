//! A journaled volume: the base image, which sealvm-blk never writes, plus the journal,
//! which holds every write since. Reads see the newest journaled data for each sector and
//! the base image elsewhere, through an in-memory index built by replaying the journal on
//! open. See vhost-blk/DESIGN.md for why this is crash-safe.

use crate::journal::format::{self, RecordKind, HEADER_LEN};
use crate::journal::{self, Bookmark, JournalError};
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const SECTOR: u64 = 512;

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The base image could not be opened.
    #[error(transparent)]
    Base(#[from] sealvm_virtio_blk::backend::RawFileError),
    /// The journal could not be opened, read or repaired.
    #[error("cannot open the journal in {dir}")]
    Journal {
        /// The journal directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process serves this journal.
    #[error("journal {dir} is in use by another sealvm-blk")]
    JournalLocked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// Replaying the journal failed.
    #[error(transparent)]
    Replay(#[from] JournalError),
}

/// Counters a volume keeps for the API.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    /// Write records appended.
    pub writes: AtomicU64,
    /// Bytes written by the guest.
    pub bytes_written: AtomicU64,
    /// Flushes (fdatasync of the journal).
    pub flushes: AtomicU64,
    /// fdatasyncs of the journal for any reason: flushes, write-through writes, bookmarks.
    pub syncs: AtomicU64,
}

/// The oldest point in time a journal still reaches back to: its first record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OldestPoint {
    /// The record's sequence number.
    pub seq: u64,
    /// When it was written, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

struct Tail {
    /// Byte offset where the next record goes.
    end: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    /// Sector number to the offset of its newest data in the segment.
    index: HashMap<u64, u64>,
    bookmarks: Vec<Bookmark>,
    /// The first record still in the journal, `None` while it is empty.
    oldest: Option<OldestPoint>,
}

/// A volume served from a base image and its journal.
pub struct JournaledVolume {
    base: RawFile,
    segment: File,
    dir: PathBuf,
    tail: Mutex<Tail>,
    write_through: bool,
    id: Vec<u8>,
    /// Counters for the API.
    pub counters: VolumeCounters,
}

/// How many bytes of torn tail were dropped when a journal was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Records replayed.
    pub records: u64,
    /// Bytes after the last valid record that were cut off.
    pub dropped_bytes: u64,
}

impl JournaledVolume {
    /// Opens the base image (read-only; it is never written) and the journal in `dir`
    /// (created if missing), replays the journal and cuts off a torn tail.
    pub fn open(
        base: &Path,
        dir: &Path,
        write_through: bool,
    ) -> Result<(Self, Opened), VolumeError> {
        let journal_err = |source| VolumeError::Journal {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(journal_err)?;
        let base_file = RawFile::open(base, true)?;
        let segment = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(journal::segment_path(dir))
            .map_err(journal_err)?;
        // SAFETY: flock only reads the descriptor, which `segment` keeps open.
        if unsafe { libc::flock(segment.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(VolumeError::JournalLocked {
                dir: dir.to_path_buf(),
            });
        }
        let mut index = HashMap::new();
        let mut bookmarks = Vec::new();
        let summary = journal::scan(dir, |header, at, payload| {
            match header.kind {
                RecordKind::Write => {
                    let first = header.offset / SECTOR;
                    for i in 0..u64::from(header.len) / SECTOR {
                        index.insert(first + i, at + HEADER_LEN as u64 + i * SECTOR);
                    }
                }
                RecordKind::Bookmark => bookmarks.push(Bookmark {
                    name: String::from_utf8_lossy(payload).into_owned(),
                    seq: header.seq,
                    time_ns: header.time_ns,
                }),
            }
            true
        })?;
        if summary.dropped_len > 0 {
            tracing::warn!(
                dir = %dir.display(),
                dropped_bytes = summary.dropped_len,
                "journal ends in a torn or corrupt record; cutting it off"
            );
            segment.set_len(summary.valid_len).map_err(journal_err)?;
            segment.sync_all().map_err(journal_err)?;
        }
        let mut id = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .into_bytes();
        id.truncate(sealvm_virtio_blk::DEVICE_ID_LEN);
        let volume = JournaledVolume {
            base: base_file,
            segment,
            dir: dir.to_path_buf(),
            tail: Mutex::new(Tail {
                end: summary.valid_len,
                next_seq: summary.last_seq + 1,
                index,
                bookmarks,
                oldest: (summary.records > 0).then_some(OldestPoint {
                    seq: summary.last_seq + 1 - summary.records,
                    time_ns: summary.first_time_ns,
                }),
            }),
            write_through,
            id,
            counters: VolumeCounters::default(),
        };
        Ok((
            volume,
            Opened {
                records: summary.records,
                dropped_bytes: summary.dropped_len,
            },
        ))
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> &Path {
        &self.dir
    }

    fn tail(&self) -> io::Result<std::sync::MutexGuard<'_, Tail>> {
        self.tail
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))
    }

    fn append(
        &self,
        tail: &mut Tail,
        kind: RecordKind,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let seq = tail.next_seq;
        let time_ns = journal::now_ns();
        let record = format::encode(kind, seq, time_ns, offset, payload);
        self.segment.write_all_at(&record, tail.end)?;
        if kind == RecordKind::Write {
            let first = offset / SECTOR;
            for i in 0..payload.len() as u64 / SECTOR {
                tail.index
                    .insert(first + i, tail.end + HEADER_LEN as u64 + i * SECTOR);
            }
        }
        tail.end += record.len() as u64;
        tail.next_seq += 1;
        tail.oldest.get_or_insert(OldestPoint { seq, time_ns });
        Ok(seq)
    }

    /// Appends a bookmark and makes it (and every write before it) durable; returns it.
    pub fn bookmark(&self, name: &str) -> io::Result<Bookmark> {
        if name.is_empty() || name.len() > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bookmark name is 1 to 256 bytes",
            ));
        }
        let mut tail = self.tail()?;
        let seq = self.append(&mut tail, RecordKind::Bookmark, 0, name.as_bytes())?;
        self.sync()?;
        let bookmark = Bookmark {
            name: name.into(),
            seq,
            time_ns: journal::now_ns(),
        };
        tail.bookmarks.push(bookmark.clone());
        Ok(bookmark)
    }

    /// Bookmarks made so far.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        self.tail().map(|t| t.bookmarks.clone()).unwrap_or_default()
    }

    /// The oldest point in time the journal reaches back to, `None` while it is empty.
    pub fn oldest_point(&self) -> Option<OldestPoint> {
        self.tail().ok().and_then(|t| t.oldest)
    }

    fn sync(&self) -> io::Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        self.segment.sync_data()
    }

    /// Size of the journal in bytes and the last sequence number.
    pub fn journal_position(&self) -> (u64, u64) {
        self.tail()
            .map(|t| (t.end, t.next_seq - 1))
            .unwrap_or((0, 0))
    }
}

impl BlockBackend for JournaledVolume {
    fn capacity_bytes(&self) -> u64 {
        self.base.capacity_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.base.read_at(offset, buf)?;
        let tail = self.tail()?;
        if tail.index.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR;
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            if let Some(&at) = tail.index.get(&(first + i as u64)) {
                self.segment.read_exact_at(sector, at)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut tail = self.tail()?;
        self.append(&mut tail, RecordKind::Write, offset, buf)?;
        drop(tail);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if self.write_through {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Every write acknowledged before this flush is already in the segment file.
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Discarded sectors may read back as anything; journaling zeroes keeps every point
        // in time exact.
        self.write_zeroes(offset, len, false)
    }

    fn device_id(&self) -> &[u8] {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, sectors: u64) -> PathBuf {
        let path = dir.join("base.raw");
        std::fs::write(&path, vec![0x11u8; (sectors * SECTOR) as usize]).unwrap();
        path
    }

    #[test]
    fn reads_see_journaled_writes_over_the_untouched_base() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let (volume, _) = JournaledVolume::open(&base_path, &dir.path().join("j"), false).unwrap();
        volume.write_at(1024, &[0xaa; 1024]).unwrap();
        volume.write_at(1536, &[0xbb; 512]).unwrap();
        volume.flush().unwrap();
        let mut buf = vec![0u8; 4 * 512];
        volume.read_at(512, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[0x11; 512][..]);
        assert_eq!(&buf[512..1024], &[0xaa; 512][..]);
        assert_eq!(&buf[1024..1536], &[0xbb; 512][..]);
        assert_eq!(&buf[1536..], &[0x11; 512][..]);
        assert!(
            std::fs::read(&base_path)
                .unwrap()
                .iter()
                .all(|&b| b == 0x11),
            "base was written"
        );
    }

    #[test]
    fn reopening_replays_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        {
            let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
            volume.write_at(0, &[1; 512]).unwrap();
            volume.bookmark("one").unwrap();
            volume.write_at(0, &[2; 512]).unwrap();
            volume.flush().unwrap();
        }
        // A crash in the middle of the next record: half a header and some data.
        let segment = journal::segment_path(&journal);
        let good_len = std::fs::metadata(&segment).unwrap().len();
        let torn = format::encode(RecordKind::Write, 4, 0, 0, &[3; 512]);
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes.extend_from_slice(&torn[..300]);
        std::fs::write(&segment, &bytes).unwrap();

        let (volume, opened) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(
            opened,
            Opened {
                records: 3,
                dropped_bytes: 300
            }
        );
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len);
        let mut buf = [0u8; 512];
        volume.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [2; 512]);
        assert_eq!(volume.bookmarks()[0].name, "one");
        // New records continue the sequence.
        volume.write_at(512, &[4; 512]).unwrap();
        assert_eq!(volume.journal_position().1, 4);
    }

    /// Writes three one-sector records (seq 1..=3) and returns the segment's path.
    fn three_records(base_path: &Path, journal: &Path) -> PathBuf {
        let (volume, _) = JournaledVolume::open(base_path, journal, false).unwrap();
        for i in 0..3u8 {
            volume.write_at(u64::from(i) * 512, &[i + 1; 512]).unwrap();
        }
        volume.flush().unwrap();
        journal::segment_path(journal)
    }

    #[test]
    fn a_damaged_last_record_is_cut_as_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal);
        let mut bytes = std::fs::read(&segment).unwrap();
        let last = 2 * format::record_len(512) as usize;
        bytes[last + HEADER_LEN + 100] ^= 1;
        std::fs::write(&segment, &bytes).unwrap();
        let (volume, opened) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(
            opened,
            Opened {
                records: 2,
                dropped_bytes: format::record_len(512)
            }
        );
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), last as u64);
        let mut buf = [0u8; 512];
        volume.read_at(1024, &mut buf).unwrap();
        assert_eq!(buf, [0x11; 512], "the torn record's data was served");
    }

    #[test]
    fn damage_followed_by_valid_records_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal);
        let original = std::fs::read(&segment).unwrap();
        let second = format::record_len(512) as usize;
        // A flipped payload byte, and a header wiped to zeroes: both inside the journal.
        for (at, damage) in [(second + HEADER_LEN + 100, 1u8), (second, 0xff)] {
            let mut bytes = original.clone();
            if damage == 0xff {
                bytes[at..at + HEADER_LEN].fill(0);
            } else {
                bytes[at] ^= damage;
            }
            std::fs::write(&segment, &bytes).unwrap();
            match JournaledVolume::open(&base_path, &journal, false) {
                Err(VolumeError::Replay(JournalError::Corrupt {
                    path,
                    offset,
                    seq,
                    next_valid,
                })) => {
                    assert_eq!(path, segment);
                    assert_eq!(offset, second as u64);
                    assert_eq!(seq, 2);
                    assert_eq!(next_valid, 2 * second as u64);
                }
                Err(e) => panic!("wrong error: {e}"),
                Ok(_) => panic!("a journal damaged in the middle opened"),
            }
            assert_eq!(
                std::fs::read(&segment).unwrap(),
                bytes,
                "the damaged journal was changed"
            );
        }
    }

    #[test]
    fn a_second_server_on_the_same_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let _first = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert!(matches!(
            JournaledVolume::open(&base_path, &journal, false),
            Err(VolumeError::JournalLocked { .. })
        ));
    }
}
