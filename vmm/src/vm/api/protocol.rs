//! The requests and answers of sealvm's API socket, as serde types: what `vmm/API.md`
//! documents and what the server ([`super::serve`]) sends. The envelope (`{"return": ...}`
//! or `{"error": ..., "code": ...}`), the line limit and the client are
//! [`sealvm_os::api_socket`]'s.
//!
//! Answer fields are snake_case (`mmio_base`, `io_out`), as they have been since the API
//! began; command names are single words.

use sealvm_os::api_socket::{ApiFailure, ErrorCode};
use serde::{Deserialize, Serialize};

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's shape, state and devices: answers [`Info`].
    Info {},
    /// Stops every vCPU (waiting up to 5 s for them to park): answers [`StateAnswer`].
    Pause {},
    /// Lets paused vCPUs run again: answers [`StateAnswer`].
    Resume {},
    /// Stops the VM (disks are flushed, the process exits): answers [`StateAnswer`].
    Shutdown {},
    /// vCPU exits by kind and each device's counters: answers [`CountersAnswer`].
    Counters {},
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked by `pause`.
    Paused,
    /// `shutdown` was asked for; the process is on its way out.
    Stopping,
}

/// What `pause`, `resume` and `shutdown` answer: the state the VM is now in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAnswer {
    /// The new state.
    pub state: VmState,
}

/// A virtio device as `info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its position among the virtio-mmio devices.
    pub index: usize,
    /// `block`, `console` or `vhost-user-blk`.
    pub kind: String,
    /// The guest-physical address of its MMIO window, as `0x...`.
    pub mmio_base: String,
    /// Its interrupt line.
    pub gsi: u32,
}

/// What `info` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Whether the vCPUs run.
    pub state: VmState,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, bytes.
    pub memory: u64,
    /// The kernel booted.
    pub kernel: String,
    /// The virtio devices.
    pub devices: Vec<DeviceInfo>,
}

/// vCPU exits by kind, over all vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits (only without an in-kernel LAPIC).
    pub hlt: u64,
    /// KVM_RUN interrupted by a signal (pause requests).
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

/// A virtio-blk device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounters {
    /// Requests completed.
    pub requests: u64,
    /// Bytes read by reads that succeeded.
    pub read_bytes: u64,
    /// Bytes written by writes that succeeded.
    pub write_bytes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Requests answered with an error status.
    pub errors: u64,
}

/// A virtio-console device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCounters {
    /// The unix socket the console is served on.
    pub socket: String,
    /// Bytes from the guest sent to the client.
    pub tx_bytes: u64,
    /// Bytes from the client given to the guest.
    pub rx_bytes: u64,
    /// Bytes from the guest dropped because no client was connected.
    pub dropped_bytes: u64,
}

/// A vhost-user-blk frontend's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserBlkCounters {
    /// The backend's vhost-user socket.
    pub socket: String,
    /// Completion interrupts relayed from the backend.
    pub completion_interrupts: u64,
    /// False once the backend went away.
    pub backend_connected: bool,
}

/// One device's counters, whichever kind it is (the `kind` beside them says which).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceCounters {
    /// `block`.
    Block(BlockCounters),
    /// `console`.
    Console(ConsoleCounters),
    /// `vhost-user-blk`.
    VhostUserBlk(VhostUserBlkCounters),
}

/// A virtio device in the `counters` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCountersEntry {
    /// The device, as `info` shows it.
    #[serde(flatten)]
    pub device: DeviceInfo,
    /// Its counters.
    pub counters: DeviceCounters,
    /// Interrupts raised to the guest.
    pub interrupts: u64,
}

/// What `counters` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersAnswer {
    /// vCPU exits by kind.
    pub exits: ExitCounts,
    /// Every virtio device.
    pub devices: Vec<DeviceCountersEntry>,
}

/// Every answer's `return` value.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `info`.
    Info(Info),
    /// `pause`, `resume`, `shutdown`.
    State(StateAnswer),
    /// `counters`.
    Counters(CountersAnswer),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `pause` gave up waiting for the vCPUs.
    #[error("vCPUs did not stop within 5 s")]
    PauseTimedOut,
    /// A device's lock was poisoned by a panic in its worker.
    #[error("virtio device {0}'s lock is poisoned (its worker panicked)")]
    DevicePoisoned(usize),
}

impl ApiFailure for ApiError {
    fn code(&self) -> ErrorCode {
        match self {
            ApiError::PauseTimedOut | ApiError::DevicePoisoned(_) => ErrorCode::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_take_no_fields() {
        assert_eq!(
            serde_json::from_value::<Request>(json!({"command": "pause"})).unwrap(),
            Request::Pause {}
        );
        assert!(
            serde_json::from_value::<Request>(json!({"command": "pause", "now": true})).is_err()
        );
        assert_eq!(
            serde_json::to_value(Request::Counters {}).unwrap(),
            json!({"command": "counters"})
        );
    }

    #[test]
    fn device_counters_are_flat_objects() {
        let entry = DeviceCountersEntry {
            device: DeviceInfo {
                index: 0,
                kind: "block".into(),
                mmio_base: "0xd0000000".into(),
                gsi: 5,
            },
            counters: DeviceCounters::Block(BlockCounters {
                requests: 4,
                read_bytes: 4096,
                write_bytes: 4096,
                flushes: 1,
                errors: 0,
            }),
            interrupts: 4,
        };
        let value = serde_json::to_value(&entry).unwrap();
        assert_eq!(value["kind"], "block");
        assert_eq!(value["counters"]["write_bytes"], 4096);
        assert_eq!(
            serde_json::to_value(StateAnswer {
                state: VmState::Stopping
            })
            .unwrap(),
            json!({"state": "stopping"})
        );
    }
}
