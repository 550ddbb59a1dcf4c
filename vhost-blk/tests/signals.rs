//! SIGTERM and SIGINT stop `serve` cleanly: every journal is made durable (a sync point
//! covering every record ends it) and the process exits 0.

use sealvm_journal::format::{self, RecordKind};
use sealvm_journal::reader::Reader;
use sealvm_testkit::loadgen::BlkDriver;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn stops_cleanly_on(signal: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(["serve", "--volume"])
        .arg(format!(
            "vol={},journal={}",
            image.display(),
            journal.display()
        ))
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut driver = BlkDriver::connect(&socket, Duration::from_secs(10)).unwrap();
    for i in 0..3u64 {
        driver.write(i * 8, &[i as u8 + 1; 4096]).unwrap();
    }
    // No flush: the writes are acknowledged but not yet durable.
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.contains("every journal is durable"), "{stderr}");
    // The journal ends with a sync point that covers every record before it.
    let records: Vec<_> = Reader::open(&journal)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let last = records.last().unwrap();
    assert_eq!(last.header.kind, RecordKind::Sync, "{records:?}");
    assert_eq!(
        format::sync_point(&last.header, &last.payload),
        Some(last.at.offset)
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.header.kind == RecordKind::Write)
            .count(),
        3
    );
}

#[test]
fn sigterm_makes_every_journal_durable_and_exits_0() {
    stops_cleanly_on(libc::SIGTERM);
}

#[test]
fn sigint_makes_every_journal_durable_and_exits_0() {
    stops_cleanly_on(libc::SIGINT);
}
