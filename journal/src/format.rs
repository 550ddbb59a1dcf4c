//! The journal's on-disk format, version 2 (and version 1, which is still read). Everything
//! that reads or writes journal bytes goes through this module.
//!
//! # Segments
//!
//! A journal is a row of segment files. A **version-2 segment** starts with a 64-byte
//! segment header that names the journal and the volume it belongs to; records follow from
//! byte 64. A **version-1 segment** has no header: its first record starts at byte 0 (its
//! first bytes are a record's magic `SVJR`, or the file is empty).
//!
//! Segment header (version 2), little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SVJH` |
//! | 4 | 2 | format version (2) |
//! | 6 | 2 | header length in bytes (64) |
//! | 8 | 16 | journal UUID: made when the journal is created, the same in every segment |
//! | 24 | 16 | volume UUID: names the volume the journal's records apply to |
//! | 40 | 8 | volume size in bytes |
//! | 48 | 4 | sector size in bytes (512) |
//! | 52 | 8 | sequence number of the segment's first record (its file name says the same) |
//! | 60 | 4 | CRC32C of bytes 0..60 |
//!
//! # Records
//!
//! Records are aligned to 8 bytes (offsets counted from the start of the file). A record is
//! a 48-byte header followed by its payload and zero padding to the next multiple of 8:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SVJR` |
//! | 4 | 2 | format version: 2 (1 in version-1 segments) |
//! | 6 | 2 | kind: 1 write, 2 bookmark, 3 sync point, 4 zero extent (version 2 only); other values are later kinds |
//! | 8 | 8 | seq: increases by one per record that changes the volume or names a point (write, zero extent, bookmark); an annotation (flag bit 0) repeats the seq of the record before it |
//! | 16 | 8 | time: wall clock, nanoseconds since the Unix epoch |
//! | 24 | 8 | offset: byte offset in the volume (writes and zero extents; 0 otherwise) |
//! | 32 | 4 | length of the payload in bytes |
//! | 36 | 4 | flags (version 2; zero in version 1): bit 0 *annotation*, the other bits zero |
//! | 40 | 4 | CRC32C of bytes 0..40 and the payload |
//! | 44 | 4 | reserved, zero, not covered by the CRC |
//!
//! Payloads: a write's is the data written (a multiple of the sector size); a bookmark's is
//! its name in UTF-8; a sync point's is 8 bytes, the byte offset in its segment up to which
//! an fdatasync had completed when it was written (the sync point itself is not synced); a
//! zero extent's is 8 bytes, the length in bytes of the range at `offset` that reads as
//! zeroes from this record on (a write-zeroes or a discard; no data is stored).
//!
//! # Later kinds
//!
//! A record of a kind this version does not know (replication markers will be the first)
//! is handled by its annotation flag: an **annotation** (bit 0 set) changes no data and
//! repeats the previous seq, so a reader that does not know its kind skips it; a record of
//! an unknown kind **without** the flag may change the volume, so a reader refuses the
//! journal with [`FormatError::UnknownKind`]'s error rather than show a volume that is
//! wrong. Sync points are annotations in version 2.
//!
//! A record whose magic, version, CRC or length does not check out ends the journal: a
//! torn tail when nothing valid follows, damage otherwise (see [`crate::segment`]).

use std::fmt;

/// Bytes in a record header.
pub const HEADER_LEN: usize = 48;
/// Bytes in a version-2 segment header.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// The format version this module writes.
pub const VERSION: u16 = 2;
/// The oldest format version this module reads.
pub const OLDEST_VERSION: u16 = 1;
/// The largest payload a record may carry (larger lengths are corruption).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The sector size every journal uses today.
pub const SECTOR_BYTES: u32 = 512;
/// Flag bit 0: the record changes no data and repeats the previous seq; unknown kinds with
/// it are skipped.
pub const FLAG_ANNOTATION: u32 = 1;

