//! Stopping `serve` cleanly on SIGTERM or SIGINT: stop taking records, make every
//! journal durable (fdatasync and a sync point), remove the socket files this process
//! bound, exit 0 (1 if a journal could not be made durable). A SIGKILL or a power loss is what the journal's crash argument is for;
//! this is the orderly stop a service manager asks for.
//!
//! The signal handler only writes the signal's number to a pipe (async-signal-safe); a
//! thread reads it and does the work.

use crate::volume::JournaledVolume;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// The write end of the pipe the handler writes to (-1 before it is installed).
static PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = PIPE.load(Ordering::Relaxed);
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; `byte` lives for the call, and a failed or
    // short write (a full pipe: a stop is already under way) is harmless.
    let _ = unsafe { libc::write(fd, std::ptr::addr_of!(byte).cast(), 1) };
}

/// Installs the handlers for SIGTERM and SIGINT: on either, every volume in `volumes` is
/// stopped ([`JournaledVolume::stop`]) and the process exits.
pub fn stop_on_signals(volumes: Vec<Arc<JournaledVolume>>) -> io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so fds[0] is an open descriptor that nothing else owns.
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    PIPE.store(fds[1], Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
        // `extern "C" fn(c_int)` that only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    std::thread::Builder::new()
        .name("sealvm-blk-signals".into())
        .spawn(move || {
            let mut pipe = std::fs::File::from(read_end);
            let mut byte = [0u8; 1];
            if io::Read::read_exact(&mut pipe, &mut byte).is_err() {
                return;
            }
            let name = if i32::from(byte[0]) == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            tracing::info!(signal = name, "stopping: making every journal durable");
            let mut failed = false;
            for volume in &volumes {
                if let Err(e) = volume.stop() {
                    failed = true;
                    tracing::error!(
                        journal = %volume.journal_dir().display(),
                        error = %e,
                        "the journal could not be made durable"
                    );
                }
            }
            if !failed {
                tracing::info!("every journal is durable; exiting");
            }
            // process::exit runs no destructors: remove the socket files here.
            sealvm_os::socket::remove_bound();
            std::process::exit(i32::from(failed));
        })?;
    Ok(())
}
