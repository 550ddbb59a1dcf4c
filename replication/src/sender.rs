//! The sending side: ships a volume's journal to a receiver over one connection, reading
//! it through a named consumer cursor (`replica-NAME`), so nothing is written twice on the
//! primary and retention keeps every record the replica has not acknowledged (until the
//! consumer budget marks it for resync, which is reported, never silent).
//!
//! The stream: Hello, the receiver's Welcome says the highest seq it holds durably, records
//! follow from the next one in journal order (sync points stay home: a replica makes its
//! own), and a Commit after each batch waits for the receiver's Ack, which moves the
//! consumer cursor. Waiting for each batch's Ack is the flow control: at most one batch is
//! in flight.

use crate::decoder::{self, DecodeError};
use crate::wire::{Hello, Message, Mode, ShippedRecord};
use sealvm_journal::consumer::{self, ConsumerError};
use sealvm_journal::reader::AppendSignal;
use sealvm_journal::{dir, JournalError, Reader};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal is version 1 and names no volume: upgrade it first.
    #[error(
        "journal {0} names no volume (a version-1 journal): run `sealvm-blk journal upgrade` first"
    )]
    NoIdentity(PathBuf),
    /// The consumer cursor could not be kept.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The replica is behind what the journal still holds: it needs a resync.
    #[error("the replica holds seq {replica}, but the journal's history before seq {oldest} was folded away: the replica needs a resync")]
    NeedsResync {
        /// The replica's durable seq.
        replica: u64,
        /// The oldest seq the journal still has.
        oldest: u64,
    },
    /// The receiver refused the stream.
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// The receiver answered something a receiver never sends here.
    #[error("the receiver answered {0} where {1} was due")]
    Unexpected(&'static str, &'static str),
    /// Reading the receiver's answers failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The receiver closed the connection.
    #[error("the receiver closed the connection")]
    Closed,
    /// Writing to the connection failed.
    #[error("sending to the receiver failed")]
    Send(#[source] io::Error),
}

/// What to ship and how.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// The volume's journal folder.
    pub journal: PathBuf,
    /// The volume's name at the receiver.
    pub name: String,
    /// The replication mode the Hello announces.
    pub mode: Mode,
    /// A Commit goes out after this many records…
    pub batch_records: usize,
    /// …or this many payload bytes, whichever comes first.
    pub batch_bytes: usize,
    /// How long to wait for new records before looking again (when no in-process writer
    /// signal is given, the journal is read again after this long).
    pub poll: Duration,
}

impl SendConfig {
    /// Defaults for `journal` and `name`: asynchronous, commits every 256 records or 8 MiB.
    pub fn new(journal: PathBuf, name: String) -> Self {
        SendConfig {
            journal,
            name,
            mode: Mode::Asynchronous,
            batch_records: 256,
            batch_bytes: 8 << 20,
            poll: Duration::from_millis(50),
        }
    }

    /// The consumer cursor this stream keeps in the journal.
    pub fn consumer_name(&self) -> String {
        format!("replica-{}", self.name)
    }
}

/// What one connection shipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// The seq the receiver held durably when the connection started.
    pub resumed_after: u64,
    /// Records sent.
    pub records: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// The highest seq the receiver acknowledged durable.
    pub acked: u64,
}

