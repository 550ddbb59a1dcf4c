//! A device worker thread: waits on a set of eventfds and a stop eventfd with poll(2).

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// A running worker; stopping it (or dropping the handle) wakes and joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `handle(i)` on a new thread each time `events[i]` becomes readable (after
    /// draining it), until stopped.
    pub fn spawn(
        name: &str,
        events: Vec<EventFd>,
        mut handle: impl FnMut(usize) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut fds: Vec<libc::pollfd> = events
                    .iter()
                    .map(|e| e.as_raw_fd())
                    .chain(std::iter::once(stop_fd.as_raw_fd()))
                    .map(|fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                loop {
                    // SAFETY: `fds` is a valid array of pollfd for its whole length, and the
                    // eventfds it names live as long as this closure.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                    if n < 0 {
                        if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                        {
                            continue;
                        }
                        return;
                    }
                    if fds[events.len()].revents != 0 {
                        return;
                    }
                    for i in 0..events.len() {
                        if fds[i].revents & libc::POLLIN != 0 {
                            let _ = events[i].read();
                            handle(i);
                        }
                    }
                }
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
