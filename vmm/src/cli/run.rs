//! `sealvm run`: boot a kernel with virtio-mmio disks and a console, or launch a sealed
//! bundle (`--bundle`, see [`super::launch`]).

use super::launch::{self, AttestOnlyError, TrustedLaunchArgs};
use super::signals::{self, TermSignals};
use super::size::parse_size;
use crate::vm::boot::BootImages;
use crate::vm::config::{DiskConfig, VmConfig};
use crate::vm::devices::bundle_disk::BundleDisk;
use crate::vm::devices::legacy::StopReason;
use crate::vm::devices::serial::SerialTarget;
use crate::vm::{ExtraDisk, Extras, Vm};
use clap::Args;
use sealvm_trust::launch::{self as trusted_launch, LaunchError};
use sealvm_trust::tpm::vtpm::{Vtpm, VtpmEndpoint, VtpmError};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// Options of `sealvm run`, in cloud-hypervisor's style.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The kernel: a bzImage, an ELF vmlinux, or an ELF with a PVH note (the probe guest).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initramfs to load with the kernel.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line. sealvm appends `sealvm.mmio=ADDR:GSI,...`, its device map.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub cpus: Option<u8>,
    /// Guest memory, e.g. 512M or 1G [default: 512M].
    #[arg(long)]
    pub memory: Option<String>,
    /// A disk: `path=IMAGE[,readonly]` (raw image, locked exclusively, or shared when
    /// readonly) or `vhost-user=SOCKET` (sealvm-blk, qemu-storage-daemon). Repeat for more.
    #[arg(long = "disk", value_name = "DISK")]
    pub disks: Vec<DiskConfig>,
    /// COM1: `stdout`, `off`, `file=PATH` or `socket=PATH` [default: stdout].
    #[arg(long)]
    pub serial: Option<SerialTarget>,
    /// A virtio-console port on a unix socket: `socket=PATH` (the guest agent's channel).
    #[arg(long, value_name = "socket=PATH")]
    pub console: Option<String>,
    /// A unix socket answering JSON commands: info, pause, resume, shutdown, counters.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A TOML file with the same settings (kernel, initramfs, cmdline, cpus, memory in
    /// bytes, disks as strings, serial, console_socket, api_socket); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trusted launch.
    #[command(flatten)]
    pub trusted: TrustedLaunchArgs,
}

