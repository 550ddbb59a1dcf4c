//! `cargo xtask test`: everything CI runs.

use crate::{images, setup};
use anyhow::Result;
use sealvm_testkit::command::{run as run_command, step};
use sealvm_testkit::Workspace;
use std::process::Command;

/// The bare-machine build, setup, images, rustfmt, clippy, then every test in the workspace.
pub fn run(workspace: &Workspace) -> Result<()> {
    let cargo = || {
        let mut command = Command::new(env!("CARGO"));
        command.current_dir(workspace.root());
        command
    };
    // xtask is what a fresh machine builds first, before `setup` has installed anything: with
    // pkg-config disabled, a dependency on a system library (tss-esapi's libtss2) anywhere in
    // its tree fails this build, so it can never creep back into the bootstrap path.
    step("test: xtask builds on a bare machine (PKG_CONFIG=false, target/bare)");
    let bare_target = workspace.target_dir().join("bare");
    run_command(
        cargo()
            .env("PKG_CONFIG", "false")
            .args(["build", "--quiet", "-p", "xtask", "--target-dir"])
            .arg(&bare_target),
    )?;
    setup::run()?;
    images::build_all(workspace)?;
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
    step("test: doc tests");
    run_command(cargo().args(["test", "--workspace", "--doc", "--quiet"]))?;
    if has_nextest() {
        // nextest runs every test in its own process, ends hung ones (.config/nextest.toml)
        // and closes with one summary line of the whole run.
        step("test: cargo nextest run");
        let profile = if std::env::var_os("CI").is_some() {
            "ci"
        } else {
            "default"
        };
        run_command(cargo().args(["nextest", "run", "--workspace", "--profile", profile]))?;
    } else {
        step("test: cargo test (cargo-nextest is not installed)");
        run_command(cargo().args(["test", "--workspace"]))?;
    }
    Ok(())
}

fn has_nextest() -> bool {
    Command::new(env!("CARGO"))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|out| out.status.success())
}
