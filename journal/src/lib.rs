//! sealvm-journal: the write journal of a sealvm volume, as a versioned stream that
//! sealvm-blk writes and that replication, backups and the helper read.
//!
//! - [`bookmark`]: named points and the rule for their names;
//! - [`format`]: the bytes on disk, version 2 (version 1 still read), described byte by
//!   byte in one place;
//! - [`segment`]: reading one segment, and telling a torn tail (cut) from damage (refused);
//! - [`dir`]: the journal directory, its state (identity, folded history, cache mode) and
//!   the checks that a journal, its image and its folded base belong together;
//! - [`consumer`]: named consumer cursors with a budget, and readers' holds;
//! - [`reader`]: records in order from a cursor, following a live journal;
//! - [`writer`]: the one writer: appends, rotation, fdatasync and sync points (what a sync
//!   makes durable, and the health a failed one poisons, in the private `durability`);
//! - [`extent_map`]: where each written extent's newest data lies, at any point in time;
//! - [`upgrade`]: converting a version-1 journal;
//! - [`storage`]: the seam the crash-critical file operations go through, and a recorder
//!   that lists the states a power loss could leave;
//! - [`fuzzing`]: the segment scanner on arbitrary bytes, for the fuzz target.
//!
//! It deliberately knows nothing about virtio, vhost-user or how a volume is served:
//! folding policy and serving live in sealvm-blk. The crash argument is in
//! journal/DESIGN.md.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bookmark;
pub mod consumer;
pub mod dir;
mod durability;
pub mod extent_map;
pub mod format;
pub mod fuzzing;
pub mod reader;
pub mod segment;
pub mod storage;
pub mod upgrade;
pub mod writer;

pub use dir::{JournalError, JournalState};
pub use extent_map::{Change, Extent, ExtentMap, Source, Timeline};
pub use format::{Identity, RecordHeader, RecordKind, Uuid};
pub use reader::{AppendSignal, Cursor, Location, Reader, Record, ScanSummary};
pub use writer::{Writer, WriterError};
