//! The API socket: one JSON request per line in, one answer per line out.
//!
//! Commands `info`, `pause`, `resume`, `shutdown` and `counters`, documented in `API.md`
//! beside this package's `Cargo.toml` and typed in [`protocol`]; the envelope
//! (`{"return": VALUE}` or `{"error": MESSAGE, "code": CODE}`), the 64 KiB line limit and
//! the client are [`sealvm_os::api_socket`]'s. This module serves the commands.

pub mod protocol;

use super::config::VmConfig;
use super::devices::legacy::{StopReason, StopSignal};
use super::devices::serial::bind_socket;
use super::devices::virtio::mmio::MmioTransport;
use super::layout::{virtio_gsi, virtio_mmio_base};
use super::vcpu::{ExitCounters, RunControl};
use protocol::{
    ApiError, CountersAnswer, DeviceCountersEntry, DeviceInfo, Info, Reply, Request, StateAnswer,
    VmState,
};
use sealvm_os::socket::RemoveOnDrop;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    if let Err(error) =
        sealvm_os::api_socket::serve_connection(stream, |request| handle(request, ctx))
    {
        tracing::debug!(%error, "API client failed");
    }
}

/// Carries out one request.
pub fn handle(request: Request, ctx: &ApiContext) -> Result<Reply, ApiError> {
    match request {
        Request::Info {} => Ok(Reply::Info(Info {
            state: if ctx.control.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            cpus: ctx.config.cpus,
            memory: ctx.config.memory,
            kernel: ctx.config.kernel.display().to_string(),
            devices: devices(ctx)?.into_iter().map(|d| d.device).collect(),
        })),
        Request::Pause {} => {
            if ctx.control.pause() {
                Ok(state(VmState::Paused))
            } else {
                Err(ApiError::PauseTimedOut)
            }
        }
        Request::Resume {} => {
            ctx.control.resume();
            Ok(state(VmState::Running))
        }
        Request::Shutdown {} => {
            ctx.stop.stop(StopReason::ApiShutdown);
            Ok(state(VmState::Stopping))
        }
        Request::Counters {} => Ok(Reply::Counters(CountersAnswer {
            exits: ctx.counters.snapshot(),
            devices: devices(ctx)?,
        })),
    }
}

fn state(state: VmState) -> Reply {
    Reply::State(StateAnswer { state })
}

/// Every virtio device with its counters.
fn devices(ctx: &ApiContext) -> Result<Vec<DeviceCountersEntry>, ApiError> {
    ctx.transports
        .iter()
        .enumerate()
        .map(|(index, transport)| {
            let transport = transport
                .lock()
                .map_err(|_| ApiError::DevicePoisoned(index))?;
            Ok(DeviceCountersEntry {
                device: DeviceInfo {
                    index,
                    kind: transport.device().kind().into(),
                    mmio_base: format!("{:#x}", virtio_mmio_base(index)),
                    gsi: virtio_gsi(index),
                },
                counters: transport.device().counters(),
                interrupts: transport.interrupt().count(),
            })
        })
        .collect()
}
