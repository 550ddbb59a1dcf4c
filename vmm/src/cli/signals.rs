//! SIGTERM and SIGINT for `sealvm run`: a signal stops the guest the way a power-off does
//! (disks flushed, a bundle's vTPM written back, its scratch removed), never kills the
//! process in the middle of that.
//!
//! [`sealvm_os::signals`] catches them; the reaction here remembers the signal and stops
//! the VM once one is running. Before the VM is built, the launch checks
//! [`TermSignals::received`] between its steps.

use crate::vm::devices::legacy::{StopReason, StopSignal};
use sealvm_os::signals::{watch_termination, SignalError};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

pub use sealvm_os::signals::name;

/// The termination signals seen so far and the VM they stop.
#[derive(Clone)]
pub struct TermSignals {
    received: Arc<AtomicI32>,
    target: Arc<Mutex<Option<StopSignal>>>,
}

impl TermSignals {
    /// Installs the SIGTERM and SIGINT handlers and starts the watcher thread. Call once.
    pub fn install() -> Result<Self, SignalError> {
        let signals = Self {
            received: Arc::new(AtomicI32::new(0)),
            target: Arc::new(Mutex::new(None)),
        };
        let watcher = signals.clone();
        watch_termination(move |signo| {
            tracing::info!(signal = name(signo), "termination signal: stopping the VM");
            watcher.received.store(signo, Ordering::SeqCst);
            if let Ok(target) = watcher.target.lock() {
                if let Some(stop) = target.as_ref() {
                    stop.stop(StopReason::HostSignal(signo));
                }
            }
        })?;
        Ok(signals)
    }

    /// The last termination signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            signo => Some(signo),
        }
    }

    /// From now on a signal stops the VM behind `stop`; a signal already received stops it
    /// at once.
    pub fn stop_on_signal(&self, stop: StopSignal) {
        if let Ok(mut target) = self.target.lock() {
            if let Some(signo) = self.received() {
                stop.stop(StopReason::HostSignal(signo));
            }
            *target = Some(stop);
        }
    }
}
