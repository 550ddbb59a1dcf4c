//! sealvm-blk's API counters move by exactly what a real vhost-user frontend (the load
//! generator) did: requests, bytes read and written, the latency histogram, and how far back
//! the journal reaches.

use sealvm_testkit::loadgen::BlkDriver;
use sealvm_testkit::Background;
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

fn volumes(api: &Path) -> Value {
    let mut stream = std::os::unix::net::UnixStream::connect(api).unwrap();
    stream.write_all(b"{\"command\":\"volumes\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["return"][0].clone()
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn counters_match_the_requests_made() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::write(&base, vec![0u8; 4 << 20]).unwrap();
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let api = dir.path().join("vol.api");
    let _server = Background::sealvm_blk(
        &format!("vol={},journal={}", base.display(), journal.display()),
        &socket,
        Some(&api),
    )
    .unwrap();
    let before = volumes(&api);
    assert_eq!(before["requests"], 0);
    assert!(
        before.get("oldest-seq").is_none(),
        "empty journal: {before}"
    );

    let started = now_ns();
    let mut driver = BlkDriver::connect(&socket, Duration::from_secs(10)).unwrap();
    for i in 0..3u64 {
        driver.write(i * 8, &[0x5a; 4096]).unwrap();
    }
    driver.flush().unwrap();
    assert_eq!(driver.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    assert_eq!(driver.read(8, 4096).unwrap(), vec![0x5a; 4096]);

    let after = volumes(&api);
    assert_eq!(after["requests"], 6, "{after}");
    assert_eq!(after["write-bytes"], 3 * 4096);
    assert_eq!(after["read-bytes"], 2 * 4096);
    assert_eq!(after["writes"], 3);
    let histogram = after["latency-us-log2"].as_array().unwrap();
    let counted: u64 = histogram.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 6, "every request is in the histogram: {after}");
    assert_eq!(after["oldest-seq"], 1);
    let oldest = after["oldest-time-ns"].as_u64().unwrap();
    assert!(
        oldest >= started && oldest <= now_ns(),
        "{oldest} not in the test's window"
    );
}
