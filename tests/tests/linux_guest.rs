//! The Linux guest image boots under QEMU, loads its virtio modules and runs sealvm-agent.

use sealvm_testkit::{QemuGuestBuilder, Workspace};

#[test]
fn linux_guest_reaches_ready_line_and_runs_the_agent() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let guest = QemuGuestBuilder::new(images).spawn().expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let transcript = guest.console().transcript();
    let version_line = format!("sealvm-guest: sealvm-agent {}", env!("CARGO_PKG_VERSION"));
    assert!(
        transcript.contains(&version_line),
        "init did not print the agent's version ({version_line:?}):\n{transcript}"
    );
    assert!(
        !transcript.contains("cannot load"),
        "a kernel module failed to load:\n{transcript}"
    );
    let (modules, status) = guest.run("cat /proc/modules").expect("run in guest");
    assert_eq!(status, 0);
    for module in ["virtio_blk", "virtio_console", "virtio_mmio", "virtio_pci"] {
        assert!(
            modules.contains(module),
            "{module} is not loaded:\n{modules}"
        );
    }
    guest.shutdown().expect("guest powers off");
}

#[test]
fn guest_writes_reach_a_raw_virtio_disk() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let guest = QemuGuestBuilder::new(images)
        .raw_disk(&disk)
        .spawn()
        .expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let (out, status) = guest
        .run("printf 'sealvm-disk-check' | dd of=/dev/vda bs=512 seek=8 conv=fsync oflag=direct 2>&1")
        .expect("run in guest");
    assert_eq!(status, 0, "dd failed in the guest: {out}");
    guest.shutdown().expect("guest powers off");
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[4096..4096 + 17], b"sealvm-disk-check");
}
