//! A vhost-user-blk frontend that drives any vhost-user-blk backend from the host, with no
//! VM: it owns a shared-memory "guest", builds a split virtqueue in it, and submits
//! virtio-blk requests. It is how sealvm-blk is crash-tested and compared with
//! qemu-storage-daemon.
//!
//! Memory layout of the 8 MiB guest (guest-physical addresses): the descriptor table at
//! 0x0, the available ring at 0x1000, the used ring at 0x2000, then one 0x11000-byte slot
//! per request in flight from 0x10000 (header at +0, status at +0x10, data at +0x1000,
//! up to 64 KiB).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};

use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// virtio-blk request types and statuses (virtio 1.2, 5.2.6), written out here rather than
/// taken from the product's parser, so this client checks the product against the spec.
pub mod types {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
}
/// virtio-blk completion statuses.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The device failed the request.
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

const MEMORY_SIZE: usize = 8 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const SLOTS_START: u64 = 0x10000;
const SLOT_SIZE: u64 = 0x11000;
/// Largest data buffer of one request.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Requests that can be in flight at once.
pub const MAX_IN_FLIGHT: u16 = 32;
const QUEUE_SIZE: u16 = 256;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const FLUSH: u64 = 1 << 9;
const CONFIG_WCE: u64 = 1 << 11;
/// Offset of `writeback` in the virtio-blk configuration space.
const WRITEBACK_OFFSET: u32 = 32;

/// Errors driving a backend.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The vhost-user handshake failed.
    #[error("vhost-user {step} failed")]
    Protocol {
        /// Which message.
        step: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// Shared memory or eventfds could not be set up.
    #[error("cannot set up the frontend's {what}")]
    Setup {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The backend stopped answering (it died or hung).
    #[error("the backend did not complete a request within {0:?}")]
    NoAnswer(Duration),
    /// The backend closed its vhost-user socket (it exited or was killed).
    #[error("the backend closed its vhost-user connection")]
    BackendGone,
    /// A request completed with an error status.
    #[error("request failed with virtio-blk status {0}")]
    Status(u8),
    /// A request larger than a slot.
    #[error("requests are limited to {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
}

/// One descriptor of a hand-built chain ([`BlkDriver::submit_chain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest-physical address; may lie outside guest memory.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A connected vhost-user-blk frontend with one queue.
pub struct BlkDriver {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_idx: u16,
    capacity_sectors: u64,
    timeout: Duration,
    inflight: Option<InflightShm>,
}

/// The inflight region (vhost-user INFLIGHT_SHMFD) the backend gave this frontend, which the
/// frontend keeps across backend restarts. Its layout (QEMU's, split virtqueues) is written
/// out here rather than taken from the product: per queue a 16-byte header (`features` u64,
/// `version` u16, `desc_num` u16, `last_batch_head` u16, `used_idx` u16), then `desc_num`
/// 16-byte descriptor states (`inflight` u8, 5 bytes padding, `next` u16, `counter` u64),
/// the area rounded up to 64 bytes.
#[derive(Debug)]
pub struct InflightShm {
    file: File,
    mmap_size: u64,
    queue_size: u16,
}

impl InflightShm {
    /// Bytes of the region.
    pub fn size(&self) -> u64 {
        self.mmap_size
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) {
        self.file
            .write_all_at(bytes, offset)
            .expect("write the inflight region");
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.file
            .read_exact_at(&mut out, offset)
            .expect("read the inflight region");
        out
    }

    /// Marks queue 0's `head` as taken and not completed, `counter` being the order in which
    /// the backend took it: what a backend killed while serving it leaves behind.
    pub fn mark_inflight(&self, head: u16, counter: u64) {
        let at = 16 + u64::from(head) * 16;
        self.write_at(at + 8, &counter.to_le_bytes());
        self.write_at(at, &[1]);
    }

    /// True while queue 0's `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.read_at(16 + u64::from(head) * 16, 1)[0] == 1
    }

    /// Queue 0's `desc_num` (the queue size the area is for).
    pub fn desc_num(&self) -> u16 {
        let bytes = self.read_at(10, 2);
        u16::from_le_bytes([bytes[0], bytes[1]])
    }

    /// Overwrites queue 0's `desc_num`, as a broken or hostile frontend might.
    pub fn set_desc_num(&self, desc_num: u16) {
        self.write_at(10, &desc_num.to_le_bytes());
    }

    /// Overwrites a byte of the region, as a broken or hostile frontend might.
    pub fn poke(&self, offset: u64, byte: u8) {
        self.write_at(offset, &[byte]);
    }
}

/// One request in flight, identified by its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(pub u16);

