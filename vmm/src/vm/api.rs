//! The API socket: one JSON object per line in, one per line out.
//!
//! Commands: `{"command":"info"}`, `pause`, `resume`, `shutdown`, `counters`. Every answer
//! has `"ok": true` and the data, or `"ok": false` and an `"error"`.

use super::config::VmConfig;
use super::devices::legacy::{StopReason, StopSignal};
use super::devices::serial::bind_socket;
use super::devices::virtio::mmio::MmioTransport;
use super::layout::{virtio_gsi, virtio_mmio_base};
use super::vcpu::{ExitCounters, RunControl};
use sealvm_os::socket::RemoveOnDrop;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Largest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// What the API can see and do.
#[derive(Clone)]
pub struct ApiContext {
    /// The VM's configuration.
    pub config: VmConfig,
    /// The virtio devices.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// vCPU exit counters.
    pub counters: Arc<ExitCounters>,
    /// Pause/resume.
    pub control: Arc<RunControl>,
    /// Shutdown.
    pub stop: StopSignal,
}

/// Binds the API socket at `path` (see [`bind_socket`]: never over a file that is not a
/// stale socket); the guard removes the socket file when dropped.
pub fn bind(path: &Path) -> std::io::Result<(UnixListener, RemoveOnDrop)> {
    bind_socket(path)
}

/// Starts answering on `listener` on a thread of its own, which ends with the process.
pub fn serve(listener: UnixListener, ctx: ApiContext) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("api-client".into())
                    .spawn(move || client(stream, &ctx));
            }
        })?;
    Ok(())
}

fn client(stream: UnixStream, ctx: &ApiContext) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(u64::MAX);
    loop {
        let mut line = String::new();
        reader.set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_REQUEST => {
                let _ = writeln!(
                    writer,
                    "{}",
                    json!({"ok": false, "error": "request too long"})
                );
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = handle(&line, ctx);
        if writeln!(writer, "{answer}").is_err() {
            return;
        }
    }
}

use std::io::Read as _;

/// Answers one request line.
pub fn handle(line: &str, ctx: &ApiContext) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("malformed JSON: {e}")}),
    };
    let Some(command) = request.get("command").and_then(Value::as_str) else {
        return json!({"ok": false, "error": "missing \"command\""});
    };
    match command {
        "info" => json!({
            "ok": true,
            "state": if ctx.control.is_paused() { "paused" } else { "running" },
            "cpus": ctx.config.cpus,
            "memory": ctx.config.memory,
            "kernel": ctx.config.kernel.display().to_string(),
            "devices": devices(ctx, false),
        }),
        "pause" => {
            if ctx.control.pause() {
                json!({"ok": true, "state": "paused"})
            } else {
                json!({"ok": false, "error": "vCPUs did not stop within 5 s"})
            }
        }
        "resume" => {
            ctx.control.resume();
            json!({"ok": true, "state": "running"})
        }
        "shutdown" => {
            ctx.stop.stop(StopReason::ApiShutdown);
            json!({"ok": true, "state": "stopping"})
        }
        "counters" => json!({
            "ok": true,
            "exits": ctx.counters.to_json(),
            "devices": devices(ctx, true),
        }),
        other => json!({
            "ok": false,
            "error": format!("unknown command {other:?} (info, pause, resume, shutdown, counters)"),
        }),
    }
}

fn devices(ctx: &ApiContext, counters: bool) -> Value {
    let list: Vec<Value> = ctx
        .transports
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let Ok(t) = t.lock() else {
                return json!({"index": i, "error": "device lock poisoned"});
            };
            let mut v = json!({
                "index": i,
                "kind": t.device().kind(),
                "mmio_base": format!("{:#x}", virtio_mmio_base(i)),
                "gsi": virtio_gsi(i),
            });
            if counters {
                v["counters"] = t.device().counters();
                v["interrupts"] = json!(t.interrupt().count());
            }
            v
        })
        .collect();
    Value::Array(list)
}