const RECORD_MAGIC: [u8; 4] = *b"SVJR";
const SEGMENT_MAGIC: [u8; 4] = *b"SVJH";

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Data written to the volume.
    Write,
    /// A named point in the journal.
    Bookmark,
    /// Where the segment was known durable: written after an fdatasync completed.
    Sync,
    /// A range that reads as zeroes from here on (write-zeroes, discard); no payload data.
    ZeroExtent,
    /// A kind this version does not know; only annotations of it reach a reader.
    Unknown(u16),
}

impl RecordKind {
    /// The kind's code in the record header.
    pub fn code(self) -> u16 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Bookmark => 2,
            RecordKind::Sync => 3,
            RecordKind::ZeroExtent => 4,
            RecordKind::Unknown(code) => code,
        }
    }

    fn from_code(code: u16, version: u16) -> Self {
        match (code, version) {
            (1, _) => RecordKind::Write,
            (2, _) => RecordKind::Bookmark,
            (3, _) => RecordKind::Sync,
            (4, 2) => RecordKind::ZeroExtent,
            (code, _) => RecordKind::Unknown(code),
        }
    }

    /// Whether records of this kind repeat the previous seq instead of taking the next.
    pub fn is_annotation(self, flags: u32) -> bool {
        self == RecordKind::Sync || flags & FLAG_ANNOTATION != 0
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record is.
    pub kind: RecordKind,
    /// The format version it was written in.
    pub version: u16,
    /// Sequence number.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Flags (bit 0: annotation).
    pub flags: u32,
    /// CRC32C over the header's first 40 bytes and the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// Whether the record repeats the previous seq and changes no data.
    pub fn is_annotation(&self) -> bool {
        self.kind.is_annotation(self.flags)
    }
}

/// Why bytes are not a valid record or segment header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than a header.
    #[error("truncated header")]
    Truncated,
    /// Not a record (bad magic, version, flags or length).
    #[error("not a version-{0} journal record")]
    BadHeader(u16),
    /// The payload does not match the CRC.
    #[error("record checksum mismatch")]
    BadChecksum,
    /// Not a segment header (bad magic, version, length or CRC).
    #[error("not a journal segment header")]
    BadSegmentHeader,
    /// A record of a kind this version does not know, not marked skippable.
    #[error(
        "record kind {0} is unknown to this version of sealvm-journal and not marked \
         skippable; refusing to read on (a newer sealvm wrote this journal)"
    )]
    UnknownKind(u16),
}

/// A 128-bit identifier (random, RFC 4122 version 4 layout), printed in the usual
/// 8-4-4-4-12 hex form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A new random UUID.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes)?;
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Ok(Uuid(bytes))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Uuid {
    type Err = FormatError;

    fn from_str(text: &str) -> Result<Self, FormatError> {
        let hex: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
        if hex.len() != 32 {
            return Err(FormatError::BadSegmentHeader);
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let digits = std::str::from_utf8(pair).map_err(|_| FormatError::BadSegmentHeader)?;
            out[i] = u8::from_str_radix(digits, 16).map_err(|_| FormatError::BadSegmentHeader)?;
        }
        Ok(Uuid(out))
    }
}

impl serde::Serialize for Uuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Uuid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a UUID")))
    }
}

/// What a journal belongs to: written in every version-2 segment header and in the fold
/// state, and checked on every open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Identity {
    /// The journal.
    pub journal: Uuid,
    /// The volume its records apply to.
    pub volume: Uuid,
    /// The volume's size in bytes.
    pub volume_bytes: u64,
    /// The sector size in bytes.
    pub sector_bytes: u32,
}

/// A decoded version-2 segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Whom the segment belongs to.
    pub identity: Identity,
    /// The sequence number of its first record.
    pub first_seq: u64,
}

