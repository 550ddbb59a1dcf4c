//! A journal damaged in the middle makes `serve` and `pit` refuse with one clear line naming
//! the segment and the offset; a torn last record is cut and the volume served.

use sealvm_blk::journal::{self, format};
use sealvm_blk::volume::JournaledVolume;
use sealvm_virtio_blk::BlockBackend;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sealvm_blk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sealvm-blk")
}

fn journal_with_three_writes(dir: &Path) -> (String, String) {
    let base = dir.join("vol.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let journal = dir.join("vol.journal");
    let (volume, _) = JournaledVolume::open(&base, &journal, false).unwrap();
    for i in 0..3u8 {
        volume.write_at(u64::from(i) * 512, &[i + 1; 512]).unwrap();
    }
    volume.flush().unwrap();
    (
        base.to_str().unwrap().into(),
        journal.to_str().unwrap().into(),
    )
}

#[test]
fn serve_and_pit_refuse_a_journal_damaged_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_three_writes(dir.path());
    let segment = journal::segment_path(Path::new(&journal), 1);
    let mut bytes = std::fs::read(&segment).unwrap();
    let second = format::SEGMENT_HEADER_LEN + format::record_len(512) as usize;
    bytes[second + format::HEADER_LEN + 7] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let expected = format!("{} is damaged at byte {second}", segment.display());

    let socket = dir.path().join("vol.sock");
    let served = sealvm_blk(&[
        "serve",
        "--volume",
        &format!("vol={base},journal={journal}"),
        "--socket",
        socket.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success(), "serve started: {stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!socket.exists(), "serve listened on a damaged journal");

    let to = dir.path().join("restored.raw");
    let restored = sealvm_blk(&[
        "pit",
        "restore",
        "--base",
        &base,
        "--journal",
        &journal,
        "--at",
        "1",
        "--to",
        to.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&restored.stderr);
    assert!(!restored.status.success(), "restore succeeded: {stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!to.exists());

    let listed = sealvm_blk(&["pit", "list", "--journal", &journal]);
    assert!(!listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stderr).contains(&expected));
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the journal was changed"
    );
}

#[test]
fn serve_cuts_a_torn_last_record_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_three_writes(dir.path());
    let segment = journal::segment_path(Path::new(&journal), 1);
    let len = std::fs::metadata(&segment).unwrap().len();
    // Half of the last record reached the disk.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(len - 300).unwrap();

    let socket = dir.path().join("vol.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args([
            "serve",
            "--volume",
            &format!("vol={base},journal={journal}"),
            "--socket",
        ])
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        format::SEGMENT_HEADER_LEN as u64 + 2 * format::record_len(512)
    );
}
