//! A journaled volume: a base image, which sealvm-blk never writes, plus the journal, which
//! holds every write since. Reads see the newest journaled data for each extent and the
//! base elsewhere, through an in-memory [`ExtentMap`] built by replaying the journal on
//! open. The journal (sealvm-journal) is a row of segment files; old segments are folded
//! into a copy of the base in the background when retention says so ([`fold`]). See
//! journal/DESIGN.md for why this is crash-safe.

pub mod fold;

pub use fold::{FoldReport, Retention};
use sealvm_journal::bookmark::{self, Bookmark};
use sealvm_journal::extent_map::{ExtentMap, Source, SECTOR};
use sealvm_journal::format::RecordKind;
use sealvm_journal::storage::{self, Storage};
use sealvm_journal::writer::{ReplayedRecord, Writer, WriterError};
use sealvm_journal::{format, JournalError};
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// The default size at which the active segment is closed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// The largest segment size accepted (extent map entries hold a 32-bit offset in a segment).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Errors opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The base image could not be opened.
    #[error(transparent)]
    Base(#[from] sealvm_virtio_blk::backend::RawFileError),
    /// The journal could not be opened, checked, replayed or repaired.
    #[error(transparent)]
    Journal(#[from] WriterError),
    /// The folded base could not be opened.
    #[error("cannot open the folded base {path}")]
    FoldedBase {
        /// The folded base.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl VolumeError {
    /// The journal error underneath, if that is what failed.
    pub fn journal_error(&self) -> Option<&JournalError> {
        match self {
            VolumeError::Journal(WriterError::Journal(e)) => Some(e),
            _ => None,
        }
    }
}

/// How a journaled volume is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// fdatasync every write before acknowledging it.
    pub write_through: bool,
    /// Close the active segment and start a new one when it reaches this size.
    pub segment_bytes: u64,
    /// How far back points in time reach; older segments are folded into the base.
    pub retention: Retention,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            write_through: false,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention: Retention::default(),
        }
    }
}

/// Counters a volume keeps for the API.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    /// Write records appended.
    pub writes: AtomicU64,
    /// Bytes written by the guest.
    pub bytes_written: AtomicU64,
    /// Zero extent records appended (write-zeroes and discards).
    pub zero_extents: AtomicU64,
    /// Flushes (fdatasync of the journal).
    pub flushes: AtomicU64,
    /// Syncs of the journal for any reason: flushes, write-through writes, bookmarks, a
    /// closed segment made durable before it is folded. (Rotation syncs nothing itself.)
    pub syncs: AtomicU64,
    /// Segments folded into the base.
    pub folded_segments: AtomicU64,
}

/// The oldest point in time a journal still reaches back to: its first record after the
/// folded history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OldestPoint {
    /// The record's sequence number.
    pub seq: u64,
    /// When it was written, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

/// Everything the lock guards: the writer, the index and the bookmarks.
struct State {
    /// The image reads fall back to: the volume's image, or the folded base once history
    /// has been folded.
    base: Arc<File>,
    /// The folded base, opened for writing, once it exists.
    folded: Option<Arc<File>>,
    /// The journal's one writer: segments, sequence numbers, the journal state.
    writer: Writer,
    /// Where each written extent's newest data lies; sources name segments by ordinal.
    index: ExtentMap,
    bookmarks: Vec<Bookmark>,
    retention: Retention,
}

impl State {
    fn base_seq(&self) -> u64 {
        self.writer.state().base_seq
    }
}

/// A volume served from a base image and its journal.
pub struct JournaledVolume {
    capacity: u64,
    image: PathBuf,
    dir: PathBuf,
    state: RwLock<State>,
    /// Asked for on the command line: every write is made durable before it is
    /// acknowledged, whatever the guest's cache mode.
    write_through: bool,
    id: Vec<u8>,
    /// One fold at a time (the background folder and the API's fold command).
    folding: Mutex<()>,
    /// Wakes the background folder early (after a rotation or a retention change).
    wake: (Mutex<bool>, Condvar),
    /// Set by [`JournaledVolume::stop`]: no record is appended any more.
    stopped: AtomicBool,
    /// Counters for the API.
    pub counters: VolumeCounters,
}

/// What replaying the journal found when a volume was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Records replayed.
    pub records: u64,
    /// Bytes after the last valid record that were cut off.
    pub dropped_bytes: u64,
}

/// Converts a sector count or offset that the request parser bounded by the capacity.
fn sectors_of(bytes: u64) -> u64 {
    bytes / SECTOR
}

