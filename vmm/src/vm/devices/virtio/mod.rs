//! virtio 1.x devices on the virtio-mmio transport.
//!
//! A device offers features and queues; the transport ([`mmio::MmioTransport`]) holds the
//! registers the driver programs, and on DRIVER_OK hands the device its queues, one eventfd
//! per queue (a KVM ioeventfd on QueueNotify) and an [`Interrupt`]. Devices run their own
//! worker threads from then on; the vCPUs only touch registers.

pub mod block;
pub mod console;
pub mod mmio;
pub mod vhost_user_blk;
mod worker;

use crate::vm::memory::GuestMemory;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// virtio device ids.
pub const TYPE_BLOCK: u32 = 2;
/// virtio console.
pub const TYPE_CONSOLE: u32 = 3;
/// virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Used/avail event index.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register and the irqfd behind it, plus
/// the DEVICE_NEEDS_RESET flag a device raises when the driver broke the rules or its
/// backend went away.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
    count: std::sync::atomic::AtomicU64,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
            count: Default::default(),
        }
    }

    /// Tells the driver a queue has used buffers.
    pub fn signal_used(&self) {
        self.raise(INT_VRING);
    }

    /// Marks the device as needing a reset and tells the driver.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.irqfd.write(1) {
            tracing::warn!(%error, "cannot raise a virtio interrupt");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Interrupts raised so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues as the driver set them up (only ready ones are valid).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, readable when the driver notifies it.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// The features offered.
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device's workers; the driver may set it up again.
    fn reset(&mut self);
    /// The device's counters, as the API shows them.
    fn counters(&self) -> crate::vm::api::protocol::DeviceCounters;
    /// Makes completed writes durable (called when the VM stops).
    fn flush(&self) {}
    /// A short name for logs and the API ("block", "console", "vhost-user-blk").
    fn kind(&self) -> &'static str;
}

/// Reads a little-endian config field of `bytes` into `data`, zero past the end.
pub fn read_config_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| bytes.get(at))
            .copied()
            .unwrap_or(0);
    }
}
