//! guest-exec and guest-exec-status: run a program in the guest and collect its exit
//! status and (base64) output later, as qemu-guest-agent does.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::protocol::CommandError;

/// Most bytes kept of a program's stdout or stderr (qga keeps 16 MiB).
pub const OUTPUT_LIMIT: u64 = 16 << 20;

/// Arguments of guest-exec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ExecArgs {
    /// The program.
    pub path: String,
    /// Its arguments.
    #[serde(default)]
    pub arg: Vec<String>,
    /// `NAME=VALUE` environment entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Base64 bytes fed to stdin.
    #[serde(default)]
    pub input_data: Option<String>,
    /// What to collect: `true`/`false`, or since qga 8.0 a mode name (`none`, `stdout`,
    /// `stderr`, `separated`, `merged`).
    #[serde(default)]
    pub capture_output: Option<CaptureOutput>,
}

/// guest-exec's `capture-output`: a flag, or a mode (qga's `GuestExecCaptureOutput`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CaptureOutput {
    /// `true` captures stdout and stderr apart, `false` neither.
    Flag(bool),
    /// A named mode.
    Mode(CaptureMode),
}

/// The capture modes of qga 8.0 and later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// Nothing.
    None,
    /// Only stdout.
    Stdout,
    /// Only stderr.
    Stderr,
    /// Both, each in its own field.
    Separated,
    /// Both, stderr joined into `out-data`.
    Merged,
}

impl CaptureOutput {
    fn mode(self) -> CaptureMode {
        match self {
            CaptureOutput::Flag(true) => CaptureMode::Separated,
            CaptureOutput::Flag(false) => CaptureMode::None,
            CaptureOutput::Mode(mode) => mode,
        }
    }
}

/// A stream's output as kept: at most [`OUTPUT_LIMIT`] bytes, and whether there was more.
#[derive(Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

struct Running {
    child: Child,
    /// Set once the program has been reaped.
    status: Option<std::process::ExitStatus>,
    stdout: Option<JoinHandle<Captured>>,
    stderr: Option<JoinHandle<Captured>>,
}

/// Programs started by guest-exec whose status has not been collected yet.
#[derive(Default, Clone)]
pub struct ExecTable {
    running: Arc<Mutex<HashMap<u32, Running>>>,
}

impl ExecTable {
    /// Starts a program; returns `{"pid": N}`.
    pub fn start(&self, args: ExecArgs) -> Result<Value, CommandError> {
        let input =
            match &args.input_data {
                Some(data) => Some(BASE64.decode(data).map_err(|e| {
                    CommandError::generic(format!("input-data is not base64: {e}"))
                })?),
                None => None,
            };
        let mode = args
            .capture_output
            .map_or(CaptureMode::None, CaptureOutput::mode);
        let mut command = Command::new(&args.path);
        command.args(&args.arg);
        for entry in &args.env {
            if let Some((name, value)) = entry.split_once('=') {
                command.env(name, value);
            }
        }
        command.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        let (out_on, err_on) = match mode {
            CaptureMode::None => (false, false),
            CaptureMode::Stdout => (true, false),
            CaptureMode::Stderr => (false, true),
            CaptureMode::Separated => (true, true),
            CaptureMode::Merged => (true, false),
        };
        let merged_pipe = if mode == CaptureMode::Merged {
            let (reader, writer) = crate::toolkits::pipe().map_err(|e| {
                CommandError::generic(format!("cannot create a pipe for guest-exec: {e}"))
            })?;
            let writer_err = writer.try_clone().map_err(|e| {
                CommandError::generic(format!("cannot create a pipe for guest-exec: {e}"))
            })?;
            command.stdout(writer).stderr(writer_err);
            Some(reader)
        } else {
            command.stdout(piped(out_on)).stderr(piped(err_on));
            None
        };
        let mut child = command.spawn().map_err(|e| {
            CommandError::generic(format!(
                "Failed to execute child process '{}': {e}",
                args.path
            ))
        })?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let collect = |stream: Option<Box<dyn Read + Send>>| {
            stream.map(|s| {
                std::thread::spawn(move || {
                    let mut data = Vec::new();
                    let mut s = s;
                    let _ = (&mut s).take(OUTPUT_LIMIT).read_to_end(&mut data);
                    // Past the limit: drain the rest so the program is not blocked on a
                    // full pipe, and say the output was cut.
                    let more = std::io::copy(&mut s, &mut std::io::sink()).unwrap_or(0);
                    Captured {
                        data,
                        truncated: more > 0,
                    }
                })
            })
        };
        // The command holds the merged pipe's write ends: drop them, or the reader never
        // sees end-of-file.
        drop(command);
        let stdout = collect(match merged_pipe {
            Some(reader) => Some(Box::new(reader) as Box<dyn Read + Send>),
            None => child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        });
        let stderr = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let pid = child.id();
        self.running
            .lock()
            .map_err(|_| CommandError::generic("exec table poisoned"))?
            .insert(
                pid,
                Running {
                    child,
                    status: None,
                    stdout,
                    stderr,
                },
            );
        Ok(json!({ "pid": pid }))
    }

    /// The status of a started program. As with qga, it has `exited` only once the program
    /// is gone and its captured output streams are closed (a background child that keeps
    /// stdout open keeps the answer at `exited: false`); then the entry is dropped. Never
    /// waits: the table lock is held only to look.
    pub fn status(&self, pid: u32) -> Result<Value, CommandError> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| CommandError::generic("exec table poisoned"))?;
        let entry = running
            .get_mut(&pid)
            .ok_or_else(|| CommandError::generic(format!("Invalid parameter 'pid' ({pid})")))?;
        if entry.status.is_none() {
            entry.status = entry
                .child
                .try_wait()
                .map_err(|e| CommandError::generic(format!("cannot wait for {pid}: {e}")))?;
        }
        let streams_closed = [&entry.stdout, &entry.stderr]
            .iter()
            .all(|h| h.as_ref().is_none_or(|h| h.is_finished()));
        let Some(status) = entry.status.filter(|_| streams_closed) else {
            return Ok(json!({ "exited": false }));
        };
        let Some(mut entry) = running.remove(&pid) else {
            unreachable!("the entry was found above under the same lock");
        };
        drop(running);
        let mut answer = serde_json::Map::new();
        answer.insert("exited".into(), json!(true));
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => answer.insert("exitcode".into(), json!(code)),
            (None, Some(signal)) => answer.insert("signal".into(), json!(signal)),
            (None, None) => None,
        };
        for (key, truncated_key, handle) in [
            ("out-data", "out-truncated", entry.stdout.take()),
            ("err-data", "err-truncated", entry.stderr.take()),
        ] {
            // qemu-guest-agent leaves a stream out when it printed nothing, and says whether
            // it was cut at the limit whenever it reports one (qga since its 2025 fix). The
            // reader has finished (checked above), so the join does not wait.
            let captured = handle
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default();
            if !captured.data.is_empty() {
                answer.insert(key.into(), json!(BASE64.encode(&captured.data)));
                answer.insert(truncated_key.into(), json!(captured.truncated));
            }
        }
        Ok(Value::Object(answer))
    }
}
