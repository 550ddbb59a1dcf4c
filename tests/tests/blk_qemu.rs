//! sealvm-blk serving the Linux guest under QEMU (`-device vhost-user-blk-pci`): the guest's
//! writes land in the journal, a bookmark made between two writes restores to exactly the
//! first, and a restart replays the journal.

use sealvm_testkit::{Background, QemuGuest, QemuGuestBuilder, Workspace};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const VOLUME_MIB: u64 = 16;

fn sealvm_blk() -> PathBuf {
    Workspace::locate()
        .binary("sealvm-blk")
        .expect("sealvm-blk built")
}

fn serve(volume: &str, socket: &Path, api: &Path) -> Background {
    Background::sealvm_blk(volume, socket, Some(api)).expect("sealvm-blk serves")
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(sealvm_blk()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn guest_write(guest: &QemuGuest, byte: &str, sector: u64, sectors: u64) {
    let (out, status) = guest
        .run(&format!(
            "dd if=/dev/zero bs=512 count={sectors} 2>/dev/null | tr '\\000' '{byte}' | dd of=/dev/vda bs=512 seek={sector} oflag=direct conv=fsync 2>&1 && sync"
        ))
        .unwrap();
    assert_eq!(status, 0, "guest write failed: {out}");
}

fn volumes(api: &Path) -> Value {
    let mut stream = std::os::unix::net::UnixStream::connect(api).unwrap();
    use std::io::{BufRead, Write};
    stream.write_all(b"{\"command\":\"volumes\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["return"][0].clone()
}

#[test]
fn guest_writes_are_journaled_and_a_bookmark_restores_exactly() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(VOLUME_MIB << 20)
        .unwrap();
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let api = dir.path().join("vol.api");
    let spec = format!("vol={},journal={}", base.display(), journal.display());
    let server = serve(&spec, &socket, &api);

    let guest = QemuGuestBuilder::new(images)
        .vhost_user_blk(&socket)
        .spawn()
        .expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let (size, _) = guest.run("cat /sys/block/vda/size").unwrap();
    assert_eq!(size.trim(), (VOLUME_MIB << 20 >> 9).to_string());

    guest_write(&guest, "A", 100, 8);
    let (ok, out, err) = cli(&["bookmark", "--api-socket", api.to_str().unwrap(), "first"]);
    assert!(ok, "{err}");
    let bookmark: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bookmark["name"], "first");
    guest_write(&guest, "B", 104, 8);

    // The guest reads back its latest data through sealvm-blk.
    let (read, _) = guest
        .run("dd if=/dev/vda bs=512 skip=100 count=12 2>/dev/null | od -An -v -c | tr -d ' \\n'")
        .unwrap();
    assert_eq!(
        read.trim(),
        format!("{}{}", "A".repeat(4 * 512), "B".repeat(8 * 512))
    );
    let counters = volumes(&api);
    assert!(counters["writes"].as_u64().unwrap() >= 2, "{counters}");
    assert!(counters["flushes"].as_u64().unwrap() >= 1, "{counters}");
    assert_eq!(counters["guest-errors"], 0);
    guest.shutdown().unwrap();

    // The base image was never written; the journal holds the guest's data.
    assert!(std::fs::read(&base).unwrap().iter().all(|&b| b == 0));
    let segment = std::fs::read(sealvm_blk::journal::segment_path(&journal, 1)).unwrap();
    assert!(segment.windows(512).any(|w| w == [b'A'; 512]));

    let restore = |at: &str, to: &Path| {
        let (ok, _, err) = cli(&[
            "pit",
            "restore",
            "--base",
            base.to_str().unwrap(),
            "--journal",
            journal.to_str().unwrap(),
            "--at",
            at,
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(ok, "restore --at {at}: {err}");
        std::fs::read(to).unwrap()
    };
    let first = restore("first", &dir.path().join("first.raw"));
    let mut expected = vec![0u8; (VOLUME_MIB << 20) as usize];
    expected[100 * 512..108 * 512].fill(b'A');
    assert!(
        first == expected,
        "the bookmark does not restore to exactly the first write"
    );
    let latest = restore("latest", &dir.path().join("latest.raw"));
    expected[104 * 512..112 * 512].fill(b'B');
    assert!(latest == expected, "latest does not hold both writes");

    // A restart replays the journal: a new guest reads the same data.
    drop(server);
    let _server = serve(&spec, &socket, &api);
    let images = Workspace::locate().linux_guest().unwrap();
    let guest = QemuGuestBuilder::new(images)
        .vhost_user_blk(&socket)
        .spawn()
        .unwrap();
    guest.wait_ready().unwrap();
    let (read, _) = guest
        .run("dd if=/dev/vda bs=512 skip=100 count=12 2>/dev/null | od -An -v -c | tr -d ' \\n'")
        .unwrap();
    assert_eq!(
        read.trim(),
        format!("{}{}", "A".repeat(4 * 512), "B".repeat(8 * 512))
    );
    guest.shutdown().unwrap();
    let (ok, out, _) = cli(&[
        "pit",
        "list",
        "--journal",
        journal.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["bookmarks"][0]["name"], "first");
    assert_eq!(listed["torn-tail-bytes"], 0);
}
