//! `sealvm run`: boot a kernel with virtio-mmio disks and a console, or launch a sealed
//! bundle (`--bundle`, see [`super::launch`]).

use super::launch::{self, TrustedLaunchArgs};
use super::size::parse_size;
use crate::vm::config::{DiskConfig, VmConfig};
use crate::vm::devices::legacy::StopReason;
use crate::vm::devices::serial::SerialTarget;
use crate::vm::Vm;
use clap::Args;
use std::path::PathBuf;

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
    Launch(#[from] launch::LaunchError),
    /// The VM stopped because a vCPU failed.
    #[error("the VM stopped: {0}")]
    Stopped(&'static str),
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
    if args.trusted.bundle.is_some() {
        return Ok(launch::run(&args.trusted)?);
    }
    let config = args.vm_config()?;
    let vm = Vm::new(config)?;
    match vm.run()? {
        StopReason::PowerOff => eprintln!("sealvm: the guest powered off"),
        StopReason::Reset => {
            eprintln!("sealvm: the guest reset; sealvm exits (restart it to boot again)")
        }
        StopReason::ApiShutdown => eprintln!("sealvm: shut down through the API"),
        StopReason::Error(what) => return Err(RunError::Stopped(what)),
    }
    Ok(())
}