/// Encodes a version-2 segment header.
pub fn encode_segment_header(header: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    let mut out = [0u8; SEGMENT_HEADER_LEN];
    out[..4].copy_from_slice(&SEGMENT_MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
    out[8..24].copy_from_slice(&header.identity.journal.0);
    out[24..40].copy_from_slice(&header.identity.volume.0);
    out[40..48].copy_from_slice(&header.identity.volume_bytes.to_le_bytes());
    out[48..52].copy_from_slice(&header.identity.sector_bytes.to_le_bytes());
    out[52..60].copy_from_slice(&header.first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&out[..60]);
    out[60..64].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a version-2 segment header.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, FormatError> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN)
        .ok_or(FormatError::Truncated)?;
    if h[..4] != SEGMENT_MAGIC
        || u16_at(h, 4) != VERSION
        || usize::from(u16_at(h, 6)) != SEGMENT_HEADER_LEN
        || crc32c::crc32c(&h[..60]) != u32_at(h, 60)
    {
        return Err(FormatError::BadSegmentHeader);
    }
    let mut journal = [0u8; 16];
    journal.copy_from_slice(&h[8..24]);
    let mut volume = [0u8; 16];
    volume.copy_from_slice(&h[24..40]);
    Ok(SegmentHeader {
        identity: Identity {
            journal: Uuid(journal),
            volume: Uuid(volume),
            volume_bytes: u64_at(h, 40),
            sector_bytes: u32_at(h, 48),
        },
        first_seq: u64_at(h, 52),
    })
}

/// The format version of a segment whose first bytes are `start` (up to 4 bytes are
/// looked at): 2 for a segment header, 1 for a record or an empty file, `None` otherwise.
pub fn segment_version(start: &[u8]) -> Option<u16> {
    let n = start.len().min(4);
    if n == 0 {
        return Some(1);
    }
    if start[..n] == SEGMENT_MAGIC[..n] {
        Some(2)
    } else if start[..n] == RECORD_MAGIC[..n] {
        Some(1)
    } else {
        None
    }
}

/// Where records start in a segment of `version`.
pub fn records_start(version: u16) -> u64 {
    if version >= 2 {
        SEGMENT_HEADER_LEN as u64
    } else {
        0
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub fn record_len(payload_len: u32) -> u64 {
    (HEADER_LEN as u64 + u64::from(payload_len)).next_multiple_of(8)
}

/// The header of a record about to be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRecord {
    /// What it is.
    pub kind: RecordKind,
    /// Its seq.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Flags: sync points get [`FLAG_ANNOTATION`] whatever this says.
    pub flags: u32,
}

/// Encodes a version-2 record header for `payload` (which follows it, padded to 8 bytes:
/// see [`padding`]). Payloads longer than [`MAX_PAYLOAD`] are the caller's bug and are cut
/// to an empty length, which the CRC then refuses on read.
pub fn encode_header(record: &NewRecord, payload: &[u8]) -> [u8; HEADER_LEN] {
    encode_header_version(record, payload, VERSION)
}

fn encode_header_version(record: &NewRecord, payload: &[u8], version: u16) -> [u8; HEADER_LEN] {
    let len = u32::try_from(payload.len()).unwrap_or(0);
    let flags = if version >= 2 && record.kind == RecordKind::Sync {
        record.flags | FLAG_ANNOTATION
    } else {
        record.flags
    };
    let mut out = [0u8; HEADER_LEN];
    out[..4].copy_from_slice(&RECORD_MAGIC);
    out[4..6].copy_from_slice(&version.to_le_bytes());
    out[6..8].copy_from_slice(&record.kind.code().to_le_bytes());
    out[8..16].copy_from_slice(&record.seq.to_le_bytes());
    out[16..24].copy_from_slice(&record.time_ns.to_le_bytes());
    out[24..32].copy_from_slice(&record.offset.to_le_bytes());
    out[32..36].copy_from_slice(&len.to_le_bytes());
    out[36..40].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..40]), payload);
    out[40..44].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The zero bytes that pad a payload of `payload_len` bytes to the next record.
pub fn padding(payload_len: usize) -> &'static [u8] {
    const ZEROES: [u8; 8] = [0; 8];
    &ZEROES[..(8 - (HEADER_LEN + payload_len) % 8) % 8]
}

/// Encodes one whole version-2 record: header, payload and padding.
pub fn encode(record: &NewRecord, payload: &[u8]) -> Vec<u8> {
    encode_version(record, payload, VERSION)
}

/// Encodes one whole record in format `version` (1 exists for tests and fixtures).
pub fn encode_version(record: &NewRecord, payload: &[u8], version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 8);
    out.extend_from_slice(&encode_header_version(record, payload, version));
    out.extend_from_slice(payload);
    out.extend_from_slice(padding(payload.len()));
    out
}

