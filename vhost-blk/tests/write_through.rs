//! VIRTIO_BLK_F_CONFIG_WCE: when the driver writes `writeback` = 0, every write is made
//! durable (the journal fdatasync'ed) before it is acknowledged.

use sealvm_testkit::background::{counter_moved as moved, BlkDaemon as Daemon};
use sealvm_testkit::loadgen::BlkDriver;
use std::time::Duration;

fn journaled(dir: &std::path::Path) -> Daemon {
    let base = dir.join("vol.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let spec = format!(
        "vol={},journal={}",
        base.display(),
        dir.join("vol.journal").display()
    );
    Daemon::serve(dir, "vol", &spec).expect("start sealvm-blk")
}

#[test]
fn writes_are_durable_before_their_ack_once_the_driver_turns_the_cache_off() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = journaled(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();

    // Write-back (the default): writes are not synced until a flush.
    let before = daemon.counters().expect("counters");
    for i in 0..4 {
        driver.write(i * 8, &[1; 4096]).unwrap();
    }
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        0
    );

    // The driver turns the cache off: what was written so far is synced at once.
    let before = daemon.counters().expect("counters");
    assert!(
        !driver.set_writeback(false).unwrap(),
        "device still reports write-back"
    );
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        1
    );

    // Each write's fdatasync has happened by the time its acknowledgement arrives.
    for i in 0..5 {
        let before = daemon.counters().expect("counters");
        driver.write(64 + i * 8, &[2; 4096]).unwrap();
        let after = daemon.counters().expect("counters");
        assert_eq!(moved(&before, &after, "/journal-syncs"), 1, "{after}");
        assert_eq!(moved(&before, &after, "/requests-by-kind/flush"), 0);
    }

    // A reconnecting frontend keeps write-through: its driver asked for it.
    drop(driver);
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let before = daemon.counters().expect("counters");
    driver.write(200, &[3; 512]).unwrap();
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        1
    );

    // Back to write-back: writes wait for a flush again.
    assert!(driver.set_writeback(true).unwrap());
    let before = daemon.counters().expect("counters");
    for i in 0..3 {
        driver.write(300 + i, &[4; 512]).unwrap();
    }
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        0
    );
    driver.flush().unwrap();
    assert_eq!(
        moved(
            &before,
            &daemon.counters().expect("counters"),
            "/journal-syncs"
        ),
        1
    );
    assert_eq!(driver.read(64, 512).unwrap(), vec![2; 512]);
}

#[test]
fn write_through_survives_a_restart_of_sealvm_blk() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = journaled(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    assert!(!driver.set_writeback(false).unwrap());
    drop(driver);
    // sealvm-blk restarts; the frontend reconnects and, like QEMU, does not write the
    // configuration again, so its guest still expects every write to be durable.
    drop(daemon);
    let daemon = journaled_again(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    for i in 0..3 {
        let before = daemon.counters().expect("counters");
        driver.write(i * 8, &[5; 4096]).unwrap();
        let after = daemon.counters().expect("counters");
        assert_eq!(
            moved(&before, &after, "/journal-syncs"),
            1,
            "a write was acknowledged without fdatasync after the restart: {after}"
        );
    }
}

/// Serves the volume `journaled` made, without recreating its image.
fn journaled_again(dir: &std::path::Path) -> Daemon {
    let spec = format!(
        "vol={},journal={}",
        dir.join("vol.raw").display(),
        dir.join("vol.journal").display()
    );
    Daemon::serve(dir, "vol", &spec).expect("start sealvm-blk")
}
