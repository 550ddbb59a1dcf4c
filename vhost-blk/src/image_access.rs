//! Image access: a point in time served as a device without copying the volume. The view
//! reads the base image and the journal records up to its sequence number, through a
//! [`Timeline`] that moves between points at a cost that follows the distance. Writes, when
//! allowed, go to a throw-away overlay: an unnamed sparse file in the journal directory
//! (memory per written extent, not per byte), emptied on retarget and gone on exit.
//!
//! A journal consumer: it opens the segments read-only and never touches the live device,
//! which may keep appending while the view is served. It holds the journal's history for
//! its whole life, so the server folds nothing away under it.

use crate::journal::{self, Cursor, JournalError};
use sealvm_journal::consumer::{ConsumerError, ReaderHold};
use sealvm_journal::extent_map::{Change, Extent, ExtentMap, Source, Timeline, SECTOR};
use sealvm_journal::format::{self, RecordKind};
use sealvm_journal::reader::Reader;
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

/// Errors opening or moving a view.
#[derive(Debug, thiserror::Error)]
pub enum ImageAccessError {
    /// The base image could not be opened.
    #[error(transparent)]
    Base(#[from] sealvm_virtio_blk::backend::RawFileError),
    /// A journal segment or the overlay could not be opened.
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

struct History {
    timeline: Timeline,
    /// Where the next look at the journal starts.
    cursor: Option<Cursor>,
    scanned_seq: u64,
    /// First seq of each segment seen, by ordinal.
    segment_names: Vec<u64>,
}

/// Writes made to a writable view: which extents the overlay file holds (at the same
/// offsets as in the volume).
struct Overlay {
    file: Option<File>,
    written: ExtentMap,
}

/// What moving a view did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Retargeted {
    /// The sequence number the view now shows.
    pub seq: u64,
    /// Write and zero extent records between the old and the new point (the work done).
    pub records: u64,
}

/// A point in time of a journaled volume, served as a block device.
pub struct PointInTimeImage {
    base: RawFile,
    /// Segment files by ordinal.
    segments: RwLock<Vec<File>>,
    dir: PathBuf,
    /// Where folding must stop: the lowest point the view shows. Moved before the view
    /// moves back, after it moves forward.
    hold: Mutex<ReaderHold>,
    history: RwLock<History>,
    overlay: Mutex<Overlay>,
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
        let hold = ReaderHold::take(dir, seq).map_err(consumer_error)?;
        let state = journal::read_state(dir)?;
        sealvm_journal::dir::check_base(dir, base, &state)?;
        let base = RawFile::open(&journal::effective_base(dir, base), true)?;
        let overlay = if writable {
            Some(overlay_file(dir, base.capacity_bytes()).map_err(|source| {
                ImageAccessError::Segment {
                    dir: dir.to_path_buf(),
                    source,
                }
            })?)
        } else {
            None
        };
        let image = PointInTimeImage {
            base,
            segments: RwLock::new(Vec::new()),
            dir: dir.to_path_buf(),
            hold: Mutex::new(hold),
            history: RwLock::new(History {
                timeline: Timeline::new(),
                cursor: None,
                scanned_seq: state.base_seq,
                segment_names: Vec::new(),
            }),
            overlay: Mutex::new(Overlay {
                file: overlay,
                written: ExtentMap::new(),
            }),
            writable,
        };
        image.retarget(seq)?;
        Ok(image)
    }

    /// The sequence number the view shows.
    pub fn seq(&self) -> u64 {
        self.history.read().map(|h| h.timeline.seq()).unwrap_or(0)
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> &Path {
        &self.dir
    }

    /// Extents the overlay holds (writes to a writable view since the last retarget).
    pub fn overlay_extents(&self) -> usize {
        self.overlay.lock().map(|o| o.written.len()).unwrap_or(0)
    }

    /// Moves the view to after record `seq`, dropping the overlay. Work is proportional to
    /// the records between the two points (plus any records appended to the journal since
    /// the last look, read once).
    pub fn retarget(&self, seq: u64) -> Result<Retargeted, ImageAccessError> {
        let mut hold = self.hold.lock().map_err(|_| poisoned())?;
        if seq < hold.seq() {
            // Moving back: the hold goes first, refused if folding already passed `seq`.
            hold.move_to(seq).map_err(consumer_error)?;
        }
        let mut history = self.history.write().map_err(|_| poisoned())?;
        if history.cursor.is_none() || seq > history.scanned_seq {
            self.read_new_records(&mut history)?;
        }
        if seq > history.scanned_seq {
            return Err(ImageAccessError::BeyondJournal {
                asked: seq,
                last: history.scanned_seq,
            });
        }
        let records = history.timeline.seek(seq) as u64;
        if seq > hold.seq() {
            // Moving forward: what lies before `seq` is no longer looked at.
            hold.move_to(seq).map_err(consumer_error)?;
        }
        let mut overlay = self.overlay.lock().map_err(|_| poisoned())?;
        if !overlay.written.is_empty() {
            overlay.written = ExtentMap::new();
            if let Some(file) = &overlay.file {
                // Emptying the file frees its blocks; setting the length back keeps it sparse.
                let len = self.base.capacity_bytes();
                file.set_len(0)
                    .and_then(|()| file.set_len(len))
                    .map_err(|source| ImageAccessError::Segment {
                        dir: self.dir.clone(),
                        source,
                    })?;
            }
        }
        Ok(Retargeted { seq, records })
    }

    fn read_new_records(&self, history: &mut History) -> Result<(), ImageAccessError> {
        let mut reader = match history.cursor {
            Some(cursor) => Reader::at(&self.dir, cursor)?,
            None => Reader::open(&self.dir)?,
        };
        let mut new_segments = Vec::new();
        while let Some((header, at)) = reader.next_record()? {
            if history.segment_names.last() != Some(&at.segment) {
                let path = journal::segment_path(&self.dir, at.segment);
                let file = File::open(&path).map_err(|source| ImageAccessError::Segment {
                    dir: self.dir.clone(),
                    source,
                })?;
                new_segments.push(file);
                history.segment_names.push(at.segment);
            }
            let ordinal = (history.segment_names.len() - 1) as u32;
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
            history.timeline.push(Change {
                seq: header.seq,
                extent: Extent {
                    start: header.offset / SECTOR,
                    sectors: len / SECTOR,
                    source,
                },
            });
        }
        self.segments
            .write()
            .map_err(|_| poisoned())?
            .extend(new_segments);
        let cursor = reader.cursor();
        history.cursor = Some(cursor);
        history.scanned_seq = history.scanned_seq.max(cursor.last_seq);
        Ok(())
    }
}

/// An unnamed sparse file of `len` bytes in `dir` for a writable view's overlay: it takes
/// disk blocks only where the view is written, and disappears with the process.
fn overlay_file(dir: &Path, len: u64) -> io::Result<File> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
    {
        Ok(file) => file,
        // File systems without O_TMPFILE: a named file, unlinked at once.
        Err(_) => {
            let path = dir.join(format!(".expose-overlay-{}", std::process::id()));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            file
        }
    };
    file.set_len(len)?;
    Ok(file)
}

