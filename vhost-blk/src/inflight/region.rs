//! The inflight region (vhost-user `INFLIGHT_SHMFD`) for split virtqueues, in QEMU's layout
//! (docs/interop/vhost-user.rst, "Inflight I/O tracking"; libvhost-user's
//! `vu_get_inflight_fd`, `vu_check_queue_inflights`).
//!
//! The backend creates the region (GET_INFLIGHT_FD); the frontend keeps its file and hands
//! it back to every backend it connects (SET_INFLIGHT_FD), so a backend that restarts finds
//! the requests its predecessor had taken from the ring but not completed.
//!
//! Layout, all little-endian. The region holds `num_queues` areas of
//! [`queue_area_size`]`(queue_size)` bytes each, one per queue, in queue order:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0  | 8 | `features` (unused, 0) |
//! | 8  | 2 | `version`: 0 in a fresh region, [`VERSION`] once a backend has used it |
//! | 10 | 2 | `desc_num`: the queue size the area was made for |
//! | 12 | 2 | `last_batch_head`: the head whose used entry is being published |
//! | 14 | 2 | `used_idx`: the used index after the last completion the backend finished |
//! | 16 | 16 × `desc_num` | one descriptor state per descriptor head |
//!
//! A descriptor state (16 bytes): `inflight` (1 byte: 1 while the request is taken and not
//! completed), 5 bytes padding, `next` (2 bytes, unused for split queues), `counter`
//! (8 bytes: the order in which heads were taken).
//!
//! Everything read from the region comes from the frontend and is checked before use.

use super::InflightError;
use std::fs::File;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// The region version a backend writes once it has started using a queue's area.
pub const VERSION: u16 = 1;
/// Bytes of a queue area's header, before its descriptor states.
const HEADER_SIZE: usize = 16;
/// Bytes of one descriptor state.
const DESC_STATE_SIZE: usize = 16;
/// Queue areas are rounded up to this many bytes.
const AREA_ALIGNMENT: usize = 64;
/// Largest queue size a split virtqueue may have.
const MAX_QUEUE_SIZE: u16 = 32768;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const OFF_DESC_INFLIGHT: usize = 0;
const OFF_DESC_COUNTER: usize = 8;

/// Bytes of one queue's area for a queue of `queue_size` descriptors, as libvhost-user
/// computes it (`vu_inflight_queue_size`), so the two agree on where each queue's area is.
pub fn queue_area_size(queue_size: u16) -> usize {
    (DESC_STATE_SIZE * usize::from(queue_size) + 2).div_ceil(AREA_ALIGNMENT) * AREA_ALIGNMENT
}

/// A mapped inflight region, shared with the frontend.
pub struct InflightRegion {
    mapping: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// Creates a fresh region (GET_INFLIGHT_FD) in a memfd for `num_queues` queues of
    /// `queue_size` descriptors: zeroed, with each area's `desc_num` set. Returns the region
    /// and the file to send to the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Arc<Self>, File), InflightError> {
        check_shape(num_queues, queue_size)?;
        let size = usize::from(num_queues) * queue_area_size(queue_size);
        let file = memfd("sealvm-blk-inflight").map_err(InflightError::Create)?;
        file.set_len(size as u64).map_err(InflightError::Create)?;
        let mapping_file = file.try_clone().map_err(InflightError::Create)?;
        let mapping = MmapRegion::from_file(FileOffset::new(mapping_file, 0), size)
            .map_err(|e| InflightError::Map(std::io::Error::other(e)))?;
        let region = InflightRegion {
            mapping,
            num_queues,
            queue_size,
        };
        for queue in 0..num_queues {
            let area = region.area(queue)?;
            area.write_obj(queue_size.to_le(), OFF_DESC_NUM)
                .map_err(|_| InflightError::OutOfRange)?;
        }
        Ok((Arc::new(region), file))
    }

    /// Maps a region the frontend sent (SET_INFLIGHT_FD) and checks its shape against what
    /// this device has: at most `max_queues` queues of at most `max_queue_size` descriptors,
    /// and `mmap_size` bytes at `mmap_offset` that the file really holds and that fit every
    /// queue's area.
    pub fn open(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
        max_queue_size: usize,
    ) -> Result<Arc<Self>, InflightError> {
        check_shape(num_queues, queue_size)?;
        if usize::from(num_queues) > max_queues || usize::from(queue_size) > max_queue_size {
            return Err(InflightError::Shape {
                num_queues,
                queue_size,
            });
        }
        let needed = (usize::from(num_queues) * queue_area_size(queue_size)) as u64;
        let file_len = file.metadata().map_err(InflightError::Map)?.len();
        let end = mmap_offset.checked_add(mmap_size);
        if mmap_size < needed || end.is_none_or(|end| end > file_len) {
            return Err(InflightError::Size {
                mmap_offset,
                mmap_size,
                needed,
                file_len,
            });
        }
        let size = usize::try_from(mmap_size).map_err(|_| InflightError::OutOfRange)?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, mmap_offset), size)
            .map_err(|e| InflightError::Map(std::io::Error::other(e)))?;
        Ok(Arc::new(InflightRegion {
            mapping,
            num_queues,
            queue_size,
        }))
    }

    /// Queues the region has an area for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The queue size the frontend said the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn area(&self, queue: u16) -> Result<VolatileSlice<'_>, InflightError> {
        if queue >= self.num_queues {
            return Err(InflightError::NoArea { queue });
        }
        let size = queue_area_size(self.queue_size);
        self.mapping
            .get_slice(usize::from(queue) * size, size)
            .map_err(|_| InflightError::OutOfRange)
    }
}

