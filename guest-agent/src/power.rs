//! guest-shutdown and guest-suspend-*: handing the guest's power to its own programs.
//!
//! guest-shutdown runs the guest's shutdown program as qga does (`/sbin/shutdown -h -P +0
//! "hypervisor initiated shutdown"`, `-H` to halt, `-r` to reboot), so the guest's init
//! stops services in order; where there is no `shutdown`, it runs `poweroff`, `halt` or
//! `reboot`, which ask init to do the same. The suspend commands use sysfs
//! (`/sys/power/state`), qga's last resort, and answer as qga does where the guest cannot.

use crate::protocol::CommandError;
use crate::system::find_program;
use serde::Deserialize;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Arguments of guest-shutdown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownArgs {
    /// `powerdown` (the default), `halt` or `reboot`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// The message qga passes to shutdown(8).
pub const SHUTDOWN_MESSAGE: &str = "hypervisor initiated shutdown";

/// Starts the guest's orderly shutdown; Ok means the shutdown program accepted the request
/// (and, as with qga, no answer is sent).
pub fn shutdown(args: ShutdownArgs) -> Result<(), CommandError> {
    let mode = args.mode.as_deref().unwrap_or("powerdown");
    let (flag, fallback) = match mode {
        "powerdown" => ("-P", "poweroff"),
        "halt" => ("-H", "halt"),
        "reboot" => ("-r", "reboot"),
        _ => {
            return Err(CommandError::generic(
                "mode is invalid (valid values are: halt|powerdown|reboot",
            ))
        }
    };
    tracing::info!(mode, "guest-shutdown");
    let mut command = if let Some(shutdown) = find_program("shutdown") {
        let mut c = Command::new(shutdown);
        c.args(["-h", flag, "+0", SHUTDOWN_MESSAGE]);
        c
    } else if let Some(program) = find_program(fallback) {
        Command::new(program)
    } else {
        return Err(CommandError::generic(format!(
            "cannot find 'shutdown' or '{fallback}' in the guest"
        )));
    };
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .status()
        .map_err(|e| CommandError::generic(format!("failed to create child process: {e}")))?;
    if !status.success() {
        return Err(CommandError::generic(
            "child process has failed to shutdown",
        ));
    }
    Ok(())
}

/// The three suspend commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendMode {
    /// guest-suspend-disk.
    Disk,
    /// guest-suspend-ram.
    Ram,
    /// guest-suspend-hybrid.
    Hybrid,
}

/// Suspends through /sys/power/state when the kernel offers the state; Ok means the
/// request went in (no answer is sent, as with qga).
pub fn suspend(mode: SuspendMode) -> Result<(), CommandError> {
    let states = std::fs::read_to_string("/sys/power/state").unwrap_or_default();
    let state = match mode {
        SuspendMode::Disk => "disk",
        SuspendMode::Ram => "mem",
        // qga suspends hybrid only through systemd or pm-utils, never through sysfs.
        SuspendMode::Hybrid => "",
    };
    if state.is_empty() || !states.split_whitespace().any(|s| s == state) {
        return Err(CommandError::generic(
            "the requested suspend mode is not supported by the guest",
        ));
    }
    // The write blocks until the guest resumes: do it off the agent's thread.
    std::thread::spawn(move || {
        if let Err(e) = std::fs::write("/sys/power/state", state) {
            tracing::warn!(error = %e, state, "suspend failed");
        }
    });
    Ok(())
}
