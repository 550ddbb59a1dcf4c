//! sealvm-helper: the helper at a recovery site. It owns the sealed key partition and a pool
//! of standby volumes, receives replication, and runs failover, drills and failback.
#![deny(unsafe_op_in_unsafe_fn)]
