//! sealvm-blk: a vhost-user-blk backend that journals every write, for bookmarks,
//! point-in-time restore, image access and replication.
#![deny(unsafe_op_in_unsafe_fn)]
