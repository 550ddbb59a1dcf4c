//! libblkio (the `blkio` crate, the library QEMU's virtio-blk-vhost-user driver and fio's
//! libblkio engine use) connects to sealvm-blk, writes, flushes, discards and reads back.
//! It refuses backends without REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS, so this is also
//! the test that sealvm-blk offers them.

use blkio::{Blkio, Completion, ReqFlags};
use sealvm_testkit::background::{counter_moved as moved, BlkDaemon as Daemon};
use std::mem::MaybeUninit;

/// Runs one request already queued on `queue` and returns its result (0 or -errno).
fn complete(queue: &mut blkio::Blkioq) -> i32 {
    let mut done = [MaybeUninit::<Completion>::uninit()];
    let n = queue.do_io(&mut done, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialized the first `n` (= 1) completions.
    unsafe { done[0].assume_init_read() }.ret
}

#[test]
fn a_libblkio_client_writes_flushes_discards_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::write(&image, vec![0x11u8; 4 << 20]).unwrap();
    let spec = format!(
        "vol={},journal={}",
        image.display(),
        dir.path().join("vol.journal").display()
    );
    let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");

    let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
    blkio
        .set_str("path", daemon.socket.to_str().unwrap())
        .unwrap();
    blkio
        .connect()
        .expect("libblkio refused to connect to sealvm-blk");
    assert_eq!(blkio.get_u64("capacity").unwrap(), 4 << 20);
    blkio.set_i32("num-queues", 1).unwrap();
    let region = blkio.alloc_mem_region(1 << 20).unwrap();
    let mut started = blkio.start().unwrap();
    blkio.map_mem_region(&region).unwrap();
    let queue = &mut started.queues[0];
    // SAFETY: libblkio mapped `region.len` bytes at `region.addr` for us, read-write, and
    // nothing else uses them while the slice lives (requests run only inside do_io).
    let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };

    let half = 512 << 10;
    for (i, b) in buf[..half].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    queue.write(0, buf.as_ptr(), 64 << 10, 1, ReqFlags::empty());
    assert_eq!(complete(queue), 0, "write");
    let before = daemon.counters().expect("counters");
    queue.flush(2, ReqFlags::empty());
    assert_eq!(complete(queue), 0, "flush");
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        1
    );

    let read_at = half;
    queue.read(
        0,
        buf[read_at..].as_mut_ptr(),
        64 << 10,
        3,
        ReqFlags::empty(),
    );
    assert_eq!(complete(queue), 0, "read");
    assert_eq!(buf[read_at..read_at + (64 << 10)], buf[..64 << 10]);

    // A discard of 1 MiB is one small journal record, and reads back as zeroes.
    let before = daemon.counters().expect("counters");
    queue.discard(1 << 20, 1 << 20, 4, ReqFlags::empty());
    assert_eq!(complete(queue), 0, "discard");
    let grew = moved(
        &before,
        &daemon.counters().expect("counters"),
        "/journal-bytes",
    );
    assert!(
        grew <= 64,
        "a 1 MiB discard grew the journal by {grew} bytes"
    );
    queue.read(
        1 << 20,
        buf[read_at..].as_mut_ptr(),
        4096,
        5,
        ReqFlags::empty(),
    );
    assert_eq!(complete(queue), 0, "read");
    assert!(buf[read_at..read_at + 4096].iter().all(|&b| b == 0));
    // The untouched rest still reads from the image.
    queue.read(
        3 << 20,
        buf[read_at..].as_mut_ptr(),
        4096,
        6,
        ReqFlags::empty(),
    );
    assert_eq!(complete(queue), 0, "read");
    assert!(buf[read_at..read_at + 4096].iter().all(|&b| b == 0x11));
}
