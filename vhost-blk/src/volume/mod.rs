//! A journaled volume: a base image, which sealvm-blk never writes, plus the journal, which
//! holds every write since. Reads see the newest journaled data for each sector and the
//! base elsewhere, through an in-memory index built by replaying the journal on open. The
//! journal is a row of segment files; old segments are folded into a copy of the base in
//! the background when retention says so ([`fold`]). See vhost-blk/DESIGN.md for why this
//! is crash-safe.

pub mod fold;

use crate::journal::format::{self, RecordKind, HEADER_LEN};
use crate::journal::{self, Bookmark, JournalError};
pub use fold::{FoldReport, Retention};
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

const SECTOR: u64 = 512;

/// The default size at which the active segment is closed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// The largest segment size accepted (index entries hold a 32-bit offset in a segment).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

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
    /// The folded base does not match the volume's image.
    #[error(
        "the journal's folded base {path} is {found} bytes but the volume's image is {expected}; \
         this journal belongs to another volume"
    )]
    FoldedBaseSize {
        /// The folded base.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The image's size.
        expected: u64,
    },
    /// The journal's first segment starts after the folded history ends.
    #[error(
        "journal {dir} has folded history up to seq {base_seq} but its first segment starts at \
         seq {first}: records in between are missing"
    )]
    MissingRecords {
        /// The journal directory.
        dir: PathBuf,
        /// The fold state's last folded seq.
        base_seq: u64,
        /// The first segment's first seq.
        first: u64,
    },
    /// The segment size is out of range.
    #[error("segment size {0} is out of range (4 KiB to 1 GiB)")]
    SegmentSize(u64),
    /// Replaying the journal failed.
    #[error(transparent)]
    Replay(#[from] JournalError),
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
    /// Flushes (fdatasync of the journal).
    pub flushes: AtomicU64,
    /// fdatasyncs of the journal for any reason: flushes, write-through writes, bookmarks,
    /// segment rotation.
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

/// One segment file of the journal.
struct Segment {
    first_seq: u64,
    /// The last record's seq, `first_seq - 1` while the segment is empty.
    last_seq: u64,
    first_time_ns: u64,
    last_time_ns: u64,
    /// Bytes of valid records: where the next record goes.
    bytes: u64,
    /// Where the segment stood after its last sync point: a flush with nothing new since
    /// writes none.
    synced_to: u64,
    path: PathBuf,
    file: Arc<File>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }
}

/// Everything the lock guards: the segments, the index and where the journal ends.
struct State {
    /// The image reads fall back to: the volume's image, or the folded base once history
    /// has been folded.
    base: Arc<File>,
    /// The folded base, opened for writing, once it exists.
    folded: Option<Arc<File>>,
    /// Segments in order; the last one is the active segment records are appended to.
    segments: VecDeque<Segment>,
    /// The ordinal of `segments[0]`; index entries name segments by ordinal.
    first_ordinal: u32,
    /// Sequence number of the next record.
    next_seq: u64,
    /// Sector number to where its newest data lies: segment ordinal << 32 | offset.
    index: HashMap<u64, u64>,
    bookmarks: Vec<Bookmark>,
    /// Everything up to here is folded (or being folded) into the folded base.
    base_seq: u64,
    retention: Retention,
}

impl State {
    fn active(&self) -> &Segment {
        self.segments
            .back()
            .expect("a volume always has an active segment")
    }

    /// The ordinal of the active segment.
    fn active_ordinal(&self) -> u32 {
        self.first_ordinal + self.segments.len() as u32 - 1
    }

    fn segment_by_ordinal(&self, ordinal: u32) -> Option<&Segment> {
        let i = ordinal.checked_sub(self.first_ordinal)?;
        self.segments.get(i as usize)
    }

