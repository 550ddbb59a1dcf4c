//! The replication wire protocol, version 1: the messages a sender (sealvm-blk, reading its
//! journal through a consumer cursor) and a receiver (`sealvm-blk receive`, the helper)
//! exchange over one connection. Everything that reads or writes these bytes goes through
//! this module.
//!
//! # Frames
//!
//! Every message is one frame: a 16-byte header, then the body. Little-endian throughout.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SVRP` |
//! | 4 | 2 | protocol version (1) |
//! | 6 | 2 | message type (below) |
//! | 8 | 4 | body length in bytes, at most [`MAX_BODY`] |
//! | 12 | 4 | CRC32C of bytes 0..12 and the body |
//!
//! # Messages
//!
//! **1 Hello** (sender → receiver, always first): which volume the stream is for.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 16 | the primary's journal UUID |
//! | 16 | 16 | volume UUID |
//! | 32 | 8 | volume size in bytes |
//! | 40 | 4 | sector size in bytes |
//! | 44 | 1 | mode: 1 synchronous, 2 asynchronous, 3 snapshot |
//! | 45 | 1 | name length N, 1 to [`MAX_NAME`] |
//! | 46 | N | the volume's name, UTF-8 |
//!
//! **2 Welcome** (receiver → sender): where to resume. 24 bytes: the highest seq the
//! replica holds durably (8; 0 when it holds nothing) and the replica's journal UUID (16).
//! The sender continues with the record after that seq.
//!
//! **3 Record** (sender → receiver): one journal record, as the primary's journal has it.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | kind: 1 write, 2 bookmark, 4 zero extent (the journal's codes; sync points are not shipped: a replica makes its own) |
//! | 2 | 6 | reserved, zero |
//! | 8 | 8 | seq |
//! | 16 | 8 | time: nanoseconds since the Unix epoch, as the primary wrote it |
//! | 24 | 8 | offset in the volume in bytes (writes and zero extents; 0 for a bookmark) |
//! | 32 | … | payload: a write's data, a bookmark's name, a zero extent's length (8 bytes) |
//!
//! **4 Commit** (sender → receiver): make every record up to this seq durable, then Ack.
//! 8 bytes: seq.
//!
//! **5 Ack** (receiver → sender): every record up to this seq is durable at the replica.
//! 8 bytes: seq.
//!
//! **6 Refused** (either way, the last message of a connection): a 2-byte code
//! ([`RefusalCode`]) and a UTF-8 reason of at most [`MAX_REASON`] bytes.
//!
//! **7 Heartbeat** (either way): 8 bytes, the sender's wall clock in nanoseconds; keeps an
//! idle link's lag measurable.
//!
//! A body whose length does not fit its type, a reserved byte that is not zero, an unknown
//! type or kind, or a CRC that does not match is refused ([`WireError`]); nothing of such a
//! frame is used. Whether a well-formed record fits the stream (its seq, its extent) is
//! [`crate::stream`]'s check.

use sealvm_journal::{RecordKind, Uuid};

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// The protocol version this module speaks.
pub const VERSION: u16 = 1;
/// Bytes of a Record body before its payload.
pub const RECORD_HEADER_LEN: usize = 32;
/// The largest body a frame may carry: a record with the journal's largest payload.
pub const MAX_BODY: u32 = RECORD_HEADER_LEN as u32 + sealvm_journal::format::MAX_PAYLOAD;
/// The longest volume name in a Hello.
pub const MAX_NAME: usize = 64;
/// The longest reason in a Refused.
pub const MAX_REASON: usize = 1024;

const MAGIC: [u8; 4] = *b"SVRP";
const HELLO_FIXED: usize = 46;

