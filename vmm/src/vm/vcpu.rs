//! vCPU threads: run KVM_RUN, send port and MMIO exits to the buses, count exits by kind,
//! stop or pause on request.

use super::devices::legacy::{StopReason, StopSignal};
use super::devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Exits by kind, over all vCPUs.
#[derive(Default, Debug)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT exits (only without an in-kernel LAPIC).
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted by a signal (pause requests).
    pub interrupted: AtomicU64,
    /// Anything else.
    pub other: AtomicU64,
}

impl ExitCounters {
    /// The counters now, as the API shows them.
    pub fn snapshot(&self) -> super::api::protocol::ExitCounts {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        super::api::protocol::ExitCounts {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            interrupted: l(&self.interrupted),
            other: l(&self.other),
        }
    }
}

/// Pause/resume of all vCPUs.
pub struct RunControl {
    paused: Mutex<bool>,
    resumed: Condvar,
    parked: AtomicUsize,
    stopping: AtomicBool,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// The signal that kicks a vCPU out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl RunControl {
    /// A controller for vCPUs that are not started yet.
    pub fn new() -> Arc<Self> {
        // A no-op handler (not SIG_IGN): delivery must interrupt KVM_RUN with EINTR.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_signal);
        Arc::new(RunControl {
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            parked: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn kick_all(&self) {
        if let Ok(threads) = self.threads.lock() {
            for &t in threads.iter() {
                // SAFETY: `t` is a vCPU thread that runs until the process exits (vCPU
                // threads are never joined or detached early), so the id stays valid.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
        }
    }

    /// Pauses every vCPU; returns once all are parked (or after 5 s with false).
    pub fn pause(&self) -> bool {
        if let Ok(mut p) = self.paused.lock() {
            *p = true;
        }
        let total = self.threads.lock().map(|t| t.len()).unwrap_or(0);
        for _ in 0..500 {
            if self.parked.load(Ordering::SeqCst) >= total {
                return true;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        if let Ok(mut p) = self.paused.lock() {
            *p = false;
        }
        self.resumed.notify_all();
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.paused.lock().map(|p| *p).unwrap_or(false)
    }

    /// Makes vCPUs leave their loops (at shutdown).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.resume();
        self.kick_all();
    }

    fn park_if_paused(&self) {
        let Ok(mut paused) = self.paused.lock() else {
            return;
        };
        if *paused {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *paused && !self.stopping.load(Ordering::SeqCst) {
                paused = match self.resumed.wait(paused) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Where to report a stop.
    pub stop: StopSignal,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
    /// Pause/resume.
    pub control: Arc<RunControl>,
}

/// Starts vCPU `id` on its own thread.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    ctx: Arc<VcpuContext>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run(id, &mut vcpu, &ctx))
}

/// Registers the pthread ids so pause can signal them.
fn register_thread(control: &RunControl, thread: libc::pthread_t) {
    if let Ok(mut t) = control.threads.lock() {
        t.push(thread);
    }
}

fn run(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) {
    register_thread(&ctx.control, {
        // SAFETY: pthread_self has no preconditions.
        unsafe { libc::pthread_self() }
    });
    let c = &ctx.counters;
    loop {
        if ctx.control.stopping.load(Ordering::SeqCst) {
            return;
        }
        ctx.control.park_if_paused();
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                c.io_in.fetch_add(1, Ordering::Relaxed);
                ctx.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                c.io_out.fetch_add(1, Ordering::Relaxed);
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                c.mmio_read.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                c.mmio_write.fetch_add(1, Ordering::Relaxed);
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                c.hlt.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = id, "guest triple-faulted or asked for a reset");
                ctx.stop.stop(StopReason::Reset);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                let reason = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                    _ => StopReason::PowerOff,
                };
                ctx.stop.stop(reason);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!(vcpu = id, reason, cpu, "KVM could not enter the guest");
                ctx.stop
                    .stop(StopReason::Error("KVM could not enter the guest"));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the
                // kvm_run union is the one KVM filled in.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                tracing::error!(
                    vcpu = id,
                    suberror = internal.suberror,
                    data = ?&internal.data[..n],
                    rip = format_args!("{rip:#x}"),
                    "KVM internal error (emulation failed)"
                );
                ctx.stop
                    .stop(StopReason::Error("KVM internal error in a vCPU"));
                return;
            }
            Ok(exit) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(vcpu = id, ?exit, "unhandled exit");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                c.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(vcpu = id, error = %e, "KVM_RUN failed");
                ctx.stop.stop(StopReason::Error("KVM_RUN failed"));
                return;
            }
        }
    }
}
