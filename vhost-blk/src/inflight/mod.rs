//! Inflight I/O tracking (vhost-user `INFLIGHT_SHMFD`): requests taken from a queue and not
//! yet completed are recorded in a region of shared memory the frontend keeps, so a
//! sealvm-blk that is killed and restarted serves them again before new requests, and the
//! frontend need not guess from the ring indexes.
//!
//! - [`region`]: the region's layout (QEMU's, for split virtqueues) and the bookkeeping of
//!   one queue: taken, completing, completed, and what to serve again on a new connection.
//! - [`chain`]: reads a request to serve again from its head index.
//! - [`connection`]: serves one frontend connection. vhost-user-backend 0.24's handler
//!   answers GET_INFLIGHT_FD and SET_INFLIGHT_FD with an error itself and is private to
//!   its crate, so the connection reads the frontend's messages, answers those two, and
//!   passes every other message, with its file descriptors, to the handler unchanged.

pub mod chain;
pub mod connection;
pub mod fuzzing;
pub mod region;

pub use connection::{serve_connection, Connection};
pub use region::{InflightRegion, QueueInflight};

use std::sync::{Arc, Mutex, MutexGuard};

/// The inflight tracking of one queue, shared by the connection (which installs it when the
/// frontend sends a region) and the queue's worker (which uses it).
#[derive(Debug, Default)]
pub struct QueueSlot {
    /// The queue's tracking, when the frontend sent a region.
    pub tracking: Option<QueueInflight>,
    /// The worker has had its first round since the frontend last (re)started the queue:
    /// it read the region ([`QueueInflight::start`]) and signalled the driver.
    pub started: bool,
}

/// One [`QueueSlot`] per queue of a device.
#[derive(Debug)]
pub struct InflightSlots {
    queues: Vec<Mutex<QueueSlot>>,
}

impl InflightSlots {
    /// Slots for `num_queues` queues, none tracked.
    pub fn new(num_queues: usize) -> Self {
        InflightSlots {
            queues: (0..num_queues).map(|_| Mutex::default()).collect(),
        }
    }

    /// Queues there are slots for.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// True for a device without queues.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// The slot of `queue`, locked; `None` for a queue the device does not have. A slot
    /// whose holder panicked is taken over: its state is the region's, which a restart
    /// would read anyway.
    pub fn lock(&self, queue: usize) -> Option<MutexGuard<'_, QueueSlot>> {
        let slot = self.queues.get(queue)?;
        Some(slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Installs `region` for every queue it has an area for (and no tracking for the
    /// others); every queue reads it when it next starts.
    pub fn install(&self, region: Option<Arc<InflightRegion>>) -> Result<(), InflightError> {
        for queue in 0..self.len() {
            let tracking = match &region {
                Some(region) if queue < usize::from(region.num_queues()) => {
                    let index = u16::try_from(queue).map_err(|_| InflightError::OutOfRange)?;
                    Some(QueueInflight::new(region.clone(), index)?)
                }
                _ => None,
            };
            if let Some(mut slot) = self.lock(queue) {
                *slot = QueueSlot {
                    tracking,
                    started: false,
                };
            }
        }
        Ok(())
    }

    /// Makes `queue` start afresh on its next round (the frontend started it): read its
    /// region again if it is tracked, and signal the driver whatever it does. False for a
    /// queue the device does not have.
    pub fn restart(&self, queue: usize) -> bool {
        self.lock(queue).is_some_and(|mut slot| {
            slot.started = false;
            true
        })
    }
}

/// What went wrong with an inflight region or a connection that carries one.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for a region of no queues, empty queues or queues beyond what
    /// the device or a split virtqueue has.
    #[error("the frontend asked for an inflight region of {num_queues} queues of {queue_size} descriptors, which this device does not have")]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue asked for.
        queue_size: u16,
    },
    /// The region the frontend sent is smaller than its queues need or than its file.
    #[error("the frontend's inflight region ({mmap_size} bytes at offset {mmap_offset} of a {file_len}-byte file) does not hold the {needed} bytes its queues need")]
    Size {
        /// Offset of the region in its file.
        mmap_offset: u64,
        /// Bytes of the region.
        mmap_size: u64,
        /// Bytes its queues need.
        needed: u64,
        /// Bytes of the file.
        file_len: u64,
    },
    /// No area for this queue in the region.
    #[error("the inflight region has no area for queue {queue}")]
    NoArea {
        /// The queue.
        queue: u16,
    },
    /// A queue's area says it was made for another queue size.
    #[error(
        "queue {queue}'s inflight area is for {desc_num} descriptors, the queue has {queue_size}"
    )]
    DescNum {
        /// The queue.
        queue: u16,
        /// What the area says.
        desc_num: u16,
        /// What the queue has.
        queue_size: u16,
    },
    /// A descriptor head beyond the queue.
    #[error("descriptor head {head} is outside queue {queue} of {desc_num} descriptors")]
    HeadOutOfRange {
        /// The queue.
        queue: u16,
        /// The head.
        head: u16,
        /// Descriptors in the queue.
        desc_num: u16,
    },
    /// An inflight flag that is neither 0 nor 1.
    #[error("queue {queue}'s inflight area holds {value} as head {head}'s inflight flag")]
    Flag {
        /// The queue.
        queue: u16,
        /// The head.
        head: u16,
        /// The flag's value.
        value: u8,
    },
    /// An access outside the mapped region (a checked access refused it).
    #[error("an access outside the inflight region")]
    OutOfRange,
    /// The descriptor chain of a request to serve again is malformed.
    #[error("the descriptor chain at head {head} cannot be read")]
    BadChain {
        /// The chain's head.
        head: u16,
    },
    /// A new region could not be created.
    #[error("cannot create an inflight region")]
    Create(#[source] std::io::Error),
    /// A region could not be mapped.
    #[error("cannot map the inflight region")]
    Map(#[source] std::io::Error),
    /// A vhost-user message could not be read or passed on.
    #[error("vhost-user connection: {what}")]
    Connection {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A message that breaks the vhost-user framing.
    #[error("malformed vhost-user message: {0}")]
    Message(&'static str),
}
