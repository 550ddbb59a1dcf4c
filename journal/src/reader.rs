//! Reading a journal in order, from any point, with a cursor that survives segment
//! rotation and folding.
//!
//! A [`Reader`] yields records as `Result` items: damage, a gap between segments, an
//! unknown kind or records folded away under it end the iteration with an error that says
//! which. At the end of the valid records it yields `None`; called again, it reads on from
//! where it stopped, so a reader of a live journal sees what the writer appended since.
//! [`Reader::follow`] waits for that, woken by the writer ([`AppendSignal`]), not by
//! polling.
//!
//! A reader keeps the segment it reads open, so the segment's records stay readable even
//! if folding deletes the file; it finds the next segment by name when it gets there, and
//! if folding removed that one, says so ([`JournalError::FoldedAway`]).

use crate::dir::{self, JournalError};
use crate::format::{self, Identity, RecordHeader};
use crate::segment::{SegmentBytes, SegmentError, SegmentScanner, SegmentSummary};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Where a record lies: its segment (named by the seq of the segment's first record) and
/// its byte offset in that file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// The first sequence number of the segment, which names it.
    pub segment: u64,
    /// Byte offset in the segment file.
    pub offset: u64,
}

/// Where a reader stands: the next record starts at `at`, after the record `last_seq`.
/// Durable consumers keep one ([`crate::consumer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cursor {
    /// The segment the next record is in.
    pub segment: u64,
    /// Its byte offset there (0: the segment's first record).
    pub offset: u64,
    /// The seq of the last record read.
    pub last_seq: u64,
}

/// A record read from a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its header.
    pub header: RecordHeader,
    /// Where it lies.
    pub at: Location,
    /// Its payload (for a write, the data).
    pub payload: Vec<u8>,
}

/// What a reader has read so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Bytes of valid records in the last segment read (its file length once cut).
    pub valid_len: u64,
    /// Bytes after the valid records of the last segment read (a torn tail).
    pub dropped_len: u64,
    /// The dropped bytes include valid records after a hole that no sync point covers.
    pub unflushed_after_hole: bool,
    /// The valid records end before the last segment: a power loss tore a closed segment,
    /// lost one, or lost a segment's header, and no sync point after that says a flush had
    /// made it durable. The segments after the reader's cursor hold nothing flushed.
    pub cut_by_power_loss: bool,
    /// Records read that are not annotations.
    pub records: u64,
    /// Seq of the first such record (0 when there is none).
    pub first_seq: u64,
    /// Seq of the last valid record read (0 when there is none).
    pub last_seq: u64,
    /// Time of the first record read.
    pub first_time_ns: u64,
    /// Time of the last record read.
    pub last_time_ns: u64,
    /// Where the next read resumes.
    pub end: Cursor,
    /// Bytes of valid records read, in every segment (segment headers not counted).
    pub bytes: u64,
}

/// Wakes readers that follow a live journal; the writer signals after every append.
#[derive(Debug, Default)]
pub struct AppendSignal {
    appended: Mutex<u64>,
    condvar: Condvar,
}

impl AppendSignal {
    /// Tells waiting readers that records up to `seq` were appended.
    pub fn notify(&self, seq: u64) {
        if let Ok(mut appended) = self.appended.lock() {
            *appended = (*appended).max(seq);
            self.condvar.notify_all();
        }
    }

    /// How far the writer has appended, as last signalled.
    pub fn appended(&self) -> u64 {
        self.appended.lock().map_or(0, |a| *a)
    }

    /// Waits until something past `seen` is appended or `deadline` passes; true if it was.
    pub fn wait_past(&self, seen: u64, deadline: Instant) -> bool {
        let Ok(mut appended) = self.appended.lock() else {
            return false;
        };
        while *appended <= seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            match self.condvar.wait_timeout(appended, deadline - now) {
                Ok((guard, _)) => appended = guard,
                Err(_) => return false,
            }
        }
        true
    }
}

struct Current {
    path: PathBuf,
    scanner: SegmentScanner<File>,
}

/// Reads a journal's records in order from a cursor.
pub struct Reader {
    dir: PathBuf,
    identity: Option<Identity>,
    cursor: Cursor,
    /// Records up to this seq are read past without being returned.
    skip_through: u64,
    current: Option<Current>,
    summary: ScanSummary,
    failed: bool,
}

