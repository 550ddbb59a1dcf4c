//! Child processes that hold secrets (swtpm, swtpm_setup) and must die with sealvm.
//!
//! The child is started with `PR_SET_PDEATHSIG(SIGKILL)`, umask 077, and one inherited
//! descriptor: a pipe holding the key, so the key is never in a file. The death signal
//! fires when the *thread* that forked the child exits, not the process, so the child is
//! forked from a keeper thread that lives until the [`TiedChild`] drops (or the process
//! dies, SIGKILL included).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;

/// A child process tied to this process's life (see the module docs).
pub struct TiedChild {
    /// The child; wait for it or kill it from any thread.
    pub child: Child,
    _keeper: mpsc::Sender<()>,
}

/// A pipe whose read end holds `secret` (and then end of file), for `--key fd=N`.
pub struct SecretPipe {
    read: OwnedFd,
}

impl SecretPipe {
    /// Writes `secret` into a new pipe and closes the write end. `secret` must fit the pipe
    /// buffer (64 KiB on Linux; keys are tens of bytes).
    pub fn new(secret: &[u8]) -> std::io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned only by us.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut writer = std::fs::File::from(write);
        writer.write_all(secret)?;
        drop(writer);
        Ok(Self { read })
    }

    /// The descriptor number the child sees (it is inherited under the same number).
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// Spawns `command` from a keeper thread with the death signal set, umask 077, and `pipe`'s
/// read end inherited (when given).
pub fn spawn(mut command: Command, pipe: Option<&SecretPipe>) -> std::io::Result<TiedChild> {
    let inherit = pipe.map(SecretPipe::fd);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (fcntl, umask, prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::umask(0o077);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the death signal was armed.
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "sealvm exited while starting the child",
                ));
            }
            Ok(())
        });
    }
    let (child_tx, child_rx) = mpsc::channel();
    let (keeper_tx, keeper_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("tied-child".into())
        .spawn(move || {
            let _ = child_tx.send(command.spawn());
            // Live until the TiedChild drops its sender: the child's death signal is tied
            // to this thread.
            let _ = keeper_rx.recv();
        })?;
    let child = child_rx
        .recv()
        .map_err(|_| std::io::Error::other("keeper thread died"))??;
    Ok(TiedChild {
        child,
        _keeper: keeper_tx,
    })
}

/// Runs `command` to completion as a tied child with its output captured.
pub fn output(
    mut command: Command,
    pipe: Option<&SecretPipe>,
) -> std::io::Result<std::process::Output> {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let tied = spawn(command, pipe)?;
    tied.child.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_reads_the_secret_from_the_inherited_pipe() {
        let pipe = SecretPipe::new(b"0123456789abcdef").unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", &format!("cat <&{}", pipe.fd())]);
        let out = output(command, Some(&pipe)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"0123456789abcdef");
    }

    #[test]
    fn the_child_runs_with_umask_077() {
        let mut command = Command::new("sh");
        command.args(["-c", "umask"]);
        let out = output(command, None).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0077");
    }
}