/// Decodes a record header of format `version`; the payload's CRC is checked by
/// [`verify`]. A header of an unknown kind decodes (so that damage and torn tails are told
/// apart the same way for every kind); [`check_kind`] says whether it may be read past.
pub fn decode_header(bytes: &[u8], version: u16) -> Result<RecordHeader, FormatError> {
    let h = bytes.get(..HEADER_LEN).ok_or(FormatError::Truncated)?;
    if h[..4] != RECORD_MAGIC || u16_at(h, 4) != version {
        return Err(FormatError::BadHeader(version));
    }
    let kind = RecordKind::from_code(u16_at(h, 6), version);
    let len = u32_at(h, 32);
    let flags = u32_at(h, 36);
    let sector = SECTOR_BYTES;
    let bad_flags = if version == 1 {
        flags != 0 || matches!(kind, RecordKind::Unknown(_))
    } else {
        flags & !FLAG_ANNOTATION != 0 || (kind == RecordKind::Sync && flags != FLAG_ANNOTATION)
    };
    if len > MAX_PAYLOAD
        || bad_flags
        || (kind == RecordKind::Write && len % sector != 0)
        || (matches!(kind, RecordKind::Sync | RecordKind::ZeroExtent) && len != 8)
    {
        return Err(FormatError::BadHeader(version));
    }
    Ok(RecordHeader {
        kind,
        version,
        seq: u64_at(h, 8),
        time_ns: u64_at(h, 16),
        offset: u64_at(h, 24),
        len,
        flags,
        crc: u32_at(h, 40),
    })
}

/// Whether a reader may go past a record with `header`: known kinds and annotations yes,
/// an unknown kind that may change the volume no.
pub fn check_kind(header: &RecordHeader) -> Result<(), FormatError> {
    match header.kind {
        RecordKind::Unknown(code) if !header.is_annotation() => Err(FormatError::UnknownKind(code)),
        _ => Ok(()),
    }
}

/// Whether a record with `header` may follow the record with seq `last_seq`: the next seq,
/// or for an annotation the same one.
pub fn continues(header: &RecordHeader, last_seq: u64) -> bool {
    if header.is_annotation() {
        header.seq == last_seq
    } else {
        Some(header.seq) == last_seq.checked_add(1)
    }
}

/// The durable offset a sync point's payload names, `None` for other records.
pub fn sync_point(header: &RecordHeader, payload: &[u8]) -> Option<u64> {
    (header.kind == RecordKind::Sync).then(|| le_u64(payload))?
}

/// The length in bytes of the range a zero extent's payload names, `None` for other records.
pub fn zero_extent_len(header: &RecordHeader, payload: &[u8]) -> Option<u64> {
    (header.kind == RecordKind::ZeroExtent).then(|| le_u64(payload))?
}

fn le_u64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Checks `payload` against the CRC in the header bytes `header`.
pub fn verify(header: &[u8], parsed: &RecordHeader, payload: &[u8]) -> Result<(), FormatError> {
    let start = header.get(..40).ok_or(FormatError::Truncated)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(start), payload);
    if crc == parsed.crc {
        Ok(())
    } else {
        Err(FormatError::BadChecksum)
    }
}

fn u16_at(h: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([h[i], h[i + 1]])
}

fn u32_at(h: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]])
}

