//! sealvm-repl: replication of a journaled volume to another host.
//!
//! - [`wire`]: the messages a sender and a receiver exchange, version 1, described byte by
//!   byte in one place, and their encoding;
//! - [`decoder`]: a streaming decoder that turns bytes from a socket into messages, refusing
//!   anything malformed before it is buffered or applied;
//! - [`stream`]: the receiver's checks on a session's messages in order (identity first,
//!   sequence numbers contiguous, extents inside the volume), so a truncated, reordered,
//!   replayed or forged stream is refused and nothing of it is applied;
//! - [`sender`]: ships a journal through a consumer cursor, resuming where the replica
//!   stands;
//! - [`receiver`]: appends a stream to the replica's own journal with the primary's
//!   sequence numbers and acknowledges what is durable;
//! - [`fuzzing`]: the decoder and the checks on arbitrary bytes, for the fuzz target.
//!
//! The records shipped are the journal's own (`sealvm-journal`): a replica appends them with
//! the same sequence numbers, so its points in time and bookmarks are the primary's. This
//! crate works on any `Read + Write` stream; sockets and TLS are the caller's.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod decoder;
pub mod fuzzing;
pub mod receiver;
pub mod sender;
pub mod stream;
pub mod tls;
pub mod wire;

pub use decoder::{DecodeError, Decoder};
pub use stream::{Accepted, StreamError, StreamState};
pub use wire::{Hello, Message, Mode, RefusalCode, ShippedRecord};