impl Reader {
    /// A reader of the journal in `dir` from its oldest record.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let first = dir::segments(dir)?.first().map_or(1, |(first, _)| *first);
        Self::at(
            dir,
            Cursor {
                segment: first,
                offset: 0,
                last_seq: first - 1,
            },
        )
    }

    /// A reader whose first record is the one after `seq`. Records after `seq` that have
    /// been folded away are [`JournalError::FoldedAway`].
    pub fn from(dir: &Path, seq: u64) -> Result<Self, JournalError> {
        let state = dir::read_state(dir)?;
        if seq < state.base_seq {
            return Err(JournalError::FoldedAway {
                asked: seq,
                base_seq: state.base_seq,
            });
        }
        let segments = dir::segments(dir)?;
        let start = segments
            .iter()
            .rev()
            .find(|(first, _)| *first <= seq + 1)
            .or(segments.first())
            .map_or(seq + 1, |(first, _)| *first);
        let mut reader = Self::at(
            dir,
            Cursor {
                segment: start,
                offset: 0,
                last_seq: start - 1,
            },
        )?;
        reader.skip_through = seq;
        Ok(reader)
    }

    /// A reader that resumes at `cursor`, where an earlier reader stopped
    /// ([`Reader::cursor`]).
    pub fn at(dir: &Path, cursor: Cursor) -> Result<Self, JournalError> {
        let state = dir::read_state(dir)?;
        Ok(Reader {
            dir: dir.to_path_buf(),
            identity: state.identity,
            cursor,
            skip_through: 0,
            current: None,
            summary: ScanSummary {
                last_seq: cursor.last_seq,
                end: cursor,
                ..ScanSummary::default()
            },
            failed: false,
        })
    }

    /// Where the reader stands: the next record it reads follows this.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// What has been read so far.
    pub fn summary(&self) -> &ScanSummary {
        &self.summary
    }

    /// The payload of the record [`Reader::next_record`] returned last.
    pub fn payload(&self) -> &[u8] {
        self.current.as_ref().map_or(&[], |c| c.scanner.payload())
    }

    /// The next record's header and location (its payload is [`Reader::payload`]), or
    /// `None` at the end of what is written.
    pub fn next_record(&mut self) -> Result<Option<(RecordHeader, Location)>, JournalError> {
        let mut rechecked = false;
        loop {
            if self.current.is_none() && !self.open_current()? {
                return Ok(None);
            }
            let current = self.current.as_mut().expect("opened above");
            let next = current.scanner.next_record().map_err(|e| match e {
                SegmentError::Io(source) => JournalError::Io {
                    path: current.path.clone(),
                    source,
                },
                SegmentError::Corrupt {
                    offset,
                    seq,
                    next_valid,
                } => JournalError::Corrupt {
                    path: current.path.clone(),
                    offset,
                    seq,
                    next_valid,
                },
                SegmentError::UnknownKind {
                    offset,
                    seq,
                    source,
                } => JournalError::UnknownKind {
                    path: current.path.clone(),
                    offset,
                    seq,
                    source,
                },
            })?;
            if let Some((header, offset)) = next {
                self.cursor.offset = offset + format::record_len(header.len);
                self.cursor.last_seq = header.seq;
                self.summary.bytes += format::record_len(header.len);
                self.summary.last_seq = header.seq;
                self.summary.last_time_ns = header.time_ns;
                self.summary.valid_len = self.cursor.offset;
                self.summary.end = self.cursor;
                if header.seq <= self.skip_through {
                    continue;
                }
                if !header.is_annotation() {
                    if self.summary.records == 0 {
                        self.summary.first_seq = header.seq;
                        self.summary.first_time_ns = header.time_ns;
                    }
                    self.summary.records += 1;
                }
                let at = Location {
                    segment: self.cursor.segment,
                    offset,
                };
                return Ok(Some((header, at)));
            }
            let ended = current.scanner.summary();
            let path = current.path.clone();
            self.note_end(&ended);
            // The end of this segment's valid records: go on in the next segment, if any.
            let segments = dir::segments(&self.dir)?;
            let Some(&(next, _)) = segments
                .iter()
                .find(|(first, _)| *first > self.cursor.segment)
            else {
                // Read on from here next time: the writer may append more.
                self.current = None;
                return Ok(None);
            };
            if ended.dropped_len > 0 && !rechecked {
                // A live writer may have completed the record seen half-written and closed
                // the segment since; look again before calling it a gap.
                rechecked = true;
                self.current = None;
                continue;
            }
            if next != self.cursor.last_seq + 1 {
                let base_seq = dir::read_state(&self.dir)?.base_seq;
                if base_seq > self.cursor.last_seq {
                    // The next segment was folded while this one was read.
                    return Err(JournalError::FoldedAway {
                        asked: self.cursor.last_seq,
                        base_seq,
                    });
                }
            }
            if ended.dropped_len > 0 || next != self.cursor.last_seq + 1 {
                // Rotation does not sync the segment it closes, so a power loss may tear
                // a closed segment's tail or lose a later segment. If a sync point after
                // here exists, a flush had made all of it durable: damage, refused.
                // Otherwise nothing from here on was flushed, and the journal ends here
                // (a writer cuts it here and removes the later segments).
                if self.sync_point_after(self.cursor.segment)? {
                    return Err(JournalError::Gap {
                        path,
                        offset: ended.valid_len,
                        seq: self.cursor.last_seq + 1,
                    });
                }
                self.summary.cut_by_power_loss = true;
                self.current = None;
                return Ok(None);
            }
            self.cursor = Cursor {
                segment: next,
                offset: 0,
                last_seq: self.cursor.last_seq,
            };
            self.current = None;
            rechecked = false;
        }
    }

    fn note_end(&mut self, ended: &SegmentSummary) {
        self.summary.valid_len = ended.valid_len;
        self.summary.dropped_len = ended.dropped_len;
        self.summary.unflushed_after_hole = ended.unflushed_after_hole;
    }

    /// Opens the segment the cursor names; false if there is nothing to read (yet).
    fn open_current(&mut self) -> Result<bool, JournalError> {
        let path = dir::segment_path(&self.dir, self.cursor.segment);
        let opened =
            match dir::open_segment(&path, self.cursor.segment, self.identity.as_ref(), false) {
                Ok(opened) => opened,
                Err(JournalError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return self.segment_gone();
                }
                Err(e) => return Err(e),
            };
        if opened.torn_header {
            // A segment whose header is not there yet (a live writer is creating it) or
            // never reached the disk (a power loss after rotation). The second is damage
            // if a flush covered it: then a sync point in it or after it says so.
            let later = dir::segments(&self.dir)?
                .iter()
                .any(|(first, _)| *first > self.cursor.segment);
            if later || opened.file.len_bytes().map_err(JournalError::io(&path))? > start_v2() {
                if self.sync_point_after(self.cursor.segment - 1)? {
                    return Err(JournalError::BadSegmentHeader { path });
                }
                self.summary.cut_by_power_loss = true;
            }
            return Ok(false);
        }
        let start = format::records_start(opened.version);
        let offset = self.cursor.offset.max(start);
        self.cursor.offset = offset;
        let scanner =
            SegmentScanner::new(opened.file, opened.version, offset, self.cursor.last_seq);
        self.current = Some(Current { path, scanner });
        Ok(true)
    }

    /// Whether any segment after `segment` holds a valid sync point: the sign that a flush
    /// made every earlier segment durable whole.
    fn sync_point_after(&self, segment: u64) -> Result<bool, JournalError> {
        for (first, path) in dir::segments(&self.dir)? {
            if first <= segment {
                continue;
            }
            let file = File::open(&path).map_err(JournalError::io(&path))?;
            if crate::segment::has_sync_point(&file, 2, start_v2(), first - 1)
                .map_err(JournalError::io(&path))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The segment the cursor names is not there: folded away (an error, unless every
    /// record in it had been read and the next segment is there), or not created yet.
    fn segment_gone(&mut self) -> Result<bool, JournalError> {
        let segments = dir::segments(&self.dir)?;
        if let Some(&(next, _)) = segments
            .iter()
            .find(|(first, _)| *first == self.cursor.last_seq + 1)
        {
            if next != self.cursor.segment {
                self.cursor = Cursor {
                    segment: next,
                    offset: 0,
                    last_seq: self.cursor.last_seq,
                };
                return self.open_current();
            }
        }
        let state = dir::read_state(&self.dir)?;
        if state.base_seq > self.cursor.last_seq.max(self.skip_through) {
            return Err(JournalError::FoldedAway {
                asked: self.cursor.last_seq.max(self.skip_through),
                base_seq: state.base_seq,
            });
        }
        Ok(false)
    }

    /// The next record, waiting until `deadline` for the writer to append one; `None` if
    /// none came in time. `signal` is the writer's ([`crate::writer::Writer::signal`]).
    pub fn follow(
        &mut self,
        signal: &AppendSignal,
        deadline: Instant,
    ) -> Result<Option<Record>, JournalError> {
        loop {
            let seen = signal.appended();
            if let Some(record) = self.next_owned()? {
                return Ok(Some(record));
            }
            if !signal.wait_past(seen.max(self.cursor.last_seq), deadline) {
                return self.next_owned();
            }
        }
    }

    fn next_owned(&mut self) -> Result<Option<Record>, JournalError> {
        Ok(self.next_record()?.map(|(header, at)| Record {
            header,
            at,
            payload: self.payload().to_vec(),
        }))
    }
}

impl Iterator for Reader {
    type Item = Result<Record, JournalError>;

    /// The next record; after an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_owned().transpose();
        if matches!(next, Some(Err(_))) {
            self.failed = true;
        }
        next
    }
}

/// Reads every record of the journal in `dir` from the start, calling `visit` with each
/// until it returns false; a convenience over [`Reader`] for callers that need no cursor.
pub fn scan(
    dir: &Path,
    visit: impl FnMut(&RecordHeader, Location, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    scan_from(dir, None, visit)
}

/// Like [`scan`], resuming at `from` (an earlier summary's `end`).
pub fn scan_from(
    dir: &Path,
    from: Option<Cursor>,
    mut visit: impl FnMut(&RecordHeader, Location, &[u8]) -> bool,
) -> Result<ScanSummary, JournalError> {
    let mut reader = match from {
        Some(cursor) => Reader::at(dir, cursor)?,
        None => Reader::open(dir)?,
    };
    while let Some((header, at)) = reader.next_record()? {
        if !visit(&header, at, reader.payload()) {
            break;
        }
    }
    Ok(reader.summary().clone())
}

/// Where records start in a version-2 segment.
fn start_v2() -> u64 {
    format::records_start(2)
}

/// The signal of a writer, shared with followers.
pub type SharedSignal = Arc<AppendSignal>;
