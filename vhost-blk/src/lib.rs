//! sealvm-blk: a vhost-user-blk backend that journals every write, for bookmarks,
//! point-in-time restore, image access and replication.
//!
//! Data flows one way: the vhost-user [`device`] parses guest requests and runs them against
//! a [`volume`] (a base image and its [`journal`]); [`pit`] reads the journal to rebuild any
//! point in time; the [`api`] socket makes bookmarks and reports counters.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod config;
pub mod counters;
pub mod device;
pub mod image_access;
pub mod inflight;
pub mod journal;
pub mod pit;
pub mod replication;
pub mod shutdown;
pub mod volume;
