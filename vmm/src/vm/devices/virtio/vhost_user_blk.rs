//! virtio-blk served by a vhost-user-blk backend (sealvm-blk, qemu-storage-daemon): sealvm
//! shares guest memory (the memfd) with the backend and hands it the queues; the guest's
//! notifications reach the backend directly (the KVM ioeventfd is the vring kick), and the
//! backend's completions come back through a relay that sets InterruptStatus before raising
//! the irqfd, as virtio-mmio requires.

use super::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vm::api::protocol as api;
use sealvm_virtio_blk::Features;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The config space bytes read from the backend.
const CONFIG_LEN: usize = 60;
/// The block features sealvm passes through from the backend to the guest.
const PASS_THROUGH: u64 = Features::SIZE_MAX
    | Features::SEG_MAX
    | Features::RO
    | Features::BLK_SIZE
    | Features::FLUSH
    | Features::TOPOLOGY
    | Features::CONFIG_WCE
    | Features::MQ
    | Features::DISCARD
    | Features::WRITE_ZEROES
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_VERSION_1;
/// Queue size offered to the guest.
const QUEUE_SIZE: u16 = 256;
/// Most request queues sealvm sets up with a backend.
const MAX_QUEUES: usize = 16;

/// Errors connecting to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be reached or the handshake failed.
    #[error("vhost-user backend at {socket}: {step} failed")]
    Handshake {
        /// The socket.
        socket: String,
        /// The message that failed.
        step: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend is not a virtio 1.x block device sealvm can drive.
    #[error("vhost-user backend at {socket} does not offer {what}")]
    Unsupported {
        /// The socket.
        socket: String,
        /// What is missing.
        what: &'static str,
    },
}

/// A vhost-user-blk frontend device.
pub struct VhostUserBlk {
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config: Vec<u8>,
    num_queues: usize,
    relay: Option<(EventFd, JoinHandle<()>)>,
    completions: Arc<AtomicU64>,
    disconnected: Arc<std::sync::atomic::AtomicBool>,
}

