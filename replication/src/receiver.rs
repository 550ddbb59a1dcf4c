//! The receiving side of one connection: a replica of each volume lives in
//! `ROOT/NAME/` (the image `base.raw`, sparse, never written, and the journal `journal/`),
//! and its journal takes the primary's records with the primary's sequence numbers, so
//! `sealvm-blk pit` and image access work on the replica as on the primary. A record is
//! appended only after [`crate::stream`] accepted it; a commit is answered only once
//! everything up to it is durable (fdatasync, then a sync point).
//!
//! One connection replicates one volume; the journal's writer lock makes a second
//! connection for the same volume wait its turn (it is refused, and the sender retries).

use crate::decoder::{self, DecodeError};
use crate::stream::{Accepted, ReplicaIdentity, StreamError, StreamState};
use crate::wire::{Hello, Message, RefusalCode};
use sealvm_journal::writer::Writer;
use sealvm_journal::{dir, format, Identity, JournalError, JournalState, Uuid};
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Segment size of a replica's journal.
pub const REPLICA_SEGMENT_BYTES: u64 = 64 << 20;

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message did not fit the stream (it was refused and nothing of it applied).
    #[error("refused the sender's stream")]
    Refused(#[source] StreamError),
    /// The connection ended before a hello.
    #[error("the connection ended before the sender said which volume")]
    NoHello,
    /// The replica's journal or image failed.
    #[error("replica {volume:?}")]
    Replica {
        /// The volume's name.
        volume: String,
        /// The cause.
        #[source]
        source: ReplicaError,
    },
    /// Writing to the connection failed.
    #[error("answering the sender failed")]
    Send(#[source] io::Error),
}

/// What went wrong with a replica on disk.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Its journal could not be read or opened.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Its journal's writer failed (another connection holds it, a bad record).
    #[error(transparent)]
    Writer(#[from] sealvm_journal::WriterError),
    /// Creating or writing its files failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The journal's UUID source failed.
    #[error("no randomness for the replica's journal UUID")]
    Random,
}

/// What one connection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// The volume.
    pub volume: String,
    /// Records appended.
    pub records: u64,
    /// The highest seq made durable and acknowledged.
    pub durable_seq: u64,
}

/// The folder of volume `name`'s replica under `root`.
pub fn replica_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// The journal folder of volume `name`'s replica.
pub fn replica_journal(root: &Path, name: &str) -> PathBuf {
    replica_dir(root, name).join("journal")
}

/// The image of volume `name`'s replica (zeroes; the journal holds every write).
pub fn replica_base(root: &Path, name: &str) -> PathBuf {
    replica_dir(root, name).join("base.raw")
}

/// Serves one connection: reads the Hello, opens (or creates) the volume's replica, answers
/// Welcome, then appends records and answers commits until the sender closes. A stream
/// that breaks a rule is answered with Refused and ends with nothing of the bad message
/// applied. `permitted`, when given, names the volumes this peer may write.
pub fn serve_connection<S: Read + Write>(
    root: &Path,
    permitted: Option<Vec<String>>,
    stream: &mut S,
) -> Result<SessionReport, ReceiveError> {
    let Some(first) = decoder::read_message(stream)? else {
        return Err(ReceiveError::NoHello);
    };
    let Message::Hello(hello) = &first else {
        let error = StreamState::new(None, 0, None)
            .accept(&first)
            .expect_err("only a hello starts a stream");
        return Err(refuse(stream, error));
    };
    // The name becomes a folder: it must be checked before it touches the disk.
    if let Err(error) = StreamState::new(None, 0, permitted.clone()).accept(&first) {
        return Err(refuse(stream, error));
    }
    let replica_err = |source| ReceiveError::Replica {
        volume: hello.name.clone(),
        source,
    };
    let held = match held_identity(root, hello) {
        Ok(held) => held,
        Err(source) => return Err(internal(stream, replica_err(source))),
    };
    let mut writer = match open_replica(root, hello, held.is_none()) {
        Ok(writer) => writer,
        Err(source) => return Err(internal(stream, replica_err(source))),
    };
    let durable_seq = writer.next_seq() - 1;
    let mut state = StreamState::new(held, durable_seq, permitted);
    if let Err(error) = state.accept(&first) {
        return Err(refuse(stream, error));
    }
    let welcome = Message::Welcome {
        durable_seq,
        journal: writer.identity().journal,
    };
    send(stream, &welcome)?;
    let mut report = SessionReport {
        volume: hello.name.clone(),
        records: 0,
        durable_seq,
    };
    while let Some(message) = decoder::read_message(stream)? {
        match state.accept(&message) {
            Ok(Accepted::Record(record)) => {
                if let Err(e) = writer.append_replicated(
                    record.kind,
                    record.seq,
                    record.time_ns,
                    record.offset,
                    &record.payload,
                ) {
                    let source = ReplicaError::Io {
                        path: replica_journal(root, &hello.name),
                        source: e,
                    };
                    return Err(internal(stream, replica_err(source)));
                }
                report.records += 1;
            }
            Ok(Accepted::Commit { seq }) => {
                if let Err(e) = make_durable(&mut writer) {
                    let source = ReplicaError::Io {
                        path: replica_journal(root, &hello.name),
                        source: e,
                    };
                    return Err(internal(stream, replica_err(source)));
                }
                report.durable_seq = seq;
                send(stream, &Message::Ack { seq })?;
            }
            Ok(Accepted::PeerRefused { reason }) => {
                tracing::warn!(volume = %hello.name, reason, "the sender ended the stream");
                break;
            }
            Ok(Accepted::Hello { .. } | Accepted::Heartbeat { .. }) => {}
            Err(error) => return Err(refuse(stream, error)),
        }
    }
    Ok(report)
}