/// Ships the journal over `stream`: until the journal has nothing more when `keep_going`
/// returns false (checked whenever the journal is caught up), or until an error. With
/// `signal` (the writer's, when the sender runs in the serving process), new records wake
/// the sender at once; without it the journal is polled.
pub fn ship<S: Read + Write>(
    config: &SendConfig,
    stream: &mut S,
    signal: Option<&AppendSignal>,
    mut keep_going: impl FnMut() -> bool,
) -> Result<SendReport, SendError> {
    let state = dir::read_state(&config.journal)?;
    let identity = state
        .identity
        .ok_or_else(|| SendError::NoIdentity(config.journal.clone()))?;
    send(
        stream,
        &Message::Hello(Hello {
            journal: identity.journal,
            volume: identity.volume,
            volume_bytes: identity.volume_bytes,
            sector_bytes: identity.sector_bytes,
            mode: config.mode,
            name: config.name.clone(),
        }),
    )?;
    let resumed_after = match expect(stream, "welcome")? {
        Message::Welcome { durable_seq, .. } => durable_seq,
        other => return Err(SendError::Unexpected(other.name(), "welcome")),
    };
    if resumed_after < state.base_seq {
        return Err(SendError::NeedsResync {
            replica: resumed_after,
            oldest: state.base_seq + 1,
        });
    }
    keep_cursor(config, resumed_after)?;
    let mut reader = Reader::from(&config.journal, resumed_after)?;
    let mut report = SendReport {
        resumed_after,
        acked: resumed_after,
        ..SendReport::default()
    };
    let mut batch = Batch::default();
    loop {
        let record = match signal {
            Some(signal) => {
                let deadline = Instant::now() + config.poll;
                reader.follow(signal, deadline)?
            }
            None => reader.next().transpose()?,
        };
        let Some(record) = record else {
            if batch.last_seq > report.acked {
                commit(config, stream, batch.last_seq, &mut report)?;
                batch = Batch::default();
            }
            if !keep_going() {
                return Ok(report);
            }
            if signal.is_none() {
                std::thread::sleep(config.poll);
            }
            continue;
        };
        if record.header.is_annotation() {
            continue;
        }
        let len = record.payload.len();
        send(
            stream,
            &Message::Record(ShippedRecord {
                kind: record.header.kind,
                seq: record.header.seq,
                time_ns: record.header.time_ns,
                offset: record.header.offset,
                payload: record.payload,
            }),
        )?;
        report.records += 1;
        report.bytes += len as u64;
        batch.records += 1;
        batch.bytes += len;
        batch.last_seq = record.header.seq;
        if batch.records >= config.batch_records || batch.bytes >= config.batch_bytes {
            commit(config, stream, batch.last_seq, &mut report)?;
            batch = Batch::default();
        }
    }
}

#[derive(Default)]
struct Batch {
    records: usize,
    bytes: usize,
    last_seq: u64,
}

/// Sends a Commit for `seq`, waits for its Ack and moves the consumer cursor there.
fn commit<S: Read + Write>(
    config: &SendConfig,
    stream: &mut S,
    seq: u64,
    report: &mut SendReport,
) -> Result<(), SendError> {
    send(stream, &Message::Commit { seq })?;
    loop {
        match expect(stream, "ack")? {
            Message::Ack { seq: acked } if acked == seq => break,
            Message::Heartbeat { .. } => {}
            other => return Err(SendError::Unexpected(other.name(), "ack")),
        }
    }
    consumer::advance(&config.journal, &config.consumer_name(), seq)?;
    report.acked = seq;
    Ok(())
}

/// Makes the consumer cursor say the replica holds `durable`: registered the first time,
/// and set back or forward to what the replica really holds (an Ack lost in a crash, or a
/// replica restored from an older copy).
fn keep_cursor(config: &SendConfig, durable: u64) -> Result<(), SendError> {
    let name = config.consumer_name();
    let existing = consumer::list(&config.journal)?
        .into_iter()
        .find(|c| c.name == name);
    match existing {
        Some(c) if c.resync => Err(ConsumerError::NeedsResync(name).into()),
        Some(c) if c.seq <= durable => {
            consumer::advance(&config.journal, &name, durable)?;
            Ok(())
        }
        _ => {
            consumer::register(&config.journal, &name, durable)?;
            Ok(())
        }
    }
}

/// Reads the next message; a Refused or a closed connection is an error.
fn expect<S: Read>(stream: &mut S, due: &'static str) -> Result<Message, SendError> {
    match decoder::read_message(stream)? {
        Some(Message::Refused { reason, .. }) => Err(SendError::Refused(reason)),
        Some(message) => Ok(message),
        None => {
            tracing::debug!(due, "the receiver closed the connection");
            Err(SendError::Closed)
        }
    }
}

fn send<S: Write>(stream: &mut S, message: &Message) -> Result<(), SendError> {
    stream
        .write_all(&message.encode())
        .and_then(|()| stream.flush())
        .map_err(SendError::Send)
}

/// True when `journal` exists and is a journal folder (for clear CLI errors).
pub fn is_journal(journal: &Path) -> bool {
    journal.join(dir::STATE_NAME).is_file()
}
