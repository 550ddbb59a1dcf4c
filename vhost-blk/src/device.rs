//! The vhost-user-blk device: virtio-blk features and configuration, and the queue handler
//! that turns each descriptor chain into a request for the volume. Requests are parsed and
//! run by the sealvm-virtio-blk crate, which checks everything the guest sends.

use crate::counters::DeviceCounters;
use sealvm_virtio_blk::{
    serve_descriptor_chain, BlockBackend, ConfigSpace, FailureLog, Features, Limits, Request,
    Served,
};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`: the frontend may ask for dirty guest memory to be logged (live
/// migration).
const LOG_ALL_BIT: u64 = 1 << 26;
/// Guest memory with a dirty-page log the frontend can install (LOG_SHMFD): every write the
/// device makes to guest memory (read data, status bytes, used ring entries) marks its
/// pages dirty while a migration logs them.
pub type GuestMemory = GuestMemoryMmap<BitmapMmapRegion>;
/// A queue over [`GuestMemory`].
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic<GuestMemory>>;
/// Descriptors the device accepts per queue.
const QUEUE_SIZE: usize = 256;

/// A vhost-user-blk device serving one volume.
pub struct BlockDevice {
    volume: Arc<dyn BlockBackend>,
    limits: Limits,
    config: Mutex<ConfigSpace>,
    num_queues: usize,
    event_idx: AtomicBool,
    /// The driver negotiated VIRTIO_BLK_F_FLUSH; without it, it expects write-through.
    flush_negotiated: AtomicBool,
    /// The driver negotiated VIRTIO_BLK_F_CONFIG_WCE, which makes `writeback` writable.
    wce_negotiated: AtomicBool,
    /// Every write is made durable before it is acknowledged: the driver turned the cache
    /// off (`writeback` = 0) or cannot flush.
    write_through: AtomicBool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemory>>>,
    /// Counters for the API.
    pub counters: DeviceCounters,
    failures: FailureLog,
}

impl BlockDevice {
    /// A device for `volume` with `num_queues` request queues.
    pub fn new(volume: Arc<dyn BlockBackend>, read_only: bool, num_queues: usize) -> Self {
        let capacity_sectors = volume.capacity_bytes() / sealvm_virtio_blk::SECTOR_SIZE;
        let limits = Limits::for_capacity(capacity_sectors, read_only);
        // A journaled volume keeps the driver's cache mode: after a restart of sealvm-blk the
        // frontend reconnects without writing the configuration again, and the guest still
        // sends no flushes.
        let saved_write_through = volume.saved_write_through() == Some(true);
        let queues = u16::try_from(num_queues).unwrap_or(u16::MAX);
        let config = ConfigSpace::from_limits(&limits, queues, !saved_write_through);
        let device = String::from_utf8_lossy(volume.device_id()).into_owned();
        BlockDevice {
            volume,
            limits,
            config: Mutex::new(config),
            num_queues,
            event_idx: AtomicBool::new(false),
            flush_negotiated: AtomicBool::new(true),
            wce_negotiated: AtomicBool::new(false),
            write_through: AtomicBool::new(saved_write_through),
            mem: Mutex::new(None),
            counters: DeviceCounters::default(),
            failures: FailureLog::new(device),
        }
    }

    fn process_queue(&self, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self
            .mem
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone()
        else {
            return Ok(());
        };
        let mem = mem.memory();
        let mut completed = false;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let volume = self.volume.as_ref();
            let used =
                serve_descriptor_chain(
                    &*mem,
                    &chain,
                    volume,
                    &self.limits,
                    |served| match served {
                        Served::Ran {
                            request,
                            error,
                            started,
                        } => {
                            let error = error.or_else(|| self.write_through_flush(&mem, request));
                            self.counters.count_request(
                                request.kind,
                                request.data_len,
                                started.elapsed(),
                                error.is_none(),
                            );
                            if let Some(error) = error {
                                self.count_error(&error);
                            }
                        }
                        Served::Rejected(rejected) => {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            self.count_error(&rejected.error);
                        }
                    },
                );
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            vring
                .add_used(head, used)
                .map_err(|e| io::Error::other(format!("cannot complete a request: {e:?}")))?;
            completed = true;
        }
        if completed && vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// True while every write is made durable before it is acknowledged.
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Acquire)
    }

    fn update_cache_mode(&self, writeback: u8) {
        let write_through = writeback == 0 || !self.flush_negotiated.load(Ordering::Acquire);
        self.write_through.store(write_through, Ordering::Release);
    }

    /// In write-through mode, makes a successful write durable before it is acknowledged.
    /// `execute` has written the status byte already, but the used ring entry that lets the
    /// driver see it is published only after this returns; a failed flush turns the status
    /// into IOERR and is returned to be counted.
    fn write_through_flush(
        &self,
        mem: &GuestMemory,
        request: &Request,
    ) -> Option<sealvm_virtio_blk::RequestError> {
        use sealvm_virtio_blk::{request::status, RequestError, RequestKind};
        let writes = matches!(
            request.kind,
            RequestKind::Out | RequestKind::WriteZeroes | RequestKind::Discard
        );
        if !writes || !self.write_through() {
            return None;
        }
        let source = self.volume.flush().err()?;
        // The parser checked the status address; a driver that unmapped it since gets no
        // answer either way.
        let _ = mem.write_slice(&[status::IOERR], GuestAddress(request.status_addr));
        Some(RequestError::Backend(source))
    }

    fn count_error(&self, error: &sealvm_virtio_blk::RequestError) {
        self.counters.count_error(error.is_guest_error());
        self.failures.record(error);
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = Features::for_limits(&self.limits)
            | Features::INDIRECT_DESC
            | Features::CONFIG_WCE
            | LOG_ALL_BIT
            | PROTOCOL_FEATURES_BIT;
        if self.num_queues > 1 {
            features |= Features::MQ;
        }
        features
    }

    /// What qemu-storage-daemon's vhost-user-blk export offers, as far as
    /// vhost-user-backend 0.24 lets a backend: CONFIG and MQ; REPLY_ACK (the vhost crate
    /// answers `need_reply` messages); CONFIGURE_MEM_SLOTS (the handler adds and removes
    /// regions one at a time; libblkio requires it); LOG_SHMFD (dirty logging through
    /// [`GuestMemory`]'s bitmap, for live migration). Not INFLIGHT_SHMFD: the 0.24 handler
    /// refuses GET_INFLIGHT_FD itself and gives a backend no way to serve it.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn acked_features(&self, features: u64) {
        self.flush_negotiated
            .store(features & Features::FLUSH != 0, Ordering::Release);
        self.wce_negotiated
            .store(features & Features::CONFIG_WCE != 0, Ordering::Release);
        // The cache mode lasts across connections: a frontend that reconnects must not
        // silently lose the write-through its driver asked for.
        let writeback = self.config.lock().map_or(1, |c| c.writeback);
        self.update_cache_mode(writeback);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self
            .config
            .lock()
            .map(|c| c.to_bytes())
            .unwrap_or([0; sealvm_virtio_blk::config::CONFIG_SPACE_LEN]);
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if !self.wce_negotiated.load(Ordering::Acquire) {
            // Without CONFIG_WCE nothing in the configuration space is writable.
            tracing::debug!(offset, len = buf.len(), "ignored a configuration write");
            return Ok(());
        }
        let mut config = self
            .config
            .lock()
            .map_err(|_| io::Error::other("configuration lock poisoned"))?;
        if config.write(u64::from(offset), buf) {
            self.update_cache_mode(config.writeback);
            let write_through = self.write_through();
            tracing::info!(write_through, "the driver changed the cache mode");
            self.volume.save_write_through(config.writeback == 0)?;
            if write_through {
                // Writes acknowledged under write-back become durable now too.
                self.volume.flush()?;
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        *self.mem.lock().map_err(|_| io::Error::other("poisoned"))? = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        if self.event_idx.load(Ordering::Relaxed) {
            // Process until the driver adds nothing between our last pop and re-enabling.
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                self.process_queue(vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
        } else {
            self.process_queue(vring)?;
        }
        Ok(())
    }
}
