//! Host processes that tests and the demo run beside a guest (sealvm-blk,
//! qemu-storage-daemon): killed when dropped, and waited for until their sockets exist.
//! [`BlkDaemon`] is a `sealvm-blk serve` with its API socket, for tests that read its
//! counters.

use crate::paths::Workspace;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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
    /// It exited before creating its sockets.
    #[error("{program} exited with {status} before listening")]
    Exited {
        /// The program.
        program: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// Polling the child failed.
    #[error("cannot poll {program}")]
    Poll {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The workspace binary is missing.
    #[error(transparent)]
    Missing(#[from] crate::paths::PathsError),
}

/// Errors of one call on a JSON-lines API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    /// Connecting, writing or reading failed.
    #[error("API socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not JSON.
    #[error("API socket {path} answered {line:?}, which is not JSON")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What it sent.
        line: String,
    },
    /// The daemon refused the command.
    #[error("API socket {path} refused the command: {answer}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The whole answer.
        answer: Value,
    },
}

/// Sends one JSON command line to the API socket at `path` and returns the answer's
/// `return` value, or the refusal as an error.
pub fn api_call(path: &Path, request: &Value) -> Result<Value, ApiCallError> {
    let io = |source| ApiCallError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    let answer: Value = serde_json::from_str(&line).map_err(|_| ApiCallError::Malformed {
        path: path.to_path_buf(),
        line: line.clone(),
    })?;
    match answer.get("return") {
        Some(value) if answer.get("error").is_none() => Ok(value.clone()),
        _ => Err(ApiCallError::Refused {
            path: path.to_path_buf(),
            answer,
        }),
    }
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
        let mut background = Background { child };
        let waited = Duration::from_secs(20);
        let deadline = Instant::now() + waited;
        for socket in sockets {
            while !socket.exists() {
                match background.child.try_wait() {
                    Ok(Some(status)) => return Err(BackgroundError::Exited { program, status }),
                    Ok(None) => {}
                    Err(source) => return Err(BackgroundError::Poll { program, source }),
                }
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

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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

/// A running `sealvm-blk serve` of one volume, with its vhost-user and API sockets named
/// after the volume in a test's folder; killed when dropped.
pub struct BlkDaemon {
    process: Background,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its API socket.
    pub api: PathBuf,
}

impl BlkDaemon {
    /// Starts the workspace's `sealvm-blk serve --volume SPEC` with sockets `DIR/NAME.sock`
    /// and `DIR/NAME.api` and waits until both listen.
    pub fn serve(dir: &Path, name: &str, spec: &str) -> Result<BlkDaemon, BackgroundError> {
        let binary = Workspace::locate().binary("sealvm-blk")?;
        let socket = dir.join(format!("{name}.sock"));
        let api = dir.join(format!("{name}.api"));
        let process = Background::start(
            Command::new(&binary)
                .args(["serve", "--volume", spec, "--socket"])
                .arg(&socket)
                .arg("--api-socket")
                .arg(&api)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
            &[&socket, &api],
        )?;
        Ok(BlkDaemon {
            process,
            socket,
            api,
        })
    }

    /// The API's `counters` object.
    pub fn counters(&self) -> Result<Value, ApiCallError> {
        api_call(&self.api, &json!({"command": "counters"}))
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// `after[key] - before[key]` for a counter at the JSON pointer `key`; panics (naming the
/// counter) when either has no such number, as a test should.
pub fn counter_moved(before: &Value, after: &Value, key: &str) -> u64 {
    let get = |v: &Value| {
        v.pointer(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {key} in {v}"))
    };
    get(after) - get(before)
}
