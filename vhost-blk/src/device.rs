//! The vhost-user-blk device: virtio-blk features and configuration, and the queue handler
//! that turns each descriptor chain into a request for the volume. Requests are parsed and
//! run by the sealvm-virtio-blk crate, which checks everything the guest sends.

use sealvm_virtio_blk::request::Rejected;
use sealvm_virtio_blk::{
    BlockBackend, ConfigSpace, Features, Limits, Request, RequestKind, Segment,
};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// Descriptors the device accepts per queue.
const QUEUE_SIZE: usize = 256;

/// Per-device request counters.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests that failed because the guest sent something malformed.
    pub guest_errors: AtomicU64,
    /// Requests that failed in the storage.
    pub io_errors: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Request latency, log2 buckets of microseconds: bucket i counts requests that took
    /// [2^i, 2^(i+1)) µs (bucket 0 also counts those under 1 µs).
    pub latency_us_log2: [AtomicU64; LATENCY_BUCKETS],
}

/// Buckets of the latency histogram (the last one collects everything from ~8 s up).
pub const LATENCY_BUCKETS: usize = 24;

impl DeviceCounters {
    /// Counts one request that took `elapsed`.
    pub fn record_latency(&self, elapsed: Duration) {
        let us = elapsed.as_micros().max(1) as u64;
        let bucket = (63 - us.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        self.latency_us_log2[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The histogram as (lower bound in µs, count) for the buckets that have counts.
    pub fn latency_histogram(&self) -> Vec<(u64, u64)> {
        self.latency_us_log2
            .iter()
            .enumerate()
            .map(|(i, c)| (1u64 << i, c.load(Ordering::Relaxed)))
            .filter(|&(_, c)| c > 0)
            .collect()
    }
}

/// A vhost-user-blk device serving one volume.
pub struct BlockDevice {
    volume: Arc<dyn BlockBackend>,
    limits: Limits,
    config: Mutex<ConfigSpace>,
    num_queues: usize,
    event_idx: AtomicBool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Counters for the API.
    pub counters: DeviceCounters,
    last_error_log: Mutex<Option<Instant>>,
}

impl BlockDevice {
    /// A device for `volume` with `num_queues` request queues.
    pub fn new(volume: Arc<dyn BlockBackend>, read_only: bool, num_queues: usize) -> Self {
        let capacity_sectors = volume.capacity_bytes() / sealvm_virtio_blk::SECTOR_SIZE;
        let limits = Limits::for_capacity(capacity_sectors, read_only);
        let config = ConfigSpace {
            capacity_sectors,
            size_max: 1 << 20,
            seg_max: (limits.max_segments - 2) as u32,
            blk_size: 512,
            writeback: 1,
            num_queues: num_queues as u16,
            max_discard_sectors: limits.max_discard_sectors,
            max_discard_seg: limits.max_discard_segments,
            max_write_zeroes_sectors: limits.max_discard_sectors,
            max_write_zeroes_seg: limits.max_discard_segments,
        };
        BlockDevice {
            volume,
            limits,
            config: Mutex::new(config),
            num_queues,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(None),
            counters: DeviceCounters::default(),
            last_error_log: Mutex::new(None),
        }
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
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
            let segments: Vec<Segment> = chain
                .clone()
                .map(|d| Segment {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                })
                .collect();
            let started = Instant::now();
            let used = match Request::parse(&*mem, &segments, &self.limits) {
                Ok(request) => {
                    let (used, error) = request.execute(&*mem, self.volume.as_ref(), &self.limits);
                    match (&error, request.kind) {
                        (Some(error), _) => self.count_error(error),
                        (None, RequestKind::In) => {
                            self.counters
                                .read_bytes
                                .fetch_add(request.data_len, Ordering::Relaxed);
                        }
                        (None, RequestKind::Out) => {
                            self.counters
                                .write_bytes
                                .fetch_add(request.data_len, Ordering::Relaxed);
                        }
                        (None, _) => {}
                    }
                    self.counters.record_latency(started.elapsed());
                    used
                }
                Err(rejected) => {
                    self.count_rejected(&rejected);
                    rejected.answer(&*mem)
                }
            };
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

    fn count_rejected(&self, rejected: &Rejected) {
        self.count_error(&rejected.error);
    }

    fn count_error(&self, error: &sealvm_virtio_blk::RequestError) {
        let counter = if error.is_guest_error() {
            &self.counters.guest_errors
        } else {
            &self.counters.io_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Log at most once a second: a misbehaving guest must not flood the log.
        if let Ok(mut last) = self.last_error_log.lock() {
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                *last = Some(Instant::now());
                tracing::warn!(%error, guest_error = error.is_guest_error(), "request failed");
            }
        }
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = Features::VERSION_1
            | Features::EVENT_IDX
            | Features::INDIRECT_DESC
            | Features::FLUSH
            | Features::BLK_SIZE
            | Features::SEG_MAX
            | Features::SIZE_MAX
            | Features::TOPOLOGY
            | Features::CONFIG_WCE
            | Features::DISCARD
            | Features::WRITE_ZEROES
            | PROTOCOL_FEATURES_BIT;
        if self.num_queues > 1 {
            features |= Features::MQ;
        }
        if self.limits.read_only {
            features |= Features::RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.config.lock().map(|c| c.to_bytes()).unwrap_or([0; 60]);
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if let Ok(mut config) = self.config.lock() {
            config.write(u64::from(offset), buf);
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
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
        vrings: &[VringRwLock],
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