/// Errors of `sealvm run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Neither --kernel, --config nor --bundle.
    #[error("nothing to boot: give --kernel, --config or --bundle")]
    NoKernel,
    /// A flag value is malformed.
    #[error("{0}")]
    BadArgument(String),
    /// The config file could not be read or parsed.
    #[error("cannot use config file {path}")]
    ConfigFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// Trusted launch failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// `--attest-only` failed.
    #[error(transparent)]
    AttestOnly(#[from] AttestOnlyError),
    /// The VM stopped because a vCPU failed.
    #[error("the VM stopped: {0}")]
    Stopped(&'static str),
    /// The guest's vTPM did not start.
    #[error("the guest's vTPM could not be started")]
    Vtpm(#[from] VtpmError),
    /// The guest's vTPM did not shut down or its state did not go back into the bundle.
    #[error("the vTPM state could not be written back into the bundle")]
    VtpmWriteBack(#[source] VtpmError),
    /// The bundle's disk could not be served.
    #[error("cannot serve the bundle's disk")]
    BundleDisk(#[source] std::io::Error),
    /// A thread panicked while it held the open bundle.
    #[error("the open bundle's lock was poisoned by a panic; the vTPM state was not written back")]
    BundlePoisoned,
    /// SIGTERM/SIGINT handling could not be set up.
    #[error("cannot install the SIGTERM/SIGINT handlers")]
    Signals(#[source] sealvm_os::signals::SignalError),
    /// A termination signal arrived before the guest started; nothing ran.
    #[error("stopped by {0} before the guest started")]
    Interrupted(&'static str),
}

impl RunArgs {
    /// The VM configuration: the config file if any, then the flags over it.
    pub fn vm_config(&self) -> Result<VmConfig, RunError> {
        let mut config = match &self.config {
            Some(path) => {
                let err = |source: Box<dyn std::error::Error + Send + Sync>| RunError::ConfigFile {
                    path: path.display().to_string(),
                    source,
                };
                let text = std::fs::read_to_string(path).map_err(|e| err(Box::new(e)))?;
                toml::from_str::<VmConfig>(&text).map_err(|e| err(Box::new(e)))?
            }
            None => {
                let kernel = self.kernel.clone().ok_or(RunError::NoKernel)?;
                toml::from_str::<VmConfig>(&format!("kernel = {:?}", kernel.display().to_string()))
                    .map_err(|e| RunError::BadArgument(e.to_string()))?
            }
        };
        if let Some(kernel) = &self.kernel {
            config.kernel = kernel.clone();
        }
        if let Some(initramfs) = &self.initramfs {
            config.initramfs = Some(initramfs.clone());
        }
        if let Some(cmdline) = &self.cmdline {
            config.cmdline = cmdline.clone();
        }
        if let Some(cpus) = self.cpus {
            config.cpus = cpus;
        }
        if let Some(memory) = &self.memory {
            config.memory = parse_size(memory).map_err(|e| RunError::BadArgument(e.to_string()))?;
        }
        if !self.disks.is_empty() {
            config.disks = self.disks.clone();
        }
        if let Some(serial) = &self.serial {
            config.serial = serial.clone();
        }
        if let Some(console) = &self.console {
            let path = console.strip_prefix("socket=").ok_or_else(|| {
                RunError::BadArgument(format!("bad --console {console:?}: use socket=PATH"))
            })?;
            config.console_socket = Some(path.into());
        }
        if let Some(api) = &self.api_socket {
            config.api_socket = Some(api.clone());
        }
        Ok(config)
    }
}

/// Runs `sealvm run`. SIGTERM and SIGINT stop the guest as a power-off does.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    if let Some(bundle) = &args.trusted.bundle {
        let helper_disk = args
            .trusted
            .helper_disk
            .as_deref()
            .ok_or_else(|| RunError::BadArgument("--bundle needs --helper-disk".into()))?;
        if args.trusted.attest_only {
            return Ok(launch::attest_only(
                bundle,
                helper_disk,
                &args.trusted.tcti,
                args.kernel.as_deref(),
                args.initramfs.as_deref(),
            )?);
        }
        let signals = TermSignals::install().map_err(RunError::Signals)?;
        return run_bundle(args, bundle, helper_disk, &signals);
    }
    let signals = TermSignals::install().map_err(RunError::Signals)?;
    let config = args.vm_config()?;
    let vm = Vm::new(config)?;
    signals.stop_on_signal(vm.stop_signal());
    report(vm.run()?)
}

/// Fails with [`RunError::Interrupted`] when a termination signal has arrived.
fn check_signals(signals: &TermSignals) -> Result<(), RunError> {
    match signals.received() {
        Some(signo) => Err(RunError::Interrupted(signals::name(signo))),
        None => Ok(()),
    }
}

/// Trusted launch: attest, unseal, open, read the boot files once and verify those bytes,
/// start the guest's vTPM on the bundle's state, boot the verified bytes with the bundle's
/// disk and a TPM CRB device, and on the way out (power-off, reset, API, SIGTERM/SIGINT)
/// write the vTPM state back into the bundle. The vTPM's scratch directory goes with the
/// [`Vtpm`] on every return path.
fn run_bundle(
    args: &RunArgs,
    bundle_path: &std::path::Path,
    helper_disk: &std::path::Path,
    signals: &TermSignals,
) -> Result<(), RunError> {
    let kernel = args.kernel.clone().ok_or_else(|| {
        RunError::BadArgument(
            "--bundle needs --kernel (and --initramfs if the bundle lists one): the bundle \
             records their SHA-256, not the files"
                .into(),
        )
    })?;
    let mut opened =
        trusted_launch::attest_and_open(bundle_path, helper_disk, &args.trusted.tcti, true)?;
    check_signals(signals)?;
    let verified = trusted_launch::read_verified_boot_files(
        &opened.manifest,
        &kernel,
        args.initramfs.as_deref(),
    )?;
    test_pause_after_boot_verify();
    if let Some(generation) =
        trusted_launch::advance_rollback(&mut opened, &args.trusted.tcti, test_crash_in_rollback)?
    {
        tracing::info!(generation, "rollback generation advanced");
    }
    check_signals(signals)?;
    let vtpm = Vtpm::start(&opened.vtpm_state, &opened.vtpm_key_hex(), false)?;
    check_signals(signals)?;
    let VtpmEndpoint::Unix { data, .. } = vtpm.endpoint().clone() else {
        unreachable!("Vtpm::start(.., tcp: false) serves unix sockets");
    };
    let manifest = opened.manifest.clone();
    let bundle = Arc::new(RwLock::new(opened.bundle));
    let disk = BundleDisk::new(bundle.clone()).map_err(RunError::BundleDisk)?;
    let mut config = args.vm_config()?;
    config.cpus = u8::try_from(manifest.vcpus)
        .map_err(|_| RunError::BadArgument(format!("bundle asks for {} vCPUs", manifest.vcpus)))?;
    config.memory = manifest.memory_mib << 20;
    // The sealed command line comes first; the user's --cmdline may only add to it.
    config.cmdline = match &args.cmdline {
        Some(extra) => format!("{} {extra}", manifest.cmdline),
        None => manifest.cmdline.clone(),
    };
    let extras = Extras {
        disks: vec![ExtraDisk {
            backend: Arc::new(disk),
            readonly: false,
            name: "bundle".into(),
        }],
        tpm_socket: Some(data),
        boot_images: Some(BootImages {
            kernel: verified.kernel,
            initramfs: verified.initramfs,
            kernel_name: kernel.display().to_string(),
        }),
    };
    tracing::info!(
        bundle = %bundle_path.display(),
        attest_ms = opened.timings.attest.as_millis() as u64,
        unseal_ms = opened.timings.unseal.as_millis() as u64,
        open_ms = opened.timings.open.as_millis() as u64,
        "host attested; bundle opened"
    );
    let outcome = Vm::with_extras(config, extras).and_then(|vm| {
        signals.stop_on_signal(vm.stop_signal());
        vm.run()
    });
    // Whatever happened to the VM, the vTPM's state goes back into the bundle.
    let write_back = match bundle.write() {
        Ok(mut bundle) => vtpm
            .stop_and_write_back(&mut bundle)
            .map_err(RunError::VtpmWriteBack),
        Err(_) => Err(RunError::BundlePoisoned),
    };
    let reason = outcome?;
    write_back?;
    eprintln!(
        "sealvm: the vTPM state was written back into {}",
        bundle_path.display()
    );
    report(reason)
}

/// Test hook, debug builds only: with `SEALVM_TEST_CRASH_IN_ROLLBACK=1`, aborts the process
/// between the bundle's rollback-generation write and the host counter increment, as a
/// power cut there would, so a test can show the next launch still works.
fn test_crash_in_rollback() {
    #[cfg(debug_assertions)]
    if std::env::var_os("SEALVM_TEST_CRASH_IN_ROLLBACK").is_some() {
        eprintln!("sealvm: test crash between the rollback steps");
        std::process::abort();
    }
}

/// Test hook, debug builds only: sleeps `SEALVM_TEST_PAUSE_AFTER_BOOT_VERIFY_MS` between
/// the boot-file check and the boot, so a test can swap the kernel file in that window and
/// show the swapped file is never booted (the window is microseconds otherwise, too short
/// to hit reliably). It only widens a race; it changes nothing that is checked.
fn test_pause_after_boot_verify() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("SEALVM_TEST_PAUSE_AFTER_BOOT_VERIFY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("sealvm: test pause after the boot-file check ({ms} ms)");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn report(reason: StopReason) -> Result<(), RunError> {
    match reason {
        StopReason::PowerOff => eprintln!("sealvm: the guest powered off"),
        StopReason::Reset => {
            eprintln!("sealvm: the guest reset; sealvm exits (restart it to boot again)")
        }
        StopReason::ApiShutdown => eprintln!("sealvm: shut down through the API"),
        StopReason::HostSignal(signo) => eprintln!(
            "sealvm: stopped by {}; the guest was stopped as at power-off",
            signals::name(signo)
        ),
        StopReason::Error(what) => return Err(RunError::Stopped(what)),
    }
    Ok(())
}
