//! The API's counters move by exactly what real I/O over the vhost-user socket did.

use sealvm_blk::journal::format::record_len;
use sealvm_blk::journal::now_ns;
use sealvm_testkit::background::{counter_moved as moved, BlkDaemon as Daemon};
use sealvm_testkit::loadgen::BlkDriver;
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn counters_follow_reads_writes_flushes_and_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let spec = format!(
        "vol={},journal={}",
        base.display(),
        dir.path().join("vol.journal").display()
    );
    let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
    let empty = daemon.counters().expect("counters");
    assert_eq!(empty["journal-bytes"], 0, "{empty}");
    assert_eq!(empty["oldest-seq"], Value::Null, "{empty}");

    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let before = daemon.counters().expect("counters");
    let started_ns = now_ns();
    for i in 0..5u64 {
        driver.write(i * 8, &[i as u8 + 1; 4096]).unwrap();
    }
    driver.flush().unwrap();
    for i in 0..3u64 {
        assert_eq!(
            driver.read(i * 16, 8192).unwrap()[..512],
            [i as u8 * 2 + 1; 512]
        );
    }
    driver.flush().unwrap();
    let finished_ns = now_ns();
    let after = daemon.counters().expect("counters");

    let m = |key| moved(&before, &after, key);
    assert_eq!(m("/requests"), 10, "{after}");
    assert_eq!(m("/requests-by-kind/write"), 5, "{after}");
    assert_eq!(m("/requests-by-kind/read"), 3, "{after}");
    assert_eq!(m("/requests-by-kind/flush"), 2, "{after}");
    assert_eq!(m("/requests-by-kind/rejected"), 0, "{after}");
    assert_eq!(m("/write-bytes"), 5 * 4096, "{after}");
    assert_eq!(m("/read-bytes"), 3 * 8192, "{after}");
    assert_eq!(m("/guest-errors") + m("/io-errors"), 0, "{after}");
    assert_eq!(m("/journal-writes"), 5, "{after}");
    assert_eq!(m("/journal-flushes"), 2, "{after}");
    let histogram = |v: &Value| -> u64 {
        v["latency-us-log2"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(histogram(&after) - histogram(&before), 10, "{after}");
    // Five writes, and one sync point recorded by the first flush (the second had nothing
    // new to make durable).
    assert_eq!(
        m("/journal-bytes"),
        5 * record_len(4096) + record_len(8),
        "{after}"
    );
    assert_eq!(after["last-seq"], 5, "{after}");
    assert_eq!(after["oldest-seq"], 1, "{after}");
    let oldest_ns = after["oldest-time-ns"].as_u64().unwrap();
    assert!(
        (started_ns..=finished_ns).contains(&oldest_ns),
        "oldest record at {oldest_ns}, I/O ran from {started_ns} to {finished_ns}"
    );

    // A bookmark is a record too (made durable, so a sync point follows it); the oldest
    // point stays where it was.
    sealvm_blk::api::call(&daemon.api, json!({"command": "bookmark", "name": "b1"})).unwrap();
    let bookmarked = daemon.counters().expect("counters");
    assert_eq!(
        moved(&after, &bookmarked, "/journal-bytes"),
        record_len(2) + record_len(8),
        "{bookmarked}"
    );
    assert_eq!(bookmarked["last-seq"], 6);
    assert_eq!(bookmarked["oldest-time-ns"], oldest_ns);
    // `volumes` carries the same counters.
    let volumes = sealvm_blk::api::call(&daemon.api, json!({"command": "volumes"})).unwrap();
    assert_eq!(volumes[0]["write-bytes"], 5 * 4096);
    assert_eq!(volumes[0]["requests-by-kind"]["write"], 5);
}

#[test]
fn oldest_point_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let spec = format!(
        "vol={},journal={}",
        base.display(),
        dir.path().join("vol.journal").display()
    );
    let first = {
        let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
        let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
        driver.write(0, &[7; 512]).unwrap();
        driver.write(1, &[8; 512]).unwrap();
        driver.flush().unwrap();
        daemon.counters().expect("counters")
    };
    let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
    let reopened = daemon.counters().expect("counters");
    assert_eq!(reopened["oldest-seq"], 1);
    assert_eq!(reopened["oldest-time-ns"], first["oldest-time-ns"]);
    assert_eq!(reopened["last-seq"], 2);
    assert_eq!(reopened["journal-bytes"], first["journal-bytes"]);
}