/// The tracking of one queue over its area of an [`InflightRegion`].
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    queue: u16,
    /// Checked against the queue at [`QueueInflight::start`].
    desc_num: u16,
    /// The counter the next taken head gets.
    counter: u64,
    /// Heads to serve again before new requests, the next one last.
    resubmit: Vec<u16>,
}

impl QueueInflight {
    /// The tracking of `queue` in `region`. Nothing is read until [`QueueInflight::start`].
    pub fn new(region: Arc<InflightRegion>, queue: u16) -> Result<Self, InflightError> {
        region.area(queue)?;
        Ok(QueueInflight {
            region,
            queue,
            desc_num: 0,
            counter: 0,
            resubmit: Vec::new(),
        })
    }

    fn area(&self) -> Result<VolatileSlice<'_>, InflightError> {
        self.region.area(self.queue)
    }

    fn read_u16(&self, offset: usize) -> Result<u16, InflightError> {
        let value: u16 = self
            .area()?
            .read_obj(offset)
            .map_err(|_| InflightError::OutOfRange)?;
        Ok(u16::from_le(value))
    }

    fn write_u16(&self, offset: usize, value: u16) -> Result<(), InflightError> {
        self.area()?
            .write_obj(value.to_le(), offset)
            .map_err(|_| InflightError::OutOfRange)
    }

    fn desc_offset(&self, head: u16) -> Result<usize, InflightError> {
        if head >= self.desc_num {
            return Err(InflightError::HeadOutOfRange {
                queue: self.queue,
                head,
                desc_num: self.desc_num,
            });
        }
        Ok(HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE)
    }

    fn set_inflight(&self, head: u16, inflight: bool) -> Result<(), InflightError> {
        let offset = self.desc_offset(head)? + OFF_DESC_INFLIGHT;
        self.area()?
            .write_obj(u8::from(inflight), offset)
            .map_err(|_| InflightError::OutOfRange)
    }

    /// Starts the queue on a (new) connection (`vu_check_queue_inflights`): `queue_size` is
    /// the size the frontend gave the queue and `used_idx` the index in the guest's used
    /// ring. A fresh area is marked as used. An area a previous backend used yields the
    /// heads it had taken and not completed, to be served again in the order they were
    /// taken; returns the queue's next available index, which counts them (`used_idx` plus
    /// the number of heads still in flight).
    pub fn start(
        &mut self,
        queue_size: u16,
        used_idx: Wrapping<u16>,
    ) -> Result<Wrapping<u16>, InflightError> {
        let desc_num = self.read_u16(OFF_DESC_NUM)?;
        if desc_num != queue_size || usize::from(desc_num) > usize::from(self.region.queue_size) {
            return Err(InflightError::DescNum {
                queue: self.queue,
                desc_num,
                queue_size,
            });
        }
        self.desc_num = desc_num;
        self.counter = 0;
        self.resubmit.clear();
        if self.read_u16(OFF_VERSION)? == 0 {
            self.write_u16(OFF_USED_IDX, used_idx.0)?;
            fence(Ordering::SeqCst);
            self.write_u16(OFF_VERSION, VERSION)?;
            return Ok(used_idx);
        }
        if self.read_u16(OFF_USED_IDX)? != used_idx.0 {
            // The previous backend published a used entry and died before it cleared the
            // head's inflight flag: that request is complete.
            let head = self.read_u16(OFF_LAST_BATCH_HEAD)?;
            self.set_inflight(head, false)?;
            fence(Ordering::SeqCst);
            self.write_u16(OFF_USED_IDX, used_idx.0)?;
        }
        let area = self.area()?;
        let mut inflight = Vec::new();
        for head in 0..desc_num {
            let offset = self.desc_offset(head)?;
            let flag: u8 = area
                .read_obj(offset + OFF_DESC_INFLIGHT)
                .map_err(|_| InflightError::OutOfRange)?;
            match flag {
                0 => {}
                1 => {
                    let counter: u64 = area
                        .read_obj(offset + OFF_DESC_COUNTER)
                        .map_err(|_| InflightError::OutOfRange)?;
                    inflight.push((u64::from_le(counter), head));
                }
                other => {
                    return Err(InflightError::Flag {
                        queue: self.queue,
                        head,
                        value: other,
                    })
                }
            }
        }
        // Newest first: the oldest is popped from the end and served first.
        inflight.sort_unstable_by(|a, b| b.cmp(a));
        self.counter = inflight.first().map_or(0, |(c, _)| c.wrapping_add(1));
        self.resubmit = inflight.iter().map(|(_, head)| *head).collect();
        let in_use = u16::try_from(self.resubmit.len()).map_err(|_| InflightError::OutOfRange)?;
        Ok(used_idx + Wrapping(in_use))
    }

    /// Heads still to be served again, in the order they will be.
    pub fn pending_resubmit(&self) -> impl Iterator<Item = u16> + '_ {
        self.resubmit.iter().rev().copied()
    }

    /// The next head to serve again before any new request, if one is left.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop()
    }

    /// Records that `head` was taken from the available ring (`vu_queue_inflight_get`).
    pub fn taken(&mut self, head: u16) -> Result<(), InflightError> {
        let offset = self.desc_offset(head)?;
        let counter = self.counter;
        self.counter = self.counter.wrapping_add(1);
        self.area()?
            .write_obj(counter.to_le(), offset + OFF_DESC_COUNTER)
            .map_err(|_| InflightError::OutOfRange)?;
        fence(Ordering::SeqCst);
        self.set_inflight(head, true)
    }

    /// Records that `head`'s used entry is about to be published
    /// (`vu_queue_inflight_pre_put`).
    pub fn completing(&self, head: u16) -> Result<(), InflightError> {
        self.desc_offset(head)?;
        self.write_u16(OFF_LAST_BATCH_HEAD, head)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Records that `head`'s used entry was published and the used index is now `used_idx`
    /// (`vu_queue_inflight_post_put`).
    pub fn completed(&self, head: u16, used_idx: Wrapping<u16>) -> Result<(), InflightError> {
        fence(Ordering::SeqCst);
        self.set_inflight(head, false)?;
        fence(Ordering::SeqCst);
        self.write_u16(OFF_USED_IDX, used_idx.0)
    }
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Shape {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

pub(super) fn memfd(name: &str) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; memfd_create
    // reads nothing else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queues: u16, size: u16) -> (Arc<InflightRegion>, File) {
        InflightRegion::create(queues, size).expect("create")
    }

    /// A second mapping of the same file, as the next backend would get it.
    fn reopen(file: &File, queues: u16, size: u16) -> Arc<InflightRegion> {
        let len = file.metadata().expect("metadata").len();
        InflightRegion::open(
            file.try_clone().expect("clone"),
            0,
            len,
            queues,
            size,
            8,
            256,
        )
        .expect("open")
    }

    #[test]
    fn area_size_matches_libvhost_user() {
        // ALIGN_UP(16 * 256 + 2, 64)
        assert_eq!(queue_area_size(256), 4160);
        assert_eq!(queue_area_size(128), 2112);
        assert_eq!(queue_area_size(1), 64);
        for size in 1..=1024 {
            assert!(queue_area_size(size) >= HEADER_SIZE + DESC_STATE_SIZE * usize::from(size));
        }
    }

    #[test]
    fn fresh_region_resubmits_nothing_and_is_marked_used() {
        let (region, file) = region(2, 8);
        let mut queue = QueueInflight::new(region, 1).expect("queue");
        assert_eq!(queue.start(8, Wrapping(5)).expect("start"), Wrapping(5));
        assert_eq!(queue.next_resubmit(), None);
        let again = reopen(&file, 2, 8);
        let queue = QueueInflight::new(again, 1).expect("queue");
        assert_eq!(queue.read_u16(OFF_VERSION).expect("version"), VERSION);
    }

    #[test]
    fn heads_taken_and_not_completed_are_resubmitted_in_order_taken() {
        let (region, file) = region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(8, Wrapping(0)).expect("start");
        for head in [6, 2, 4, 0] {
            queue.taken(head).expect("taken");
        }
        // Head 2 completes (used index 0 -> 1); 6, 4 and 0 are in flight when the backend dies.
        queue.completing(2).expect("completing");
        queue.completed(2, Wrapping(1)).expect("completed");

        let mut next = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        let next_avail = next.start(8, Wrapping(1)).expect("start");
        assert_eq!(next_avail, Wrapping(4), "one used plus three in flight");
        assert_eq!(next.pending_resubmit().collect::<Vec<_>>(), vec![6, 4, 0]);
        assert_eq!(next.next_resubmit(), Some(6));
        assert_eq!(next.next_resubmit(), Some(4));
        assert_eq!(next.next_resubmit(), Some(0));
        assert_eq!(next.next_resubmit(), None);
        // New heads are counted after the resubmitted ones.
        next.taken(3).expect("taken");
        let mut third = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        third.start(8, Wrapping(1)).expect("start");
        assert_eq!(
            third.pending_resubmit().collect::<Vec<_>>(),
            vec![6, 4, 0, 3]
        );
    }

    #[test]
    fn a_used_entry_published_before_the_crash_is_not_resubmitted() {
        let (region, file) = region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(8, Wrapping(10)).expect("start");
        queue.taken(3).expect("taken");
        queue.taken(5).expect("taken");
        // Head 3's used entry is published (the guest's used index is now 11), and the
        // backend dies before `completed`.
        queue.completing(3).expect("completing");

        let mut next = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        let next_avail = next.start(8, Wrapping(11)).expect("start");
        assert_eq!(next.pending_resubmit().collect::<Vec<_>>(), vec![5]);
        assert_eq!(next_avail, Wrapping(12));
    }

    #[test]
    fn indexes_wrap() {
        let (region, file) = region(1, 4);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(4, Wrapping(u16::MAX)).expect("start");
        queue.taken(1).expect("taken");
        queue.taken(2).expect("taken");
        let mut next = QueueInflight::new(reopen(&file, 1, 4), 0).expect("queue");
        assert_eq!(
            next.start(4, Wrapping(u16::MAX)).expect("start"),
            Wrapping(1)
        );
    }

    #[test]
    fn a_queue_size_other_than_the_areas_is_refused() {
        let (region, _file) = region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        assert!(matches!(
            queue.start(16, Wrapping(0)),
            Err(InflightError::DescNum {
                desc_num: 8,
                queue_size: 16,
                ..
            })
        ));
    }

    #[test]
    fn a_desc_num_larger_than_the_region_is_refused() {
        let (region, file) = region(1, 8);
        let queue = QueueInflight::new(region, 0).expect("queue");
        // A frontend that rewrites desc_num to more than the area holds.
        queue.write_u16(OFF_DESC_NUM, 200).expect("write");
        let mut next = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        assert!(matches!(
            next.start(200, Wrapping(0)),
            Err(InflightError::DescNum { desc_num: 200, .. })
        ));
    }

    #[test]
    fn a_bad_last_batch_head_or_flag_is_an_error() {
        let (region, file) = region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(8, Wrapping(0)).expect("start");
        queue.write_u16(OFF_LAST_BATCH_HEAD, 9).expect("write");
        let mut next = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        assert!(matches!(
            next.start(8, Wrapping(3)),
            Err(InflightError::HeadOutOfRange { head: 9, .. })
        ));

        let (region, file) = self::region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(8, Wrapping(0)).expect("start");
        queue
            .area()
            .expect("area")
            .write_obj(7u8, HEADER_SIZE + 2 * DESC_STATE_SIZE)
            .expect("write");
        let mut next = QueueInflight::new(reopen(&file, 1, 8), 0).expect("queue");
        assert!(matches!(
            next.start(8, Wrapping(0)),
            Err(InflightError::Flag {
                head: 2,
                value: 7,
                ..
            })
        ));
    }

    #[test]
    fn heads_outside_the_queue_are_refused() {
        let (region, _file) = region(1, 8);
        let mut queue = QueueInflight::new(region, 0).expect("queue");
        queue.start(8, Wrapping(0)).expect("start");
        assert!(matches!(
            queue.taken(8),
            Err(InflightError::HeadOutOfRange { head: 8, .. })
        ));
        assert!(queue.completing(8).is_err());
        assert!(queue.completed(8, Wrapping(1)).is_err());
    }

    #[test]
    fn a_region_smaller_than_its_queues_or_its_file_is_refused() {
        let (_region, file) = region(2, 256);
        let len = file.metadata().expect("metadata").len();
        let open = |offset, size, queues, queue_size| {
            InflightRegion::open(
                file.try_clone().expect("clone"),
                offset,
                size,
                queues,
                queue_size,
                2,
                256,
            )
        };
        assert!(open(0, len, 2, 256).is_ok());
        assert!(matches!(
            open(0, len - 1, 2, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            open(64, len, 2, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            open(u64::MAX, len, 2, 256),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            open(0, len, 3, 256),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            open(0, len, 1, 512),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            open(0, len, 0, 256),
            Err(InflightError::Shape { .. })
        ));
        let region = open(0, len, 2, 256).expect("open");
        assert!(matches!(
            QueueInflight::new(region, 2),
            Err(InflightError::NoArea { queue: 2 })
        ));
    }
}
