//! The ACPI hardware-reduced power registers (sleep control, sleep status, reset) and the
//! i8042 reset line: how a guest powers off or resets.

use super::BusDevice;
use crate::vm::layout::{ACPI_RESET_VALUE, S5_SLEEP_TYPE};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset; sealvm ends the process (a supervisor restarts it).
    Reset,
    /// Shutdown through the API socket.
    ApiShutdown,
    /// sealvm received a termination signal (SIGTERM, SIGINT): stopped as a power-off.
    HostSignal(i32),
    /// A vCPU failed; the message says why.
    Error(&'static str),
}

/// Where a device or vCPU asks the VMM to stop.
#[derive(Clone)]
pub struct StopSignal {
    reason: Arc<Mutex<Option<StopReason>>>,
    event: Arc<EventFd>,
}

impl StopSignal {
    /// A new signal, not raised.
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignal {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Raises the signal; the first reason wins.
    pub fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some(reason);
            }
        }
        let _ = self.event.write(1);
    }

    /// The reason, once raised.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().ok().and_then(|r| *r)
    }

    /// The eventfd that becomes readable when the signal is raised.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// Ports 0x600 (sleep control), 0x601 (sleep status), 0x602 (reset).
pub struct AcpiPowerRegisters {
    stop: StopSignal,
}

impl AcpiPowerRegisters {
    /// Registers that raise `stop`.
    pub fn new(stop: StopSignal) -> Self {
        AcpiPowerRegisters { stop }
    }
}

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;

impl BusDevice for AcpiPowerRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep (WAK_STS clear); control and reset read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.stop.stop(StopReason::PowerOff)
            }
            0 => tracing::debug!(value, "guest wrote an unsupported sleep request"),
            2 if value == ACPI_RESET_VALUE => self.stop.stop(StopReason::Reset),
            _ => {}
        }
    }
}

/// The i8042 controller, as far as a guest uses it on a VM: the reset command (0xfe to port
/// 0x64) and a status register that says "nothing to read".
pub struct I8042 {
    stop: StopSignal,
}

impl I8042 {
    /// A controller that raises `stop` on reset.
    pub fn new(stop: StopSignal) -> Self {
        I8042 { stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Mapped at 0x60..0x65: offset 4 is the command port.
        if offset == 4 && data.first() == Some(&0xfe) {
            self.stop.stop(StopReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off_and_other_values_do_not() {
        let stop = StopSignal::new().unwrap();
        let mut regs = AcpiPowerRegisters::new(stop.clone());
        regs.write(0, &[S5_SLEEP_TYPE << 2]);
        assert_eq!(stop.reason(), None, "SLP_EN not set");
        regs.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(stop.reason(), None, "S3 is not supported");
        regs.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(stop.reason(), Some(StopReason::PowerOff));
        assert_eq!(stop.event().read().unwrap(), 1);
    }

    #[test]
    fn reset_register_and_i8042_reset() {
        let stop = StopSignal::new().unwrap();
        AcpiPowerRegisters::new(stop.clone()).write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
        let stop = StopSignal::new().unwrap();
        I8042::new(stop.clone()).write(4, &[0xfe]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }
}