impl VhostUserBlk {
    /// Connects to the backend at `socket` and reads its features and configuration.
    pub fn connect(socket: &Path) -> Result<Self, VhostUserError> {
        let step = |step| {
            let socket = socket.display().to_string();
            move |source| VhostUserError::Handshake {
                socket,
                step,
                source,
            }
        };
        let mut frontend = Frontend::connect(socket, MAX_QUEUES as u64).map_err(step("connect"))?;
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let unsupported = |what| VhostUserError::Unsupported {
            socket: socket.display().to_string(),
            what,
        };
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(unsupported("VIRTIO_F_VERSION_1"));
        }
        if backend_features & PROTOCOL_FEATURES == 0 {
            return Err(unsupported(
                "protocol features (needed to read the configuration)",
            ));
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        let protocol_features =
            offered & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        if !protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(unsupported("the CONFIG protocol feature"));
        }
        frontend
            .set_protocol_features(protocol_features)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        let num_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))? as usize
        } else {
            1
        };
        let (_, config) = frontend
            .get_config(
                0,
                CONFIG_LEN as u32,
                VhostUserConfigFlags::WRITABLE,
                &[0u8; CONFIG_LEN],
            )
            .map_err(step("GET_CONFIG"))?;
        let mut device = VhostUserBlk {
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            protocol_features,
            config,
            num_queues: num_queues.clamp(1, MAX_QUEUES),
            relay: None,
            completions: Arc::default(),
            disconnected: Arc::default(),
        };
        // Advertise only as many queues as sealvm sets up.
        if backend_features & Features::MQ != 0 && device.config.len() >= 36 {
            let n = device.num_queues as u16;
            device.config[34..36].copy_from_slice(&n.to_le_bytes());
        } else {
            device.num_queues = 1;
        }
        Ok(device)
    }

    fn setup_vrings(&mut self, activation: &Activation) -> Result<Vec<EventFd>, vhost::Error> {
        let mem = &activation.mem;
        self.frontend
            .set_features(activation.acked_features | PROTOCOL_FEATURES)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()?;
        self.frontend.set_mem_table(&regions)?;
        let host = |addr: u64| -> Result<u64, vhost::Error> {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        let mut calls = Vec::new();
        for (i, (queue, kick)) in activation
            .queues
            .iter()
            .zip(&activation.queue_events)
            .enumerate()
        {
            if !queue.ready() {
                continue;
            }
            self.frontend.set_vring_num(i, queue.size())?;
            self.frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: queue.max_size(),
                    queue_size: queue.size(),
                    flags: 0,
                    desc_table_addr: host(queue.desc_table())?,
                    used_ring_addr: host(queue.used_ring())?,
                    avail_ring_addr: host(queue.avail_ring())?,
                    log_addr: None,
                },
            )?;
            self.frontend.set_vring_base(i, 0)?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(vhost::Error::IOError)?;
            self.frontend.set_vring_call(i, &call)?;
            self.frontend.set_vring_kick(i, kick)?;
            self.frontend.set_vring_enable(i, true)?;
            calls.push(call);
        }
        Ok(calls)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.num_queues]
    }

    fn features(&self) -> u64 {
        self.backend_features & PASS_THROUGH
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` (offset 32) is writable; pass it on to the backend.
        if offset == 32 && data.len() == 1 && data[0] <= 1 {
            let result = self
                .frontend
                .set_config(32, VhostUserConfigFlags::WRITABLE, data);
            match result {
                Ok(()) => self.config[32] = data[0],
                Err(error) => tracing::warn!(%error, "backend refused the cache mode change"),
            }
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let calls = self.setup_vrings(&activation).map_err(|e| {
            ActivateError(format!(
                "cannot hand the queues to vhost-user backend {}: {e}",
                self.socket.display()
            ))
        })?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError(format!("eventfd: {e}")))?;
        let stop_clone = stop
            .try_clone()
            .map_err(|e| ActivateError(format!("eventfd: {e}")))?;
        let socket_fd = self.frontend.as_raw_fd();
        let interrupt = activation.interrupt.clone();
        let completions = self.completions.clone();
        let disconnected = self.disconnected.clone();
        let socket = self.socket.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                relay(
                    calls,
                    stop_clone,
                    socket_fd,
                    &interrupt,
                    &completions,
                    &disconnected,
                    &socket,
                )
            })
            .map_err(|e| ActivateError(format!("cannot start the interrupt relay: {e}")))?;
        self.relay = Some((stop, thread));
        let _ = self.protocol_features;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((stop, thread)) = self.relay.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
        for i in 0..self.num_queues {
            // GET_VRING_BASE stops the ring in the backend.
            let _ = self.frontend.get_vring_base(i);
        }
    }

    fn counters(&self) -> api::DeviceCounters {
        api::DeviceCounters::VhostUserBlk(api::VhostUserBlkCounters {
            socket: self.socket.display().to_string(),
            completion_interrupts: self.completions.load(Ordering::Relaxed),
            backend_connected: !self.disconnected.load(Ordering::Relaxed),
        })
    }

    fn kind(&self) -> &'static str {
        "vhost-user-blk"
    }
}

/// Turns backend completions (call eventfds) into virtio-mmio interrupts, and notices the
/// backend going away.
fn relay(
    calls: Vec<EventFd>,
    stop: EventFd,
    socket_fd: i32,
    interrupt: &Interrupt,
    completions: &AtomicU64,
    disconnected: &std::sync::atomic::AtomicBool,
    socket: &Path,
) {
    let mut fds: Vec<libc::pollfd> = calls
        .iter()
        .map(|c| c.as_raw_fd())
        .chain([stop.as_raw_fd(), socket_fd])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n_calls = calls.len();
    // The socket only matters for hang-up; its replies are read by the frontend itself.
    fds[n_calls + 1].events = 0;
    loop {
        // SAFETY: `fds` is a valid pollfd array; the fds outlive this loop.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[n_calls].revents != 0 {
            return;
        }
        let mut fired = false;
        for (i, call) in calls.iter().enumerate() {
            if fds[i].revents & libc::POLLIN != 0 {
                let _ = call.read();
                fired = true;
            }
        }
        if fired {
            completions.fetch_add(1, Ordering::Relaxed);
            interrupt.signal_used();
        }
        if fds[n_calls + 1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            disconnected.store(true, Ordering::Relaxed);
            tracing::error!(
                socket = %socket.display(),
                "vhost-user backend went away; the disk needs a reset and fails until the \
                 backend is back and the VM restarts"
            );
            interrupt.signal_needs_reset();
            return;
        }
    }
}
