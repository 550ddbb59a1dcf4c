//! The demo's VMM step: sealvm boots the probe guest on this host's /dev/kvm, its disk a
//! journaled sealvm-blk volume reached through sealvm's vhost-user-blk frontend.

use crate::images;
use anyhow::{ensure, Context, Result};
use sealvm_testkit::command::{self as process, step};
use sealvm_testkit::{Background, SealvmVm, Workspace};
use std::process::Command;
use std::time::Duration;

/// Runs the step and prints what the guest and the journal say.
pub fn run_demo(workspace: &Workspace, built: &images::Built) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("probe.raw");
    let journal = dir.path().join("probe.journal");
    let socket = dir.path().join("probe.sock");
    std::fs::File::create(&base)?.set_len(16 << 20)?;
    step("demo: sealvm-blk serves a 16 MiB journaled volume for the probe guest");
    let _backend = Background::sealvm_blk(
        &format!("probe={},journal={}", base.display(), journal.display()),
        &socket,
        None,
    )?;
    step("demo: sealvm boots the probe guest on /dev/kvm (PVH, ACPI, virtio-mmio, vhost-user-blk)");
    let args: Vec<String> = vec![
        "--kernel".into(),
        built.probe_guest.display().to_string(),
        "--memory".into(),
        "64M".into(),
        "--disk".into(),
        format!("vhost-user={}", socket.display()),
    ];
    let mut vm = SealvmVm::start(&workspace.binary("sealvm")?, &args)?;
    let done = vm.wait_for("PROBE DONE", Duration::from_secs(60));
    for line in vm
        .output()
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
    {
        println!("    guest: {line}");
    }
    let done = done.context("the probe guest did not finish")?;
    println!("    guest: {done}");
    ensure!(done.ends_with("fail=0"), "a probe check failed");
    let status = vm
        .wait_exit(Duration::from_secs(10))
        .context("sealvm did not exit after the guest powered off")?;
    ensure!(status.success(), "sealvm exited with {status}");
    println!("    sealvm: the guest powered off through ACPI; sealvm exited cleanly");
    let list = process::output(
        Command::new(workspace.binary("sealvm-blk")?)
            .args(["pit", "list", "--journal"])
            .arg(&journal),
    )?;
    step("demo: the guest's write is in the journal (sealvm-blk pit list)");
    for line in list.lines().take(6) {
        println!("    {line}");
    }
    Ok(())
}
