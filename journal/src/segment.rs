//! Reading one segment: its records in order, and at the first record that does not check
//! out, the decision between a **torn tail** (cut: nothing durable is lost) and **damage**
//! (refused: records a flush made durable would be lost). The rules are in
//! journal/DESIGN.md ("Torn tails, holes and damage").
//!
//! The scanner reads through [`SegmentBytes`], so the same code runs on a segment file, on
//! bytes in memory (the fuzz target, and next a replication receiver's buffer) and on the
//! crash simulator's storage.

use crate::format::{self, RecordHeader, HEADER_LEN};
use std::fs::File;
use std::io;

/// Bytes of a segment, read at positions. A live writer may append while they are read.
pub trait SegmentBytes {
    /// The current length in bytes.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `at`; fewer only at the end.
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize>;
}

impl SegmentBytes for File {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut got = 0;
        while got < buf.len() {
            match FileExt::read_at(self, &mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

impl<T: SegmentBytes + ?Sized> SegmentBytes for &T {
    fn len_bytes(&self) -> io::Result<u64> {
        (**self).len_bytes()
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        (**self).read_at(buf, at)
    }
}

impl SegmentBytes for [u8] {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<usize> {
        let start = usize::try_from(at).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// Why a segment cannot be read on.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// Reading failed.
    #[error("read failed")]
    Io(#[from] io::Error),
    /// A record that does not check out is followed by valid records, and a sync point
    /// after it says its bytes had been durable: damage, not a torn tail.
    #[error(
        "damaged at byte {offset} (record seq {seq}); valid records follow from byte \
         {next_valid}, so this is not a torn tail"
    )]
    Corrupt {
        /// Byte offset of the damaged record.
        offset: u64,
        /// The sequence number the damaged record should have had.
        seq: u64,
        /// Byte offset of the first valid record after it.
        next_valid: u64,
    },
    /// A valid record of a kind this version cannot read past.
    #[error("record seq {seq} at byte {offset}: {source}")]
    UnknownKind {
        /// Byte offset of the record.
        offset: u64,
        /// Its seq.
        seq: u64,
        /// The format error naming the kind.
        #[source]
        source: format::FormatError,
    },
}

/// What a scan of one segment found, so far or at its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Where the valid records end: the next record goes here.
    pub valid_len: u64,
    /// Bytes after the valid records (a torn tail), known once the scan ended.
    pub dropped_len: u64,
    /// The dropped bytes include valid records after a hole that no sync point covers:
    /// unflushed writes a power loss left out of order.
    pub unflushed_after_hole: bool,
    /// Records read that are not annotations.
    pub records: u64,
    /// Seq of the first such record (0 when there is none).
    pub first_seq: u64,
    /// Seq of the last valid record (the seq before the segment while there is none).
    pub last_seq: u64,
    /// Time of the first record.
    pub first_time_ns: u64,
    /// Time of the last record.
    pub last_time_ns: u64,
}

const WINDOW: usize = 1 << 20;

/// Reads a segment's records one at a time, from a position where the record after
/// `last_seq` begins.
pub struct SegmentScanner<S: SegmentBytes> {
    src: S,
    version: u16,
    at: u64,
    summary: SegmentSummary,
    window: Vec<u8>,
    window_start: u64,
    window_len: usize,
    current: Option<(RecordHeader, u64)>,
    ended: bool,
}

impl<S: SegmentBytes> SegmentScanner<S> {
    /// A scanner of `src` (a segment of format `version`) from byte `offset`, where the
    /// record after `last_seq` starts.
    pub fn new(src: S, version: u16, offset: u64, last_seq: u64) -> Self {
        SegmentScanner {
            src,
            version,
            at: offset,
            summary: SegmentSummary {
                valid_len: offset,
                last_seq,
                ..SegmentSummary::default()
            },
            window: Vec::new(),
            window_start: 0,
            window_len: 0,
            current: None,
            ended: false,
        }
    }

    /// The next valid record and its byte offset, or `None` at the end of the valid
    /// records (then [`SegmentScanner::summary`] says what was cut). Damage before the end
    /// and unknown kinds are errors.
    pub fn next_record(&mut self) -> Result<Option<(RecordHeader, u64)>, SegmentError> {
        self.current = None;
        if self.ended {
            return Ok(None);
        }
        let at = self.at;
        let Some(header) = self.try_record(at)? else {
            self.ended = true;
            self.finish()?;
            return Ok(None);
        };
        format::check_kind(&header).map_err(|source| SegmentError::UnknownKind {
            offset: at,
            seq: header.seq,
            source,
        })?;
        if !header.is_annotation() {
            if self.summary.records == 0 {
                self.summary.first_seq = header.seq;
                self.summary.first_time_ns = header.time_ns;
            }
            self.summary.records += 1;
        }
        self.summary.last_seq = header.seq;
        self.summary.last_time_ns = header.time_ns;
        self.at = at + format::record_len(header.len);
        self.summary.valid_len = self.at;
        self.current = Some((header, at));
        Ok(Some((header, at)))
    }

    /// The payload of the record [`SegmentScanner::next_record`] returned last.
    pub fn payload(&self) -> &[u8] {
        match self.current {
            Some((header, at)) => {
                let start = (at + HEADER_LEN as u64 - self.window_start) as usize;
                &self.window[start..start + header.len as usize]
            }
            None => &[],
        }
    }

    /// What the scan found so far; complete once `next_record` returned `None`.
    pub fn summary(&self) -> SegmentSummary {
        self.summary
    }

    /// The record at `at` if it is complete, checks out and continues the sequence.
    fn try_record(&mut self, at: u64) -> io::Result<Option<RecordHeader>> {
        let version = self.version;
        let Some(head) = self.window_bytes(at, HEADER_LEN)? else {
            return Ok(None);
        };
        let Ok(header) = format::decode_header(head, version) else {
            return Ok(None);
        };
        if !format::continues(&header, self.summary.last_seq) {
            return Ok(None);
        }
        let len = format::record_len(header.len) as usize;
        let Some(record) = self.window_bytes(at, len)? else {
            return Ok(None);
        };
        let payload = &record[HEADER_LEN..HEADER_LEN + header.len as usize];
        if format::verify(record, &header, payload).is_err() {
            return Ok(None);
        }
        Ok(Some(header))
    }

    /// `len` bytes at `at` from the read window, refilled as needed; `None` past the end.
    fn window_bytes(&mut self, at: u64, len: usize) -> io::Result<Option<&[u8]>> {
        let inside = at >= self.window_start
            && at + len as u64 <= self.window_start + self.window_len as u64;
        if !inside {
            let left = self.src.len_bytes()?.saturating_sub(at);
            let want = len.max(WINDOW.min(usize::try_from(left).unwrap_or(WINDOW)));
            self.window.resize(want, 0);
            self.window_start = at;
            self.window_len = self.src.read_at(&mut self.window, at)?;
        }
        let start = (at - self.window_start) as usize;
        Ok(self.window[..self.window_len].get(start..start + len))
    }

    /// At the end of the valid records: a torn tail, a hole among unflushed records, or
    /// damage.
    fn finish(&mut self) -> Result<(), SegmentError> {
        let valid = self.summary.valid_len;
        let last_seq = self.summary.last_seq;
        let (src, version) = (&self.src, self.version);
        if let Some(next_valid) = valid_record_after(src, version, valid, last_seq)? {
            // A live writer may have completed the record seen half-written and appended
            // more since: then the record is valid now, and the scan simply stops here.
            let completed = record_at(src, version, valid)?
                .is_some_and(|(header, _)| format::continues(&header, last_seq));
            if !completed {
                // Valid records after a hole. If a sync point after it says the hole's bytes
                // had been durable, they were damaged afterwards: refuse. If not, nothing
                // from the hole on was ever flushed, and a power loss wrote a later page
                // before an earlier one: cut there, like a torn tail.
                let durable = durable_point_after(src, version, next_valid, last_seq)?;
                if durable > valid {
                    return Err(SegmentError::Corrupt {
                        offset: valid,
                        seq: last_seq + 1,
                        next_valid,
                    });
                }
                self.summary.unflushed_after_hole = true;
            }
        }
        // A live writer may append while we read, so the file can outgrow what we saw.
        self.summary.dropped_len = src.len_bytes()?.saturating_sub(valid);
        Ok(())
    }
}

/// The record at `at` and its payload, if it is complete and checks out.
fn record_at<S: SegmentBytes + ?Sized>(
    src: &S,
    version: u16,
    at: u64,
) -> io::Result<Option<(RecordHeader, Vec<u8>)>> {
    let mut header_bytes = [0u8; HEADER_LEN];
    if src.read_at(&mut header_bytes, at)? < HEADER_LEN {
        return Ok(None);
    }
    let Ok(header) = format::decode_header(&header_bytes, version) else {
        return Ok(None);
    };
    let mut payload = vec![0u8; header.len as usize];
    if src.read_at(&mut payload, at + HEADER_LEN as u64)? < payload.len() {
        return Ok(None);
    }
    Ok(format::verify(&header_bytes, &header, &payload)
        .is_ok()
        .then_some((header, payload)))
}

/// Whether any valid sync point lies at or after `from` in `src` (records after
/// `last_seq`, hopping over damage): a flush completed after everything before it.
pub fn has_sync_point<S: SegmentBytes + ?Sized>(
    src: &S,
    version: u16,
    from: u64,
    last_seq: u64,
) -> io::Result<bool> {
    Ok(durable_point_after(src, version, from, last_seq)? > 0)
}

/// The furthest durable offset any sync point from `from` on claims, following valid
/// records (and hopping over further damage) to the end of the segment; 0 if none does.
fn durable_point_after<S: SegmentBytes + ?Sized>(
    src: &S,
    version: u16,
    from: u64,
    last_seq: u64,
) -> io::Result<u64> {
    let mut durable = 0;
    let mut at = from;
    let mut seq = last_seq;
    loop {
        match record_at(src, version, at)? {
            Some((header, payload)) if header.seq > seq || format::continues(&header, seq) => {
                if let Some(point) = format::sync_point(&header, &payload) {
                    durable = durable.max(point);
                }
                seq = header.seq;
                at += format::record_len(header.len);
            }
            _ => match valid_record_after(src, version, at, seq)? {
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
fn valid_record_after<S: SegmentBytes + ?Sized>(
    src: &S,
    version: u16,
    damaged: u64,
    last_seq: u64,
) -> io::Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut start = damaged + 8;
    let left = src.len_bytes()?.saturating_sub(start);
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK)) + HEADER_LEN];
    loop {
        let got = src.read_at(&mut buf, start)?;
        if got < HEADER_LEN {
            return Ok(None);
        }
        for i in (0..=got - HEADER_LEN).step_by(8) {
            let Ok(header) = format::decode_header(&buf[i..i + HEADER_LEN], version) else {
                continue;
            };
            let at = start + i as u64;
            if header.seq > last_seq && record_at(src, version, at)?.is_some() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{NewRecord, RecordKind};

    fn record(kind: RecordKind, seq: u64, payload: &[u8]) -> Vec<u8> {
        format::encode(
            &NewRecord {
                kind,
                seq,
                time_ns: seq,
                offset: 0,
                flags: 0,
            },
            payload,
        )
    }

    fn scan(bytes: &[u8]) -> Result<(Vec<u64>, SegmentSummary), SegmentError> {
        let mut scanner = SegmentScanner::new(bytes, 2, 0, 0);
        let mut seqs = Vec::new();
        while let Some((header, _)) = scanner.next_record()? {
            seqs.push(header.seq);
        }
        Ok((seqs, scanner.summary()))
    }

    #[test]
    fn a_torn_last_record_is_cut_and_damage_covered_by_a_sync_point_refused() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            bytes.extend(record(RecordKind::Write, seq, &[seq as u8; 512]));
        }
        let second = format::record_len(512) as usize;
        let synced = bytes.len() as u64;
        bytes.extend(record(RecordKind::Sync, 3, &synced.to_le_bytes()));
        let (seqs, summary) = scan(&bytes).unwrap();
        assert_eq!(seqs, [1, 2, 3, 3]);
        assert_eq!(summary.records, 3);

        let mut torn = bytes[..2 * second + 100].to_vec();
        let (seqs, summary) = scan(&torn).unwrap();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(summary.dropped_len, 100);
        torn[second + 70] ^= 1;
        assert_eq!(
            scan(&torn).unwrap().0,
            [1],
            "damage in the last record is torn"
        );

        let mut damaged = bytes.clone();
        damaged[second + 70] ^= 1;
        match scan(&damaged) {
            Err(SegmentError::Corrupt { offset, seq: 2, .. }) => {
                assert_eq!(offset, second as u64)
            }
            other => panic!("damage under a sync point was not refused: {other:?}"),
        }
    }

    #[test]
    fn an_unknown_kind_is_refused_unless_it_is_an_annotation() {
        let mut bytes = record(RecordKind::Write, 1, &[1; 512]);
        let marker = NewRecord {
            kind: RecordKind::Unknown(9),
            seq: 1,
            time_ns: 0,
            offset: 0,
            flags: format::FLAG_ANNOTATION,
        };
        bytes.extend(format::encode(&marker, b"marker"));
        bytes.extend(record(RecordKind::Write, 2, &[2; 512]));
        assert_eq!(scan(&bytes).unwrap().0, [1, 1, 2]);
        bytes.extend(record(RecordKind::Unknown(10), 3, b"?"));
        assert!(matches!(
            scan(&bytes),
            Err(SegmentError::UnknownKind { seq: 3, .. })
        ));
    }
}