/// Message type codes (the frame header's bytes 6..8).
mod code {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const RECORD: u16 = 3;
    pub const COMMIT: u16 = 4;
    pub const ACK: u16 = 5;
    pub const REFUSED: u16 = 6;
    pub const HEARTBEAT: u16 = 7;
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not `SVRP`: not a sealvm replication stream.
    #[error("not a sealvm replication frame (bad magic)")]
    BadMagic,
    /// A protocol version this side does not speak.
    #[error("replication protocol version {0} is not supported (this side speaks {VERSION})")]
    Version(u16),
    /// The CRC does not match: the frame was damaged or forged.
    #[error("frame checksum mismatch (type {msg_type}, {len} bytes)")]
    Checksum {
        /// The message type.
        msg_type: u16,
        /// The body length.
        len: u32,
    },
    /// A body longer than [`MAX_BODY`].
    #[error("frame body of {0} bytes is over the limit of {MAX_BODY}")]
    TooLong(u32),
    /// An unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u16),
    /// A body whose length or content does not fit its message type.
    #[error("malformed {what} message: {why}")]
    Malformed {
        /// The message type's name.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// How a group replicates (the Hello says which, so a receiver can report it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A write is acknowledged to the guest only once the replica has it durable.
    Synchronous,
    /// Acknowledged locally, shipped in order.
    Asynchronous,
    /// The extents changed between two bookmarks, shipped and applied as one step.
    Snapshot,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Synchronous => 1,
            Mode::Asynchronous => 2,
            Mode::Snapshot => 3,
        }
    }

    fn from_code(code: u8) -> Option<Mode> {
        match code {
            1 => Some(Mode::Synchronous),
            2 => Some(Mode::Asynchronous),
            3 => Some(Mode::Snapshot),
            _ => None,
        }
    }
}

/// Why one side ended the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// A frame did not decode.
    Malformed,
    /// The Hello names a different volume, size or journal than the replica holds.
    IdentityMismatch,
    /// The peer may not write this volume.
    NotPermitted,
    /// A record's seq skips ahead: records are missing.
    Gap,
    /// A record's seq was already received.
    Replay,
    /// A record's extent lies outside the volume, or its payload does not fit its kind.
    OutOfRange,
    /// The receiver failed (its disk, its journal); the sender may retry later.
    Internal,
    /// A code this version does not know.
    Other(u16),
}

impl RefusalCode {
    fn code(self) -> u16 {
        match self {
            RefusalCode::Malformed => 1,
            RefusalCode::IdentityMismatch => 2,
            RefusalCode::NotPermitted => 3,
            RefusalCode::Gap => 4,
            RefusalCode::Replay => 5,
            RefusalCode::OutOfRange => 6,
            RefusalCode::Internal => 7,
            RefusalCode::Other(code) => code,
        }
    }

    fn from_code(code: u16) -> RefusalCode {
        match code {
            1 => RefusalCode::Malformed,
            2 => RefusalCode::IdentityMismatch,
            3 => RefusalCode::NotPermitted,
            4 => RefusalCode::Gap,
            5 => RefusalCode::Replay,
            6 => RefusalCode::OutOfRange,
            7 => RefusalCode::Internal,
            other => RefusalCode::Other(other),
        }
    }
}

/// The first message of a stream: the volume it replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The primary's journal.
    pub journal: Uuid,
    /// The volume.
    pub volume: Uuid,
    /// Its size in bytes.
    pub volume_bytes: u64,
    /// Its sector size in bytes.
    pub sector_bytes: u32,
    /// How the group replicates.
    pub mode: Mode,
    /// The volume's name (what a receiver's permissions name).
    pub name: String,
}

/// One journal record on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippedRecord {
    /// Write, bookmark or zero extent.
    pub kind: RecordKind,
    /// Its seq in the primary's journal.
    pub seq: u64,
    /// When the primary wrote it (ns since the Unix epoch).
    pub time_ns: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// The data, the bookmark's name, or a zero extent's length.
    pub payload: Vec<u8>,
}