/// The index entry a record makes, if it changes data.
fn indexed(kind: RecordKind, ordinal: u32, payload_offset: u64) -> Option<Source> {
    match kind {
        // Segments are at most 1 GiB, so offsets fit in 32 bits.
        RecordKind::Write => Some(Source::Data {
            segment: ordinal,
            offset: payload_offset as u32,
        }),
        RecordKind::ZeroExtent => Some(Source::Zero { segment: ordinal }),
        _ => None,
    }
}

impl JournaledVolume {
    /// Opens `base` and the journal in `dir` with default options and write-back or
    /// write-through as asked; see [`JournaledVolume::open_with`].
    pub fn open(
        base: &Path,
        dir: &Path,
        write_through: bool,
    ) -> Result<(Self, Opened), VolumeError> {
        Self::open_with(
            base,
            dir,
            JournalOptions {
                write_through,
                ..JournalOptions::default()
            },
        )
    }

    /// Opens the base image (read-only; it is never written) and the journal in `dir`
    /// (created if missing), checks they belong together, replays the journal and cuts
    /// off a torn tail.
    pub fn open_with(
        base: &Path,
        dir: &Path,
        options: JournalOptions,
    ) -> Result<(Self, Opened), VolumeError> {
        Self::open_with_storage(base, dir, options, storage::disk())
    }

    /// [`JournaledVolume::open_with`] with the journal's syncs, renames and removals, and
    /// folding's, going through `storage` (the crash simulator's seam).
    pub fn open_with_storage(
        base: &Path,
        dir: &Path,
        options: JournalOptions,
        storage: Arc<dyn Storage>,
    ) -> Result<(Self, Opened), VolumeError> {
        let image = RawFile::open(base, true)?;
        let capacity = image.capacity_bytes();
        drop(image);
        let mut index = ExtentMap::new();
        let mut bookmarks = Vec::new();
        let (writer, replayed) =
            Writer::open_with(dir, base, options.segment_bytes, storage, |record| {
                let ReplayedRecord {
                    header,
                    ordinal,
                    payload_offset,
                    payload,
                } = record;
                if let Some(source) = indexed(header.kind, ordinal, payload_offset) {
                    let len =
                        format::zero_extent_len(header, payload).unwrap_or(u64::from(header.len));
                    index.insert(sectors_of(header.offset), sectors_of(len), source);
                } else if header.kind == RecordKind::Bookmark {
                    bookmarks.push(Bookmark::from_record(header, payload));
                }
            })?;
        let base_seq = writer.state().base_seq;
        bookmarks.retain(|b| b.seq > base_seq);
        let folded_path = dir.join(sealvm_journal::dir::FOLDED_BASE_NAME);
        let folded = match OpenOptions::new().read(true).write(true).open(&folded_path) {
            Ok(file) => Some(Arc::new(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(VolumeError::FoldedBase {
                    path: folded_path,
                    source,
                })
            }
        };
        let base_file = match &folded {
            Some(file) => file.clone(),
            None => Arc::new(File::open(base).map_err(|source| VolumeError::FoldedBase {
                path: base.to_path_buf(),
                source,
            })?),
        };
        let mut id = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
            .into_bytes();
        id.truncate(sealvm_virtio_blk::DEVICE_ID_LEN);
        let volume = JournaledVolume {
            capacity,
            image: base.to_path_buf(),
            dir: dir.to_path_buf(),
            state: RwLock::new(State {
                base: base_file,
                folded,
                writer,
                index,
                bookmarks,
                retention: options.retention,
            }),
            write_through: options.write_through,
            id,
            folding: Mutex::new(()),
            wake: (Mutex::new(false), Condvar::new()),
            stopped: AtomicBool::new(false),
            counters: VolumeCounters::default(),
        };
        Ok((
            volume,
            Opened {
                records: replayed.records,
                dropped_bytes: replayed.dropped_bytes,
            },
        ))
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> &Path {
        &self.dir
    }

    fn read_state(&self) -> io::Result<std::sync::RwLockReadGuard<'_, State>> {
        self.state
            .read()
            .map_err(|_| io::Error::other("journal lock poisoned"))
    }

    fn write_state(&self) -> io::Result<std::sync::RwLockWriteGuard<'_, State>> {
        self.state
            .write()
            .map_err(|_| io::Error::other("journal lock poisoned"))
    }

