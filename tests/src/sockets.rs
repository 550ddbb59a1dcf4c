//! The three things a test puts at a path before a binary is told to listen there (a
//! regular file, a live socket, a stale socket), and the two outcomes it then checks: the
//! binary refused and exited, or the binary serves on the path. The tests that sockets are
//! never stolen (sealvm-blk's, sealvm's and the agent's) share them.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// What a test writes into the regular file it puts at a socket path, to check afterwards
/// that the binary left it byte for byte.
pub const PRECIOUS: &[u8] = b"a file someone typed the socket path over\n\x00\x01\x02";

/// Errors of the socket fixtures.
#[derive(Debug, thiserror::Error)]
pub enum SocketFixtureError {
    /// Creating the file or socket, or starting or polling the process, failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The binary was expected to refuse the path and exit, but it kept running.
    #[error("{program} still runs after {waited:?}; it should have refused the socket path")]
    DidNotExit {
        /// The program.
        program: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The binary was expected to serve on the path, but nothing answered in time.
    #[error("nothing answered on {path} within {waited:?}")]
    NotServed {
        /// The socket path.
        path: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The binary exited while it was expected to serve.
    #[error("the process exited with {status} instead of serving")]
    Exited {
        /// How it ended.
        status: ExitStatus,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SocketFixtureError {
    let what = what.into();
    move |source| SocketFixtureError::Io { what, source }
}

/// Writes [`PRECIOUS`] into a regular file at `path`.
pub fn regular_file(path: &Path) -> Result<(), SocketFixtureError> {
    std::fs::write(path, PRECIOUS).map_err(io(format!("cannot write {}", path.display())))
}

/// A socket the test itself serves at `path` (a live socket another process would steal).
pub fn live_socket(path: &Path) -> Result<UnixListener, SocketFixtureError> {
    UnixListener::bind(path).map_err(io(format!("cannot bind {}", path.display())))
}

/// Leaves a stale socket file at `path`: bound, then the listener closed, as a process
/// that died leaves it.
pub fn stale_socket(path: &Path) -> Result<(), SocketFixtureError> {
    drop(live_socket(path)?);
    Ok(())
}

/// How a binary that refused to start ended.
#[derive(Debug)]
pub struct Refusal {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Refusal {
    /// Panics (as a test should) unless the process failed and said that `path` is not a
    /// socket, and the regular file there still holds [`PRECIOUS`], byte for byte.
    pub fn assert_not_a_socket(&self, path: &Path) {
        assert!(!self.status.success(), "{self:?}");
        let said = format!("{} exists and is not a socket", path.display());
        assert!(self.stderr.contains(&said), "expected {said:?}: {self:?}");
        assert_eq!(std::fs::read(path).ok().as_deref(), Some(PRECIOUS));
    }

    /// Panics (as a test should) unless the process failed and said that another process
    /// serves `path`.
    pub fn assert_served_by_another(&self, path: &Path) {
        assert!(!self.status.success(), "{self:?}");
        let said = format!("another process serves {}", path.display());
        assert!(self.stderr.contains(&said), "expected {said:?}: {self:?}");
    }
}

/// Runs `command` (stdin and stdout closed, stderr captured), which should refuse its
/// socket path and exit within `within`; kills it and fails when it does not.
pub fn expect_exit(command: &mut Command, within: Duration) -> Result<Refusal, SocketFixtureError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("cannot start {program}")))?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io(format!("cannot poll {program}")))?
        {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(SocketFixtureError::DidNotExit {
                program,
                waited: within,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)
            .map_err(io(format!("cannot read the stderr of {program}")))?;
    }
    Ok(Refusal { status, stderr })
}

/// Waits until something accepts a connection on `path` (not merely until the file
/// exists: a stale socket file exists before the binary replaces it), failing early when
/// `child` exits.
pub fn wait_until_served(
    path: &Path,
    child: &mut Child,
    within: Duration,
) -> Result<(), SocketFixtureError> {
    let deadline = Instant::now() + within;
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait().map_err(io("cannot poll the process"))? {
            return Err(SocketFixtureError::Exited { status });
        }
        if Instant::now() > deadline {
            return Err(SocketFixtureError::NotServed {
                path: path.display().to_string(),
                waited: within,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when `path` holds a socket file (bound, whether or not anyone listens).
pub fn is_socket_file(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// A process a test expects to serve: killed and reaped when dropped, so a failing
/// assertion never leaves it running (holding the test's output pipe open).
pub struct Serving {
    child: Option<Child>,
}

impl Serving {
    /// Starts `command` with stdin closed and stderr captured.
    pub fn spawn(command: &mut Command) -> Result<Self, SocketFixtureError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let child = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("cannot start {program}")))?;
        Ok(Serving { child: Some(child) })
    }

    /// The process.
    pub fn child(&mut self) -> &mut Child {
        // `child` is only taken by `into_child` and `drop`, which consume `self`.
        self.child
            .as_mut()
            .expect("the child is present until into_child or drop")
    }

    /// Waits until something accepts on `path`, as [`wait_until_served`].
    pub fn wait_until_served(
        &mut self,
        path: &Path,
        within: Duration,
    ) -> Result<(), SocketFixtureError> {
        wait_until_served(path, self.child(), within)
    }

    /// The process, no longer killed on drop.
    pub fn into_child(mut self) -> Child {
        self.child
            .take()
            .expect("the child is present until into_child or drop")
    }

    /// Sends `signal` (SIGTERM, SIGINT) and waits for the process to exit.
    /// On an error the process is killed and reaped, as on drop.
    pub fn stop_with(mut self, signal: libc::c_int) -> Result<Output, SocketFixtureError> {
        let id = self.child().id();
        let pid = libc::pid_t::try_from(id).map_err(|_| SocketFixtureError::Io {
            what: format!("process id {id} does not fit a pid_t"),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: kill only sends a signal, to the child this fixture started and has not
        // reaped yet (so the id is still its).
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(SocketFixtureError::Io {
                what: format!("cannot signal process {pid}"),
                source: std::io::Error::last_os_error(),
            });
        }
        self.into_child()
            .wait_with_output()
            .map_err(io(format!("cannot wait for process {pid}")))
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
