//! Running commands from xtask, the benchmarks and tests with one clear error when they fail.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// Runs `command`, inheriting stdio, and fails naming the command when it exits non-zero.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    let status = command
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` and returns its stdout; fails with its stderr when it exits non-zero.
pub fn output(command: &mut Command) -> Result<String> {
    let shown = describe(command);
    let out = command
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints a step heading, so long runs show where they are.
pub fn step(what: &str) {
    println!("==> {what}");
}

fn describe(command: &Command) -> String {
    let mut shown = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}
