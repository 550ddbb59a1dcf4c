//! sealvm: a KVM virtual machine monitor that boots guests with virtio-mmio devices and
//! launches sealed bundles on trusted hosts (the trust workflows are `sealvm_trust`).
//!
//! The library holds everything testable; `main.rs` only parses arguments and calls in.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod vm;
