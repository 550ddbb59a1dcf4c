//! sealvm-agent: the guest agent. It speaks the qemu-guest-agent wire protocol over a
//! virtio-serial or virtio-console port, so libvirt and QMP tooling work with it, and adds
//! application toolkits that make snapshots application-consistent, and a heartbeat.
//!
//! The same crate holds the host side ([`client::AgentClient`]), used by `sealvm-agent
//! client` and by sealvm's tools.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod accounts;
pub mod agent;
pub mod client;
pub mod command_table;
pub mod exec;
pub mod files;
pub mod freeze;
pub mod fsfreeze;
pub mod machine;
pub mod network;
pub mod power;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod system;
pub mod toolkits;

pub use agent::{Agent, AgentConfig};
pub use client::{AgentClient, ClientError};
