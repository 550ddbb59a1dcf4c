//! A `swtpm socket --tpm2` process on loopback, standing in for the host TPM in tests and
//! the demo. The process is killed when the value drops.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting swtpm.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    /// The process could not be spawned (swtpm not installed?).
    #[error("cannot start swtpm")]
    Spawn(#[source] std::io::Error),
    /// No free loopback port pair was found.
    #[error("no free loopback port pair for swtpm")]
    NoPort,
    /// swtpm exited or did not listen within 10 seconds.
    #[error("swtpm did not come up on port {0}")]
    NotListening(u16),
}

/// A running swtpm with its data channel on `port` and control channel on `port + 1`.
pub struct SwtpmProcess {
    child: Child,
    port: u16,
    state_dir: PathBuf,
}

impl SwtpmProcess {
    /// Starts swtpm with its state in `state_dir` (created if needed), powered on and
    /// started up (`--flags not-need-init,startup-clear`).
    pub fn start(state_dir: &Path) -> Result<Self, SwtpmError> {
        std::fs::create_dir_all(state_dir).map_err(SwtpmError::Spawn)?;
        let port = free_port_pair().ok_or(SwtpmError::NoPort)?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2"])
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(SwtpmError::Spawn)?;
        let mut process = Self {
            child,
            port,
            state_dir: state_dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || matches!(process.child.try_wait(), Ok(Some(_))) {
                return Err(SwtpmError::NotListening(port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Wait for the control channel too; the TCTI uses both.
        while TcpStream::connect(("127.0.0.1", port + 1)).is_err() {
            if Instant::now() > deadline {
                return Err(SwtpmError::NotListening(port + 1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(process)
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port P with P + 1 also free (swtpm's data and control channels).
pub fn free_port_pair() -> Option<u16> {
    for _ in 0..50 {
        let first = TcpListener::bind(("127.0.0.1", 0)).ok()?;
        let port = first.local_addr().ok()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Some(port);
        }
    }
    None
}
