//! Image access: a point in time served as a device without copying the volume. The view
//! reads the base image and the journal records up to its sequence number; writes, when
//! allowed, go to a throw-away in-memory overlay. Moving the view to another point in time
//! touches only the records between the two points.
//!
//! A journal consumer: it opens the segments read-only and never touches the live device,
//! which may keep appending while the view is served. It holds the journal's history for
//! its whole life, so the server folds nothing away under it.

use crate::journal::format::{RecordKind, HEADER_LEN};
use crate::journal::{self, Cursor, HistoryHold, JournalError};
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

const SECTOR: u64 = 512;

/// Errors opening or moving a view.
#[derive(Debug, thiserror::Error)]
pub enum ImageAccessError {
    /// The base image could not be opened.
    #[error(transparent)]
    Base(#[from] sealvm_virtio_blk::backend::RawFileError),
    /// The journal segment could not be opened.
    #[error("cannot open the journal in {dir}")]
    Segment {
        /// The journal directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The point is beyond the journal.
    #[error("sequence number {asked} is beyond the journal's last record {last}")]
    BeyondJournal {
        /// Asked for.
        asked: u64,
        /// The last record.
        last: u64,
    },
    /// The point lies in history that retention has folded away.
    #[error(
        "sequence number {asked} is older than the journal reaches: history up to seq \
         {base_seq} has been folded into the base"
    )]
    FoldedAway {
        /// Asked for.
        asked: u64,
        /// The oldest point left.
        base_seq: u64,
    },
}

/// One write record: where its data is and which sectors it covers.
#[derive(Clone, Copy)]
struct WriteRecord {
    seq: u64,
    first_sector: u64,
    sectors: u64,
    data_offset: u64,
}

struct History {
    /// Write records in sequence order.
    writes: Vec<WriteRecord>,
    /// Per sector, every version as (seq, where its data lies), in sequence order; where
    /// is a segment ordinal << 32 | offset in the segment.
    versions: HashMap<u64, Vec<(u64, u64)>>,
    /// Where the next scan starts.
    cursor: Option<Cursor>,
    scanned_seq: u64,
    /// First seq of each segment seen, by ordinal.
    segment_names: Vec<u64>,
}

struct View {
    seq: u64,
    /// Sector to where its data as of `seq` lies (ordinal << 32 | offset).
    index: HashMap<u64, u64>,
    /// Throw-away writes made to the view.
    overlay: HashMap<u64, Vec<u8>>,
}

/// What moving a view did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Retargeted {
    /// The sequence number the view now shows.
    pub seq: u64,
    /// Write records between the old and the new point (the work done).
    pub records: u64,
}

/// A point in time of a journaled volume, served as a block device.
pub struct PointInTimeImage {
    base: RawFile,
    /// Segment files by ordinal.
    segments: RwLock<Vec<File>>,
    dir: PathBuf,
    base_seq: u64,
    _hold: Option<HistoryHold>,
    history: Mutex<History>,
    view: RwLock<View>,
    writable: bool,
}

