//! SIGTERM and SIGINT, caught one way for every binary: the handler only writes the
//! signal's number into a pipe (write(2) is async-signal-safe); a watcher thread reads it
//! and runs the binary's reaction outside signal context, where it may lock, log, flush
//! and exit.
//!
//! It deliberately decides nothing about what a signal means (stop a VM, make journals
//! durable, remove sockets): that is the closure the binary passes.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The pipe's write end, for the handler; -1 until installed.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// Set by the first [`watch_termination`].
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signo: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signo as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives for the call. A full pipe
        // (a burst of signals) loses the extra ones, which is fine: the reaction to the
        // first is under way.
        unsafe { libc::write(fd, std::ptr::addr_of!(byte).cast(), 1) };
    }
}

/// Why the termination signals could not be watched.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// [`watch_termination`] was already called in this process.
    #[error("the termination signals are already watched (one watcher per process)")]
    AlreadyWatched,
    /// The pipe from the handler to the watcher could not be made.
    #[error("cannot make the signal pipe")]
    Pipe(#[source] io::Error),
    /// sigaction refused the handler.
    #[error("cannot install the handler for {signal}")]
    Handler {
        /// The signal's name.
        signal: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The watcher thread could not be started.
    #[error("cannot start the signal watcher thread")]
    Thread(#[source] io::Error),
}

/// Catches SIGTERM and SIGINT from now on and calls `react` with the signal's number, on a
/// watcher thread, for each one received, in order. Once per process; the handlers stay
/// for the life of the process (interrupted system calls are restarted).
pub fn watch_termination(
    mut react: impl FnMut(libc::c_int) + Send + 'static,
) -> Result<(), SignalError> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Err(SignalError::AlreadyWatched);
    }
    let mut fds: [RawFd; 2] = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SignalError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so fds[0] is an open descriptor nothing else owns. The write
    // end stays open for the life of the process: the handler may run at any time.
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    PIPE_WRITE.store(fds[1], Ordering::Relaxed);
    // The watcher first, so a signal caught as soon as the handlers are in finds it.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut pipe = std::fs::File::from(read_end);
            let mut byte = [0u8; 1];
            while matches!(pipe.read(&mut byte), Ok(1)) {
                react(libc::c_int::from(byte[0]));
            }
        })
        .map_err(SignalError::Thread)?;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is plain data, for which all zeroes is a valid value; the
        // fields that matter are filled in below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action.sa_mask` is a sigset owned by `action`; the handler only calls
        // write(2), which is async-signal-safe.
        let installed = unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(SignalError::Handler {
                signal: name(signal),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The termination signal's name for messages ("SIGTERM", "SIGINT"; "a signal" otherwise).
pub fn name(signo: libc::c_int) -> &'static str {
    match signo {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    // One test: the watcher is once per process, and the test binary is one process.
    #[test]
    fn each_signal_reaches_the_reaction_once_and_a_second_watcher_is_refused() {
        let (seen, signals) = mpsc::channel();
        watch_termination(move |signo| {
            let _ = seen.send(signo);
        })
        .unwrap();
        for signal in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: raise only sends a signal to this process, whose handler is installed.
            assert_eq!(unsafe { libc::raise(signal) }, 0);
            assert_eq!(signals.recv_timeout(Duration::from_secs(10)), Ok(signal));
        }
        assert!(matches!(
            watch_termination(|_| {}),
            Err(SignalError::AlreadyWatched)
        ));
        assert_eq!(name(libc::SIGINT), "SIGINT");
    }
}
