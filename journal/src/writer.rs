//! Appending to a journal: one writer per journal (`serve.lock`), records appended to the
//! active segment, rotation into a new segment, fdatasync with sync points, and the journal
//! state. The crash argument is in journal/DESIGN.md.
//!
//! An fdatasync that fails **poisons** the writer: after such a failure the kernel may
//! have dropped the dirty pages it could not write and marked them clean, so a later
//! fdatasync can succeed without the data ever reaching the disk (PostgreSQL's
//! "fsyncgate"). Every later append and sync fails until the journal is reopened and
//! replayed, which reads back what really is in the file.

use crate::dir::{self, JournalError, JournalState};
pub use crate::durability::SyncTarget;
use crate::durability::{ClosedSegment, DirEntries, Health};
use crate::format::{self, Identity, NewRecord, RecordHeader, RecordKind, SegmentHeader, Uuid};
use crate::reader::{AppendSignal, Reader};
use crate::storage::{self, Storage};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The smallest and largest segment sizes a writer accepts (extent maps hold a 32-bit
/// offset in a segment).
pub const SEGMENT_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=(1 << 30);

/// Errors opening a journal for writing.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Reading or checking the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Another process writes this journal.
    #[error("journal {dir} is in use by another sealvm-blk")]
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// The first segment starts after the folded history ends.
    #[error(
        "journal {dir} has folded history up to seq {base_seq} but its first segment starts \
         at seq {first}: records in between are missing"
    )]
    MissingRecords {
        /// The journal directory.
        dir: PathBuf,
        /// The last folded seq.
        base_seq: u64,
        /// The first segment's first seq.
        first: u64,
    },
    /// The segment size is out of range.
    #[error("segment size {0} is out of range (4 KiB to 1 GiB)")]
    SegmentSize(u64),
}

/// One segment file.
#[derive(Debug)]
pub struct SegmentState {
    /// Seq of its first record (its name).
    pub first_seq: u64,
    /// Seq of its last record, `first_seq - 1` while it has none.
    pub last_seq: u64,
    /// Time of its first record.
    pub first_time_ns: u64,
    /// Time of its last record.
    pub last_time_ns: u64,
    /// Where the next record goes (the file's valid length).
    pub bytes: u64,
    /// Where the segment stood after its last sync point.
    pub synced_to: u64,
    /// The file's path.
    pub path: PathBuf,
    /// The file, shared with syncs outside the writer's lock.
    pub file: Arc<File>,
    /// Set once the segment is closed and an fdatasync since has made all of it durable.
    /// Rotation does not sync the segment it closes (that would hold the writer's lock
    /// for the length of a large fdatasync); the next flush does, outside the lock.
    durable: Arc<AtomicBool>,
}

impl SegmentState {
    /// True while the segment holds no record.
    pub fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }

    /// Bytes of records (the segment header not counted).
    pub fn record_bytes(&self) -> u64 {
        self.bytes.saturating_sub(format::SEGMENT_HEADER_LEN as u64)
    }

    /// True once the segment is closed and an fdatasync made all of it durable.
    pub fn is_durable(&self) -> bool {
        self.durable.load(Ordering::Acquire)
    }

    fn new(first_seq: u64, path: PathBuf, file: File) -> SegmentState {
        SegmentState {
            first_seq,
            last_seq: first_seq - 1,
            first_time_ns: 0,
            last_time_ns: 0,
            bytes: format::SEGMENT_HEADER_LEN as u64,
            synced_to: 0,
            path,
            file: Arc::new(file),
            durable: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Where an appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its seq.
    pub seq: u64,
    /// Its segment's ordinal (see [`Writer::segment_by_ordinal`]).
    pub ordinal: u32,
    /// Byte offset of its payload in the segment.
    pub payload_offset: u64,
    /// Its time.
    pub time_ns: u64,
}

/// What replaying the journal on open found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records replayed (annotations not counted).
    pub records: u64,
    /// Bytes after the last valid record that were cut off.
    pub dropped_bytes: u64,
}

