//! The vhost-user-blk device: virtio-blk features and configuration, and the queue handler
//! that turns each descriptor chain into a request for the volume. Requests are parsed and
//! run by the sealvm-virtio-blk crate, which checks everything the guest sends.

use crate::counters::DeviceCounters;
use crate::inflight::{chain::chain_segments, InflightError, InflightSlots, QueueSlot};
use sealvm_virtio_blk::{
    serve_chain, BlockBackend, ConfigSpace, FailureLog, Features, Limits, Request, Segment, Served,
};
use std::io;
use std::num::Wrapping;
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
pub const QUEUE_SIZE: usize = 256;

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
    /// Inflight tracking per queue, installed by the frontend's connection.
    inflight: Arc<InflightSlots>,
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
            inflight: Arc::new(InflightSlots::new(num_queues)),
        }
    }

    /// The device's inflight tracking, for the connection that serves its frontend.
    pub fn inflight_slots(&self) -> Arc<InflightSlots> {
        self.inflight.clone()
    }

    /// On the first request after the frontend (re)started a tracked queue, reads its
    /// inflight area: the requests a previous sealvm-blk took and did not complete are
    /// served again first, and the queue continues after them in the available ring.
    fn start_inflight(
        &self,
        slot: &mut QueueSlot,
        vring: &Vring,
        mem: &GuestMemory,
    ) -> Result<(), InflightError> {
        if slot.started {
            return Ok(());
        }
        slot.started = true;
        let Some(tracking) = slot.tracking.as_mut() else {
            return Ok(());
        };
        let (queue_size, used_idx) = {
            let state = vring.get_ref();
            let queue = state.get_queue();
            let used_idx = queue
                .used_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|_| InflightError::OutOfRange)?;
            (queue.size(), used_idx)
        };
        let next_avail = tracking.start(queue_size, used_idx)?;
        vring.set_queue_next_avail(next_avail.0);
        let resubmit: Vec<u16> = tracking.pending_resubmit().collect();
        if !resubmit.is_empty() {
            tracing::info!(
                requests = resubmit.len(),
                heads = ?resubmit,
                "serving again the requests in flight when the previous sealvm-blk stopped"
            );
        }
        Ok(())
    }

    /// Runs `f` on the queue's tracking; a failure (a head or region the frontend got
    /// wrong) ends the tracking of that queue, never the device.
    fn track(
        &self,
        slot: &mut QueueSlot,
        f: impl FnOnce(&mut crate::inflight::QueueInflight) -> Result<(), InflightError>,
    ) {
        if let Some(tracking) = slot.tracking.as_mut() {
            if let Err(error) = f(tracking) {
                tracing::warn!(%error, "inflight tracking stopped for a queue");
                slot.tracking = None;
            }
        }
    }

    /// The next request: one taken before a restart and not completed, else a new one from
    /// the available ring (recorded as taken).
    fn next_request(
        &self,
        slot: &mut QueueSlot,
        vring: &Vring,
        mem: &GuestMemory,
    ) -> Option<(u16, Result<Vec<Segment>, InflightError>)> {
        if let Some(head) = slot.tracking.as_mut().and_then(|t| t.next_resubmit()) {
            self.counters
                .inflight_resubmitted
                .fetch_add(1, Ordering::Relaxed);
            let (desc_table, queue_size) = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                (GuestAddress(queue.desc_table()), queue.size())
            };
            return Some((head, chain_segments(mem, desc_table, queue_size, head)));
        }
        let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem)?;
        let head = chain.head_index();
        self.track(slot, |t| t.taken(head));
        let segments = chain
            .map(|d| Segment {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        Some((head, Ok(segments)))
    }

    fn process_queue(&self, queue_index: usize, vring: &Vring) -> io::Result<()> {
        let Some(mem) = self
            .mem
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .clone()
        else {
            return Ok(());
        };
        let mem = mem.memory();
        let mut slot = self
            .inflight
            .lock(queue_index)
            .ok_or_else(|| io::Error::other(format!("no queue {queue_index}")))?;
        // The first round after the frontend (re)started the queue.
        let first_round = !slot.started;
        if let Err(error) = self.start_inflight(&mut slot, vring, &mem) {
            tracing::warn!(%error, queue = queue_index, "ignoring the frontend's inflight area");
            slot.tracking = None;
        }
        let mut completed = false;
        while let Some((head, segments)) = self.next_request(&mut slot, vring, &mem) {
            let used = match segments {
                Ok(segments) => self.serve(&mem, &segments),
                Err(error) => {
                    // A request to serve again whose descriptors the driver broke: it is
                    // completed with nothing written.
                    tracing::warn!(%error, "cannot serve an inflight request again");
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.track(&mut slot, |t| t.completing(head));
            vring
                .add_used(head, used)
                .map_err(|e| io::Error::other(format!("cannot complete a request: {e:?}")))?;
            let next_used = Wrapping(vring.get_ref().get_queue().next_used());
            self.track(&mut slot, |t| t.completed(head, next_used));
            completed = true;
        }
        let needs_notification = completed && vring.needs_notification().unwrap_or(true);
        // After a restart the driver may wait for an interrupt for used entries the previous
        // sealvm-blk published and died before signalling; its used_event then lies behind
        // what this process adds, and the event-index rule would never signal. So the first
        // round after a (re)start signals whatever it did.
        if needs_notification || first_round {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Serves one request; returns the bytes written to the driver's buffers.
    fn serve(&self, mem: &GuestMemory, segments: &[Segment]) -> u32 {
        let volume = self.volume.as_ref();
        serve_chain(mem, segments, volume, &self.limits, |served| match served {
            Served::Ran {
                request,
                error,
                started,
            } => {
                let error = error.or_else(|| self.write_through_flush(mem, request));
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
        })
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

    /// What qemu-storage-daemon's vhost-user-blk export offers: CONFIG and MQ; REPLY_ACK
    /// (the vhost crate answers `need_reply` messages); CONFIGURE_MEM_SLOTS (the handler
    /// adds and removes regions one at a time; libblkio requires it); LOG_SHMFD (dirty
    /// logging through [`GuestMemory`]'s bitmap, for live migration); INFLIGHT_SHMFD
    /// (requests in flight when sealvm-blk stopped are served again by the next one; the
    /// two inflight messages are answered by [`crate::inflight::connection`], because
    /// vhost-user-backend 0.24's handler refuses them, so a frontend needs that connection,
    /// as `sealvm-blk serve` gives it, not a bare `VhostUserDaemon`).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
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
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per worker thread (`queues_per_thread`): the thread is the queue.
        let queue_index = thread_id;
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
                self.process_queue(queue_index, vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
        } else {
            self.process_queue(queue_index, vring)?;
        }
        Ok(())
    }
}
