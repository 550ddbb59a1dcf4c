//! A guest's vTPM: swtpm started on the state restored from its bundle, with swtpm's own
//! state encryption keyed from the bundle, and the state written back into the bundle when
//! the VM stops.
//!
//! The state directory is a private scratch directory on /dev/shm (memory only, 0700, see
//! [`super::scratch`]); the files swtpm keeps there are 0600 and encrypted with the
//! bundle-derived key, which swtpm reads from a pipe (`--key fd=N`): the key is never in a
//! file. swtpm is tied to this process ([`super::tied_child`]): it dies with it. The VMM's TPM CRB device talks to the data socket
//! and uses the control socket for the TPM's power and locality.

use super::scratch::{Scratch, ScratchError};
use super::tied_child::{self, SecretPipe, TiedChild};
use crate::bundle::payload::{Bundle, BundleError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// swtpm's state file for a TPM 2.0.
const STATE_FILE: &str = "tpm2-00.permall";

/// Errors starting, stopping or saving the vTPM.
#[derive(Debug, thiserror::Error)]
pub enum VtpmError {
    /// A file in the private state directory could not be written or read.
    #[error("vTPM state directory I/O on {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No private directory on memory for the state.
    #[error("no private memory-only directory for the vTPM state")]
    Scratch(#[from] ScratchError),
    /// swtpm could not be spawned or did not come up.
    #[error("swtpm for the guest did not start: {0}")]
    Start(&'static str),
    /// `swtpm_ioctl -s` failed to shut swtpm down cleanly.
    #[error("swtpm for the guest did not shut down cleanly")]
    Shutdown,
    /// Writing the state back into the bundle failed.
    #[error("cannot write the vTPM state back into the bundle")]
    WriteBack(#[source] BundleError),
}

/// How the VMM (or a test) reaches the vTPM.
#[derive(Debug, Clone)]
pub enum VtpmEndpoint {
    /// Unix sockets: data and control, for the CRB device.
    Unix {
        /// TPM command socket.
        data: PathBuf,
        /// swtpm control socket.
        ctrl: PathBuf,
    },
    /// Loopback TCP: data on `port`, control on `port + 1` (tests, tpm2-tools).
    Tcp {
        /// The data port.
        port: u16,
    },
}

/// A running swtpm serving one guest's vTPM.
pub struct Vtpm {
    child: Option<TiedChild>,
    scratch: Scratch,
    endpoint: VtpmEndpoint,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VtpmError {
    let path = path.display().to_string();
    move |source| VtpmError::Io { path, source }
}

/// Writes `contents` to a new file `path` with mode 0600 (only the owner reads it).
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

impl Vtpm {
    /// Restores `state` (from [`Bundle::vtpm_state`]) into a private scratch directory on
    /// memory (see [`super::scratch`]) and starts swtpm on it with the state key `key_hex`
    /// (32 hex digits), handed over through a pipe, never a file. swtpm dies with this
    /// process. `tcp` selects a loopback TCP endpoint instead of unix sockets.
    pub fn start(state: &[u8], key_hex: &str, tcp: bool) -> Result<Self, VtpmError> {
        let scratch = Scratch::create()?;
        let dir = scratch.path().to_path_buf();
        let state_path = dir.join(STATE_FILE);
        write_private(&state_path, state).map_err(io_err(&state_path))?;
        let key = SecretPipe::new(key_hex.as_bytes()).map_err(io_err(Path::new("key pipe")))?;
        let endpoint = if tcp {
            VtpmEndpoint::Tcp {
                port: free_port_pair().ok_or(VtpmError::Start("no free port"))?,
            }
        } else {
            VtpmEndpoint::Unix {
                data: dir.join("data.sock"),
                ctrl: dir.join("ctrl.sock"),
            }
        };
        let (server, ctrl) = match &endpoint {
            VtpmEndpoint::Unix { data, ctrl } => (
                format!("type=unixio,path={},mode=0600", data.display()),
                format!("type=unixio,path={},mode=0600", ctrl.display()),
            ),
            VtpmEndpoint::Tcp { port } => (
                format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
            ),
        };
        let mut command = Command::new("swtpm");
        command
            .args(["socket", "--tpm2", "--server", &server, "--ctrl", &ctrl])
            .arg("--tpmstate")
            .arg(format!("dir={},mode=0600", dir.display()))
            .arg("--key")
            .arg(format!("fd={},format=hex,mode=aes-cbc", key.fd()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let child = tied_child::spawn(command, Some(&key))
            .map_err(|_| VtpmError::Start("cannot spawn swtpm"))?;
        drop(key);
        let mut vtpm = Self {
            child: Some(child),
            scratch,
            endpoint,
        };
        vtpm.wait_listening()?;
        Ok(vtpm)
    }

    /// The private scratch directory swtpm keeps its state in.
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// swtpm's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.child.id())
    }

    fn wait_listening(&mut self) -> Result<(), VtpmError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match &self.endpoint {
                VtpmEndpoint::Unix { data, ctrl } => data.exists() && ctrl.exists(),
                VtpmEndpoint::Tcp { port } => {
                    std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok()
                        && std::net::TcpStream::connect(("127.0.0.1", *port + 1)).is_ok()
                }
            };
            // swtpm listens before it has loaded its state, and exits when the state does
            // not decrypt: only a TPM command answered with success proves it is up.
            if up {
                return self.answers_a_command();
            }
            let exited = self
                .child
                .as_mut()
                .map(|c| matches!(c.child.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited || Instant::now() > deadline {
                return Err(VtpmError::Start(
                    "swtpm exited or did not listen (wrong state key?)",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends TPM2_GetRandom(8) on the data channel and requires a success response.
    fn answers_a_command(&mut self) -> Result<(), VtpmError> {
        use std::io::Read;
        const GET_RANDOM: [u8; 12] = [
            0x80, 0x01, // TPM_ST_NO_SESSIONS
            0x00, 0x00, 0x00, 0x0c, // size
            0x00, 0x00, 0x01, 0x7b, // TPM_CC_GetRandom
            0x00, 0x08, // bytesRequested
        ];
        fn round_trip(stream: &mut dyn ReadWrite) -> std::io::Result<[u8; 10]> {
            stream.write_all(&GET_RANDOM)?;
            let mut header = [0u8; 10];
            stream.read_exact(&mut header)?;
            Ok(header)
        }
        trait ReadWrite: Read + Write {}
        impl<T: Read + Write> ReadWrite for T {}
        let timeout = Some(Duration::from_secs(10));
        let answer = match &self.endpoint {
            VtpmEndpoint::Tcp { port } => std::net::TcpStream::connect(("127.0.0.1", *port))
                .and_then(|mut s| {
                    s.set_read_timeout(timeout)?;
                    round_trip(&mut s)
                }),
            VtpmEndpoint::Unix { data, .. } => std::os::unix::net::UnixStream::connect(data)
                .and_then(|mut s| {
                    s.set_read_timeout(timeout)?;
                    round_trip(&mut s)
                }),
        };
        match answer {
            Ok(header) if header[6..10] == [0, 0, 0, 0] => Ok(()),
            Ok(_) => Err(VtpmError::Start("swtpm answered with a TPM error")),
            Err(_) => Err(VtpmError::Start(
                "swtpm exited after it started listening (wrong state key?)",
            )),
        }
    }

    /// Where the vTPM listens.
    pub fn endpoint(&self) -> &VtpmEndpoint {
        &self.endpoint
    }

    /// The TCTI for tss-esapi/tpm2-tools when the endpoint is TCP.
    pub fn tcti(&self) -> Option<String> {
        match &self.endpoint {
            VtpmEndpoint::Tcp { port } => Some(format!("swtpm:host=127.0.0.1,port={port}")),
            VtpmEndpoint::Unix { .. } => None,
        }
    }

    /// Shuts swtpm down cleanly (it saves its state) and writes the state back into `bundle`
    /// atomically. The state stays encrypted with the bundle-derived key throughout.
    pub fn stop_and_write_back(mut self, bundle: &mut Bundle) -> Result<(), VtpmError> {
        let mut ioctl = Command::new("swtpm_ioctl");
        match &self.endpoint {
            VtpmEndpoint::Unix { ctrl, .. } => ioctl.arg("--unix").arg(ctrl),
            VtpmEndpoint::Tcp { port } => ioctl.arg("--tcp").arg(format!("127.0.0.1:{}", port + 1)),
        };
        let ok = ioctl
            .arg("-s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let child = self.child.take();
        if let Some(mut tied) = child {
            if !ok {
                let _ = tied.child.kill();
                let _ = tied.child.wait();
                return Err(VtpmError::Shutdown);
            }
            let _ = tied.child.wait();
        }
        let state_path = self.scratch.path().join(STATE_FILE);
        let state = std::fs::read(&state_path).map_err(io_err(&state_path))?;
        bundle
            .write_vtpm_state(&state)
            .map_err(VtpmError::WriteBack)
    }
}

impl Drop for Vtpm {
    fn drop(&mut self) {
        if let Some(mut tied) = self.child.take() {
            let _ = tied.child.kill();
            let _ = tied.child.wait();
        }
    }
}

/// A loopback port P with P + 1 also free (swtpm's data and control channels).
fn free_port_pair() -> Option<u16> {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind(("127.0.0.1", 0)).ok()?;
        let port = first.local_addr().ok()?.port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Some(port);
        }
    }
    None
}
