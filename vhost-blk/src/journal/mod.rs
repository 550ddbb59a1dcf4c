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

/// The segment file inside a journal directory. (One segment for now; rotation and folding
/// of old history are not built yet.)
pub const SEGMENT_NAME: &str = "segment-000001.svj";

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

/// What a scan of a segment found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Bytes of valid records from the start of the segment.
    pub valid_len: u64,
    /// Bytes after the valid records (a torn tail or corruption), dropped on open.
    pub dropped_len: u64,
    /// Records read.
    pub records: u64,
    /// Sequence number of the last valid record (0 when there is none).
    pub last_seq: u64,
    /// Time of the first and last valid records.
    pub first_time_ns: u64,
    /// Time of the last valid record.
    pub last_time_ns: u64,
}

/// Path of the segment in `dir`.
pub fn segment_path(dir: &Path) -> PathBuf {
    dir.join(SEGMENT_NAME)
}

/// Reads the segment in order, calling `visit` with each valid record, its byte offset in
/// the segment and its payload, until the end or a torn tail: a last record that is
/// incomplete or does not check out, with no valid record after it. A damaged record with
/// a valid record after it is [`JournalError::Corrupt`]. `visit` returns false to stop
/// early.
pub fn scan(
    dir: &Path,
    visit: impl FnMut(&RecordHeader, u64, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    scan_from(dir, 0, 0, visit)
}

/// Like [`scan`], but starting at byte `offset` of the segment, where the record after
/// `last_seq` begins (a position an earlier scan returned as `valid_len`/`last_seq`).
/// The summary's lengths and counts cover only what this call read.
pub fn scan_from(
    dir: &Path,
    offset: u64,
    last_seq: u64,
    mut visit: impl FnMut(&RecordHeader, u64, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    let path = segment_path(dir);
    let io_err = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ScanSummary::default()),
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
        if header.seq != summary.last_seq + 1 {
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
        if summary.records == 0 {
            summary.first_time_ns = header.time_ns;
        }
        summary.records += 1;
        summary.last_seq = header.seq;
        summary.last_time_ns = header.time_ns;
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
        if record_is_valid(&positioned, summary.valid_len, summary.last_seq + 1)
            .map_err(io_err)?
            .is_none()
        {
            return Err(JournalError::Corrupt {
                path,
                offset: summary.valid_len,
                seq: summary.last_seq + 1,
                next_valid,
            });
        }
    }
    // A live server may append while we read, so the file can outgrow `total`.
    summary.dropped_len = total.saturating_sub(summary.valid_len);
    Ok(summary)
}

/// The record at `at` if it is complete, checks out and has sequence number `seq`.
fn record_is_valid(file: &File, at: u64, seq: u64) -> io::Result<Option<RecordHeader>> {
    let mut header_bytes = [0u8; HEADER_LEN];
    if read_full_at(file, &mut header_bytes, at)? < HEADER_LEN {
        return Ok(None);
    }
    let Ok(header) = format::decode_header(&header_bytes) else {
        return Ok(None);
    };
    if header.seq != seq {
        return Ok(None);
    }
    let mut payload = vec![0u8; header.len as usize];
    if read_full_at(file, &mut payload, at + HEADER_LEN as u64)? < payload.len() {
        return Ok(None);
    }
    Ok(format::verify(&header_bytes, &header, &payload)
        .is_ok()
        .then_some(header))
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
            if header.seq > last_seq && record_is_valid(file, at, header.seq)?.is_some() {
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

/// The bookmarks in the journal at `dir`, in order.
pub fn bookmarks(dir: &Path) -> Result<Vec<Bookmark>, JournalError> {
    let mut found = Vec::new();
    scan(dir, |header, _, payload| {
        if header.kind == RecordKind::Bookmark {
            found.push(Bookmark {
                name: String::from_utf8_lossy(payload).into_owned(),
                seq: header.seq,
                time_ns: header.time_ns,
            });
        }
        true
    })?;
    Ok(found)
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
