//! Memory per extent of the extent map, measured with a counting allocator: the index of a
//! volume written in large requests costs memory per extent, not per sector (target: at
//! most 64 bytes per extent, so a 1 TiB volume written in 1 MiB writes needs 64 MiB).

use sealvm_journal::extent_map::{ExtentMap, Source};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter of
// live bytes is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `dealloc` is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn bytes_per_extent(order: impl Iterator<Item = u64>, count: u64) -> f64 {
    let before = LIVE.load(Ordering::Relaxed);
    let mut map = ExtentMap::new();
    const MIB_SECTORS: u64 = 2048;
    for (n, i) in order.enumerate() {
        map.insert(
            i * MIB_SECTORS,
            MIB_SECTORS,
            Source::Data {
                segment: (n / 64) as u32,
                offset: ((n % 64) * (1 << 20) + 48) as u32,
            },
        );
    }
    assert_eq!(map.len() as u64, count);
    let used = LIVE.load(Ordering::Relaxed) - before;
    drop(map);
    used as f64 / count as f64
}

#[test]
fn the_index_costs_at_most_64_bytes_per_written_extent() {
    const COUNT: u64 = 200_000;
    let sequential = bytes_per_extent(0..COUNT, COUNT);
    // A scattered order (a multiplicative permutation of 0..COUNT).
    let scattered = bytes_per_extent((0..COUNT).map(|i| (i * 7919) % COUNT), COUNT);
    println!(
        "extent map: {sequential:.1} bytes per extent written in order, {scattered:.1} scattered \
         (so 1 TiB written in 1 MiB writes, 2^20 extents, needs {:.0} MiB)",
        sequential.max(scattered)
    );
    assert!(sequential <= 64.0, "{sequential} bytes per extent");
    assert!(scattered <= 64.0, "{scattered} bytes per extent");
}
