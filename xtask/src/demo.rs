//! `cargo xtask demo`: show the main job, as far as the project has got: the Linux guest on
//! a journaled sealvm-blk volume, a bookmark taken with the guest frozen by sealvm-agent,
//! and a deleted file recovered from that point in time.

use crate::{images, setup};
use anyhow::{bail, ensure, Context, Result};
use sealvm_testkit::command::{self as process, step};
use sealvm_testkit::{Accel, Background, QemuGuest, QemuGuestBuilder, Workspace};
use std::process::Command;

/// Installs what is missing, builds the images and binaries, and shows sealvm at work.
pub fn run(workspace: &Workspace) -> Result<()> {
    setup::run()?;
    let built = images::build_all(workspace)?;
    step("demo: building the sealvm binaries");
    process::run(
        Command::new(env!("CARGO"))
            .current_dir(workspace.root())
            .args(["build", "--workspace", "--bins", "--quiet"]),
    )?;
    crate::demo_bundle::run_demo(workspace, &built)?;
    crate::demo_vmm::run_demo(workspace, &built)?;
    journaled_volume_recovers_a_deleted_file(workspace, &built)
}

fn journaled_volume_recovers_a_deleted_file(
    workspace: &Workspace,
    built: &images::Built,
) -> Result<()> {
    let blk = workspace.binary("sealvm-blk")?;
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("orders.ext4");
    let journal = dir.path().join("orders.journal");
    let (socket, api, agent) = (
        dir.path().join("orders.sock"),
        dir.path().join("orders.api"),
        dir.path().join("agent.sock"),
    );
    std::fs::File::create(&base)?.set_len(64 << 20)?;
    process::output(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&base))?;

    step("demo: sealvm-blk serves a 64 MiB ext4 volume, journaling every write");
    let _server = Background::sealvm_blk(
        &format!("orders={},journal={}", base.display(), journal.display()),
        &socket,
        Some(&api),
    )?;

    let accel = Accel::detect();
    step(&format!(
        "demo: QEMU (-accel {}) boots the Linux guest on it through vhost-user-blk, with sealvm-agent",
        accel.qemu_name()
    ));
    let guest = QemuGuestBuilder::new(built.linux_guest.clone())
        .vhost_user_blk(&socket)
        .agent_channel(&agent)
        .echo_console(true)
        .spawn()?;
    let took = guest
        .wait_ready()
        .context("the Linux guest did not become ready")?;
    step(&format!(
        "demo: guest ready after {:.1} s",
        took.as_secs_f64()
    ));

    guest_run(&guest, "mount -t ext4 /dev/vda /mnt && echo 'order 1001: 3 widgets' > /mnt/orders.txt && sync && cat /mnt/orders.txt")?;

    step("demo: bookmark with the guest frozen: the agent freezes its filesystems, sealvm-blk bookmarks, the agent thaws (no application toolkit runs in this guest, so the report says crash-consistent)");
    let report = process::output(
        Command::new(&blk)
            .args(["bookmark", "--api-socket"])
            .arg(&api)
            .arg("--agent-socket")
            .arg(&agent)
            .arg("before-cleanup"),
    )?;
    println!("{}", indent(&report));

    step("demo: someone deletes the file in the guest");
    guest_run(&guest, "rm /mnt/orders.txt && sync && ls -la /mnt")?;
    guest.shutdown()?;

    step("demo: the journal's points in time");
    println!(
        "{}",
        indent(&process::output(
            Command::new(&blk)
                .args(["pit", "list", "--journal"])
                .arg(&journal)
        )?)
    );

    step("demo: restore the volume as it was at the bookmark, and read the file back");
    let restored = dir.path().join("restored.ext4");
    process::output(
        Command::new(&blk)
            .args(["pit", "restore", "--base"])
            .arg(&base)
            .arg("--journal")
            .arg(&journal)
            .args(["--at", "before-cleanup", "--to"])
            .arg(&restored),
    )?;
    let recovered = process::output(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat /orders.txt")
            .arg(&restored),
    )?;
    println!("  orders.txt at before-cleanup: {}", recovered.trim());
    ensure!(
        recovered.contains("order 1001"),
        "the file did not come back from the bookmark"
    );
    step("demo: done — the deleted file came back from the bookmark taken with the guest frozen");
    Ok(())
}

fn guest_run(guest: &QemuGuest, command: &str) -> Result<()> {
    let (out, status) = guest.run(command)?;
    if status != 0 {
        bail!("guest command failed ({status}): {command}\n{out}");
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
