//! virtio-console with one port, reachable from the host through a unix socket (the guest
//! agent's channel). One host client at a time; bytes from it fill the guest's receive
//! buffers, bytes the guest transmits go to it. While nobody is connected the last 64 KiB
//! the guest sent are kept and delivered to the next client.

use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_CONSOLE,
    VIRTIO_F_VERSION_1,
};
use crate::vm::api::protocol as api;
use crate::vm::devices::serial::bind_socket;
use crate::vm::memory::GuestMemory;
use sealvm_os::socket::RemoveOnDrop;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 64;
/// Bytes kept for a client that has not connected yet.
const TX_BACKLOG: usize = 64 * 1024;
const RX: usize = 0;
const TX: usize = 1;

#[derive(Default)]
struct ConsoleCounters {
    tx_bytes: AtomicU64,
    rx_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
}

/// A virtio-console device.
pub struct Console {
    listener: Arc<UnixListener>,
    path: PathBuf,
    counters: Arc<ConsoleCounters>,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// A console whose port is served on a unix socket at `path`, and the guard that
    /// removes the socket file (the caller keeps it while the VM runs: the device lives in
    /// its transport, which the API's thread may hold until the process ends).
    pub fn new(path: PathBuf) -> std::io::Result<(Self, RemoveOnDrop)> {
        let (listener, socket_file) = bind_socket(&path)?;
        listener.set_nonblocking(true)?;
        let console = Console {
            listener: Arc::new(listener),
            path,
            counters: Arc::default(),
            stop: None,
            thread: None,
        };
        Ok((console, socket_file))
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none of them offered.
        read_config_bytes(&[0u8; 12], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            ..
        } = activation;
        if queues.len() != 2 || !queues.iter().all(|q| q.ready()) {
            return Err(ActivateError("console queues are not ready".into()));
        }
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError(format!("eventfd: {e}")))?;
        let stop_clone = stop
            .try_clone()
            .map_err(|e| ActivateError(format!("eventfd: {e}")))?;
        let mut port = Port {
            mem,
            queues,
            events: queue_events,
            interrupt,
            listener: self.listener.clone(),
            client: None,
            pending: Vec::new(),
            backlog: std::collections::VecDeque::new(),
            counters: self.counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("virtio-console".into())
            .spawn(move || port.run(stop_clone))
            .map_err(|e| ActivateError(format!("cannot start the console worker: {e}")))?;
        self.stop = Some(stop);
        self.thread = Some(thread);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn counters(&self) -> api::DeviceCounters {
        let c = &self.counters;
        api::DeviceCounters::Console(api::ConsoleCounters {
            socket: self.path.display().to_string(),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            dropped_bytes: c.dropped_bytes.load(Ordering::Relaxed),
        })
    }

    fn kind(&self) -> &'static str {
        "console"
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reset();
    }
}

struct Port {
    mem: GuestMemory,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    listener: Arc<UnixListener>,
    client: Option<UnixStream>,
    /// Bytes read from the client that did not fit in the guest's buffers yet.
    pending: Vec<u8>,
    /// Bytes the guest sent while no client was connected.
    backlog: std::collections::VecDeque<u8>,
    counters: Arc<ConsoleCounters>,
}

impl Port {
    fn run(&mut self, stop: EventFd) {
        loop {
            let client_fd = self.client.as_ref().map(|c| c.as_raw_fd());
            // Read from the client only while there is room to put what it sends.
            let want_client = client_fd.is_some() && self.pending.is_empty();
            let mut fds = vec![
                pollfd(self.events[RX].as_raw_fd()),
                pollfd(self.events[TX].as_raw_fd()),
                pollfd(stop.as_raw_fd()),
                pollfd(self.listener.as_raw_fd()),
            ];
            if let (true, Some(fd)) = (want_client, client_fd) {
                fds.push(pollfd(fd));
            }
            // SAFETY: `fds` is a valid pollfd array for its length; the fds stay open.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[2].revents != 0 {
                return;
            }
            if fds[3].revents != 0 {
                if let Ok((mut stream, _)) = self.listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    let backlog: Vec<u8> = self.backlog.drain(..).collect();
                    if write_all_blocking(&mut stream, &backlog).is_ok() {
                        // A new client replaces the old one.
                        self.client = Some(stream);
                        self.pending.clear();
                    }
                }
            }
            if fds[1].revents != 0 {
                let _ = self.events[TX].read();
                self.transmit();
            }
            if fds[0].revents != 0 {
                let _ = self.events[RX].read();
            }
            if fds.len() > 4 && fds[4].revents != 0 {
                self.read_client();
            }
            self.deliver();
        }
    }

    fn transmit(&mut self) {
        let mut notify = false;
        let queue = &mut self.queues[TX];
        while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            for desc in chain {
                if desc.is_write_only() || desc.len() > 1 << 20 {
                    continue;
                }
                let mut buf = vec![0u8; desc.len() as usize];
                if self.mem.read_slice(&mut buf, desc.addr()).is_ok() {
                    bytes.extend_from_slice(&buf);
                }
            }
            self.counters
                .tx_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let sent = match self.client.as_mut() {
                Some(client) => write_all_blocking(client, &bytes).is_ok(),
                None => false,
            };
            if !sent {
                if self.client.take().is_some() {
                    tracing::debug!("console client went away");
                }
                self.backlog.extend(bytes.iter());
                let excess = self.backlog.len().saturating_sub(TX_BACKLOG);
                if excess > 0 {
                    self.backlog.drain(..excess);
                    self.counters
                        .dropped_bytes
                        .fetch_add(excess as u64, Ordering::Relaxed);
                }
            }
            if queue.add_used(&self.mem, head, 0).is_err() {
                break;
            }
            notify = true;
        }
        if notify {
            self.interrupt.signal_used();
        }
    }

    fn read_client(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        match client.read(&mut buf) {
            Ok(0) => self.client = None,
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.client = None,
        }
    }

    /// Moves pending client bytes into the guest's receive buffers.
    fn deliver(&mut self) {
        let mut notify = false;
        let queue = &mut self.queues[RX];
        while !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() || written == self.pending.len() {
                    continue;
                }
                let n = (desc.len() as usize).min(self.pending.len() - written);
                if self
                    .mem
                    .write_slice(
                        &self.pending[written..written + n],
                        GuestAddress(desc.addr().0),
                    )
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            self.pending.drain(..written);
            self.counters
                .rx_bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            if queue.add_used(&self.mem, head, written as u32).is_err() {
                break;
            }
            notify = true;
        }
        if notify {
            self.interrupt.signal_used();
        }
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn write_all_blocking(stream: &mut UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