/// A record met while replaying: what the owner of an index needs.
pub struct ReplayedRecord<'a> {
    /// Its header.
    pub header: &'a RecordHeader,
    /// Its segment's ordinal.
    pub ordinal: u32,
    /// Byte offset of its payload in the segment.
    pub payload_offset: u64,
    /// Its payload.
    pub payload: &'a [u8],
}

/// The one writer of a journal.
pub struct Writer {
    dir: PathBuf,
    identity: Identity,
    state: JournalState,
    segments: VecDeque<SegmentState>,
    first_ordinal: u32,
    next_seq: u64,
    segment_bytes: u64,
    health: Arc<Health>,
    entries: Arc<DirEntries>,
    signal: Arc<AppendSignal>,
    _serve_lock: File,
}

impl Writer {
    /// Opens the journal in `dir` (created if missing) for the volume image `base`, checks
    /// that they belong together, replays every record through `visit` and cuts a torn
    /// tail. A version-1 journal is [`JournalError::NeedsUpgrade`].
    pub fn open(
        dir: &Path,
        base: &Path,
        segment_bytes: u64,
        visit: impl FnMut(ReplayedRecord<'_>),
    ) -> Result<(Writer, Replayed), WriterError> {
        Self::open_with(dir, base, segment_bytes, storage::disk(), visit)
    }

    /// [`Writer::open`] with every sync, rename and removal (on open, of the journal state,
    /// and later) going through `storage`: the crash simulator's seam.
    pub fn open_with(
        dir: &Path,
        base: &Path,
        segment_bytes: u64,
        storage: Arc<dyn Storage>,
        mut visit: impl FnMut(ReplayedRecord<'_>),
    ) -> Result<(Writer, Replayed), WriterError> {
        if !SEGMENT_BYTES_RANGE.contains(&segment_bytes) {
            return Err(WriterError::SegmentSize(segment_bytes));
        }
        std::fs::create_dir_all(dir).map_err(JournalError::io(dir))?;
        let lock_path = dir.join(dir::SERVE_LOCK_NAME);
        use sealvm_os::lock::{lock_file, LockFileError, LockMode, Wait};
        let serve_lock = match lock_file(&lock_path, LockMode::Exclusive, Wait::NoWait) {
            Ok(file) => file,
            Err(LockFileError::Held { .. }) => {
                return Err(WriterError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(LockFileError::Open { path, source } | LockFileError::Lock { path, source }) => {
                return Err(JournalError::Io { path, source }.into())
            }
        };
        let mut listed = dir::segments(dir)?;
        let mut state = dir::read_state(dir)?;
        let identity = match state.identity {
            Some(identity) => identity,
            None if listed.is_empty() => {
                // A new journal: name it and its volume.
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
                    base_seq: state.base_seq,
                    write_through: state.write_through,
                };
                dir::write_state_with(storage.as_ref(), dir, &state)?;
                identity
            }
            None => {
                return Err(JournalError::NeedsUpgrade {
                    dir: dir.to_path_buf(),
                }
                .into())
            }
        };
        dir::check_base(dir, base, &state)?;
        let health = Arc::new(Health::new(storage.clone()));
        if listed.is_empty() {
            let first = state.base_seq + 1;
            create_segment(dir, &identity, first, &health)?;
            listed.push((first, dir::segment_path(dir, first)));
        }
        if listed[0].0 > state.base_seq + 1 {
            return Err(WriterError::MissingRecords {
                dir: dir.to_path_buf(),
                base_seq: state.base_seq,
                first: listed[0].0,
            });
        }
        let mut segments = VecDeque::new();
        let mut torn_headers = Vec::new();
        for (first, path) in &listed {
            let opened = dir::open_segment(path, *first, Some(&identity), true)?;
            if opened.version == 1 {
                return Err(JournalError::NeedsUpgrade {
                    dir: dir.to_path_buf(),
                }
                .into());
            }
            torn_headers.push(opened.torn_header);
            segments.push_back(SegmentState::new(*first, path.clone(), opened.file));
        }
        // The reader stops at the end of the records a power loss may have kept: a torn
        // tail, a segment whose header never reached the disk, or a segment missing after
        // one that ends early, with no sync point after it (it refuses the journal if one
        // says the lost bytes had been durable).
        let mut reader = Reader::open(dir)?;
        let mut current = 0usize;
        while let Some((header, at)) = reader.next_record()? {
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
            visit(ReplayedRecord {
                header: &header,
                ordinal: current as u32,
                payload_offset: at.offset + format::HEADER_LEN as u64,
                payload: reader.payload(),
            });
        }
        let summary = reader.summary().clone();
        let stopped_in = reader.cursor().segment;
        // Segments after the one the reader stopped in hold only records no flush made
        // durable (their predecessor lost its tail, or they lost their header): remove them.
        let mut removed = Vec::new();
        while segments.len() > 1 && segments.back().is_some_and(|s| s.first_seq > stopped_in) {
            removed.extend(segments.pop_back());
        }
        for segment in &removed {
            tracing::warn!(
                segment = %segment.path.display(),
                "journal segment after a power loss's cut holds no flushed record; removing it"
            );
            storage
                .remove_file(&segment.path)
                .map_err(JournalError::io(&segment.path))?;
        }
        let active = segments.back().expect("at least one segment");
        if torn_headers[segments.len() - 1] {
            // Created by a writer that lost power before the header was durable; nothing in
            // it was flushed: write the header again over an empty segment.
            active
                .file
                .set_len(0)
                .map_err(JournalError::io(&active.path))?;
            write_segment_header(
                storage.as_ref(),
                &active.file,
                &active.path,
                &identity,
                active.first_seq,
            )?;
        }
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
        let dropped_len = if torn_headers[segments.len() - 1] {
            0
        } else {
            summary.dropped_len
        };
        if dropped_len > 0 {
            let io_err = JournalError::io(&active.path);
            active.file.set_len(active.bytes).map_err(io_err)?;
            storage
                .sync_all(&active.path, &active.file)
                .map_err(JournalError::io(&active.path))?;
        }
        if !removed.is_empty() {
            storage.sync_dir(dir).map_err(JournalError::io(dir))?;
        }
        let next_seq = summary.last_seq.max(state.base_seq) + 1;
        let signal = Arc::new(AppendSignal::default());
        signal.notify(next_seq - 1);
        // Closed segments may still be only in the page cache (a process that crashed
        // wrote them): the first sync makes them and the directory durable.
        let entries = Arc::new(DirEntries::default());
        entries.created.store(1, Ordering::Release);
        Ok((
            Writer {
                dir: dir.to_path_buf(),
                identity,
                state,
                segments,
                first_ordinal: 0,
                next_seq,
                segment_bytes,
                health,
                entries,
                signal,
                _serve_lock: serve_lock,
            },
            Replayed {
                records: summary.records,
                dropped_bytes: summary.dropped_len,
            },
        ))
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whom the journal belongs to.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The journal state as last written.
    pub fn state(&self) -> &JournalState {
        &self.state
    }

    /// Changes the journal state durably (crash-safe replacement of `state.json`).
    pub fn update_state(&mut self, change: impl FnOnce(&mut JournalState)) -> io::Result<()> {
        let mut state = self.state;
        change(&mut state);
        if state != self.state {
            dir::write_state_with(self.health.storage.as_ref(), &self.dir, &state)
                .map_err(io::Error::other)?;
            self.state = state;
        }
        Ok(())
    }

    /// Wakes readers that follow this journal.
    pub fn signal(&self) -> Arc<AppendSignal> {
        self.signal.clone()
    }

    /// The seq the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The segments, oldest first; the last is the active one.
    pub fn segments(&self) -> &VecDeque<SegmentState> {
        &self.segments
    }

    /// The active segment.
    pub fn active(&self) -> &SegmentState {
        self.segments
            .back()
            .expect("a writer always has an active segment")
    }

    /// The ordinal of the oldest segment (ordinals count segments since open).
    pub fn first_ordinal(&self) -> u32 {
        self.first_ordinal
    }

    /// The ordinal of the active segment.
    pub fn active_ordinal(&self) -> u32 {
        self.first_ordinal + self.segments.len() as u32 - 1
    }

    /// The segment with `ordinal`, if it is still there.
    pub fn segment_by_ordinal(&self, ordinal: u32) -> Option<&SegmentState> {
        let i = ordinal.checked_sub(self.first_ordinal)?;
        self.segments.get(i as usize)
    }

    /// Bytes of records in every segment.
    pub fn journal_bytes(&self) -> u64 {
        self.segments.iter().map(SegmentState::record_bytes).sum()
    }

    /// Forgets the oldest segment once it has been folded (the caller deletes the file).
    pub fn pop_oldest(&mut self) -> Option<SegmentState> {
        if self.segments.len() < 2 {
            return None;
        }
        self.first_ordinal += 1;
        self.segments.pop_front()
    }

    /// Fails every later fdatasync `count` times with EIO, as a failing disk would: the
    /// fault seam for tests of what a failed fdatasync does (the real failure needs a
    /// device that fails writes, such as dm-error).
    pub fn inject_sync_failures(&self, count: u32) {
        self.health
            .injected_failures
            .store(count, Ordering::Release);
    }

    /// The storage seam this writer's syncs, renames and removals go through; folding
    /// uses it too.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.health.storage.clone()
    }

    /// Fails if an earlier fdatasync failed.
    pub fn check_health(&self) -> io::Result<()> {
        self.health.check()
    }

    /// Appends a record of `kind` (not a sync point: see [`Writer::record_sync_point`]),
    /// starting a new segment first when the active one would grow past the segment size.
    pub fn append(
        &mut self,
        kind: RecordKind,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<Appended> {
        self.append_timed(kind, offset, payload, dir::now_ns())
    }

    /// Appends a record a replica received from its primary, with the primary's seq and
    /// time, so the replica's points in time and bookmarks are the primary's. `seq` must be
    /// the journal's next one ([`Writer::next_seq`]); anything else is refused, and the
    /// journal is unchanged.
    pub fn append_replicated(
        &mut self,
        kind: RecordKind,
        seq: u64,
        time_ns: u64,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<Appended> {
        if kind == RecordKind::Sync || seq != self.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a replicated {kind:?} record with seq {seq} does not follow seq {}",
                    self.next_seq - 1
                ),
            ));
        }
        self.append_timed(kind, offset, payload, time_ns)
    }

    fn append_timed(
        &mut self,
        kind: RecordKind,
        offset: u64,
        payload: &[u8],
        time_ns: u64,
    ) -> io::Result<Appended> {
        self.health.check()?;
        let len = format::record_len(payload.len() as u32);
        let active = self.active();
        let annotation = kind == RecordKind::Sync;
        if !annotation && !active.is_empty() && active.bytes + len > self.segment_bytes {
            self.rotate()?;
        }
        let seq = if annotation {
            self.next_seq - 1
        } else {
            self.next_seq
        };
        let record = NewRecord {
            kind,
            seq,
            time_ns,
            offset,
            flags: 0,
        };
        let ordinal = self.active_ordinal();
        let active = self.segments.back_mut().expect("an active segment");
        let at = active.bytes;
        // One positioned write of header, payload (from where the caller has it: never
        // copied into a record buffer) and padding.
        let header = format::encode_header(&record, payload);
        write_all_vectored_at(
            &active.file,
            &[&header, payload, format::padding(payload.len())],
            at,
        )?;
        if active.is_empty() {
            active.first_time_ns = time_ns;
        }
        active.bytes += len;
        active.last_seq = seq;
        active.last_time_ns = time_ns;
        if !annotation {
            self.next_seq += 1;
            self.signal.notify(seq);
        }
        Ok(Appended {
            seq,
            ordinal,
            payload_offset: at + format::HEADER_LEN as u64,
            time_ns,
        })
    }

    /// A handle to make every record appended so far durable (a flush), outside the
    /// caller's lock: closed segments not yet synced, new directory entries, and the active
    /// segment as it is now.
    pub fn sync_target(&self) -> SyncTarget {
        let active = self.active();
        SyncTarget {
            active: Some((active.file.clone(), active.path.clone())),
            ..self.closed_sync_target()
        }
    }

    /// A handle to make every closed segment and the directory entries durable, outside
    /// the caller's lock; the active segment is left alone. Folding syncs a segment this
    /// way before it gives up the segment's points in time.
    pub fn closed_sync_target(&self) -> SyncTarget {
        let closed = self
            .segments
            .iter()
            .take(self.segments.len() - 1)
            .filter(|s| !s.is_durable())
            .map(|s| ClosedSegment {
                file: s.file.clone(),
                path: s.path.clone(),
                durable: s.durable.clone(),
            })
            .collect();
        let generation = self.entries.created.load(Ordering::Acquire);
        let dir_generation =
            (self.entries.synced.load(Ordering::Acquire) < generation).then_some(generation);
        SyncTarget {
            closed,
            dir: self.dir.clone(),
            dir_generation,
            entries: self.entries.clone(),
            active: None,
            ordinal: self.active_ordinal(),
            end: self.active().bytes,
            health: self.health.clone(),
        }
    }

    /// Records that segment `ordinal` was durable up to `end` (an fdatasync that started
    /// when it ended there has completed), unless a sync point already says as much. On
    /// open, such a point tells damage to durable records (refused) from a power loss's
    /// hole among unflushed ones (cut); a sync point in a later segment also says every
    /// earlier segment had been durable whole.
    pub fn record_sync_point(&mut self, ordinal: u32, end: u64) -> io::Result<()> {
        // A segment closed since is not the active one: a sync point in the new active
        // segment would claim the closed segment durable whole, which this sync did not
        // make sure of (records may have been appended after the handle was taken).
        if ordinal != self.active_ordinal() || end <= self.active().synced_to {
            return Ok(());
        }
        self.append(RecordKind::Sync, 0, &end.to_le_bytes())?;
        let active = self.segments.back_mut().expect("an active segment");
        active.synced_to = active.bytes;
        Ok(())
    }

    /// Closes the active segment and starts a new one named by the next sequence number.
    /// Nothing is synced here, under the caller's lock: the next sync makes the closed
    /// segment, the new segment's directory entry and header durable
    /// ([`Writer::sync_target`]). Until then a power loss may tear the closed segment or
    /// lose the new one; replay cuts there, as nothing after it was flushed.
    pub fn rotate(&mut self) -> io::Result<()> {
        let first_seq = self.next_seq;
        let path = dir::segment_path(&self.dir, first_seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let header = format::encode_segment_header(&SegmentHeader {
            identity: self.identity,
            first_seq,
        });
        file.write_all_at(&header, 0)?;
        preallocate(&file, self.segment_bytes);
        self.entries.created.fetch_add(1, Ordering::AcqRel);
        self.segments
            .push_back(SegmentState::new(first_seq, path, file));
        tracing::debug!(first_seq, "journal segment started");
        Ok(())
    }
}

/// Reserves the blocks of a whole segment beyond the file's end (its length stays what is
/// written), so appends overwrite allocated blocks instead of reserving space page by
/// page. Only a hint: a file system that cannot is left to allocate as it goes.
fn preallocate(file: &File, segment_bytes: u64) {
    use std::os::unix::io::AsRawFd;
    let Ok(len) = libc::off_t::try_from(segment_bytes) else {
        return;
    };
    // SAFETY: fallocate only reads the descriptor, which `file` keeps open, and the range.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot preallocate a journal segment");
    }
}

/// Writes every byte of `parts`, one after the other, at `offset` of `file` with as few
/// `pwritev` calls as the kernel allows (one, unless it writes short), allocating nothing.
fn write_all_vectored_at(file: &File, parts: &[&[u8]; 3], offset: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let mut parts = *parts;
    let mut offset = offset;
    loop {
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 3];
        let mut count = 0;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            iovecs[count] = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
            count += 1;
        }
        if count == 0 {
            return Ok(());
        }
        let Ok(at) = libc::off_t::try_from(offset) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: the first `count` iovecs point into slices of `parts`, alive and unchanged
        // for the call; pwritev only reads them, and the descriptor `file` keeps open.
        let written =
            unsafe { libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), count as libc::c_int, at) };
        if written < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut written = written as usize;
        offset += written as u64;
        for part in parts.iter_mut() {
            let n = written.min(part.len());
            *part = &part[n..];
            written -= n;
        }
    }
}

