//! The freeze window of an application-consistent snapshot: from sending the freeze to the
//! thaw's answer, with a busy writer on an ext4 filesystem in the guest, for sealvm-agent and
//! for Debian's qemu-guest-agent in the same guest.

use crate::table::{median, millis, Row};
use crate::Built;
use anyhow::{ensure, Context, Result};
use sealvm_agent::AgentClient;
use sealvm_testkit::command::step;
use sealvm_testkit::QemuGuestBuilder;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Median freeze window over [`ROUNDS`] freeze/thaw cycles per agent.
pub fn freeze_window(built: &Built) -> Result<Row> {
    step("bench: freeze window with a busy writer (sealvm-agent and qemu-ga)");
    let dir = tempfile::tempdir()?;
    let ours = dir.path().join("sealvm-agent.sock");
    let theirs = dir.path().join("qemu-ga.sock");
    let disk = dir.path().join("data.ext4");
    std::fs::File::create(&disk)?.set_len(128 << 20)?;
    ensure!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&disk)
            .status()?
            .success(),
        "mkfs.ext4 failed"
    );
    let guest = QemuGuestBuilder::new(built.linux_guest.clone())
        .agent_channel(&ours)
        .raw_disk(&disk)
        .qemu_ga_channel(&theirs)
        .spawn()?;
    guest.wait_ready()?;
    let (out, status) = guest.run(
        "mount -t ext4 /dev/vda /mnt && \
         (while true; do dd if=/dev/zero of=/mnt/busy bs=64k count=32 conv=fsync 2>/dev/null; done &); true",
    )?;
    ensure!(status == 0, "guest set-up failed: {out}");
    guest.start_qemu_ga()?;
    let qemu_ga = windows(&theirs).context("qemu-ga")?;
    let sealvm = windows(&ours).context("sealvm-agent")?;
    guest.shutdown()?;
    Ok(Row {
        name: format!("freeze window, busy ext4 writer (ms, median of {ROUNDS})"),
        ours: sealvm,
        peer: Some(("qemu-ga".into(), qemu_ga)),
        lower_is_better: true,
    })
}

fn windows(socket: &Path) -> Result<f64> {
    let mut client = AgentClient::connect(socket, TIMEOUT)?;
    let mut samples = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        client.execute("guest-fsfreeze-freeze", None, TIMEOUT)?;
        client.execute("guest-fsfreeze-thaw", None, TIMEOUT)?;
        client.execute("guest-ping", None, TIMEOUT)?;
        samples.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(millis(median(&mut samples)))
}
