//! The stock Debian cloud kernel booting under sealvm on hardware KVM: it must find COM1 and
//! the virtio-mmio disk through the ACPI tables alone and reach the guest's ready line.
//!
//! On hosts whose /dev/kvm cannot run a stock kernel (the nested, software-assisted kvm-pvm
//! of these machines), the test says why and does nothing; the probe guest tests
//! (`vmm_probe`) are what prove sealvm on real KVM there.

use sealvm_testkit::host::hardware_virtualization;
use sealvm_testkit::Workspace;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn debian_kernel_boots_to_the_ready_line_and_sees_its_disk() {
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
    let mut child = Command::new(workspace.binary("sealvm").unwrap())
        .args(["run", "--memory", "512M", "--cpus", "2"])
        .arg("--kernel")
        .arg(&guest.kernel)
        .arg("--initramfs")
        .arg(&guest.initramfs)
        .args(["--cmdline", "console=ttyS0 panic=-1"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut ready = false;
    while Instant::now() < deadline && !ready {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            ready = line.contains("SEALVM-GUEST-READY");
            seen.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let console = seen.join("\n");
    assert!(ready, "no ready line; console:\n{console}");
    assert!(
        console.contains("vda"),
        "virtio-mmio disk not found via ACPI:\n{console}"
    );
}
