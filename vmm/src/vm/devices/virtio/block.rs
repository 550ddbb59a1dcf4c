//! virtio-blk on a raw image (or any [`BlockBackend`]): requests parsed and checked by the
//! shared `sealvm-virtio-blk` crate, run on a worker thread.

use super::worker::Worker;
use super::{read_config_bytes, ActivateError, Activation, VirtioDevice, TYPE_BLOCK};
use crate::vm::api::protocol as api;
use sealvm_virtio_blk::{
    serve_descriptor_chain, BlockBackend, ConfigSpace, FailureLog, Features, Limits, RequestKind,
    Served,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};

/// Queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;

/// Per-device counters.
#[derive(Default)]
pub struct BlockCounters {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    errors: AtomicU64,
}

/// A virtio-blk device.
pub struct Block {
    backend: Arc<dyn BlockBackend>,
    limits: Limits,
    config: ConfigSpace,
    counters: Arc<BlockCounters>,
    failures: Arc<FailureLog>,
    worker: Option<Worker>,
    name: String,
}

impl Block {
    /// A device serving `backend`; `name` is for logs and the API.
    pub fn new(backend: Arc<dyn BlockBackend>, read_only: bool, name: String) -> Self {
        let capacity_sectors = backend.capacity_bytes() / sealvm_virtio_blk::SECTOR_SIZE;
        let limits = Limits::for_capacity(capacity_sectors, read_only);
        // One queue; CONFIG_WCE is not offered, so the cache stays write-back.
        let config = ConfigSpace::from_limits(&limits, 1, true);
        Block {
            backend,
            limits,
            config,
            counters: Arc::default(),
            failures: Arc::new(FailureLog::new(name.clone())),
            worker: None,
            name,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        Features::for_limits(&self.limits)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.to_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // CONFIG_WCE is not offered: the configuration space is read-only.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            queue_events,
            interrupt,
            ..
        } = activation;
        let mut queue = queues
            .pop()
            .filter(|q| q.ready())
            .ok_or_else(|| ActivateError("the request queue is not ready".into()))?;
        let backend = self.backend.clone();
        let limits = self.limits;
        let counters = self.counters.clone();
        let failures = self.failures.clone();
        let worker = Worker::spawn(&format!("blk-{}", self.name), queue_events, move |_| {
            if process_queue(
                &mut queue,
                &mem,
                backend.as_ref(),
                &limits,
                &counters,
                &failures,
            ) {
                interrupt.signal_used();
            }
        })
        .map_err(|e| ActivateError(format!("cannot start the block worker: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }

    fn counters(&self) -> api::DeviceCounters {
        let c = &self.counters;
        api::DeviceCounters::Block(api::BlockCounters {
            requests: c.requests.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        })
    }

    fn flush(&self) {
        if let Err(error) = self.backend.flush() {
            tracing::error!(disk = %self.name, %error, "flush at shutdown failed");
        }
    }

    fn kind(&self) -> &'static str {
        "block"
    }
}

/// Runs every available request; returns true when the driver should be interrupted.
pub fn process_queue(
    queue: &mut Queue,
    mem: &crate::vm::memory::GuestMemory,
    backend: &dyn BlockBackend,
    limits: &Limits,
    counters: &BlockCounters,
    failures: &FailureLog,
) -> bool {
    let mut notify = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            return notify;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used =
                serve_descriptor_chain(mem, &chain, backend, limits, |served| match served {
                    Served::Ran { request, error, .. } => {
                        let counter = match (request.kind, &error) {
                            (RequestKind::In, None) => {
                                Some((&counters.read_bytes, request.data_len))
                            }
                            (RequestKind::Out, None) => {
                                Some((&counters.write_bytes, request.data_len))
                            }
                            (RequestKind::Flush, None) => Some((&counters.flushes, 1)),
                            _ => None,
                        };
                        if let Some((counter, by)) = counter {
                            counter.fetch_add(by, Ordering::Relaxed);
                        }
                        if let Some(error) = error {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            failures.record(&error);
                        }
                    }
                    Served::Rejected(rejected) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        failures.record(&rejected.error);
                    }
                });
            counters.requests.fetch_add(1, Ordering::Relaxed);
            if queue.add_used(mem, head, used).is_err() {
                tracing::warn!("cannot complete a request: used ring unusable");
                return notify;
            }
            match queue.needs_notification(mem) {
                Ok(true) => notify = true,
                Ok(false) => {}
                Err(_) => notify = true,
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => return notify,
        }
    }
}
