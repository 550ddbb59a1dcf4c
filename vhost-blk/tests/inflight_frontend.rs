//! Inflight tracking (INFLIGHT_SHMFD) driven by the project's own frontend, which can stage
//! exactly what a killed sealvm-blk leaves behind: requests taken from the available ring and
//! marked in flight in the region, never completed. The next sealvm-blk serves them again,
//! in the order they were taken, once each, without a kick; a region the frontend broke is
//! ignored and the device keeps serving.

use sealvm_testkit::loadgen::{status, BlkDriver, Slot};
use sealvm_testkit::Background;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Volume {
    _dir: tempfile::TempDir,
    spec: String,
    socket: PathBuf,
    api: PathBuf,
}

impl Volume {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("vol.raw");
        std::fs::File::create(&base)
            .and_then(|f| f.set_len(16 << 20))
            .expect("base image");
        let journal = dir.path().join("vol.journal");
        Volume {
            spec: format!("vol={},journal={}", base.display(), journal.display()),
            socket: dir.path().join("vol.sock"),
            api: dir.path().join("vol.api"),
            _dir: dir,
        }
    }

    fn serve(&self) -> Background {
        // A killed server's socket files stay; the next one is ready once it made new ones.
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.api);
        Background::sealvm_blk(&self.spec, &self.socket, Some(&self.api)).expect("sealvm-blk")
    }
}

fn counters(api: &Path) -> Value {
    sealvm_blk::api::call(api, json!({"command": "counters"})).expect("counters")
}

fn counter(value: &Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {pointer} in {value}"))
}

/// Waits until the backend has published `count` completions the driver has not taken.
fn wait_for_used(driver: &BlkDriver, count: usize) -> Vec<(u16, u8)> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let used = driver.used_entries();
        if used.len() >= count {
            return used;
        }
        assert!(
            Instant::now() < deadline,
            "only {used:?} completed; wanted {count}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn requests_a_killed_sealvm_blk_left_in_flight_are_served_again_once_in_the_order_taken() {
    let volume = Volume::new();
    let mut server = volume.serve();
    let mut driver = BlkDriver::connect_with_inflight(&volume.socket, TIMEOUT).expect("connect");
    let region_size = driver.inflight().expect("an inflight region").size();
    // One queue of 256 descriptors: ALIGN_UP(16 * 256 + 2, 64), as libvhost-user sizes it.
    assert_eq!(region_size, 4160);
    assert_eq!(driver.inflight().expect("region").desc_num(), 256);

    driver.write(0, &[0xaa; 4096]).expect("write");
    assert!(
        !driver.inflight().expect("region").is_inflight(0),
        "a completed request is still marked in flight"
    );

    // What sealvm-blk leaves when it is killed while serving two writes to one sector: both
    // taken from the ring (C first, then B), neither completed.
    let c = driver
        .queue_write(Slot(2), 8, &[b'C'; 4096])
        .expect("queue C");
    let b = driver
        .queue_write(Slot(1), 8, &[b'B'; 4096])
        .expect("queue B");
    let region = driver.inflight().expect("region");
    region.mark_inflight(c, 100);
    region.mark_inflight(b, 101);
    server.kill();

    let _server = volume.serve();
    let mut driver = driver.reconnect(&volume.socket).expect("reconnect");
    // No kick: the new sealvm-blk serves them as soon as the queue starts.
    let used = wait_for_used(&driver, 2);
    assert_eq!(
        used,
        vec![(c, status::OK), (b, status::OK)],
        "served again out of order or failed"
    );
    for _ in 0..2 {
        driver.complete().expect("complete");
    }
    let region = driver.inflight().expect("region");
    assert!(!region.is_inflight(b) && !region.is_inflight(c));
    // B was taken last, so it is the sector's content.
    assert_eq!(driver.read(8, 4096).expect("read"), vec![b'B'; 4096]);
    assert_eq!(driver.read(0, 4096).expect("read"), vec![0xaa; 4096]);
    // Served once each: the ring continues after them, not at them again.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        driver.used_entries().is_empty(),
        "{:?}",
        driver.used_entries()
    );
    let after = counters(&volume.api);
    assert_eq!(counter(&after, "/inflight-resubmitted"), 2, "{after}");
    assert_eq!(counter(&after, "/requests-by-kind/write"), 2, "{after}");
    assert_eq!(counter(&after, "/requests"), 4, "{after}");
}

#[test]
fn a_region_the_frontend_broke_is_ignored_and_the_device_keeps_serving() {
    for breakage in ["desc_num", "flag"] {
        let volume = Volume::new();
        let mut server = volume.serve();
        let mut driver =
            BlkDriver::connect_with_inflight(&volume.socket, TIMEOUT).expect("connect");
        driver.write(0, &[1; 512]).expect("write");
        let staged = driver
            .queue_write(Slot(1), 16, &[b'S'; 512])
            .expect("queue");
        let region = driver.inflight().expect("region");
        region.mark_inflight(staged, 7);
        match breakage {
            // A queue size the queue does not have.
            "desc_num" => region.set_desc_num(300),
            // An inflight flag that is neither 0 nor 1 (head 5's).
            _ => region.poke(16 + 5 * 16, 9),
        }
        server.kill();

        let mut server = volume.serve();
        let mut driver = driver.reconnect(&volume.socket).expect("reconnect");
        // The staged request is still in the available ring after the used index, where
        // the frontend restarted the queue: it is served from there, not from the region.
        let used = wait_for_used(&driver, 1);
        assert_eq!(used, vec![(staged, status::OK)], "{breakage}");
        driver.complete().expect("complete");
        assert_eq!(
            driver.read(16, 512).expect("read"),
            vec![b'S'; 512],
            "{breakage}"
        );
        driver.write(24, &[2; 512]).expect("a new write");
        assert!(server.is_running(), "{breakage}: sealvm-blk exited");
        let after = counters(&volume.api);
        assert_eq!(
            counter(&after, "/inflight-resubmitted"),
            0,
            "{breakage}: {after}"
        );
    }
}