impl PointInTimeImage {
    /// Opens a view of the volume (`base` plus the journal in `dir`) after record `seq`.
    pub fn open(
        base: &Path,
        dir: &Path,
        seq: u64,
        writable: bool,
    ) -> Result<Self, ImageAccessError> {
        if !dir.is_dir() {
            return Err(ImageAccessError::Segment {
                dir: dir.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let hold = journal::hold_history(dir)?;
        let base_seq = journal::read_state(dir)?.base_seq;
        let base = RawFile::open(&journal::effective_base(dir, base), true)?;
        let image = PointInTimeImage {
            base,
            segments: RwLock::new(Vec::new()),
            dir: dir.to_path_buf(),
            base_seq,
            _hold: hold,
            history: Mutex::new(History {
                writes: Vec::new(),
                versions: HashMap::new(),
                cursor: None,
                scanned_seq: base_seq,
                segment_names: Vec::new(),
            }),
            // From seq 0, so the first retarget indexes every record up to the point,
            // including those of a segment a crash left half folded.
            view: RwLock::new(View {
                seq: 0,
                index: HashMap::new(),
                overlay: HashMap::new(),
            }),
            writable,
        };
        image.retarget(seq)?;
        Ok(image)
    }

    /// The sequence number the view shows.
    pub fn seq(&self) -> u64 {
        self.view.read().map(|v| v.seq).unwrap_or(0)
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> &Path {
        &self.dir
    }

    /// Moves the view to after record `seq`, dropping the overlay. Work is proportional to
    /// the write records between the two points (plus any records appended to the journal
    /// since the last look, read once).
    pub fn retarget(&self, seq: u64) -> Result<Retargeted, ImageAccessError> {
        if seq < self.base_seq {
            return Err(ImageAccessError::FoldedAway {
                asked: seq,
                base_seq: self.base_seq,
            });
        }
        let mut history = self.history.lock().map_err(|_| poisoned())?;
        if history.cursor.is_none() || seq > history.scanned_seq {
            self.read_new_records(&mut history)?;
        }
        if seq > history.scanned_seq {
            return Err(ImageAccessError::BeyondJournal {
                asked: seq,
                last: history.scanned_seq,
            });
        }
        let mut view = self.view.write().map_err(|_| poisoned())?;
        let (low, high) = (view.seq.min(seq), view.seq.max(seq));
        let start = history.writes.partition_point(|w| w.seq <= low);
        let end = history.writes.partition_point(|w| w.seq <= high);
        let between = &history.writes[start..end];
        for record in between {
            for sector in record.first_sector..record.first_sector + record.sectors {
                // The newest version of this sector at or before `seq`.
                match newest_at(&history.versions, sector, seq) {
                    Some(offset) => view.index.insert(sector, offset),
                    None => view.index.remove(&sector),
                };
            }
        }
        view.seq = seq;
        view.overlay.clear();
        Ok(Retargeted {
            seq,
            records: between.len() as u64,
        })
    }

    fn read_new_records(&self, history: &mut History) -> Result<(), ImageAccessError> {
        let History {
            writes,
            versions,
            segment_names,
            cursor,
            ..
        } = history;
        let mut new_segments = Vec::new();
        let mut failure = None;
        let summary = journal::scan_from(&self.dir, *cursor, |header, at, _| {
            if segment_names.last() != Some(&at.segment) {
                match File::open(journal::segment_path(&self.dir, at.segment)) {
                    Ok(file) => new_segments.push(file),
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
                segment_names.push(at.segment);
            }
            let ordinal = (segment_names.len() - 1) as u64;
            if header.kind == RecordKind::Write {
                let record = WriteRecord {
                    seq: header.seq,
                    first_sector: header.offset / SECTOR,
                    sectors: u64::from(header.len) / SECTOR,
                    data_offset: (ordinal << 32) | (at.offset + HEADER_LEN as u64),
                };
                for i in 0..record.sectors {
                    versions
                        .entry(record.first_sector + i)
                        .or_default()
                        .push((record.seq, record.data_offset + i * SECTOR));
                }
                writes.push(record);
            }
            true
        })?;
        if let Some(source) = failure {
            return Err(ImageAccessError::Segment {
                dir: self.dir.clone(),
                source,
            });
        }
        self.segments
            .write()
            .map_err(|_| poisoned())?
            .extend(new_segments);
        *cursor = Some(summary.end);
        history.scanned_seq = history.scanned_seq.max(summary.end.last_seq);
        Ok(())
    }
}

/// Where `sector`'s newest version at or before `seq` lies.
fn newest_at(versions: &HashMap<u64, Vec<(u64, u64)>>, sector: u64, seq: u64) -> Option<u64> {
    let list = versions.get(&sector)?;
    let newer = list.partition_point(|&(s, _)| s <= seq);
    newer.checked_sub(1).map(|i| list[i].1)
}

fn poisoned() -> ImageAccessError {
    ImageAccessError::Journal(JournalError::Io {
        path: PathBuf::new(),
        source: io::Error::other("image access lock poisoned"),
    })
}

impl BlockBackend for PointInTimeImage {
    fn capacity_bytes(&self) -> u64 {
        self.base.capacity_bytes()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.base.read_at(offset, buf)?;
        let view = self
            .view
            .read()
            .map_err(|_| io::Error::other("view lock poisoned"))?;
        let segments = self
            .segments
            .read()
            .map_err(|_| io::Error::other("segment list lock poisoned"))?;
        let first = offset / SECTOR;
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let n = first + i as u64;
            if let Some(data) = view.overlay.get(&n) {
                sector.copy_from_slice(data);
            } else if let Some(&at) = view.index.get(&n) {
                let segment = segments
                    .get((at >> 32) as usize)
                    .ok_or_else(|| io::Error::other("index names an unknown segment"))?;
                segment.read_exact_at(sector, at & 0xffff_ffff)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the view is read-only",
            ));
        }
        let mut view = self
            .view
            .write()
            .map_err(|_| io::Error::other("view lock poisoned"))?;
        let first = offset / SECTOR;
        for (i, sector) in buf.chunks(SECTOR as usize).enumerate() {
            view.overlay.insert(first + i as u64, sector.to_vec());
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // The overlay is throw-away by design: nothing to make durable.
        Ok(())
    }

    fn device_id(&self) -> &[u8] {
        b"sealvm-pit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit;
    use crate::volume::JournaledVolume;

    #[test]
    fn views_match_restores_and_retarget_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 16 * 512]).unwrap();
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
        for (i, byte) in (1u8..=6).enumerate() {
            volume
                .write_at((i as u64 % 4) * 1024, &[byte; 1024])
                .unwrap();
        }
        volume.flush().unwrap();
        let restored = |seq: u64| {
            let out = dir.path().join(format!("r{seq}.raw"));
            pit::restore(&base, &journal, seq, &out, |_, _| {}).unwrap();
            std::fs::read(&out).unwrap()
        };
        let read_all = |image: &PointInTimeImage| {
            let mut all = vec![0u8; 16 * 512];
            image.read_at(0, &mut all).unwrap();
            all
        };
        let image = PointInTimeImage::open(&base, &journal, 2, false).unwrap();
        assert_eq!(read_all(&image), restored(2));
        let forward = image.retarget(6).unwrap();
        assert_eq!(forward, Retargeted { seq: 6, records: 4 });
        assert_eq!(read_all(&image), restored(6));
        let back = image.retarget(1).unwrap();
        assert_eq!(back.records, 5);
        assert_eq!(read_all(&image), restored(1));
        assert_eq!(image.retarget(0).unwrap().records, 1);
        assert_eq!(read_all(&image), vec![0u8; 16 * 512]);

        // New records appended by the live volume become reachable.
        volume.write_at(0, &[9; 512]).unwrap();
        volume.flush().unwrap();
        image.retarget(7).unwrap();
        assert_eq!(read_all(&image), restored(7));
        assert!(matches!(
            image.retarget(99),
            Err(ImageAccessError::BeyondJournal { .. })
        ));
        assert!(
            image.write_at(0, &[1; 512]).is_err(),
            "a read-only view took a write"
        );
    }

    #[test]
    fn writable_view_keeps_writes_in_a_throw_away_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 8 * 512]).unwrap();
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
        volume.write_at(0, &[5; 512]).unwrap();
        let image = PointInTimeImage::open(&base, &journal, 1, true).unwrap();
        image.write_at(512, &[7; 512]).unwrap();
        let mut buf = vec![0u8; 1024];
        image.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[5; 512][..]);
        assert_eq!(&buf[512..], &[7; 512][..]);
        assert!(
            std::fs::read(&base).unwrap().iter().all(|&b| b == 0),
            "the base was written"
        );
        image.retarget(1).unwrap();
        image.read_at(0, &mut buf).unwrap();
        assert_eq!(
            &buf[512..],
            &[0; 512][..],
            "the overlay survived a retarget"
        );
    }
}
