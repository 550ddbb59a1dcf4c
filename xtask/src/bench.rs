//! `cargo xtask bench`: builds the guest images, then runs `sealvm-bench` (the `bench/`
//! package, in release) as a process. The benchmarks link the product crates, which xtask
//! must not: xtask builds on a machine where `cargo xtask setup` has installed nothing yet.

use crate::images;
use anyhow::Result;
use sealvm_testkit::command::{run, step};
use sealvm_testkit::Workspace;
use std::process::Command;

/// Builds the images, then runs every benchmark (or the group `only` names).
pub fn run_benchmarks(workspace: &Workspace, only: Option<&str>) -> Result<()> {
    images::build_all(workspace)?;
    step("bench: building and running sealvm-bench (release)");
    let mut command = Command::new(env!("CARGO"));
    command.current_dir(workspace.root()).args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "sealvm-bench",
        "--",
    ]);
    if let Some(group) = only {
        command.args(["--only", group]);
    }
    run(&mut command)
}
