//! `sealvm run`: boot a kernel with virtio-mmio disks and a console, or launch a sealed
//! bundle (`--bundle`, see [`super::launch`]).

use super::launch::{self, AttestOnlyError, TrustedLaunchArgs};
use super::size::parse_size;
use crate::vm::config::{DiskConfig, VmConfig};
use crate::vm::devices::bundle_disk::BundleDisk;
use crate::vm::devices::legacy::StopReason;
use crate::vm::devices::serial::SerialTarget;
use crate::vm::{Extras, Vm};
use clap::Args;
use sealvm_trust::launch::{self as trusted_launch, LaunchError};
use sealvm_trust::tpm::vtpm::{Vtpm, VtpmEndpoint};
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
    /// The guest's vTPM failed.
    #[error("guest vTPM: {0}")]
    Vtpm(String),
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

/// Runs `sealvm run`.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    if let Some(bundle) = &args.trusted.bundle {
        if args.trusted.attest_only {
            let helper_disk = args
                .trusted
                .helper_disk
                .as_deref()
                .ok_or_else(|| RunError::BadArgument("--bundle needs --helper-disk".into()))?;
            return Ok(launch::attest_only(
                bundle,
                helper_disk,
                &args.trusted.tcti,
            )?);
        }
        return run_bundle(args, bundle);
    }
    let config = args.vm_config()?;
    report(Vm::new(config)?.run()?)
}

/// Trusted launch: attest, unseal, open, verify the boot files, start the guest's vTPM on
/// the bundle's state, boot with the bundle's disk and a TPM CRB device, and on the way out
/// write the vTPM state back into the bundle.
fn run_bundle(args: &RunArgs, bundle_path: &std::path::Path) -> Result<(), RunError> {
    let helper_disk = args
        .trusted
        .helper_disk
        .as_deref()
        .ok_or_else(|| RunError::BadArgument("--bundle needs --helper-disk".into()))?;
    let kernel = args.kernel.clone().ok_or_else(|| {
        RunError::BadArgument(
            "--bundle needs --kernel (and --initramfs if the bundle lists one): the bundle \
             records their SHA-256, not the files"
                .into(),
        )
    })?;
    let opened =
        trusted_launch::attest_and_open(bundle_path, helper_disk, &args.trusted.tcti, true)?;
    trusted_launch::verify_boot_files(&opened.manifest, &kernel, args.initramfs.as_deref())?;
    let vtpm = Vtpm::start(&opened.vtpm_state, &opened.vtpm_key_hex(), false)
        .map_err(|e| RunError::Vtpm(e.to_string()))?;
    let VtpmEndpoint::Unix { data, .. } = vtpm.endpoint().clone() else {
        return Err(RunError::Vtpm("the vTPM has no unix socket".into()));
    };
    let manifest = opened.manifest.clone();
    let bundle = Arc::new(RwLock::new(opened.bundle));
    let disk = BundleDisk::new(bundle.clone()).map_err(|e| RunError::Vtpm(e.to_string()))?;
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
        disks: vec![(Arc::new(disk), false, "bundle".into())],
        tpm_socket: Some(data),
    };
    tracing::info!(
        bundle = %bundle_path.display(),
        attest_ms = opened.timings.attest.as_millis() as u64,
        unseal_ms = opened.timings.unseal.as_millis() as u64,
        open_ms = opened.timings.open.as_millis() as u64,
        "host attested; bundle opened"
    );
    let outcome = Vm::with_extras(config, extras).and_then(Vm::run);
    // Whatever happened to the VM, the vTPM's state goes back into the bundle.
    let write_back = {
        let mut bundle = bundle
            .write()
            .map_err(|_| RunError::Vtpm("bundle lock poisoned".into()))?;
        vtpm.stop_and_write_back(&mut bundle)
    };
    let reason = outcome?;
    write_back.map_err(|e| RunError::Vtpm(format!("vTPM write-back failed: {e}")))?;
    eprintln!(
        "sealvm: the vTPM state was written back into {}",
        bundle_path.display()
    );
    report(reason)
}

fn report(reason: StopReason) -> Result<(), RunError> {
    match reason {
        StopReason::PowerOff => eprintln!("sealvm: the guest powered off"),
        StopReason::Reset => {
            eprintln!("sealvm: the guest reset; sealvm exits (restart it to boot again)")
        }
        StopReason::ApiShutdown => eprintln!("sealvm: shut down through the API"),
        StopReason::Error(what) => return Err(RunError::Stopped(what)),
    }
    Ok(())
}
