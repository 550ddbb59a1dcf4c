//! Devices: the port and MMIO buses the vCPUs dispatch exits to, the legacy devices (COM1,
//! ACPI power registers, i8042 reset) and the virtio-mmio devices.

pub mod bundle_disk;
pub mod legacy;
pub mod serial;
pub mod tpm_crb;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device on the port-I/O or MMIO bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address ranges mapped to devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// Maps `len` bytes from `base` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) {
        self.ranges.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - *base < *len)
            .map(|(base, _, device)| (addr - base, device))
    }

    /// Reads from the device at `addr`; false when nothing is mapped there (the data is
    /// then all ones, as on real hardware).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                if let Ok(mut device) = device.lock() {
                    device.read(offset, data);
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                if let Ok(mut device) = device.lock() {
                    device.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}
