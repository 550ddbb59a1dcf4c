//! The stock Debian cloud kernel booting under sealvm on hardware KVM: it must find COM1 and
//! the virtio-mmio disk through the ACPI tables alone, reach the guest's ready line, and
//! write to its disk from inside.
//!
//! On hosts whose /dev/kvm cannot run a stock kernel (the nested, software-assisted kvm-pvm
//! of these machines), the test says why and does nothing; the probe guest tests
//! (`vmm_probe`) are what prove sealvm on real KVM there.

use sealvm_testkit::host::hardware_virtualization;
use sealvm_testkit::{Console, Workspace, GUEST_READY_LINE};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn debian_kernel_boots_to_the_ready_line_and_writes_its_disk() {
    if let Err(reason) = hardware_virtualization() {
        eprintln!("SKIPPED: a stock Linux kernel cannot run under sealvm here: {reason}");
        return;
    }
    let workspace = Workspace::locate();
    let guest = workspace
        .linux_guest()
        .expect("run cargo xtask images first");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let serial = dir.path().join("serial.sock");
    let mut child = Command::new(workspace.binary("sealvm").unwrap())
        .args(["run", "--memory", "512M", "--cpus", "2"])
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initramfs")
        .arg(&guest.initramfs)
        .args(["--cmdline", "console=ttyS0 panic=-1"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--serial")
        .arg(format!("socket={}", serial.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        if let Ok(stream) = UnixStream::connect(&serial) {
            break stream;
        }
        assert!(
            Instant::now() < deadline,
            "sealvm did not open its serial socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let console = Console::start(stream.try_clone().unwrap(), stream, false);
    let ready = console.wait_for(GUEST_READY_LINE, Duration::from_secs(120));
    let transcript = console.transcript();
    assert!(ready.is_ok(), "no ready line; console:\n{transcript}");
    assert!(
        transcript.contains("vda"),
        "virtio-mmio disk not found via ACPI:\n{transcript}"
    );
    let (out, status) = console
        .run(
            "printf SEALVM-LINUX-WROTE-THIS | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>&1",
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(status, 0, "{out}");
    let _ = console.run("poweroff -f", Duration::from_secs(5));
    let _ = child.wait();
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[4096..4096 + 23], b"SEALVM-LINUX-WROTE-THIS");
}
