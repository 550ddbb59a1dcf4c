//! The receiver's checks on one connection's messages, in order. A message that decoded
//! ([`crate::wire`]) may still not fit the stream: a record before the Hello, a Hello for
//! another volume or from a peer not allowed to write it, a seq that skips ahead (records
//! lost) or goes back (a replay), an extent outside the volume, a bookmark name that could
//! be misread. Each is refused with a [`StreamError`] before anything of it is applied, and
//! the connection is then over: every later message is refused too, so a receiver keeps
//! serving its last consistent point.

use crate::wire::{Hello, Message, RefusalCode, ShippedRecord};
use sealvm_journal::format::SECTOR_BYTES;
use sealvm_journal::{RecordKind, Uuid};

/// What the replica already holds for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdentity {
    /// The primary journal the replica's records came from.
    pub primary_journal: Uuid,
    /// The volume.
    pub volume: Uuid,
    /// Its size in bytes.
    pub volume_bytes: u64,
}

/// Why a message does not fit the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Something other than a Hello came first.
    #[error("the stream must start with a hello, not {0}")]
    NoHello(&'static str),
    /// A message a sender never sends (a second hello, a welcome, an ack).
    #[error("unexpected {0} from the sender")]
    Unexpected(&'static str),
    /// The peer may not write this volume.
    #[error("this peer may not replicate volume {0:?}")]
    NotPermitted(String),
    /// The Hello names something other than what the replica holds.
    #[error("the sender's {what} is {sent}, the replica's is {held}")]
    IdentityMismatch {
        /// Which field.
        what: &'static str,
        /// What the Hello says.
        sent: String,
        /// What the replica holds.
        held: String,
    },
    /// A Hello whose volume cannot exist (size zero or not whole sectors, another sector
    /// size).
    #[error("the hello describes an impossible volume: {0}")]
    BadVolume(&'static str),
    /// A record's seq skips ahead.
    #[error("records are missing: expected seq {expected}, got {got}")]
    Gap {
        /// The seq that should come next.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
    /// A record's seq was already received.
    #[error("seq {got} was already received (expected {expected}): a replayed record")]
    Replay {
        /// The seq that should come next.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
    /// A record that does not fit the volume.
    #[error("record seq {seq} is out of range: {why}")]
    OutOfRange {
        /// The record.
        seq: u64,
        /// What is wrong.
        why: String,
    },
    /// A commit of records not yet received.
    #[error("commit of seq {commit} but only seq {received} has been received")]
    CommitAhead {
        /// The seq the commit names.
        commit: u64,
        /// The last seq received.
        received: u64,
    },
    /// The connection already failed.
    #[error("the stream already failed: {0}")]
    AlreadyFailed(Box<StreamError>),
}

impl StreamError {
    /// What to tell the sender in the Refused that ends the connection.
    pub fn refusal(&self) -> Message {
        let code = match self {
            StreamError::NoHello(_) | StreamError::Unexpected(_) => RefusalCode::Malformed,
            StreamError::NotPermitted(_) => RefusalCode::NotPermitted,
            StreamError::IdentityMismatch { .. } | StreamError::BadVolume(_) => {
                RefusalCode::IdentityMismatch
            }
            StreamError::Gap { .. } => RefusalCode::Gap,
            StreamError::Replay { .. } => RefusalCode::Replay,
            StreamError::OutOfRange { .. } | StreamError::CommitAhead { .. } => {
                RefusalCode::OutOfRange
            }
            StreamError::AlreadyFailed(inner) => return inner.refusal(),
        };
        Message::Refused {
            code,
            reason: self.to_string(),
        }
    }
}

/// What an accepted message asks the receiver to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted<'m> {
    /// The stream is for this volume; answer with a Welcome resuming after `resume_after`.
    Hello {
        /// The Hello.
        hello: &'m Hello,
        /// The highest seq the replica holds durably.
        resume_after: u64,
    },
    /// Append this record to the replica's journal.
    Record(&'m ShippedRecord),
    /// Make everything up to `seq` durable, then Ack.
    Commit {
        /// The seq.
        seq: u64,
    },
    /// Nothing to do but note the peer is alive (its clock, for lag).
    Heartbeat {
        /// The peer's clock.
        time_ns: u64,
    },
    /// The peer ended the connection with this reason.
    PeerRefused {
        /// Why.
        reason: &'m str,
    },
}

/// One connection's state at the receiver.
#[derive(Debug)]
pub struct StreamState {
    held: Option<ReplicaIdentity>,
    permitted: Option<Vec<String>>,
    /// The last seq received on this connection (starts at the replica's durable seq).
    last_seq: u64,
    hello: Option<Hello>,
    failed: Option<StreamError>,
}

impl StreamState {
    /// A connection to a replica that holds records up to `durable_seq` of the volume
    /// `held` (`None`: a new replica, which adopts the first Hello's identity). When
    /// `permitted` is given, the Hello's volume name must be in it.
    pub fn new(
        held: Option<ReplicaIdentity>,
        durable_seq: u64,
        permitted: Option<Vec<String>>,
    ) -> Self {
        StreamState {
            held,
            permitted,
            last_seq: durable_seq,
            hello: None,
            failed: None,
        }
    }

    /// The last seq received on this connection.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The Hello, once accepted.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Checks `message` against the stream so far; on success the receiver does what the
    /// answer says. After the first error every message is refused.
    pub fn accept<'m>(&mut self, message: &'m Message) -> Result<Accepted<'m>, StreamError> {
        if let Some(failed) = &self.failed {
            return Err(StreamError::AlreadyFailed(Box::new(failed.clone())));
        }
        let result = self.check(message);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    fn check<'m>(&mut self, message: &'m Message) -> Result<Accepted<'m>, StreamError> {
        let name = message.name();
        if let Message::Refused { reason, .. } = message {
            return Ok(Accepted::PeerRefused { reason });
        }
        let Some(hello) = &self.hello else {
            let Message::Hello(hello) = message else {
                return Err(StreamError::NoHello(name));
            };
            self.check_hello(hello)?;
            self.hello = Some(hello.clone());
            return Ok(Accepted::Hello {
                hello,
                resume_after: self.last_seq,
            });
        };
        match message {
            Message::Record(record) => {
                check_record(record, hello.volume_bytes, self.last_seq)?;
                self.last_seq = record.seq;
                Ok(Accepted::Record(record))
            }
            Message::Commit { seq } if *seq > self.last_seq => Err(StreamError::CommitAhead {
                commit: *seq,
                received: self.last_seq,
            }),
            Message::Commit { seq } => Ok(Accepted::Commit { seq: *seq }),
            Message::Heartbeat { time_ns } => Ok(Accepted::Heartbeat { time_ns: *time_ns }),
            _ => Err(StreamError::Unexpected(name)),
        }
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), StreamError> {
        // The name names the replica's folder: one plain path component, nothing else.
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if hello.name.is_empty() || !hello.name.chars().all(plain) || hello.name.starts_with('.') {
            return Err(StreamError::BadVolume(
                "the name is not letters, digits, '-', '_' and '.' (not first)",
            ));
        }
        if let Some(permitted) = &self.permitted {
            if !permitted.contains(&hello.name) {
                return Err(StreamError::NotPermitted(hello.name.clone()));
            }
        }
        if hello.sector_bytes != SECTOR_BYTES {
            return Err(StreamError::BadVolume("the sector size is not 512 bytes"));
        }
        if hello.volume_bytes == 0 || hello.volume_bytes % u64::from(SECTOR_BYTES) != 0 {
            return Err(StreamError::BadVolume(
                "the size is not a whole number of sectors",
            ));
        }
        if let Some(held) = &self.held {
            let mismatch = |what, sent: String, held: String| StreamError::IdentityMismatch {
                what,
                sent,
                held,
            };
            if hello.volume != held.volume {
                return Err(mismatch(
                    "volume",
                    hello.volume.to_string(),
                    held.volume.to_string(),
                ));
            }
            if hello.volume_bytes != held.volume_bytes {
                return Err(mismatch(
                    "volume size",
                    hello.volume_bytes.to_string(),
                    held.volume_bytes.to_string(),
                ));
            }
            if hello.journal != held.primary_journal {
                return Err(mismatch(
                    "journal",
                    hello.journal.to_string(),
                    held.primary_journal.to_string(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks one record against the volume's size and the seq before it.
fn check_record(
    record: &ShippedRecord,
    volume_bytes: u64,
    last_seq: u64,
) -> Result<(), StreamError> {
    let expected = last_seq + 1;
    if record.seq > expected {
        return Err(StreamError::Gap {
            expected,
            got: record.seq,
        });
    }
    if record.seq < expected {
        return Err(StreamError::Replay {
            expected,
            got: record.seq,
        });
    }
    let out = |why: String| StreamError::OutOfRange {
        seq: record.seq,
        why,
    };
    let sector = u64::from(SECTOR_BYTES);
    let extent = |len: u64| {
        if len == 0 || len % sector != 0 || record.offset % sector != 0 {
            return Err(out(format!(
                "extent at {} of {len} bytes is not whole sectors",
                record.offset
            )));
        }
        match record.offset.checked_add(len) {
            Some(end) if end <= volume_bytes => Ok(()),
            _ => Err(out(format!(
                "extent at {} of {len} bytes ends past the volume's {volume_bytes} bytes",
                record.offset
            ))),
        }
    };
    match record.kind {
        RecordKind::Write => extent(record.payload.len() as u64),
        RecordKind::ZeroExtent => {
            let len: [u8; 8] = record
                .payload
                .as_slice()
                .try_into()
                .map_err(|_| out("a zero extent's payload is not 8 bytes".into()))?;
            extent(u64::from_le_bytes(len))
        }
        RecordKind::Bookmark => {
            if record.offset != 0 {
                return Err(out("a bookmark has an offset".into()));
            }
            let name = std::str::from_utf8(&record.payload)
                .map_err(|_| out("a bookmark name is not UTF-8".into()))?;
            sealvm_journal::bookmark::check_name(name)
                .map_err(|e| out(format!("bookmark name: {e}")))
        }
        RecordKind::Sync | RecordKind::Unknown(_) => Err(out(
            "only writes, zero extents and bookmarks are shipped".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Mode;

    const VOLUME: u64 = 1 << 20;

    fn hello() -> Message {
        Message::Hello(Hello {
            journal: Uuid([1; 16]),
            volume: Uuid([2; 16]),
            volume_bytes: VOLUME,
            sector_bytes: 512,
            mode: Mode::Asynchronous,
            name: "data".into(),
        })
    }

    fn write(seq: u64, offset: u64, len: usize) -> Message {
        Message::Record(ShippedRecord {
            kind: RecordKind::Write,
            seq,
            time_ns: seq,
            offset,
            payload: vec![1; len],
        })
    }

    fn held() -> ReplicaIdentity {
        ReplicaIdentity {
            primary_journal: Uuid([1; 16]),
            volume: Uuid([2; 16]),
            volume_bytes: VOLUME,
        }
    }

    #[test]
    fn a_stream_in_order_is_accepted_and_resumes_after_the_durable_seq() {
        let mut state = StreamState::new(Some(held()), 10, Some(vec!["data".into()]));
        let hello = hello();
        assert!(matches!(
            state.accept(&hello),
            Ok(Accepted::Hello {
                resume_after: 10,
                ..
            })
        ));
        for seq in 11..14 {
            let record = write(seq, (seq - 11) * 4096, 4096);
            assert!(matches!(state.accept(&record), Ok(Accepted::Record(_))));
        }
        assert_eq!(
            state.accept(&Message::Commit { seq: 13 }),
            Ok(Accepted::Commit { seq: 13 })
        );
        assert_eq!(state.last_seq(), 13);
    }

    #[test]
    fn gaps_replays_and_reordering_are_refused_and_end_the_stream() {
        for (records, expect_gap) in [
            (vec![11, 13], true),
            (vec![11, 11], false),
            (vec![12, 11], true),
        ] {
            let mut state = StreamState::new(None, 10, None);
            state.accept(&hello()).unwrap();
            let mut result = Ok(Accepted::Heartbeat { time_ns: 0 });
            let messages: Vec<Message> = records.iter().map(|&s| write(s, 0, 512)).collect();
            for message in &messages {
                result = state.accept(message);
                if result.is_err() {
                    break;
                }
            }
            let error = result.unwrap_err();
            assert_eq!(
                matches!(error, StreamError::Gap { .. }),
                expect_gap,
                "{records:?}: {error}"
            );
            assert!(matches!(
                error,
                StreamError::Gap { .. } | StreamError::Replay { .. }
            ));
            let next = write(state.last_seq() + 1, 0, 512);
            assert!(matches!(
                state.accept(&next),
                Err(StreamError::AlreadyFailed(_))
            ));
        }
    }

    #[test]
    fn extents_outside_the_volume_or_not_whole_sectors_are_refused() {
        for (offset, len) in [
            (VOLUME - 512, 1024),
            (u64::MAX - 511, 512),
            (100, 512),
            (0, 100),
            (0, 0),
        ] {
            let mut state = StreamState::new(None, 0, None);
            state.accept(&hello()).unwrap();
            let record = write(1, offset, len);
            assert!(
                matches!(state.accept(&record), Err(StreamError::OutOfRange { .. })),
                "offset {offset} len {len}"
            );
        }
        let mut state = StreamState::new(None, 0, None);
        state.accept(&hello()).unwrap();
        let zero = Message::Record(ShippedRecord {
            kind: RecordKind::ZeroExtent,
            seq: 1,
            time_ns: 1,
            offset: 0,
            payload: (VOLUME + 512).to_le_bytes().to_vec(),
        });
        assert!(matches!(
            state.accept(&zero),
            Err(StreamError::OutOfRange { .. })
        ));
    }

    #[test]
    fn the_hello_must_come_first_and_match_what_the_replica_holds() {
        let mut state = StreamState::new(None, 0, None);
        assert_eq!(
            state.accept(&write(1, 0, 512)),
            Err(StreamError::NoHello("record"))
        );

        let Message::Hello(mut other) = hello() else {
            unreachable!()
        };
        other.volume = Uuid([9; 16]);
        let mut state = StreamState::new(Some(held()), 0, None);
        let other = Message::Hello(other);
        assert!(matches!(
            state.accept(&other),
            Err(StreamError::IdentityMismatch { what: "volume", .. })
        ));

        for name in ["../etc", "a/b", ".hidden", ""] {
            let Message::Hello(mut bad) = hello() else {
                unreachable!()
            };
            bad.name = name.into();
            let bad = Message::Hello(bad);
            let mut state = StreamState::new(None, 0, None);
            assert!(
                matches!(state.accept(&bad), Err(StreamError::BadVolume(_))),
                "{name:?}"
            );
        }

        let mut state = StreamState::new(Some(held()), 0, Some(vec!["logs".into()]));
        assert_eq!(
            state.accept(&hello()),
            Err(StreamError::NotPermitted("data".into()))
        );
        let refusal = StreamError::NotPermitted("data".into()).refusal();
        assert!(matches!(
            refusal,
            Message::Refused {
                code: RefusalCode::NotPermitted,
                ..
            }
        ));
    }

    #[test]
    fn ambiguous_bookmark_names_and_commits_ahead_are_refused() {
        let mut state = StreamState::new(None, 0, None);
        state.accept(&hello()).unwrap();
        let bookmark = Message::Record(ShippedRecord {
            kind: RecordKind::Bookmark,
            seq: 1,
            time_ns: 1,
            offset: 0,
            payload: b"latest".to_vec(),
        });
        assert!(matches!(
            state.accept(&bookmark),
            Err(StreamError::OutOfRange { .. })
        ));

        let mut state = StreamState::new(None, 0, None);
        state.accept(&hello()).unwrap();
        assert_eq!(
            state.accept(&Message::Commit { seq: 1 }),
            Err(StreamError::CommitAhead {
                commit: 1,
                received: 0
            })
        );
    }
}