/// fdatasyncs the active segment and records a sync point there.
fn make_durable(writer: &mut Writer) -> io::Result<()> {
    let target = writer.sync_target();
    target.sync()?;
    writer.record_sync_point(target.ordinal, target.end)
}

/// The identity of an existing replica of `hello`'s volume, or `None` when there is none.
fn held_identity(root: &Path, hello: &Hello) -> Result<Option<ReplicaIdentity>, ReplicaError> {
    let journal = replica_journal(root, &hello.name);
    if !journal.join(dir::STATE_NAME).exists() {
        return Ok(None);
    }
    let state = dir::read_state(&journal)?;
    let Some(identity) = state.identity else {
        return Ok(None);
    };
    let primary = read_primary(&journal)?;
    Ok(Some(ReplicaIdentity {
        primary_journal: primary.unwrap_or(hello.journal),
        volume: identity.volume,
        volume_bytes: identity.volume_bytes,
    }))
}

const PRIMARY_NAME: &str = "primary-journal";

fn read_primary(journal: &Path) -> Result<Option<Uuid>, ReplicaError> {
    let path = journal.join(PRIMARY_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReplicaError::Io { path, source }),
    }
}

/// Opens the replica's journal, creating the replica first when `create`: a sparse image
/// of the volume's size and a journal that names the primary's volume.
fn open_replica(root: &Path, hello: &Hello, create: bool) -> Result<Writer, ReplicaError> {
    let journal = replica_journal(root, &hello.name);
    let base = replica_base(root, &hello.name);
    if create {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReplicaError::Io { path, source }
        };
        std::fs::create_dir_all(&journal).map_err(io_err(&journal))?;
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&base)
            .map_err(io_err(&base))?;
        image.set_len(hello.volume_bytes).map_err(io_err(&base))?;
        image.sync_all().map_err(io_err(&base))?;
        let identity = Identity {
            journal: Uuid::random().map_err(|_| ReplicaError::Random)?,
            volume: hello.volume,
            volume_bytes: hello.volume_bytes,
            sector_bytes: format::SECTOR_BYTES,
        };
        let state = JournalState {
            version: format::VERSION,
            identity: Some(identity),
            base_fingerprint: Some(dir::fingerprint(&image, &base)?),
            base_seq: 0,
            write_through: false,
        };
        let primary = journal.join(PRIMARY_NAME);
        sealvm_os::durable::replace(&primary, hello.journal.to_string().as_bytes(), 0o644)
            .map_err(|e| ReplicaError::Io {
                path: primary,
                source: io::Error::other(e),
            })?;
        dir::write_state(&journal, &state)?;
    }
    let (writer, _) = Writer::open(&journal, &base, REPLICA_SEGMENT_BYTES, |_| {})?;
    Ok(writer)
}

fn send<S: Write>(stream: &mut S, message: &Message) -> Result<(), ReceiveError> {
    stream
        .write_all(&message.encode())
        .and_then(|()| stream.flush())
        .map_err(ReceiveError::Send)
}

/// Tells the sender why the stream is refused (best effort: it may be gone) and returns
/// the error.
fn refuse<S: Write>(stream: &mut S, error: StreamError) -> ReceiveError {
    tracing::warn!(%error, "refusing a replication stream");
    let _ = send(stream, &error.refusal());
    ReceiveError::Refused(error)
}

fn internal<S: Write>(stream: &mut S, error: ReceiveError) -> ReceiveError {
    let reason = format!("{:#}", anyhow_like(&error));
    tracing::error!(reason, "the replica failed");
    let _ = send(
        stream,
        &Message::Refused {
            code: RefusalCode::Internal,
            reason,
        },
    );
    error
}

/// The error and its causes on one line.
fn anyhow_like(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        line.push_str(": ");
        line.push_str(&inner.to_string());
        cause = inner.source();
    }
    line
}
