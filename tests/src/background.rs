//! Host processes that tests and the demo run beside a guest (sealvm-blk,
//! qemu-storage-daemon): killed when dropped, and waited for until their sockets exist.

use crate::paths::Workspace;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting a background process.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket it should create did not appear.
    #[error("{program} did not create {path} within {waited:?}")]
    NoSocket {
        /// The program.
        program: String,
        /// The socket.
        path: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The workspace binary is missing.
    #[error(transparent)]
    Missing(#[from] crate::paths::PathsError),
}

/// A child process that is killed when this is dropped.
pub struct Background {
    child: Child,
}

impl Background {
    /// Starts `command` (stderr inherited, so its log shows in test output) and waits until
    /// every path in `sockets` exists.
    pub fn start(command: &mut Command, sockets: &[&Path]) -> Result<Self, BackgroundError> {
        let program = command.get_program().to_string_lossy().into_owned();
        for socket in sockets {
            let _ = std::fs::remove_file(socket);
        }
        let child =
            command
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|source| BackgroundError::Spawn {
                    program: program.clone(),
                    source,
                })?;
        let background = Background { child };
        let waited = Duration::from_secs(10);
        let deadline = Instant::now() + waited;
        for socket in sockets {
            while !socket.exists() {
                if Instant::now() >= deadline {
                    return Err(BackgroundError::NoSocket {
                        program,
                        path: socket.display().to_string(),
                        waited,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(background)
    }

    /// `sealvm-blk serve --volume SPEC --socket SOCKET [--api-socket API]`, started and ready.
    pub fn sealvm_blk(
        volume: &str,
        socket: &Path,
        api: Option<&Path>,
    ) -> Result<Self, BackgroundError> {
        let binary = Workspace::locate().binary("sealvm-blk")?;
        let mut command = Command::new(binary);
        command
            .args(["serve", "--volume", volume, "--socket"])
            .arg(socket);
        let mut sockets = vec![socket];
        if let Some(api) = api {
            command.arg("--api-socket").arg(api);
            sockets.push(api);
        }
        Background::start(&mut command, &sockets)
    }

    /// qemu-storage-daemon exporting the raw file `image` as vhost-user-blk on `socket`.
    pub fn qemu_storage_daemon(image: &Path, socket: &Path) -> Result<Self, BackgroundError> {
        Background::start(
            Command::new("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=f0,filename={}", image.display()))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                )),
            &[socket],
        )
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}
