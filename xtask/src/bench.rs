//! `cargo xtask bench`: run the benchmarks and print one table, sealvm beside its peer
//! measured in the same run.

use crate::images;
use crate::process::step;
use anyhow::Result;
use sealvm_testkit::{QemuGuestBuilder, Workspace};
use std::time::Duration;

/// One measured figure, with the peer's figure from the same run when there is one.
pub struct Row {
    /// What was measured, with its unit.
    pub name: String,
    /// sealvm's figure.
    pub ours: f64,
    /// The peer's figure, and the peer's name.
    pub peer: Option<(String, f64)>,
    /// True when a smaller figure is better (latency), false when larger is (throughput).
    pub lower_is_better: bool,
}

/// Builds the images, runs every benchmark (or the group `only` names) and prints the
/// table.
pub fn run(workspace: &Workspace, only: Option<&str>) -> Result<()> {
    let groups = ["boot", "agent", "vmm", "blk", "journal", "bundle"];
    if let Some(group) = only {
        anyhow::ensure!(
            groups.contains(&group),
            "no benchmark group {group:?} (one of {groups:?})"
        );
    }
    let runs = |group: &str| only.is_none_or(|only| only == group);
    let built = images::build_all(workspace)?;
    // Each benchmark measures sealvm beside its peer in the same run.
    let mut rows = Vec::new();
    if runs("boot") {
        rows.push(linux_guest_boot(&built)?);
    }
    if runs("agent") {
        rows.push(crate::bench_agent::freeze_window(&built)?);
    }
    if runs("vmm") {
        rows.extend(crate::bench_vmm::rows(workspace, &built)?);
    }
    if runs("blk") {
        rows.extend(crate::bench_blk::run(workspace)?);
    }
    if runs("journal") {
        rows.extend(crate::bench_journal::rows(workspace)?);
    }
    if runs("bundle") {
        rows.extend(crate::bench_bundle::rows(workspace)?);
    }
    print_table(&rows);
    Ok(())
}

/// Median wall time from starting QEMU to the Linux guest's ready line, over three boots.
/// It is the fixed cost every Linux-guest test and the demo pay.
fn linux_guest_boot(built: &images::Built) -> Result<Row> {
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

/// The middle sample.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Milliseconds as a float.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the rows as one table; the ratio is always "how many times better sealvm is".
pub fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(10).max(9);
    println!();
    println!(
        "{:<width$}  {:>12}  {:>24}  {:>8}",
        "benchmark", "sealvm", "peer", "ratio"
    );
    println!("{}", "-".repeat(width + 52));
    for row in rows {
        let (peer, ratio) = match &row.peer {
            Some((name, value)) => {
                let ratio = if row.lower_is_better {
                    value / row.ours
                } else {
                    row.ours / value
                };
                (format!("{value:.1} ({name})"), format!("{ratio:.2}x"))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<width$}  {:>12.1}  {:>24}  {:>8}",
            row.name, row.ours, peer, ratio
        );
    }
}