impl BlkDriver {
    /// Connects to the backend at `socket` and sets up one queue.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, LoadError> {
        let mut driver = Self::connect_unstarted(socket, timeout)?;
        driver.handshake(false)?;
        Ok(driver)
    }

    /// Connects as [`Self::connect`] and also negotiates INFLIGHT_SHMFD: the backend makes
    /// an inflight region (GET_INFLIGHT_FD), which is handed back to it (SET_INFLIGHT_FD)
    /// before the queue starts, as QEMU does. Fails if the backend does not offer it.
    pub fn connect_with_inflight(socket: &Path, timeout: Duration) -> Result<Self, LoadError> {
        let mut driver = Self::connect_unstarted(socket, timeout)?;
        driver.handshake(true)?;
        Ok(driver)
    }

    fn connect_unstarted(socket: &Path, timeout: Duration) -> Result<Self, LoadError> {
        let setup = |what| move |source| LoadError::Setup { what, source };
        Ok(BlkDriver {
            frontend: Frontend::connect(socket, 1).map_err(|source| LoadError::Protocol {
                step: "connect",
                source,
            })?,
            mem: Self::new_memory()?,
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(setup("kick eventfd"))?,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(setup("call eventfd"))?,
            avail_idx: 0,
            used_idx: 0,
            capacity_sectors: 0,
            timeout,
            inflight: None,
        })
    }

    /// Connects again to a (restarted) backend at `socket`, keeping the guest memory, the
    /// rings and the inflight region, as QEMU does when its vhost-user socket reconnects:
    /// the queue restarts at the used index (GET_VRING_BASE cannot reach a dead backend).
    pub fn reconnect(mut self, socket: &Path) -> Result<Self, LoadError> {
        self.frontend = Frontend::connect(socket, 1).map_err(|source| LoadError::Protocol {
            step: "connect",
            source,
        })?;
        let with_inflight = self.inflight.is_some();
        self.handshake(with_inflight)?;
        Ok(self)
    }

    /// The inflight region, once negotiated.
    pub fn inflight(&self) -> Option<&InflightShm> {
        self.inflight.as_ref()
    }

    fn new_memory() -> Result<GuestMemoryMmap<()>, LoadError> {
        let setup = |what| move |source| LoadError::Setup { what, source };
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd.
        let fd = unsafe { libc::memfd_create(c"sealvm-blk-load".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(LoadError::Setup {
                what: "memfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEMORY_SIZE as u64)
            .map_err(setup("memfd size"))?;
        GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEMORY_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| LoadError::Setup {
            what: "guest memory",
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Everything from SET_OWNER to a started queue, on the current connection; the queue
    /// starts at `self.used_idx` (0 on a first connection).
    fn handshake(&mut self, with_inflight: bool) -> Result<(), LoadError> {
        let protocol = |step| move |source| LoadError::Protocol { step, source };
        let frontend = &mut self.frontend;
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        // No EVENT_IDX: the backend then signals every completion, which keeps this simple.
        let wanted = offered & (VERSION_1 | FLUSH | CONFIG_WCE | PROTOCOL_FEATURES_BIT);
        frontend
            .set_features(wanted)
            .map_err(protocol("SET_FEATURES"))?;
        if offered & PROTOCOL_FEATURES_BIT != 0 {
            let protocol_features = frontend
                .get_protocol_features()
                .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
            let mut wanted = VhostUserProtocolFeatures::CONFIG;
            if with_inflight {
                wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            frontend
                .set_protocol_features(protocol_features & wanted)
                .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        }
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .expect("the region just created");
        let region_info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(protocol("memory region"))?;
        let host = region_info.userspace_addr;
        frontend
            .set_mem_table(&[region_info])
            .map_err(protocol("SET_MEM_TABLE"))?;
        if with_inflight {
            if self.inflight.is_none() {
                let (got, file) = frontend
                    .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE_SIZE))
                    .map_err(protocol("GET_INFLIGHT_FD"))?;
                self.inflight = Some(InflightShm {
                    file,
                    mmap_size: got.mmap_size,
                    queue_size: got.queue_size,
                });
            }
            if let Some(inflight) = &self.inflight {
                frontend
                    .set_inflight_fd(
                        &VhostUserInflight::new(inflight.mmap_size, 0, 1, inflight.queue_size),
                        inflight.file.as_raw_fd(),
                    )
                    .map_err(protocol("SET_INFLIGHT_FD"))?;
            }
        }
        frontend
            .set_vring_num(0, QUEUE_SIZE)
            .map_err(protocol("SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host + DESC_TABLE,
                    used_ring_addr: host + USED_RING,
                    avail_ring_addr: host + AVAIL_RING,
                    log_addr: None,
                },
            )
            .map_err(protocol("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(0, self.used_idx)
            .map_err(protocol("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(0, &self.call)
            .map_err(protocol("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(0, &self.kick)
            .map_err(protocol("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(0, true)
            .map_err(protocol("SET_VRING_ENABLE"))?;
        let config = [0u8; 8];
        let (_, capacity) = frontend
            .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &config)
            .map_err(protocol("GET_CONFIG"))?;
        self.capacity_sectors = u64::from_le_bytes(capacity[..8].try_into().unwrap_or([0; 8]));
        Ok(())
    }

    /// Sets the device's cache mode as a driver does through the configuration space
    /// (`writeback`: true for write-back, false for write-through), and reads it back.
    /// Needs VIRTIO_BLK_F_CONFIG_WCE; returns the mode the device reports afterwards.
    pub fn set_writeback(&mut self, writeback: bool) -> Result<bool, LoadError> {
        let protocol = |step| move |source| LoadError::Protocol { step, source };
        self.frontend
            .set_config(
                WRITEBACK_OFFSET,
                VhostUserConfigFlags::WRITABLE,
                &[u8::from(writeback)],
            )
            .map_err(protocol("SET_CONFIG"))?;
        let (_, value) = self
            .frontend
            .get_config(WRITEBACK_OFFSET, 1, VhostUserConfigFlags::WRITABLE, &[0])
            .map_err(protocol("GET_CONFIG"))?;
        Ok(value.first() == Some(&1))
    }

    /// The volume's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn slot_addr(slot: Slot) -> u64 {
        SLOTS_START + u64::from(slot.0) * SLOT_SIZE
    }

    /// Puts a request in `slot` on the queue and kicks the backend. For writes `data` is
    /// the payload; for reads its length is the length to read.
    pub fn submit(
        &mut self,
        slot: Slot,
        request_type: u32,
        sector: u64,
        data: &[u8],
        read_len: usize,
    ) -> Result<(), LoadError> {
        let len = if request_type == types::IN {
            read_len
        } else {
            data.len()
        };
        if len > MAX_REQUEST_BYTES || slot.0 >= MAX_IN_FLIGHT {
            return Err(LoadError::TooLarge);
        }
        let base = Self::slot_addr(slot);
        self.write_header(slot, request_type, sector);
        if request_type == types::OUT {
            self.write_guest(base + 0x1000, data);
        }
        // Up to three descriptors per slot: header, data (if any), status.
        let mut chain = vec![RawDescriptor {
            addr: base,
            len: 16,
            writable: false,
        }];
        if len > 0 {
            chain.push(RawDescriptor {
                addr: base + 0x1000,
                len: len as u32,
                writable: request_type == types::IN,
            });
        }
        chain.push(RawDescriptor {
            addr: base + 0x10,
            len: 1,
            writable: true,
        });
        self.submit_chain(slot, &chain)
    }

    /// Guest address of `slot`'s 16-byte request header.
    pub fn header_addr(slot: Slot) -> u64 {
        Self::slot_addr(slot)
    }

    /// Guest address of `slot`'s status byte, which [`Self::complete`] reports.
    pub fn status_addr(slot: Slot) -> u64 {
        Self::slot_addr(slot) + 0x10
    }

    /// Guest address of `slot`'s data buffer ([`MAX_REQUEST_BYTES`] long).
    pub fn data_addr(slot: Slot) -> u64 {
        Self::slot_addr(slot) + 0x1000
    }

    /// Writes a virtio-blk request header (`request_type`, `sector`) at
    /// [`Self::header_addr`] and marks the status byte as not yet written (0xff).
    pub fn write_header(&self, slot: Slot, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write_guest(Self::header_addr(slot), &header);
        self.write_guest(Self::status_addr(slot), &[0xff]);
    }

    /// Copies `bytes` into guest memory at `addr`. Panics outside the 8 MiB guest (a bug in
    /// the caller: only descriptors may point outside).
    pub fn write_guest(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("inside guest memory");
    }

    /// Puts a hand-built descriptor chain for `slot` on the queue and kicks the backend.
    /// Nothing is checked: descriptors may point anywhere, have any length and direction,
    /// which is how malformed requests are sent. At most three descriptors per slot.
    pub fn submit_chain(&mut self, slot: Slot, chain: &[RawDescriptor]) -> Result<(), LoadError> {
        self.queue_chain(slot, chain)?;
        self.kick.write(1).map_err(|source| LoadError::Setup {
            what: "kick",
            source,
        })
    }

    /// Puts a write of `data` at `sector` for `slot` in the available ring without kicking
    /// the backend; returns its descriptor head. With [`InflightShm::mark_inflight`] this
    /// stages a request a killed backend had taken and not completed.
    pub fn queue_write(&mut self, slot: Slot, sector: u64, data: &[u8]) -> Result<u16, LoadError> {
        if data.len() > MAX_REQUEST_BYTES || data.is_empty() {
            return Err(LoadError::TooLarge);
        }
        let base = Self::slot_addr(slot);
        self.write_header(slot, types::OUT, sector);
        self.write_guest(base + 0x1000, data);
        let chain = [
            RawDescriptor {
                addr: base,
                len: 16,
                writable: false,
            },
            RawDescriptor {
                addr: base + 0x1000,
                len: data.len() as u32,
                writable: false,
            },
            RawDescriptor {
                addr: base + 0x10,
                len: 1,
                writable: true,
            },
        ];
        self.queue_chain(slot, &chain)?;
        Ok(slot.0 * 3)
    }

    /// Completions the backend has published that [`Self::complete`] has not taken, in
    /// order, as (descriptor head, status); they stay unread.
    pub fn used_entries(&self) -> Vec<(u16, u8)> {
        fence(Ordering::SeqCst);
        let used_idx: u16 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 2))
            .expect("used ring in memory");
        let mut out = Vec::new();
        let mut idx = self.used_idx;
        while idx != used_idx {
            let entry = USED_RING + 4 + u64::from(idx % QUEUE_SIZE) * 8;
            let head: u32 = self
                .mem
                .read_obj(GuestAddress(entry))
                .expect("used ring in memory");
            let state: u8 = self
                .mem
                .read_obj(GuestAddress(
                    Self::slot_addr(Slot((head / 3) as u16)) + 0x10,
                ))
                .expect("slot in memory");
            out.push((head as u16, state));
            idx = idx.wrapping_add(1);
        }
        out
    }

    fn queue_chain(&mut self, slot: Slot, chain: &[RawDescriptor]) -> Result<(), LoadError> {
        if chain.is_empty() || chain.len() > 3 || slot.0 >= MAX_IN_FLIGHT {
            return Err(LoadError::TooLarge);
        }
        let first = slot.0 * 3;
        let count = chain.len() as u16;
        for (i, descriptor) in chain.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if descriptor.writable { DESC_F_WRITE } else { 0 };
            if (i as u16) + 1 < count {
                flags |= DESC_F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&descriptor.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&descriptor.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(index + 1).to_le_bytes());
            self.write_guest(DESC_TABLE + u64::from(index) * 16, &raw);
        }
        let ring_at = AVAIL_RING + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        self.write_guest(ring_at, &first.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_guest(AVAIL_RING + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Waits for the next completion; returns its slot and status byte.
    pub fn complete(&mut self) -> Result<(Slot, u8), LoadError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            fence(Ordering::SeqCst);
            let used_idx: u16 = self
                .mem
                .read_obj(GuestAddress(USED_RING + 2))
                .expect("used ring in memory");
            if used_idx != self.used_idx {
                let entry = USED_RING + 4 + u64::from(self.used_idx % QUEUE_SIZE) * 8;
                let head: u32 = self
                    .mem
                    .read_obj(GuestAddress(entry))
                    .expect("used ring in memory");
                self.used_idx = self.used_idx.wrapping_add(1);
                let slot = Slot((head / 3) as u16);
                let state: u8 = self
                    .mem
                    .read_obj(GuestAddress(Self::slot_addr(slot) + 0x10))
                    .expect("slot in memory");
                return Ok((slot, state));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(LoadError::NoAnswer(self.timeout));
            }
            // Wait for a completion signal, or for the backend's socket to hang up (it died).
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.frontend.as_raw_fd(),
                    events: 0,
                    revents: 0,
                },
            ];
            let wait_ms = (deadline - now).as_millis().min(100) as i32;
            // SAFETY: two valid pollfds for descriptors that self keeps open.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, wait_ms) };
            if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(LoadError::BackendGone);
            }
            let _ = self.call.read();
        }
    }

    /// Runs one request to completion and fails unless its status is OK.
    fn run_one(
        &mut self,
        request_type: u32,
        sector: u64,
        data: &[u8],
        read_len: usize,
    ) -> Result<(), LoadError> {
        self.submit(Slot(0), request_type, sector, data, read_len)?;
        let (_, state) = self.complete()?;
        if state != status::OK {
            return Err(LoadError::Status(state));
        }
        Ok(())
    }

    /// Writes `data` at `sector` and waits for the acknowledgement.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), LoadError> {
        self.run_one(types::OUT, sector, data, 0)
    }

    /// Reads `len` bytes from `sector`.
    pub fn read(&mut self, sector: u64, len: usize) -> Result<Vec<u8>, LoadError> {
        self.run_one(types::IN, sector, &[], len)?;
        Ok(self.slot_data(Slot(0), len))
    }

    /// Flushes and waits for the acknowledgement.
    pub fn flush(&mut self) -> Result<(), LoadError> {
        self.run_one(types::FLUSH, 0, &[], 0)
    }

    /// The data buffer of `slot` after a read completed.
    pub fn slot_data(&self, slot: Slot, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(Self::slot_addr(slot) + 0x1000))
            .expect("slot in memory");
        out
    }
}
