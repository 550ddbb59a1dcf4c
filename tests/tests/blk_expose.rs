//! Image access: `sealvm-blk pit expose` serves a point in time as a new vhost-user-blk
//! device while the live volume keeps taking writes; the API moves it forwards and
//! backwards; QEMU reads it like any disk and cannot write to it.

use sealvm_blk::api;
use sealvm_testkit::loadgen::BlkDriver;
use sealvm_testkit::{Background, QemuGuestBuilder, Workspace};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const SECTORS: u64 = 2048;
const TIMEOUT: Duration = Duration::from_secs(10);

fn sector_data(tag: u8) -> Vec<u8> {
    vec![tag; 8 * 512]
}

#[test]
fn exposed_point_in_time_is_served_retargeted_and_read_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let journal = dir.path().join("vol.journal");
    let (live_socket, live_api) = (dir.path().join("live.sock"), dir.path().join("live.api"));
    let volume = format!("v={},journal={}", base.display(), journal.display());
    let _live = Background::sealvm_blk(&volume, &live_socket, Some(&live_api)).unwrap();
    let mut live = BlkDriver::connect(&live_socket, TIMEOUT).unwrap();
    live.write(0, &sector_data(b'1')).unwrap();
    live.flush().unwrap();
    api::call(&live_api, json!({"command": "bookmark", "name": "one"})).unwrap();
    live.write(0, &sector_data(b'2')).unwrap();
    live.flush().unwrap();

    let (exposed_socket, exposed_api) = (dir.path().join("pit.sock"), dir.path().join("pit.api"));
    let binary = Workspace::locate().binary("sealvm-blk").unwrap();
    let _exposed = Background::start(
        Command::new(binary)
            .args(["pit", "expose", "--base"])
            .arg(&base)
            .arg("--journal")
            .arg(&journal)
            .args(["--at", "one", "--socket"])
            .arg(&exposed_socket)
            .arg("--api-socket")
            .arg(&exposed_api),
        &[&exposed_socket, &exposed_api],
    )
    .unwrap();
    let mut view = BlkDriver::connect(&exposed_socket, TIMEOUT).unwrap();
    assert_eq!(view.read(0, 8 * 512).unwrap(), sector_data(b'1'));

    // The live volume goes on; the exposed point in time does not move.
    live.write(0, &sector_data(b'3')).unwrap();
    live.flush().unwrap();
    assert_eq!(live.read(0, 8 * 512).unwrap(), sector_data(b'3'));
    assert_eq!(view.read(0, 8 * 512).unwrap(), sector_data(b'1'));

    // Forwards to the newest record, then back to the bookmark.
    let forward = api::call(&exposed_api, json!({"command": "retarget", "at": "latest"})).unwrap();
    assert_eq!(forward["records"], 2, "{forward}");
    assert_eq!(view.read(0, 8 * 512).unwrap(), sector_data(b'3'));
    let back = api::call(&exposed_api, json!({"command": "retarget", "at": "one"})).unwrap();
    assert_eq!(back["records"], 2, "{back}");
    assert_eq!(view.read(0, 8 * 512).unwrap(), sector_data(b'1'));
    let refused = api::call(
        &exposed_api,
        json!({"command": "retarget", "at": "no-such-bookmark"}),
    );
    assert!(refused.is_err());
    drop(view);

    // QEMU attaches the exposed image as a read-only disk.
    let images = Workspace::locate().linux_guest().expect("guest images");
    let guest = QemuGuestBuilder::new(images)
        .vhost_user_blk(&exposed_socket)
        .spawn()
        .unwrap();
    guest.wait_ready().unwrap();
    let (out, _) = guest
        .run("dd if=/dev/vda bs=512 count=8 2>/dev/null | tr -d '1' | wc -c; cat /sys/block/vda/ro")
        .unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "1"],
        "guest saw other data or a writable disk: {out}"
    );
    let (_, status) = guest
        .run("echo x | dd of=/dev/vda bs=512 count=1 conv=fsync oflag=direct 2>/dev/null")
        .unwrap();
    assert_ne!(status, 0, "the guest wrote to a read-only point in time");
    guest.shutdown().unwrap();
}