/// A replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Sender → receiver, first: the volume.
    Hello(Hello),
    /// Receiver → sender: the highest seq durable at the replica, and the replica's journal.
    Welcome {
        /// Highest durable seq (0: none).
        durable_seq: u64,
        /// The replica's journal.
        journal: Uuid,
    },
    /// Sender → receiver: one record.
    Record(ShippedRecord),
    /// Sender → receiver: make everything up to `seq` durable and acknowledge it.
    Commit {
        /// The seq.
        seq: u64,
    },
    /// Receiver → sender: everything up to `seq` is durable.
    Ack {
        /// The seq.
        seq: u64,
    },
    /// The last message of a connection: why it ends.
    Refused {
        /// Why, for programs.
        code: RefusalCode,
        /// Why, for people.
        reason: String,
    },
    /// Keeps an idle link measurable.
    Heartbeat {
        /// The sender's wall clock, ns since the Unix epoch.
        time_ns: u64,
    },
}

impl Message {
    /// The message type's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome { .. } => "welcome",
            Message::Record(_) => "record",
            Message::Commit { .. } => "commit",
            Message::Ack { .. } => "ack",
            Message::Refused { .. } => "refused",
            Message::Heartbeat { .. } => "heartbeat",
        }
    }

    /// The message as one frame, header and body.
    pub fn encode(&self) -> Vec<u8> {
        let (msg_type, body) = self.body();
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&msg_type.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&out[..12]);
        crc = crc32c::crc32c_append(crc, &body);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn body(&self) -> (u16, Vec<u8>) {
        match self {
            Message::Hello(hello) => {
                let name = hello.name.as_bytes();
                let mut b = Vec::with_capacity(HELLO_FIXED + name.len());
                b.extend_from_slice(&hello.journal.0);
                b.extend_from_slice(&hello.volume.0);
                b.extend_from_slice(&hello.volume_bytes.to_le_bytes());
                b.extend_from_slice(&hello.sector_bytes.to_le_bytes());
                b.push(hello.mode.code());
                b.push(name.len() as u8);
                b.extend_from_slice(name);
                (code::HELLO, b)
            }
            Message::Welcome {
                durable_seq,
                journal,
            } => {
                let mut b = durable_seq.to_le_bytes().to_vec();
                b.extend_from_slice(&journal.0);
                (code::WELCOME, b)
            }
            Message::Record(record) => {
                let mut b = Vec::with_capacity(RECORD_HEADER_LEN + record.payload.len());
                b.extend_from_slice(&record.kind.code().to_le_bytes());
                b.extend_from_slice(&[0; 6]);
                b.extend_from_slice(&record.seq.to_le_bytes());
                b.extend_from_slice(&record.time_ns.to_le_bytes());
                b.extend_from_slice(&record.offset.to_le_bytes());
                b.extend_from_slice(&record.payload);
                (code::RECORD, b)
            }
            Message::Commit { seq } => (code::COMMIT, seq.to_le_bytes().to_vec()),
            Message::Ack { seq } => (code::ACK, seq.to_le_bytes().to_vec()),
            Message::Refused { code: why, reason } => {
                let reason = truncate_utf8(reason, MAX_REASON);
                let mut b = why.code().to_le_bytes().to_vec();
                b.extend_from_slice(reason.as_bytes());
                (code::REFUSED, b)
            }
            Message::Heartbeat { time_ns } => (code::HEARTBEAT, time_ns.to_le_bytes().to_vec()),
        }
    }
}

/// The fields of a frame header, checked for everything that does not need the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type.
    pub msg_type: u16,
    /// The body length in bytes (at most [`MAX_BODY`]).
    pub body_len: u32,
    crc: u32,
}