fn u64_at(h: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[i..i + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64) -> NewRecord {
        NewRecord {
            kind: RecordKind::Write,
            seq,
            time_ns: 99,
            offset: 4096,
            flags: 0,
        }
    }

    #[test]
    fn records_round_trip_and_are_aligned() {
        let bytes = encode(&write(7), &[0xab; 512]);
        assert_eq!(bytes.len() as u64, record_len(512));
        let header = decode_header(&bytes, 2).unwrap();
        assert_eq!(
            (header.kind, header.seq, header.offset, header.len),
            (RecordKind::Write, 7, 4096, 512)
        );
        verify(&bytes, &header, &bytes[HEADER_LEN..HEADER_LEN + 512]).unwrap();
        for name in ["a", "before-upgrade", "sixteen-chars-xx"] {
            let bookmark = NewRecord {
                kind: RecordKind::Bookmark,
                ..write(8)
            };
            let bytes = encode(&bookmark, name.as_bytes());
            assert_eq!(bytes.len() as u64, record_len(name.len() as u32));
            assert_eq!(bytes.len() % 8, 0);
        }
    }

    #[test]
    fn a_zero_extent_carries_its_length_and_no_data() {
        let record = NewRecord {
            kind: RecordKind::ZeroExtent,
            ..write(3)
        };
        let len = 1u64 << 40;
        let bytes = encode(&record, &len.to_le_bytes());
        assert_eq!(
            bytes.len(),
            56,
            "a zero extent of 1 TiB is one small record"
        );
        let header = decode_header(&bytes, 2).unwrap();
        assert_eq!(zero_extent_len(&header, &bytes[HEADER_LEN..56]), Some(len));
        assert!(!header.is_annotation());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(&write(1), &[7; 512]);
        for i in 0..HEADER_LEN + 512 {
            if (44..48).contains(&i) {
                continue; // reserved bytes are not covered
            }
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let ok = decode_header(&bad, 2).and_then(|h| {
                let payload = bad
                    .get(HEADER_LEN..HEADER_LEN + h.len as usize)
                    .ok_or(FormatError::Truncated)?;
                verify(&bad, &h, payload)
            });
            assert!(ok.is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn unknown_kinds_are_skipped_as_annotations_or_refused() {
        let marker = NewRecord {
            kind: RecordKind::Unknown(40),
            flags: FLAG_ANNOTATION,
            ..write(5)
        };
        let header = decode_header(&encode(&marker, b"replica-1"), 2).unwrap();
        assert!(check_kind(&header).is_ok());
        assert!(continues(&header, 5), "an annotation repeats the seq");
        let unknown = NewRecord {
            kind: RecordKind::Unknown(41),
            ..write(6)
        };
        let header = decode_header(&encode(&unknown, b"x"), 2).unwrap();
        assert_eq!(check_kind(&header), Err(FormatError::UnknownKind(41)));
    }

    #[test]
    fn version_one_records_are_read_with_their_own_rules() {
        let v1 = encode_version(&write(1), &[1; 512], 1);
        assert_eq!(decode_header(&v1, 1).unwrap().version, 1);
        assert!(decode_header(&v1, 2).is_err());
        let zero = NewRecord {
            kind: RecordKind::ZeroExtent,
            ..write(2)
        };
        let v1_zero = encode_version(&zero, &8u64.to_le_bytes(), 1);
        assert!(
            decode_header(&v1_zero, 1).is_err(),
            "v1 has no zero extents"
        );
        assert_eq!(segment_version(b"SVJR"), Some(1));
        assert_eq!(segment_version(b""), Some(1));
        assert_eq!(segment_version(b"SVJH"), Some(2));
        assert_eq!(segment_version(b"\0\0\0\0"), None);
    }

    #[test]
    fn segment_headers_round_trip_and_refuse_damage() {
        let header = SegmentHeader {
            identity: Identity {
                journal: Uuid::random().unwrap(),
                volume: Uuid::random().unwrap(),
                volume_bytes: 1 << 30,
                sector_bytes: 512,
            },
            first_seq: 77,
        };
        let bytes = encode_segment_header(&header);
        assert_eq!(decode_segment_header(&bytes).unwrap(), header);
        for i in 0..SEGMENT_HEADER_LEN {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(decode_segment_header(&bad).is_err(), "byte {i}");
        }
        let text = header.identity.journal.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.parse::<Uuid>().unwrap(), header.identity.journal);
    }

    #[test]
    fn garbage_lengths_are_refused() {
        let mut bytes = encode(&write(1), &[0; 512]);
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_header(&bytes, 2), Err(FormatError::BadHeader(2)));
        bytes[32..36].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(decode_header(&bytes, 2), Err(FormatError::BadHeader(2)));
        assert_eq!(decode_header(&bytes[..10], 2), Err(FormatError::Truncated));
    }
}
