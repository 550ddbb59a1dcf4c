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
/// the segment and its payload, until the end or the first record that does not check out
/// (a torn tail). `visit` returns false to stop early.
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
    // A live server may append while we read, so the file can outgrow `total`.
    summary.dropped_len = total.saturating_sub(summary.valid_len);
    Ok(summary)
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