/// Creates segment `first_seq` with its header, durable (file and directory entry): the
/// first segment of a journal, made on open.
fn create_segment(
    dir: &Path,
    identity: &Identity,
    first_seq: u64,
    health: &Health,
) -> Result<(PathBuf, File), JournalError> {
    let path = dir::segment_path(dir, first_seq);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(JournalError::io(&path))?;
    write_segment_header(health.storage.as_ref(), &file, &path, identity, first_seq)?;
    health
        .storage
        .sync_dir(dir)
        .map_err(JournalError::io(dir))?;
    Ok((path, file))
}

fn write_segment_header(
    storage: &dyn Storage,
    file: &File,
    path: &Path,
    identity: &Identity,
    first_seq: u64,
) -> Result<(), JournalError> {
    let header = format::encode_segment_header(&SegmentHeader {
        identity: *identity,
        first_seq,
    });
    storage
        .write_at(path, file, &header, 0)
        .and_then(|()| storage.sync_data(path, file))
        .map_err(JournalError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appended_record_is_its_encoding_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let journal = tmp.path().join("j");
        let (mut writer, _) = Writer::open(&journal, &base, 1 << 20, |_| {}).unwrap();
        let start = writer.active().bytes as usize;
        let mut expected = Vec::new();
        for (offset, payload) in [(0u64, vec![3u8; 65536]), (512, b"odd-length".to_vec())] {
            let kind = if payload.len() > 100 {
                RecordKind::Write
            } else {
                RecordKind::Bookmark
            };
            let appended = writer.append(kind, offset, &payload).unwrap();
            let record = NewRecord {
                kind,
                seq: appended.seq,
                time_ns: appended.time_ns,
                offset,
                flags: 0,
            };
            expected.extend_from_slice(&format::encode(&record, &payload));
        }
        let bytes = std::fs::read(&writer.active().path).unwrap();
        assert_eq!(bytes.len() as u64, writer.active().bytes);
        assert!(bytes[start..] == expected[..], "the records on disk differ");
    }

    #[test]
    fn a_vectored_write_puts_every_part_in_order_at_its_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = File::create(&path).unwrap();
        let big = vec![7u8; 3 << 20];
        write_all_vectored_at(&file, &[b"head", &big, b"tail"], 10).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 10 + 4 + big.len() + 4);
        assert_eq!(&bytes[10..14], b"head");
        assert!(bytes[14..14 + big.len()].iter().all(|&b| b == 7));
        assert_eq!(&bytes[bytes.len() - 4..], b"tail");
    }
}
