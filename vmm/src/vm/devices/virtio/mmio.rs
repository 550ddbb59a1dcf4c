//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::vm::devices::BusDevice;
use crate::vm::memory::GuestMemory;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4c53; // "SLVM"

const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;
/// Offset of QueueNotify.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// One virtio device's register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
}

impl MmioTransport {
    /// A transport for `device`, raising `irqfd`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for size in sizes {
            queues.push(Queue::new(size).map_err(|e| std::io::Error::other(format!("{e:?}")))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// The eventfds to register as ioeventfds on QueueNotify, with their queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The interrupt line (for counters).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_DRIVER_OK != 0 {
            // Queue registers are read-only once the device is live.
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted something not offered, or legacy mode: refuse by not
                // setting FEATURES_OK, which the driver reads back.
                tracing::warn!(
                    accepted = self.driver_features,
                    offered,
                    "driver accepted features the device did not offer"
                );
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, queue) in self.queues.iter_mut().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                tracing::warn!(
                    device = self.device.kind(),
                    queue = i,
                    "driver set up a queue outside guest memory; device needs reset"
                );
                self.interrupt.signal_needs_reset();
                return;
            }
            queue.set_event_idx(event_idx);
            queues.push(copy_queue(queue));
        }
        let mut queue_events = Vec::new();
        for event in &self.queue_events {
            match event.try_clone() {
                Ok(e) => queue_events.push(e),
                Err(error) => {
                    tracing::warn!(%error, "cannot clone a queue eventfd");
                    self.interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(error) => {
                tracing::error!(device = self.device.kind(), %error, "device failed to start");
                self.interrupt.signal_needs_reset();
            }
        }
    }
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let features = self.device.features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.ready()))
                .unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => {
                if self.interrupt.needs_reset() {
                    self.status | STATUS_NEEDS_RESET
                } else {
                    self.status
                }
            }
            0x0fc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Some(value) = u32_of(data) else {
            return;
        };
        let accepting_features =
            self.status & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED) == STATUS_DRIVER;
        match offset {
            0x014 => self.device_features_sel = value,
            0x020 if accepting_features => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x050 => {
                // Only reached when KVM's ioeventfd did not match (e.g. a bad index).
                if let Some(event) = self.queue_events.get(value as usize) {
                    let _ = event.write(1);
                }
            }
            0x064 => self.interrupt.ack(value),
            0x070 => self.set_status(value),
            0x080 => with_queue(self, |q| q.set_desc_table_address(Some(value), None)),
            0x084 => with_queue(self, |q| q.set_desc_table_address(None, Some(value))),
            0x090 => with_queue(self, |q| q.set_avail_ring_address(Some(value), None)),
            0x094 => with_queue(self, |q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => with_queue(self, |q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => with_queue(self, |q| q.set_used_ring_address(None, Some(value))),
            _ => tracing::debug!(offset, "write to an unknown virtio-mmio register"),
        }
    }
}

fn with_queue(transport: &mut MmioTransport, f: impl FnOnce(&mut Queue)) {
    if let Some(q) = transport.selected_queue() {
        f(q);
    }
}

/// A queue with the same driver-programmed state (Queue is not Clone).
fn copy_queue(queue: &Queue) -> Queue {
    let mut copy = Queue::new(queue.max_size()).unwrap_or_default();
    copy.set_size(queue.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(queue.desc_table());
    copy.set_desc_table_address(lo, hi);
    let (lo, hi) = split(queue.avail_ring());
    copy.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(queue.used_ring());
    copy.set_used_ring_address(lo, hi);
    copy.set_event_idx(queue.event_idx_enabled());
    copy.set_ready(queue.ready());
    copy
}