/// Decodes and checks a frame header (magic, version, type, length limit).
pub fn decode_frame_header(bytes: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, WireError> {
    if bytes[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let msg_type = u16_at(bytes, 6);
    if !(code::HELLO..=code::HEARTBEAT).contains(&msg_type) {
        return Err(WireError::UnknownType(msg_type));
    }
    let body_len = u32_at(bytes, 8);
    if body_len > MAX_BODY {
        return Err(WireError::TooLong(body_len));
    }
    Ok(FrameHeader {
        msg_type,
        body_len,
        crc: u32_at(bytes, 12),
    })
}

/// Checks the frame's CRC over `header_bytes` and `body` and decodes the message. `body`
/// must be exactly `header.body_len` bytes.
pub fn decode_body(
    header_bytes: &[u8; FRAME_HEADER_LEN],
    header: FrameHeader,
    body: Vec<u8>,
) -> Result<Message, WireError> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header_bytes[..12]), &body);
    if crc != header.crc || body.len() != header.body_len as usize {
        return Err(WireError::Checksum {
            msg_type: header.msg_type,
            len: header.body_len,
        });
    }
    let malformed = |what, why| WireError::Malformed { what, why };
    let exactly = |what, len: usize| {
        if body.len() == len {
            Ok(())
        } else {
            Err(malformed(what, "wrong body length"))
        }
    };
    match header.msg_type {
        code::HELLO => {
            if body.len() < HELLO_FIXED + 1 {
                return Err(malformed("hello", "too short"));
            }
            let name_len = body[45] as usize;
            if name_len == 0 || name_len > MAX_NAME || body.len() != HELLO_FIXED + name_len {
                return Err(malformed("hello", "bad volume name length"));
            }
            let mode =
                Mode::from_code(body[44]).ok_or_else(|| malformed("hello", "unknown mode"))?;
            let name = std::str::from_utf8(&body[HELLO_FIXED..])
                .map_err(|_| malformed("hello", "volume name is not UTF-8"))?
                .to_owned();
            Ok(Message::Hello(Hello {
                journal: Uuid(uuid_at(&body, 0)),
                volume: Uuid(uuid_at(&body, 16)),
                volume_bytes: u64_at(&body, 32),
                sector_bytes: u32_at(&body, 40),
                mode,
                name,
            }))
        }
        code::WELCOME => {
            exactly("welcome", 24)?;
            Ok(Message::Welcome {
                durable_seq: u64_at(&body, 0),
                journal: Uuid(uuid_at(&body, 8)),
            })
        }
        code::RECORD => decode_record(body),
        code::COMMIT => {
            exactly("commit", 8)?;
            Ok(Message::Commit {
                seq: u64_at(&body, 0),
            })
        }
        code::ACK => {
            exactly("ack", 8)?;
            Ok(Message::Ack {
                seq: u64_at(&body, 0),
            })
        }
        code::REFUSED => {
            if body.len() < 2 || body.len() > 2 + MAX_REASON {
                return Err(malformed("refused", "bad reason length"));
            }
            let reason = std::str::from_utf8(&body[2..])
                .map_err(|_| malformed("refused", "reason is not UTF-8"))?
                .to_owned();
            Ok(Message::Refused {
                code: RefusalCode::from_code(u16_at(&body, 0)),
                reason,
            })
        }
        code::HEARTBEAT => {
            exactly("heartbeat", 8)?;
            Ok(Message::Heartbeat {
                time_ns: u64_at(&body, 0),
            })
        }
        other => Err(WireError::UnknownType(other)),
    }
}

fn decode_record(mut body: Vec<u8>) -> Result<Message, WireError> {
    let malformed = |why| WireError::Malformed {
        what: "record",
        why,
    };
    if body.len() < RECORD_HEADER_LEN {
        return Err(malformed("shorter than its header"));
    }
    if body[2..8].iter().any(|&b| b != 0) {
        return Err(malformed("reserved bytes are not zero"));
    }
    let kind = match u16_at(&body, 0) {
        1 => RecordKind::Write,
        2 => RecordKind::Bookmark,
        4 => RecordKind::ZeroExtent,
        _ => return Err(malformed("not a write, bookmark or zero extent")),
    };
    let seq = u64_at(&body, 8);
    let time_ns = u64_at(&body, 16);
    let offset = u64_at(&body, 24);
    // The payload keeps the body's allocation: a 64 MiB write is not copied again.
    body.drain(..RECORD_HEADER_LEN);
    Ok(Message::Record(ShippedRecord {
        kind,
        seq,
        time_ns,
        offset,
        payload: body,
    }))
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut out = [0; 4];
    out.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(out)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut out = [0; 8];
    out.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(out)
}

fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut out = [0; 16];
    out.copy_from_slice(&b[at..at + 16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message type, for round trips.
    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                journal: Uuid([1; 16]),
                volume: Uuid([2; 16]),
                volume_bytes: 1 << 30,
                sector_bytes: 512,
                mode: Mode::Asynchronous,
                name: "db-log".into(),
            }),
            Message::Welcome {
                durable_seq: 41,
                journal: Uuid([3; 16]),
            },
            Message::Record(ShippedRecord {
                kind: RecordKind::Write,
                seq: 42,
                time_ns: 1_700_000_000_000_000_000,
                offset: 4096,
                payload: vec![0xab; 1024],
            }),
            Message::Record(ShippedRecord {
                kind: RecordKind::ZeroExtent,
                seq: 43,
                time_ns: 1,
                offset: 0,
                payload: (1u64 << 20).to_le_bytes().to_vec(),
            }),
            Message::Record(ShippedRecord {
                kind: RecordKind::Bookmark,
                seq: 44,
                time_ns: 2,
                offset: 0,
                payload: b"nightly".to_vec(),
            }),
            Message::Commit { seq: 44 },
            Message::Ack { seq: 44 },
            Message::Refused {
                code: RefusalCode::Gap,
                reason: "expected seq 45, got 47".into(),
            },
            Message::Heartbeat { time_ns: 99 },
        ]
    }

    fn decode(frame: &[u8]) -> Result<Message, WireError> {
        let header_bytes: [u8; FRAME_HEADER_LEN] = frame[..FRAME_HEADER_LEN].try_into().unwrap();
        let header = decode_frame_header(&header_bytes)?;
        decode_body(&header_bytes, header, frame[FRAME_HEADER_LEN..].to_vec())
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            assert_eq!(decode(&message.encode()).unwrap(), message);
        }
    }

    #[test]
    fn the_frame_header_is_laid_out_as_documented() {
        let frame = Message::Commit { seq: 7 }.encode();
        assert_eq!(&frame[0..4], b"SVRP");
        assert_eq!(u16_at(&frame, 4), 1);
        assert_eq!(u16_at(&frame, 6), 4);
        assert_eq!(u32_at(&frame, 8), 8);
        assert_eq!(
            u32_at(&frame, 12),
            crc32c::crc32c_append(crc32c::crc32c(&frame[..12]), &frame[16..])
        );
        assert_eq!(u64_at(&frame, 16), 7);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        for message in samples() {
            let frame = message.encode();
            for at in 0..frame.len() {
                for bit in [0, 7] {
                    let mut bad = frame.clone();
                    bad[at] ^= 1 << bit;
                    assert!(
                        decode(&bad).is_err(),
                        "{message:?}: flip at {at} bit {bit} accepted"
                    );
                }
            }
        }
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let mut frame = Message::Commit { seq: 7 }.encode();
        frame[8..12].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let header: [u8; FRAME_HEADER_LEN] = frame[..16].try_into().unwrap();
        assert_eq!(
            decode_frame_header(&header),
            Err(WireError::TooLong(MAX_BODY + 1))
        );
    }

    #[test]
    fn sync_points_and_unknown_kinds_are_not_records_on_the_wire() {
        for kind in [3u16, 5, 0xffff] {
            let mut message = Message::Record(ShippedRecord {
                kind: RecordKind::Write,
                seq: 1,
                time_ns: 1,
                offset: 0,
                payload: vec![0; 512],
            })
            .encode();
            message[16..18].copy_from_slice(&kind.to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&message[..12]), &message[16..]);
            message[12..16].copy_from_slice(&crc.to_le_bytes());
            assert!(matches!(
                decode(&message),
                Err(WireError::Malformed { what: "record", .. })
            ));
        }
    }

    #[test]
    fn a_long_refusal_reason_is_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON);
        let frame = Message::Refused {
            code: RefusalCode::Internal,
            reason,
        }
        .encode();
        let Message::Refused { reason, .. } = decode(&frame).unwrap() else {
            panic!("not a refusal")
        };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
    }
}
