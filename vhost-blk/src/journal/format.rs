//! The journal's on-disk record format, version 1. Everything that reads or writes journal
//! bytes goes through this module.
//!
//! A journal segment is a sequence of records, each aligned to 8 bytes. A record is a
//! 48-byte header followed by its payload and zero padding to the next multiple of 8:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SVJR` |
//! | 4 | 2 | format version (1), little-endian |
//! | 6 | 2 | kind: 1 write, 2 bookmark, 3 sync point |
//! | 8 | 8 | seq: sequence number, increasing by one per write or bookmark; a sync point repeats the seq of the record before it |
//! | 16 | 8 | time: wall clock, nanoseconds since the Unix epoch |
//! | 24 | 8 | offset: byte offset in the volume (writes; 0 for bookmarks) |
//! | 32 | 4 | length of the payload in bytes |
//! | 36 | 4 | reserved, zero |
//! | 40 | 4 | CRC32C of bytes 0..40 and the payload |
//! | 44 | 4 | reserved, zero |
//!
//! A write's payload is the data written (a multiple of 512 bytes); a bookmark's is its name
//! in UTF-8; a sync point's is 8 bytes, little-endian: the byte offset in its segment up to
//! which an fdatasync had completed when it was written (so everything before that offset
//! had been durable; the sync point itself is not synced). A record whose magic, version, CRC or length does not check out ends the
//! journal. If it is the last record (nothing valid follows), it is a torn tail from a
//! crash and is dropped on open; if valid records follow, the journal is damaged and is
//! refused (see `journal::scan`).

/// Bytes in a record header.
pub const HEADER_LEN: usize = 48;
/// The format version this module reads and writes.
pub const VERSION: u16 = 1;
/// The largest payload a record may carry (larger lengths are corruption).
pub const MAX_PAYLOAD: u32 = 64 << 20;

const MAGIC: [u8; 4] = *b"SVJR";

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Data written to the volume.
    Write,
    /// A named point in the journal.
    Bookmark,
    /// Where the segment was known durable: written after an fdatasync completed.
    Sync,
}

impl RecordKind {
    fn code(self) -> u16 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Bookmark => 2,
            RecordKind::Sync => 3,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Bookmark),
            3 => Some(RecordKind::Sync),
            _ => None,
        }
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Write or bookmark.
    pub kind: RecordKind,
    /// Sequence number.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// CRC32C over the header's first 40 bytes and the payload.
    pub crc: u32,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than a header.
    #[error("truncated record header")]
    Truncated,
    /// Not a record (bad magic, version, kind or length).
    #[error("not a version-1 journal record")]
    BadHeader,
    /// The payload does not match the CRC.
    #[error("record checksum mismatch")]
    BadChecksum,
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub fn record_len(payload_len: u32) -> u64 {
    (HEADER_LEN as u64 + u64::from(payload_len)).next_multiple_of(8)
}

/// Encodes one record, header, payload and padding.
pub fn encode(kind: RecordKind, seq: u64, time_ns: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("payloads are limited to MAX_PAYLOAD");
    let mut out = Vec::with_capacity(record_len(len) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.code().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ns.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..40]), payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    out.resize(record_len(len) as usize, 0);
    out
}

/// Decodes a header; the payload's CRC is checked by [`verify`].
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, FormatError> {
    let h = bytes.get(..HEADER_LEN).ok_or(FormatError::Truncated)?;
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if h[..4] != MAGIC || u16_at(4) != VERSION {
        return Err(FormatError::BadHeader);
    }
    let kind = RecordKind::from_code(u16_at(6)).ok_or(FormatError::BadHeader)?;
    let len = u32_at(32);
    if len > MAX_PAYLOAD
        || (kind == RecordKind::Write && len % 512 != 0)
        || (kind == RecordKind::Sync && len != 8)
    {
        return Err(FormatError::BadHeader);
    }
    Ok(RecordHeader {
        kind,
        seq: u64_at(8),
        time_ns: u64_at(16),
        offset: u64_at(24),
        len,
        crc: u32_at(40),
    })
}

/// Whether a record with `header` may follow the record with seq `last_seq`: the next seq,
/// or for a sync point the same one.
pub fn continues(header: &RecordHeader, last_seq: u64) -> bool {
    header.seq == last_seq + 1 || (header.kind == RecordKind::Sync && header.seq == last_seq)
}

/// The durable offset a sync point's payload names, `None` for other records.
pub fn sync_point(header: &RecordHeader, payload: &[u8]) -> Option<u64> {
    if header.kind != RecordKind::Sync {
        return None;
    }
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Checks `payload` against the CRC in the header bytes `header`.
pub fn verify(header: &[u8], parsed: &RecordHeader, payload: &[u8]) -> Result<(), FormatError> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..40]), payload);
    if crc == parsed.crc {
        Ok(())
    } else {
        Err(FormatError::BadChecksum)
    }
}

/// Decodes arbitrary bytes as a sequence of records, as the replay on open does; a fuzzer
/// and replayed crash inputs call it. Panics only on a bug.
pub fn fuzz_decode(mut bytes: &[u8]) {
    while let Ok(header) = decode_header(bytes) {
        let len = record_len(header.len) as usize;
        let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + header.len as usize) else {
            return;
        };
        if verify(bytes, &header, payload).is_err() || bytes.len() < len {
            return;
        }
        bytes = &bytes[len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_aligned() {
        let bytes = encode(RecordKind::Write, 7, 99, 4096, &[0xab; 512]);
        assert_eq!(bytes.len() as u64, record_len(512));
        assert_eq!(bytes.len() % 8, 0);
        let header = decode_header(&bytes).unwrap();
        assert_eq!(
            (
                header.kind,
                header.seq,
                header.time_ns,
                header.offset,
                header.len
            ),
            (RecordKind::Write, 7, 99, 4096, 512)
        );
        verify(&bytes, &header, &bytes[HEADER_LEN..HEADER_LEN + 512]).unwrap();
        let bookmark = encode(RecordKind::Bookmark, 8, 100, 0, b"before-upgrade");
        assert_eq!(bookmark.len() % 8, 0);
        assert_eq!(decode_header(&bookmark).unwrap().kind, RecordKind::Bookmark);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(RecordKind::Write, 1, 2, 512, &[7; 512]);
        for i in 0..HEADER_LEN + 512 {
            if (44..48).contains(&i) {
                continue; // reserved bytes are not covered
            }
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let ok = decode_header(&bad).and_then(|h| {
                let payload = bad
                    .get(HEADER_LEN..HEADER_LEN + h.len as usize)
                    .ok_or(FormatError::Truncated)?;
                verify(&bad, &h, payload)
            });
            assert!(ok.is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn replayed_fuzz_inputs_decode_cleanly() {
        let good = encode(RecordKind::Write, 1, 2, 0, &[9; 512]);
        let mut truncated = good.clone();
        truncated.truncate(200);
        for input in [&b""[..], &good, &truncated, b"SVJR\x01\x00\x01\x00"] {
            fuzz_decode(input);
        }
    }

    #[test]
    fn garbage_lengths_are_refused() {
        let mut bytes = encode(RecordKind::Write, 1, 2, 0, &[0; 512]);
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_header(&bytes), Err(FormatError::BadHeader));
        bytes[32..36].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(decode_header(&bytes), Err(FormatError::BadHeader));
        assert_eq!(decode_header(&bytes[..10]), Err(FormatError::Truncated));
    }
}