    /// Appends a record and updates the index; rotation wakes the folder.
    fn append(
        &self,
        state: &mut State,
        kind: RecordKind,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<sealvm_journal::writer::Appended> {
        // Checked under the lock, so once `stop` has the lock no record follows its sync.
        if self.stopped.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "sealvm-blk is stopping: the journal takes no more records",
            ));
        }
        let segments = state.writer.segments().len();
        let appended = state.writer.append(kind, offset, payload)?;
        if state.writer.segments().len() != segments {
            // A segment closed (not synced: the next flush does that, outside the lock).
            self.wake_folder();
        }
        if let Some(source) = indexed(kind, appended.ordinal, appended.payload_offset) {
            let len = if kind == RecordKind::ZeroExtent {
                u64::from_le_bytes(payload.try_into().unwrap_or([0; 8]))
            } else {
                payload.len() as u64
            };
            state
                .index
                .insert(sectors_of(offset), sectors_of(len), source);
        }
        Ok(appended)
    }

    /// Makes every record appended so far durable: closed segments not yet synced, new
    /// segments' directory entries, and the active segment, all outside the lock so the
    /// guest's writes go on; then records the sync point.
    fn sync_and_record(&self) -> io::Result<()> {
        let target = self.read_state()?.writer.sync_target();
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        // If the segment is closed in between, no sync point is recorded for it (see
        // `Writer::record_sync_point`); the next sync covers it.
        target.sync()?;
        self.write_state()?
            .writer
            .record_sync_point(target.ordinal, target.end)
    }

    /// Appends a bookmark and makes it (and every write before it) durable; returns it.
    /// Names that `--at` would read as something else, and names in use, are refused.
    pub fn bookmark(&self, name: &str) -> io::Result<Bookmark> {
        Ok(Self::bookmark_group(&[self], name)?.remove(0))
    }

    /// Makes one bookmark across several volumes, a consistency group: every volume's
    /// journal gets a bookmark record while all of them are locked, so no write to any of
    /// them falls between the records; then each is made durable. Returns the bookmarks in
    /// the order of `volumes`.
    pub fn bookmark_group(volumes: &[&JournaledVolume], name: &str) -> io::Result<Vec<Bookmark>> {
        bookmark::check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Locks are taken in journal-directory order, so two group bookmarks cannot
        // deadlock; a guest's write takes one volume's lock only.
        let mut order: Vec<usize> = (0..volumes.len()).collect();
        order.sort_by(|&a, &b| volumes[a].dir.cmp(&volumes[b].dir));
        let mut guards = Vec::new();
        for &i in &order {
            guards.push((i, volumes[i].write_state()?));
        }
        for (i, state) in &guards {
            if state.bookmarks.iter().any(|b| b.name == name) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "volume {} already has a bookmark named {name:?}; bookmark names are \
                         unique within a journal",
                        volumes[*i].dir.display()
                    ),
                ));
            }
        }
        let mut made = vec![None; volumes.len()];
        for (i, state) in &mut guards {
            let volume = volumes[*i];
            let appended = volume.append(state, RecordKind::Bookmark, 0, name.as_bytes())?;
            let bookmark = Bookmark {
                name: name.into(),
                seq: appended.seq,
                time_ns: appended.time_ns,
            };
            state.bookmarks.push(bookmark.clone());
            made[*i] = Some(bookmark);
        }
        drop(guards);
        let mut bookmarks = Vec::new();
        for (volume, made) in volumes.iter().zip(made) {
            let bookmark = made.ok_or_else(|| io::Error::other("a volume got no bookmark"))?;
            volume.sync_and_record()?;
            bookmarks.push(bookmark);
        }
        Ok(bookmarks)
    }

    /// Bookmarks still within reach (not folded away), oldest first.
    pub fn bookmarks(&self) -> Vec<Bookmark> {
        self.read_state()
            .map(|s| s.bookmarks.clone())
            .unwrap_or_default()
    }

    /// The oldest point in time the journal reaches back to, `None` while no record is
    /// within reach.
    pub fn oldest_point(&self) -> Option<OldestPoint> {
        let state = self.read_state().ok()?;
        let base_seq = state.base_seq();
        let segment = state
            .writer
            .segments()
            .iter()
            .find(|s| !s.is_empty() && s.last_seq > base_seq)?;
        // Folding works in whole segments, so a segment within reach starts after base_seq.
        Some(OldestPoint {
            seq: segment.first_seq,
            time_ns: segment.first_time_ns,
        })
    }

    /// The last sequence number folded into the base: points in time before it are gone.
    pub fn base_seq(&self) -> u64 {
        self.read_state().map(|s| s.base_seq()).unwrap_or(0)
    }

    /// Size of the journal's records (every segment) in bytes and the last sequence number.
    pub fn journal_position(&self) -> (u64, u64) {
        self.read_state()
            .map(|s| (s.writer.journal_bytes(), s.writer.next_seq() - 1))
            .unwrap_or((0, 0))
    }

    /// The number of segment files.
    pub fn segment_count(&self) -> usize {
        self.read_state()
            .map(|s| s.writer.segments().len())
            .unwrap_or(0)
    }

    /// Extents in the index: what its memory follows.
    pub fn index_extents(&self) -> usize {
        self.read_state().map(|s| s.index.len()).unwrap_or(0)
    }

    /// Fails every later fdatasync of the journal `count` times (a fault seam for tests;
    /// see [`Writer::inject_sync_failures`]).
    pub fn inject_sync_failures(&self, count: u32) {
        if let Ok(state) = self.read_state() {
            state.writer.inject_sync_failures(count);
        }
    }

    /// Stops the volume for a clean exit: refuses every later write, zero extent and
    /// bookmark, and makes everything appended so far durable (fdatasync and a sync
    /// point). Reads go on.
    pub fn stop(&self) -> io::Result<()> {
        self.stopped.store(true, Ordering::Release);
        // Appends that saw the flag clear hold the write lock until they are done, so the
        // sync target taken after them covers every record.
        drop(self.write_state()?);
        self.sync_and_record()
    }

    /// Appends a zero extent: `len` bytes at `offset` read as zeroes from here on.
    fn zero_extent(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut state = self.write_state()?;
        self.append(
            &mut state,
            RecordKind::ZeroExtent,
            offset,
            &len.to_le_bytes(),
        )?;
        drop(state);
        if self.write_through {
            self.sync_and_record()?;
        }
        self.counters.zero_extents.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl BlockBackend for JournaledVolume {
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // The base is read under the lock too: a fold writes the base and then drops index
        // entries, and a read must not see the old base data with the entry already gone.
        let state = self.read_state()?;
        state.base.read_exact_at(buf, offset)?;
        if state.index.is_empty() {
            return Ok(());
        }
        let first = sectors_of(offset);
        for extent in state.index.overlapping(first, sectors_of(buf.len() as u64)) {
            let from = ((extent.start - first) * SECTOR) as usize;
            let to = from + (extent.sectors * SECTOR) as usize;
            let part = &mut buf[from..to];
            match extent.source {
                Source::Zero { .. } => part.fill(0),
                Source::Data { segment, offset } => state
                    .writer
                    .segment_by_ordinal(segment)
                    .ok_or_else(|| io::Error::other("the index names a folded segment"))?
                    .file
                    .read_exact_at(part, u64::from(offset))?,
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut state = self.write_state()?;
        self.append(&mut state, RecordKind::Write, offset, buf)?;
        drop(state);
        if self.write_through {
            self.sync_and_record()?;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        // Every write acknowledged before this flush is already in a segment file; the sync
        // covers the closed segments not yet durable and the active one.
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.sync_and_record()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Discarded sectors may read back as anything; zeroes keep every point in time
        // exact, and a zero extent costs one small record whatever the length.
        self.zero_extent(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.zero_extent(offset, len)
    }

    fn saved_write_through(&self) -> Option<bool> {
        self.read_state()
            .ok()
            .map(|s| s.writer.state().write_through)
    }

    fn save_write_through(&self, write_through: bool) -> io::Result<()> {
        self.write_state()?
            .writer
            .update_state(|s| s.write_through = write_through)
    }

    fn device_id(&self) -> &[u8] {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal;
    use sealvm_journal::format::{NewRecord, HEADER_LEN, SEGMENT_HEADER_LEN};

    /// Where a segment's first record starts.
    const START: usize = SEGMENT_HEADER_LEN;
    const SECTOR: u64 = 512;

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
        let segment = journal::segment_path(&journal, 1);
        let good_len = std::fs::metadata(&segment).unwrap().len();
        let torn = format::encode(
            &NewRecord {
                kind: RecordKind::Write,
                seq: 4,
                time_ns: 0,
                offset: 0,
                flags: 0,
            },
            &[3; 512],
        );
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

    /// Writes three one-sector records (seq 1..=3), flushed (then a sync point follows) or
    /// not, and returns the segment's path.
    fn three_records(base_path: &Path, journal: &Path, flush: bool) -> PathBuf {
        let (volume, _) = JournaledVolume::open(base_path, journal, false).unwrap();
        for i in 0..3u8 {
            volume.write_at(u64::from(i) * 512, &[i + 1; 512]).unwrap();
        }
        if flush {
            volume.flush().unwrap();
        }
        journal::segment_path(journal, 1)
    }

    #[test]
    fn a_damaged_last_record_is_cut_as_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal, false);
        let mut bytes = std::fs::read(&segment).unwrap();
        let last = START + 2 * format::record_len(512) as usize;
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
    fn a_flushed_last_record_that_is_damaged_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal, true);
        let mut bytes = std::fs::read(&segment).unwrap();
        let last = START + 2 * format::record_len(512) as usize;
        bytes[last + HEADER_LEN + 100] ^= 1;
        std::fs::write(&segment, &bytes).unwrap();
        match JournaledVolume::open(&base_path, &journal, false) {
            Err(e)
                if matches!(
                    e.journal_error(),
                    Some(JournalError::Corrupt { seq: 3, .. })
                ) =>
            {
                let Some(JournalError::Corrupt { offset, .. }) = e.journal_error() else {
                    unreachable!()
                };
                let offset = *offset;
                assert_eq!(offset, last as u64)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a flushed record was cut as a torn tail"),
        }
    }

    #[test]
    fn a_power_loss_hole_among_unflushed_records_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = journal::segment_path(&journal, 1);
        let flushed_end = {
            let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
            volume.write_at(0, &[1; 512]).unwrap();
            volume.write_at(512, &[2; 512]).unwrap();
            volume.flush().unwrap();
            let flushed_end = std::fs::metadata(&segment).unwrap().len();
            for i in 3..=5u8 {
                volume.write_at(u64::from(i) * 512, &[i; 512]).unwrap();
            }
            flushed_end
        };
        // A power loss wrote the pages of records 4 and 5 but not the one of record 3.
        let mut bytes = std::fs::read(&segment).unwrap();
        let hole = flushed_end as usize;
        bytes[hole..hole + format::record_len(512) as usize].fill(0);
        std::fs::write(&segment, &bytes).unwrap();
        let (volume, opened) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(
            opened,
            Opened {
                records: 2,
                dropped_bytes: bytes.len() as u64 - flushed_end
            }
        );
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), flushed_end);
        let mut buf = vec![0u8; 6 * 512];
        volume.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[1; 512][..], "a flushed write was lost");
        assert_eq!(&buf[512..1024], &[2; 512][..], "a flushed write was lost");
        assert!(
            buf[1024..].iter().all(|&b| b == 0x11),
            "unflushed records after the hole were kept"
        );
        // The sequence goes on from the last flushed record.
        volume.write_at(0, &[9; 512]).unwrap();
        assert_eq!(volume.journal_position().1, 3);
    }

    #[test]
    fn damage_followed_by_valid_records_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal, true);
        let original = std::fs::read(&segment).unwrap();
        let second = START + format::record_len(512) as usize;
        let first_len = format::record_len(512) as usize;
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
                Err(e) => match e.journal_error() {
                    Some(JournalError::Corrupt {
                        path,
                        offset,
                        seq,
                        next_valid,
                    }) => {
                        assert_eq!(path, &segment);
                        assert_eq!(*offset, second as u64);
                        assert_eq!(*seq, 2);
                        assert_eq!(*next_valid, (second + first_len) as u64);
                    }
                    _ => panic!("wrong error: {e}"),
                },
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
    fn a_group_bookmark_is_one_consistent_point_across_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let base = dir.path().join(format!("{name}.raw"));
            std::fs::write(&base, vec![0u8; 8 * 512]).unwrap();
            let journal = dir.path().join(format!("{name}.journal"));
            std::sync::Arc::new(JournaledVolume::open(&base, &journal, false).unwrap().0)
        };
        let (log, data) = (open("log"), open("data"));
        // Dependent writes: the log first, then the data, as fast as they go.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (log, data, stop) = (log.clone(), data.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut tag = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tag += 1;
                    log.write_at(0, &[tag as u8; 512]).unwrap();
                    data.write_at(0, &[tag as u8; 512]).unwrap();
                }
            })
        };
        let mut made = Vec::new();
        for i in 0..50 {
            let name = format!("b{i}");
            made.push(JournaledVolume::bookmark_group(&[&log, &data], &name).unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        // Each volume gets only the writer's writes and the bookmarks, so the writes before
        // the i-th bookmark are its seq minus the i bookmarks before it (and itself).
        let mut logged_before = Vec::new();
        for (i, pair) in made.iter().enumerate() {
            let writes = |b: &Bookmark| b.seq - 1 - i as u64;
            let (logged, written) = (writes(&pair[0]), writes(&pair[1]));
            assert!(
                written <= logged && logged <= written + 1,
                "bookmark {i}: {logged} log writes but {written} data writes before it"
            );
            logged_before.push(logged);
        }
        let moving = logged_before.windows(2).filter(|w| w[1] > w[0]).count();
        assert!(
            moving > 10,
            "the writer hardly ran while bookmarks were made"
        );
    }

    #[test]
    fn bookmark_names_that_read_as_a_point_or_are_in_use_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let (volume, _) = JournaledVolume::open(&base_path, &dir.path().join("j"), false).unwrap();
        volume.write_at(0, &[1; 512]).unwrap();
        for name in ["2", "latest", "@1", "bookmark:x"] {
            let err = volume.bookmark(name).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}: {err}");
        }
        volume.bookmark("before").unwrap();
        let err = volume.bookmark("before").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        let err = JournaledVolume::bookmark_group(&[&volume], "before").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        let names: Vec<_> = volume.bookmarks().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["before"], "a refused bookmark was recorded");
        assert_eq!(volume.journal_position().1, 2);
    }

    /// Uses the writer's fault seam (`inject_sync_failures`): a real fdatasync failure needs
    /// a device that fails writes (dm-error), which a unit test cannot set up.
    #[test]
    fn a_failed_fdatasync_fails_every_later_flush_until_the_journal_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        volume.write_at(0, &[1; 512]).unwrap();
        volume.flush().unwrap();
        volume.write_at(512, &[2; 512]).unwrap();
        volume.inject_sync_failures(1);
        assert!(
            volume.flush().is_err(),
            "the failing fdatasync was not reported"
        );
        // The disk works again, but the pages the kernel could not write may be gone: a
        // retried fdatasync would succeed without them. Every later flush fails instead.
        for _ in 0..3 {
            let err = volume.flush().unwrap_err();
            assert!(err.to_string().contains("restart sealvm-blk"), "{err}");
        }
        assert!(volume.write_at(1024, &[3; 512]).is_err());
        assert!(volume.bookmark("after-failure").is_err());
        drop(volume);
        // Reopening replays what really is in the journal, and flushes work again.
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        volume.write_at(1024, &[3; 512]).unwrap();
        volume.flush().unwrap();
        let mut buf = vec![0u8; 1536];
        volume.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[1; 512][..]);
        assert_eq!(&buf[1024..], &[3; 512][..]);
    }

    #[test]
    fn a_whole_device_discard_is_one_small_record_and_one_extent() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("big.raw");
        let gib = 1u64 << 30;
        std::fs::write(&base_path, vec![0x11u8; 4096]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&base_path)
            .unwrap()
            .set_len(gib)
            .unwrap();
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        for i in 0..64 {
            volume.write_at(i * (1 << 20), &[7; 4096]).unwrap();
        }
        let (before, _) = volume.journal_position();
        volume.discard(0, gib).unwrap();
        let (after, _) = volume.journal_position();
        assert_eq!(after - before, format::record_len(8), "a discard of 1 GiB");
        assert_eq!(volume.index_extents(), 1);
        let mut buf = vec![1u8; 8192];
        volume.read_at(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "discarded sectors read back data"
        );
        volume.write_zeroes(512, 512, false).unwrap();
        volume.write_at(4096, &[5; 512]).unwrap();
        drop(volume);
        // Replay builds the same map: zeroes over the base, split by the two later records
        // into five extents.
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(volume.index_extents(), 5);
        volume.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(&buf[4096..4608], &[5; 512][..]);
    }

    #[test]
    fn the_guests_write_through_mode_is_kept_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(volume.saved_write_through(), Some(false));
        volume.save_write_through(true).unwrap();
        drop(volume);
        let (volume, _) = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert_eq!(volume.saved_write_through(), Some(true));
    }

    #[test]
    fn a_second_server_on_the_same_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let _first = JournaledVolume::open(&base_path, &journal, false).unwrap();
        assert!(matches!(
            JournaledVolume::open(&base_path, &journal, false),
            Err(VolumeError::Journal(WriterError::Locked { .. }))
        ));
    }
}