    fn journal_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

/// Packs a segment ordinal and an offset in it into one index entry.
fn pack(ordinal: u32, offset: u64) -> u64 {
    (u64::from(ordinal) << 32) | offset
}

fn unpack(entry: u64) -> (u32, u64) {
    ((entry >> 32) as u32, entry & 0xffff_ffff)
}

/// A volume served from a base image and its journal.
pub struct JournaledVolume {
    capacity: u64,
    image: PathBuf,
    dir: PathBuf,
    state: RwLock<State>,
    write_through: bool,
    segment_bytes: u64,
    id: Vec<u8>,
    /// One fold at a time (the background folder and the API's fold command).
    folding: Mutex<()>,
    /// Wakes the background folder early (after a rotation or a retention change).
    wake: (Mutex<bool>, Condvar),
    /// Held for the volume's life: one server per journal.
    _serve_lock: File,
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
    /// (created if missing), replays the journal and cuts off a torn tail.
    pub fn open_with(
        base: &Path,
        dir: &Path,
        options: JournalOptions,
    ) -> Result<(Self, Opened), VolumeError> {
        if !(4096..=MAX_SEGMENT_BYTES).contains(&options.segment_bytes) {
            return Err(VolumeError::SegmentSize(options.segment_bytes));
        }
        let journal_err = |source| VolumeError::Journal {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(journal_err)?;
        let serve_lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(journal::SERVE_LOCK_NAME))
            .map_err(journal_err)?;
        // SAFETY: flock only reads the descriptor, which `serve_lock` keeps open.
        if unsafe { libc::flock(serve_lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(VolumeError::JournalLocked {
                dir: dir.to_path_buf(),
            });
        }
        let image = RawFile::open(base, true)?;
        let capacity = image.capacity_bytes();
        drop(image);
        let fold_state = journal::read_state(dir)?;
        let folded_path = dir.join(journal::FOLDED_BASE_NAME);
        let folded = match OpenOptions::new().read(true).write(true).open(&folded_path) {
            Ok(file) => {
                let found = file.metadata().map_err(journal_err)?.len();
                if found != capacity {
                    return Err(VolumeError::FoldedBaseSize {
                        path: folded_path,
                        found,
                        expected: capacity,
                    });
                }
                Some(Arc::new(file))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(journal_err(e)),
        };
        let base_file = match &folded {
            Some(file) => file.clone(),
            None => Arc::new(File::open(base).map_err(journal_err)?),
        };

        let mut listed = journal::segments(dir)?;
        if listed.is_empty() {
            let first = fold_state.base_seq + 1;
            let path = journal::segment_path(dir, first);
            File::create(&path).map_err(journal_err)?;
            journal::sync_dir(dir).map_err(journal_err)?;
            listed.push((first, path));
        }
        if listed[0].0 > fold_state.base_seq + 1 {
            return Err(VolumeError::MissingRecords {
                dir: dir.to_path_buf(),
                base_seq: fold_state.base_seq,
                first: listed[0].0,
            });
        }
        let mut segments = VecDeque::new();
        for (first, path) in &listed {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(journal_err)?;
            segments.push_back(Segment {
                first_seq: *first,
                last_seq: first - 1,
                first_time_ns: 0,
                last_time_ns: 0,
                bytes: 0,
                synced_to: 0,
                path: path.clone(),
                file: Arc::new(file),
            });
        }
        let mut index = HashMap::new();
        let mut bookmarks = Vec::new();
        let mut current = 0usize;
        let summary = journal::scan(dir, |header, at, payload| {
            while segments[current].first_seq != at.segment {
                current += 1;
            }
            let segment = &mut segments[current];
            if segment.is_empty() {
                segment.first_time_ns = header.time_ns;
            }
            segment.last_seq = header.seq;
            segment.last_time_ns = header.time_ns;
            segment.bytes = at.offset + format::record_len(header.len);
            match header.kind {
                RecordKind::Write => {
                    let first = header.offset / SECTOR;
                    let data = at.offset + HEADER_LEN as u64;
                    for i in 0..u64::from(header.len) / SECTOR {
                        index.insert(first + i, pack(current as u32, data + i * SECTOR));
                    }
                }
                RecordKind::Bookmark if header.seq > fold_state.base_seq => {
                    bookmarks.push(Bookmark {
                        name: String::from_utf8_lossy(payload).into_owned(),
                        seq: header.seq,
                        time_ns: header.time_ns,
                    })
                }
                RecordKind::Bookmark | RecordKind::Sync => {}
            }
            true
        })?;
        let active = segments.back().expect("at least one segment was listed");
        if summary.unflushed_after_hole {
            tracing::warn!(
                segment = %active.path.display(),
                dropped_bytes = summary.dropped_len,
                "journal has a hole followed by records no flush had made durable (a power \
                 loss); cutting it there, as a disk's volatile cache would lose them"
            );
        } else if summary.dropped_len > 0 {
            tracing::warn!(
                segment = %active.path.display(),
                dropped_bytes = summary.dropped_len,
                "journal ends in a torn or corrupt record; cutting it off"
            );
        }
        if summary.dropped_len > 0 {
            active.file.set_len(active.bytes).map_err(journal_err)?;
            active.file.sync_all().map_err(journal_err)?;
        }
        let next_seq = summary.last_seq.max(fold_state.base_seq) + 1;
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
                segments,
                first_ordinal: 0,
                next_seq,
                index,
                bookmarks,
                base_seq: fold_state.base_seq,
                retention: options.retention,
            }),
            write_through: options.write_through,
            segment_bytes: options.segment_bytes,
            id,
            folding: Mutex::new(()),
            wake: (Mutex::new(false), Condvar::new()),
            _serve_lock: serve_lock,
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

    fn append(
        &self,
        state: &mut State,
        kind: RecordKind,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let len = format::record_len(payload.len() as u32);
        let active = state.active();
        // A sync point names an offset in its own segment, so it never starts a new one.
        if kind != RecordKind::Sync && !active.is_empty() && active.bytes + len > self.segment_bytes
        {
            self.rotate(state)?;
        }
        let seq = if kind == RecordKind::Sync {
            state.next_seq - 1
        } else {
            state.next_seq
        };
        let time_ns = journal::now_ns();
        let record = format::encode(kind, seq, time_ns, offset, payload);
        let ordinal = state.active_ordinal();
        let active = state.segments.back_mut().expect("an active segment");
        let at = active.bytes;
        active.file.write_all_at(&record, at)?;
        if active.is_empty() {
            active.first_time_ns = time_ns;
        }
        active.bytes += len;
        active.last_seq = seq;
        active.last_time_ns = time_ns;
        if kind == RecordKind::Write {
            let first = offset / SECTOR;
            let data = at + HEADER_LEN as u64;
            for i in 0..payload.len() as u64 / SECTOR {
                state
                    .index
                    .insert(first + i, pack(ordinal, data + i * SECTOR));
            }
        }
        if kind != RecordKind::Sync {
            state.next_seq += 1;
        }
        Ok(seq)
    }

    /// Records that segment `ordinal` was durable up to `end` (an fdatasync that started
    /// when it ended there has completed), unless a sync point already says as much. On
    /// open, such a point tells damage to durable records (refused) from a power loss's
    /// hole among unflushed ones (cut).
    fn record_sync_point(&self, state: &mut State, ordinal: u32, end: u64) -> io::Result<()> {
        // A segment closed since was synced whole when it was closed.
        if ordinal != state.active_ordinal() || end <= state.active().synced_to {
            return Ok(());
        }
        self.append(state, RecordKind::Sync, 0, &end.to_le_bytes())?;
        let active = state.segments.back_mut().expect("an active segment");
        active.synced_to = active.bytes;
        Ok(())
    }

    /// The active segment's file, ordinal and end, for a sync outside the lock.
    fn active_position(&self) -> io::Result<(Arc<File>, u32, u64)> {
        let state = self.read_state()?;
        let ordinal = state.active_ordinal();
        let active = state.active();
        Ok((active.file.clone(), ordinal, active.bytes))
    }

    /// fdatasyncs the active segment and records the sync point.
    fn sync_and_record(&self) -> io::Result<()> {
        let (file, ordinal, end) = self.active_position()?;
        // Synced outside the lock so the guest's writes keep going meanwhile; if the segment
        // is closed in between, closing it synced it.
        self.sync_file(&file)?;
        let mut state = self.write_state()?;
        self.record_sync_point(&mut state, ordinal, end)
    }

    /// Closes the active segment (fdatasync'ed, so only the last segment can ever end in a
    /// torn record) and starts a new one named by the next sequence number.
    fn rotate(&self, state: &mut State) -> io::Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        state.active().file.sync_data()?;
        let first_seq = state.next_seq;
        let path = journal::segment_path(&self.dir, first_seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        journal::sync_dir(&self.dir)?;
        state.segments.push_back(Segment {
            first_seq,
            last_seq: first_seq - 1,
            first_time_ns: 0,
            last_time_ns: 0,
            bytes: 0,
            synced_to: 0,
            path,
            file: Arc::new(file),
        });
        tracing::debug!(first_seq, "journal segment started");
        self.wake_folder();
        Ok(())
    }

    /// Appends a bookmark and makes it (and every write before it) durable; returns it.
    pub fn bookmark(&self, name: &str) -> io::Result<Bookmark> {
        if name.is_empty() || name.len() > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bookmark name is 1 to 256 bytes",
            ));
        }
        let mut state = self.write_state()?;
        let seq = self.append(&mut state, RecordKind::Bookmark, 0, name.as_bytes())?;
        let time_ns = state.active().last_time_ns;
        self.sync(&state)?;
        let ordinal = state.active_ordinal();
        let end = state.active().bytes;
        self.record_sync_point(&mut state, ordinal, end)?;
        let bookmark = Bookmark {
            name: name.into(),
            seq,
            time_ns,
        };
        state.bookmarks.push(bookmark.clone());
        Ok(bookmark)
    }

    /// Makes one bookmark across several volumes, a consistency group: every volume's
    /// journal gets a bookmark record while all of them are locked, so no write to any of
    /// them falls between the records; then each is made durable. Returns the bookmarks in
    /// the order of `volumes`.
    pub fn bookmark_group(volumes: &[&JournaledVolume], name: &str) -> io::Result<Vec<Bookmark>> {
        if name.is_empty() || name.len() > 256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bookmark name is 1 to 256 bytes",
            ));
        }
        // Locks are taken in journal-directory order, so two group bookmarks cannot
        // deadlock; a guest's write takes one volume's lock only.
        let mut order: Vec<usize> = (0..volumes.len()).collect();
        order.sort_by(|&a, &b| volumes[a].dir.cmp(&volumes[b].dir));
        let mut guards = Vec::new();
        for &i in &order {
            guards.push((i, volumes[i].write_state()?));
        }
        let mut made = vec![None; volumes.len()];
        for (i, state) in &mut guards {
            let volume = volumes[*i];
            let seq = volume.append(state, RecordKind::Bookmark, 0, name.as_bytes())?;
            let bookmark = Bookmark {
                name: name.into(),
                seq,
                time_ns: state.active().last_time_ns,
            };
            state.bookmarks.push(bookmark.clone());
            made[*i] = Some(bookmark);
        }
        drop(guards);
        let mut bookmarks = Vec::new();
        for (volume, made) in volumes.iter().zip(made) {
            let bookmark = made.expect("every volume got a bookmark");
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
        let segment = state
            .segments
            .iter()
            .find(|s| !s.is_empty() && s.last_seq > state.base_seq)?;
        // Folding works in whole segments, so a segment within reach starts after base_seq.
        Some(OldestPoint {
            seq: segment.first_seq,
            time_ns: segment.first_time_ns,
        })
    }

    /// The last sequence number folded into the base: points in time before it are gone.
    pub fn base_seq(&self) -> u64 {
        self.read_state().map(|s| s.base_seq).unwrap_or(0)
    }

    fn sync(&self, state: &State) -> io::Result<()> {
        self.sync_file(&state.active().file)
    }

    fn sync_file(&self, file: &File) -> io::Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        file.sync_data()
    }

    /// Size of the journal (every segment) in bytes and the last sequence number.
    pub fn journal_position(&self) -> (u64, u64) {
        self.read_state()
            .map(|s| (s.journal_bytes(), s.next_seq - 1))
            .unwrap_or((0, 0))
    }

    /// The number of segment files.
    pub fn segment_count(&self) -> usize {
        self.read_state().map(|s| s.segments.len()).unwrap_or(0)
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
        let first = offset / SECTOR;
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            if let Some(&entry) = state.index.get(&(first + i as u64)) {
                let (ordinal, at) = unpack(entry);
                let segment = state
                    .segment_by_ordinal(ordinal)
                    .ok_or_else(|| io::Error::other("index names a folded segment"))?;
                segment.file.read_exact_at(sector, at)?;
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
        // Every write acknowledged before this flush is already in a segment file, and every
        // segment but the active one was fdatasync'ed when it was closed.
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.sync_and_record()
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
        let segment = journal::segment_path(&journal, 1);
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
    fn a_flushed_last_record_that_is_damaged_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = base(dir.path(), 16);
        let journal = dir.path().join("j");
        let segment = three_records(&base_path, &journal, true);
        let mut bytes = std::fs::read(&segment).unwrap();
        let last = 2 * format::record_len(512) as usize;
        bytes[last + HEADER_LEN + 100] ^= 1;
        std::fs::write(&segment, &bytes).unwrap();
        match JournaledVolume::open(&base_path, &journal, false) {
            Err(VolumeError::Replay(JournalError::Corrupt { offset, seq: 3, .. })) => {
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
