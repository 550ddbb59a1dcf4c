//! Running `sealvm run` from tests, the demo and benchmarks: its COM1 output (stdout) read
//! line by line, the process killed when the handle is dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// A running `sealvm run`.
pub struct SealvmVm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl SealvmVm {
    /// Starts `sealvm run ARGS` with COM1 on stdout.
    pub fn start(sealvm: &Path, args: &[String]) -> std::io::Result<Self> {
        let mut command = Command::new(sealvm);
        command.arg("run").args(args);
        Self::spawn(&mut command)
    }

    /// Starts any VMM whose serial console is its stdout (QEMU with `-serial stdio`, for
    /// benchmarks against a peer).
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(SealvmVm {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits until a line containing `text` appears; returns it, or None on timeout or
    /// when the VM's output ends first.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) -> Option<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(text)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(text);
                    self.seen.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        None
    }

    /// Every console line read so far.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }

    /// Waits for the process to exit, collecting the rest of its output.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.seen.push(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Drain what the reader thread still holds.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status in KiB (VmHWM, RssShmem...), while the process runs.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for SealvmVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
