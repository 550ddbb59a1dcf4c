//! The write journal: every write a guest makes becomes a record appended to a segment
//! file, and a flush is acknowledged only after the segment is fdatasync'ed.
//!
//! This module reads and appends journals; [`crate::volume`] serves a volume from a base
//! image plus its journal, and [`crate::pit`] rebuilds any point in time from them.

pub mod format;

use format::{RecordHeader, RecordKind, HEADER_LEN};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// Prefix and suffix of segment file names: `segment-<first seq, 12 digits>.svj`.
const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".svj";
/// The fold state: how far history has been folded into the folded base.
pub const STATE_NAME: &str = "state.json";
/// The folded base: the base image with every folded record applied. It exists once the
/// first segment has been folded; until then the volume's own image is the base.
pub const FOLDED_BASE_NAME: &str = "folded-base.raw";
/// Held exclusively by the server while it folds a segment and shared by every reader
/// (`pit`), so history never disappears under a reader.
pub const FOLD_LOCK_NAME: &str = "fold.lock";
/// Held exclusively by the one server of a journal.
pub const SERVE_LOCK_NAME: &str = "serve.lock";

/// Errors reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal directory or segment could not be opened or read.
    #[error("cannot read journal segment {path}")]
    Io {
        /// The segment.
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
    /// The fold state file is unreadable.
    #[error("the journal's fold state {path} is unreadable: {reason}")]
    BadState {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A bookmark: a named point in the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Bookmark {
    /// Its name.
    pub name: String,
    /// The bookmark record's sequence number: writes before it are in the point in time.
    pub seq: u64,
    /// When it was made, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

/// Where a record lies: its segment (named by the sequence number of the segment's first
/// record) and its byte offset in that segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// The first sequence number of the segment, which names it.
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// Where a scan stopped: the next scan resumes here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The segment and offset the next record would start at.
    pub at: Location,
    /// The sequence number of the last record read (0 before the first).
    pub last_seq: u64,
}

/// What a scan of a journal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Bytes of valid records in the last segment read.
    pub valid_len: u64,
    /// Bytes after the valid records of the last segment (a torn tail), dropped on open.
    pub dropped_len: u64,
    /// The dropped bytes include valid records after a hole that no sync point covers:
    /// unflushed writes a power loss left out of order.
    pub unflushed_after_hole: bool,
    /// Write and bookmark records read (sync points are not counted).
    pub records: u64,
    /// Sequence number of the first record read (0 when there is none).
    pub first_seq: u64,
    /// Sequence number of the last valid record (0 when there is none).
    pub last_seq: u64,
    /// Time of the first valid record.
    pub first_time_ns: u64,
    /// Time of the last valid record.
    pub last_time_ns: u64,
    /// Where the next scan resumes.
    pub end: Cursor,
    /// Bytes of valid records in every segment read.
    pub bytes: u64,
}

/// The journal's fold state (`state.json`): everything up to `base_seq` is folded into
/// the folded base, or being folded; points in time before `base_seq` are gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoldState {
    /// The last sequence number folded (0: nothing folded, the volume's image is the base).
    pub base_seq: u64,
}

/// The path of the segment whose first record is `first_seq`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_seq:012}{SEGMENT_SUFFIX}"))
}

/// The journal's segments in order, as (first sequence number, path).
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| JournalError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
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

/// Reads the fold state; a journal without one has folded nothing.
pub fn read_state(dir: &Path) -> Result<FoldState, JournalError> {
    let path = dir.join(STATE_NAME);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| JournalError::BadState {
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FoldState::default()),
        Err(source) => Err(JournalError::Io { path, source }),
    }
}

/// Replaces the fold state atomically: a crash leaves the old or the new one.
pub fn write_state(dir: &Path, state: FoldState) -> io::Result<()> {
    let tmp = dir.join(format!("{STATE_NAME}.tmp"));
    let bytes = serde_json::to_vec(&state).map_err(io::Error::other)?;
    let mut file = File::create(&tmp)?;
    io::Write::write_all(&mut file, &bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_NAME))?;
    sync_dir(dir)
}

/// fsyncs a directory, making creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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

/// A shared hold on a journal's history: while it is held, the server folds nothing away.
/// Readers of a journal (restore, image access, listing) take one.
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
    let io_err = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&file), libc::LOCK_SH) } != 0 {
        return Err(io_err(io::Error::last_os_error()));
    }
    Ok(Some(HistoryHold { _file: file }))
}

