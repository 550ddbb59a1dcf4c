//! SIGTERM and SIGINT for `sealvm run`: a signal stops the guest the way a power-off does
//! (disks flushed, a bundle's vTPM written back, its scratch removed), never kills the
//! process in the middle of that.
//!
//! The handler only writes the signal number into a pipe (async-signal-safe); a watcher
//! thread reads it, remembers it, and stops the VM once one is running. Before the VM is
//! built, the launch checks [`TermSignals::received`] between its steps.

use crate::vm::devices::legacy::{StopReason, StopSignal};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

/// The pipe's write end, for the handler. -1 until installed.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signo: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signo as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives for the call. A full pipe
        // (many signals) loses the extra ones, which is fine: one is enough.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// The termination signals seen so far and the VM they stop.
#[derive(Clone)]
pub struct TermSignals {
    received: Arc<AtomicI32>,
    target: Arc<Mutex<Option<StopSignal>>>,
}

impl TermSignals {
    /// Installs the SIGTERM and SIGINT handlers and starts the watcher thread. Call once.
    pub fn install() -> std::io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded; the read end is owned here only. The write end stays open
        // for the life of the process (the handler may run at any time).
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        PIPE_WRITE.store(fds[1], Ordering::Relaxed);
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: sigaction is plain data; zeroed is valid, then filled in.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: `action.sa_mask` is a valid sigset; the handler only calls write(2).
            let installed = unsafe {
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if installed != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let signals = Self {
            received: Arc::new(AtomicI32::new(0)),
            target: Arc::new(Mutex::new(None)),
        };
        let watcher = signals.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                use std::io::Read;
                let mut pipe = std::fs::File::from(read);
                let mut byte = [0u8; 1];
                while matches!(pipe.read(&mut byte), Ok(1)) {
                    let signo = i32::from(byte[0]);
                    tracing::info!(signal = signo, "termination signal: stopping the VM");
                    watcher.received.store(signo, Ordering::SeqCst);
                    if let Ok(target) = watcher.target.lock() {
                        if let Some(stop) = target.as_ref() {
                            stop.stop(StopReason::HostSignal(signo));
                        }
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

/// The signal's name for messages.
pub fn name(signo: i32) -> &'static str {
    match signo {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
