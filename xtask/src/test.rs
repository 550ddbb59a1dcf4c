//! `cargo xtask test`: everything CI runs.

use crate::process::{run as run_command, step};
use crate::{images, setup};
use anyhow::Result;
use sealvm_testkit::Workspace;
use std::process::Command;

/// Setup, images, rustfmt, clippy, then every test in the workspace.
pub fn run(workspace: &Workspace) -> Result<()> {
    setup::run()?;
    images::build_all(workspace)?;
    let cargo = || {
        let mut command = Command::new(env!("CARGO"));
        command.current_dir(workspace.root());
        command
    };
    step("test: cargo fmt --check");
    run_command(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("test: cargo clippy --all-targets -- -D warnings");
    run_command(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("test: building the binaries the integration tests start");
    run_command(cargo().args(["build", "--workspace", "--bins", "--quiet"]))?;
    step("test: cargo test");
    run_command(cargo().args(["test", "--workspace"]))?;
    Ok(())
}