/// Reads every segment in order, calling `visit` with each valid record, where it lies and
/// its payload, until the end or a torn tail: a last record that is incomplete or does not
/// check out, with no valid record after it. A damaged record with a valid record after it
/// is [`JournalError::Corrupt`]; a segment that does not continue the one before it is
/// [`JournalError::Gap`]. `visit` returns false to stop early.
pub fn scan(
    dir: &Path,
    visit: impl FnMut(&RecordHeader, Location, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    scan_from(dir, None, visit)
}

/// Like [`scan`], but resuming at `from`, where an earlier scan stopped (its
/// [`ScanSummary::end`]). The summary's counts cover only what this call read.
pub fn scan_from(
    dir: &Path,
    from: Option<Cursor>,
    mut visit: impl FnMut(&RecordHeader, Location, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    let all = segments(dir)?;
    let mut summary = ScanSummary::default();
    let Some(&(first_segment, _)) = all.first() else {
        summary.end = from.unwrap_or_default();
        return Ok(summary);
    };
    let mut cursor = from.unwrap_or(Cursor {
        at: Location {
            segment: first_segment,
            offset: 0,
        },
        last_seq: first_segment - 1,
    });
    summary.last_seq = cursor.last_seq;
    let start = all.partition_point(|&(first, _)| first < cursor.at.segment);
    let mut stopped = false;
    for (i, (first, path)) in all[start..].iter().enumerate() {
        let is_last = start + i + 1 == all.len();
        let offset = if *first == cursor.at.segment {
            cursor.at.offset
        } else {
            // A new segment starts with the record after the last one read.
            if *first != cursor.last_seq + 1 {
                let previous = all[start + i - 1].1.clone();
                return Err(JournalError::Gap {
                    path: previous,
                    offset: cursor.at.offset,
                    seq: cursor.last_seq + 1,
                });
            }
            0
        };
        let part = scan_segment(path, offset, cursor.last_seq, &mut |header, at, payload| {
            let keep_going = visit(
                header,
                Location {
                    segment: *first,
                    offset: at,
                },
                payload,
            );
            if !keep_going {
                stopped = true;
            }
            keep_going
        })?;
        if part.records > 0 {
            if summary.records == 0 {
                summary.first_seq = part.first_seq;
                summary.first_time_ns = part.first_time_ns;
            }
            summary.records += part.records;
            summary.last_seq = part.last_seq;
            summary.last_time_ns = part.last_time_ns;
        }
        summary.bytes += part.valid_len - offset;
        summary.valid_len = part.valid_len;
        summary.dropped_len = part.dropped_len;
        summary.unflushed_after_hole = part.unflushed_after_hole;
        cursor = Cursor {
            at: Location {
                segment: *first,
                offset: part.valid_len,
            },
            last_seq: part.last_seq,
        };
        if stopped {
            break;
        }
        if !is_last && part.dropped_len > 0 {
            // A segment is fdatasync'ed before the next one is created, so only the last
            // can end in a torn record.
            return Err(JournalError::Gap {
                path: path.clone(),
                offset: part.valid_len,
                seq: part.last_seq + 1,
            });
        }
    }
    summary.end = cursor;
    Ok(summary)
}

/// Scans one segment from byte `offset`, where the record after `last_seq` begins.
fn scan_segment(
    path: &Path,
    offset: u64,
    last_seq: u64,
    visit: &mut dyn FnMut(&RecordHeader, u64, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    let io_err = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(ScanSummary {
                valid_len: offset,
                last_seq,
                ..ScanSummary::default()
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let total = file.metadata().map_err(io_err)?.len();
    let positioned = file.try_clone().map_err(io_err)?;
    let mut file = file;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).map_err(io_err)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut summary = ScanSummary {
        valid_len: offset,
        last_seq,
        ..ScanSummary::default()
    };
    let mut header_bytes = [0u8; HEADER_LEN];
    let mut payload = Vec::new();
    let mut at = offset;
    loop {
        if read_full(&mut reader, &mut header_bytes).map_err(io_err)? < HEADER_LEN {
            break;
        }
        let Ok(header) = format::decode_header(&header_bytes) else {
            break;
        };
        if !format::continues(&header, summary.last_seq) {
            break;
        }
        let padded = format::record_len(header.len) - HEADER_LEN as u64;
        payload.resize(padded as usize, 0);
        if read_full(&mut reader, &mut payload).map_err(io_err)? < payload.len() {
            break;
        }
        let data = &payload[..header.len as usize];
        if format::verify(&header_bytes, &header, data).is_err() {
            break;
        }
        if header.kind != RecordKind::Sync {
            if summary.records == 0 {
                summary.first_seq = header.seq;
                summary.first_time_ns = header.time_ns;
            }
            summary.records += 1;
            summary.last_seq = header.seq;
            summary.last_time_ns = header.time_ns;
        }
        let keep_going = visit(&header, at, data);
        at += format::record_len(header.len);
        summary.valid_len = at;
        if !keep_going {
            return Ok(summary);
        }
    }
    if let Some(next_valid) =
        valid_record_after(&positioned, summary.valid_len, summary.last_seq).map_err(io_err)?
    {
        // A live server may have completed the record we saw half-written and appended
        // more since: then the record is valid now, and we simply stop where we read.
        let completed = record_at(&positioned, summary.valid_len)
            .map_err(io_err)?
            .is_some_and(|(header, _)| format::continues(&header, summary.last_seq));
        if !completed {
            // Valid records after a hole. If a sync point after the hole says the hole's
            // bytes had been made durable, they were damaged afterwards: refuse. If not,
            // the hole and what follows were never flushed, and a power loss wrote a later
            // page before an earlier one: cut there, like a torn tail.
            let durable =
                durable_point_after(&positioned, next_valid, summary.last_seq).map_err(io_err)?;
            if durable > summary.valid_len {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: summary.valid_len,
                    seq: summary.last_seq + 1,
                    next_valid,
                });
            }
            summary.unflushed_after_hole = true;
        }
    }
    // A live server may append while we read, so the file can outgrow `total`.
    summary.dropped_len = total.saturating_sub(summary.valid_len);
    Ok(summary)
}

/// The record at `at` and its payload, if it is complete and checks out.
fn record_at(file: &File, at: u64) -> io::Result<Option<(RecordHeader, Vec<u8>)>> {
    let mut header_bytes = [0u8; HEADER_LEN];
    if read_full_at(file, &mut header_bytes, at)? < HEADER_LEN {
        return Ok(None);
    }
    let Ok(header) = format::decode_header(&header_bytes) else {
        return Ok(None);
    };
    let mut payload = vec![0u8; header.len as usize];
    if read_full_at(file, &mut payload, at + HEADER_LEN as u64)? < payload.len() {
        return Ok(None);
    }
    Ok(format::verify(&header_bytes, &header, &payload)
        .is_ok()
        .then_some((header, payload)))
}

/// The furthest durable offset any sync point from `from` on claims, following valid
/// records (and hopping over further damage) to the end of the segment; 0 if none does.
fn durable_point_after(file: &File, from: u64, last_seq: u64) -> io::Result<u64> {
    let mut durable = 0;
    let mut at = from;
    let mut seq = last_seq;
    loop {
        match record_at(file, at)? {
            Some((header, payload)) if header.seq > seq || format::continues(&header, seq) => {
                if let Some(point) = format::sync_point(&header, &payload) {
                    durable = durable.max(point);
                }
                seq = header.seq;
                at += format::record_len(header.len);
            }
            _ => match valid_record_after(file, at, seq)? {
                Some(next) => at = next,
                None => return Ok(durable),
            },
        }
    }
}

/// The offset of the first valid record after the damaged one at `damaged`, if any: a
/// record at an 8-byte boundary whose header and CRC check out and whose sequence number
/// is later than `last_seq`, the last one before the damage (the seq bound keeps a guest's
/// data that happens to hold a journal record from counting).
fn valid_record_after(file: &File, damaged: u64, last_seq: u64) -> io::Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + HEADER_LEN];
    let mut start = damaged + 8;
    loop {
        let got = read_full_at(file, &mut buf, start)?;
        if got < HEADER_LEN {
            return Ok(None);
        }
        for i in (0..=got - HEADER_LEN).step_by(8) {
            let Ok(header) = format::decode_header(&buf[i..i + HEADER_LEN]) else {
                continue;
            };
            let at = start + i as u64;
            if header.seq > last_seq && record_at(file, at)?.is_some() {
                return Ok(Some(at));
            }
        }
        if got < buf.len() {
            return Ok(None);
        }
        // Headers straddling the chunk's end are looked at again from the next chunk.
        start += (got - HEADER_LEN + 8) as u64;
    }
}

fn read_full_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
