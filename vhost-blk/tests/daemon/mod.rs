//! A sealvm-blk daemon started as a real process for a test, killed when dropped.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sealvm-blk serve`.
pub struct Daemon {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its API socket.
    pub api: PathBuf,
}

impl Daemon {
    /// Serves `spec` (the `--volume` argument) with sockets named after `name` in `dir`.
    pub fn serve(dir: &Path, name: &str, spec: &str) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let api = dir.join(format!("{name}.api"));
        // Sockets left by an earlier daemon would look like this one listening.
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&api);
        let child = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
            .args(["serve", "--volume", spec, "--socket"])
            .arg(&socket)
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start sealvm-blk");
        let mut daemon = Daemon { child, socket, api };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.socket.exists() || !daemon.api.exists() {
            if let Some(status) = daemon.child.try_wait().expect("poll sealvm-blk") {
                panic!("sealvm-blk exited with {status} before listening");
            }
            assert!(
                Instant::now() < deadline,
                "sealvm-blk did not listen in 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// The API's `counters` object.
    pub fn counters(&self) -> Value {
        sealvm_blk::api::call(&self.api, json!({"command": "counters"})).expect("counters")
    }

    /// True while the process runs.
    #[allow(dead_code)] // not every test binary that includes this module calls it
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll sealvm-blk").is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `after[key] - before[key]` for a counter at the JSON pointer `key`.
#[allow(dead_code)] // not every test binary that includes this module calls it
pub fn moved(before: &Value, after: &Value, key: &str) -> u64 {
    let get = |v: &Value| {
        v.pointer(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {key} in {v}"))
    };
    get(after) - get(before)
}