fn consumer_error(e: ConsumerError) -> ImageAccessError {
    match e {
        ConsumerError::Journal(e) => ImageAccessError::Journal(e),
        ConsumerError::FoldedAway { asked, base_seq } => {
            ImageAccessError::FoldedAway { asked, base_seq }
        }
        other => ImageAccessError::Segment {
            dir: PathBuf::from(sealvm_journal::consumer::CONSUMERS_DIR),
            source: io::Error::other(other.to_string()),
        },
    }
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
        let history = self
            .history
            .read()
            .map_err(|_| io::Error::other("view lock poisoned"))?;
        let segments = self
            .segments
            .read()
            .map_err(|_| io::Error::other("segment list lock poisoned"))?;
        let first = offset / SECTOR;
        let sectors = buf.len() as u64 / SECTOR;
        for extent in history.timeline.map().overlapping(first, sectors) {
            let from = ((extent.start - first) * SECTOR) as usize;
            let part = &mut buf[from..from + (extent.sectors * SECTOR) as usize];
            match extent.source {
                Source::Zero { .. } => part.fill(0),
                Source::Data { segment, offset } => segments
                    .get(segment as usize)
                    .ok_or_else(|| io::Error::other("the view names an unknown segment"))?
                    .read_exact_at(part, u64::from(offset))?,
            }
        }
        let overlay = self
            .overlay
            .lock()
            .map_err(|_| io::Error::other("overlay lock poisoned"))?;
        if let Some(file) = &overlay.file {
            for extent in overlay.written.overlapping(first, sectors) {
                let from = ((extent.start - first) * SECTOR) as usize;
                let part = &mut buf[from..from + (extent.sectors * SECTOR) as usize];
                file.read_exact_at(part, extent.start * SECTOR)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut overlay = self
            .overlay
            .lock()
            .map_err(|_| io::Error::other("overlay lock poisoned"))?;
        let Some(file) = overlay.file.as_ref().filter(|_| self.writable) else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the view is read-only",
            ));
        };
        file.write_all_at(buf, offset)?;
        // The overlay file holds the data at the volume's own offsets; the map only says
        // which extents it holds.
        overlay.written.insert(
            offset / SECTOR,
            buf.len() as u64 / SECTOR,
            Source::Zero { segment: 0 },
        );
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

    #[test]
    fn a_writable_views_overlay_lives_in_an_unnamed_file_not_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![3u8; 8 << 20]).unwrap();
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
        volume.write_at(0, &[5; 4096]).unwrap();
        let files_before = std::fs::read_dir(&journal).unwrap().count();
        let image = PointInTimeImage::open(&base, &journal, 1, true).unwrap();
        // 4 MiB of writes in 1 MiB requests: four extents of bookkeeping, whatever the bytes.
        for i in 0..4u64 {
            image
                .write_at(i << 20, &vec![i as u8 + 10; 1 << 20])
                .unwrap();
        }
        assert_eq!(image.overlay_extents(), 4);
        let mut buf = vec![0u8; 8192];
        image.read_at((2 << 20) - 4096, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[11; 4096][..]);
        assert_eq!(&buf[4096..], &[12; 4096][..]);
        image.read_at(5 << 20, &mut buf).unwrap();
        assert_eq!(buf, vec![3u8; 8192], "unwritten sectors of the view");
        let names = |dir: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // New: the consumers directory (the view's hold) and fold.lock, no overlay file.
        let now = names(&journal);
        assert_eq!(now.len(), files_before + 2, "{now:?}");
        assert!(now.iter().all(|n| !n.contains("overlay")), "{now:?}");
        image.retarget(1).unwrap();
        assert_eq!(image.overlay_extents(), 0);
        image.read_at(0, &mut buf).unwrap();
        assert_eq!(
            &buf[..4096],
            &[5; 4096][..],
            "the overlay survived a retarget"
        );
    }
}
