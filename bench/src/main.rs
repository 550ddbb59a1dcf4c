//! `sealvm-bench`: sealvm's benchmarks, each measured beside its peer in the same run, printed
//! as one table. `cargo xtask bench` builds the guest images and runs this in release; it
//! lives outside xtask because it links the product crates, and xtask must build on a bare
//! machine.

mod agent;
mod blk;
mod bundle;
mod journal;
mod pattern;
mod table;
mod vmm;

use anyhow::Result;
use clap::Parser;
use sealvm_testkit::command::step;
use sealvm_testkit::{GuestImages, QemuGuestBuilder, Workspace};
use std::path::PathBuf;
use table::{median, millis, Row};

/// The benchmark groups, in the order they run.
const GROUPS: [&str; 6] = ["boot", "agent", "vmm", "blk", "journal", "bundle"];

/// Run sealvm's benchmarks and print one table, sealvm beside its peers (qemu-storage-daemon,
/// qemu-ga, OpenSSL, swtpm) measured in the same run. Needs the guest images
/// (`cargo xtask images`); `cargo xtask bench` builds them and runs this.
#[derive(Parser)]
#[command(name = "sealvm-bench")]
struct Cli {
    /// Run one group only: boot, agent, vmm, blk, journal or bundle.
    #[arg(long)]
    only: Option<String>,
}

/// The guest images the benchmarks boot.
pub struct Built {
    /// The Linux guest: Debian cloud kernel and busybox initramfs with sealvm-agent.
    pub linux_guest: GuestImages,
    /// The probe guest: a PVH ELF sealvm boots on real KVM.
    pub probe_guest: PathBuf,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(group) = &cli.only {
        anyhow::ensure!(
            GROUPS.contains(&group.as_str()),
            "no benchmark group {group:?} (one of {GROUPS:?})"
        );
    }
    let runs = |group: &str| cli.only.as_deref().is_none_or(|only| only == group);
    let workspace = Workspace::locate();
    let built = Built {
        linux_guest: workspace.linux_guest()?,
        probe_guest: workspace.probe_guest()?,
    };
    // Each benchmark measures sealvm beside its peer in the same run.
    let mut rows = Vec::new();
    if runs("boot") {
        rows.push(linux_guest_boot(&built)?);
    }
    if runs("agent") {
        rows.push(agent::freeze_window(&built)?);
    }
    if runs("vmm") {
        rows.extend(vmm::rows(&workspace, &built)?);
    }
    if runs("blk") {
        rows.extend(blk::run(&workspace)?);
    }
    if runs("journal") {
        rows.extend(journal::rows(&workspace)?);
    }
    if runs("bundle") {
        rows.extend(bundle::rows(&workspace)?);
    }
    table::print_table(&rows);
    Ok(())
}

/// Median wall time from starting QEMU to the Linux guest's ready line, over three boots.
/// It is the fixed cost every Linux-guest test and the demo pay.
fn linux_guest_boot(built: &Built) -> Result<Row> {
    let mut times = Vec::new();
    for i in 1..=3 {
        step(&format!("bench: linux guest boot {i}/3"));
        let guest = QemuGuestBuilder::new(built.linux_guest.clone()).spawn()?;
        times.push(guest.wait_ready()?);
        guest.shutdown()?;
    }
    Ok(Row {
        name: "linux guest under QEMU: start to ready line (ms, median of 3)".into(),
        ours: millis(median(&mut times)),
        peer: None,
        lower_is_better: true,
    })
}
