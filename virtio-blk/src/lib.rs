//! virtio-blk devices, once for every transport: sealvm's virtio-mmio device and
//! sealvm-blk's vhost-user backend both hand each descriptor chain to
//! [`serve_descriptor_chain`], which turns it into [`Segment`]s, parses them
//! ([`Request::parse`]) and runs the request against a [`BlockBackend`]
//! ([`Request::execute`]). Both present the configuration space [`ConfigSpace::from_limits`]
//! builds from the same [`Limits`] the parser enforces, offer [`Features::for_limits`], and
//! log failed requests through a rate-limited [`FailureLog`].
//!
//! Everything here treats the guest as untrusted: every length, offset and sector count is
//! checked, and a bad request becomes a [`RequestError`] (answered with
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`), never a panic. The crate does not know
//! about queues, interrupts or vhost-user beyond the descriptor chain type; callers own
//! those.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
pub mod failure_log;
pub mod fuzzing;
pub mod request;
pub mod serve;

pub use backend::{BlockBackend, RawFile};
pub use config::{ConfigSpace, Features};
pub use failure_log::FailureLog;
pub use request::{Limits, Request, RequestError, RequestKind, Segment};
pub use serve::{chain_segments, serve_chain, serve_descriptor_chain, Served};

/// Bytes in a virtio-blk sector; offsets on the wire are always in these units.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the device id returned by `VIRTIO_BLK_T_GET_ID`.
pub const DEVICE_ID_LEN: usize = 20;
