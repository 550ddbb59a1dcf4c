//! sealvm-agent: the guest agent. It speaks the qemu-guest-agent wire protocol over a
//! virtio-serial or virtio-console port and makes snapshots application-consistent.
#![deny(unsafe_op_in_unsafe_fn)]
