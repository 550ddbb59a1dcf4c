//! The VMM: a KVM VM with an in-kernel irqchip, vCPU threads, guest memory in a memfd, the
//! legacy devices, virtio-mmio block and console devices, ACPI tables, and an API socket.
//!
//! [`Vm::new`] builds everything and loads the kernel; [`Vm::run`] starts the vCPUs and
//! returns when the guest powers off or resets, the API asks for shutdown, or a vCPU fails,
//! after flushing every disk.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod vcpu;

use config::{DiskConfig, VmConfig};
use devices::legacy::{AcpiPowerRegisters, StopReason, StopSignal, I8042};
use devices::serial::SerialDevice;
use devices::virtio::block::Block;
use devices::virtio::console::Console;
use devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use devices::virtio::vhost_user_blk::{VhostUserBlk, VhostUserError};
use devices::virtio::VirtioDevice;
use devices::Bus;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use layout::*;
use memory::GuestMemory;
use sealvm_virtio_blk::{BlockBackend, RawFile};
use std::sync::{Arc, Mutex};
use vcpu::{ExitCounters, RunControl, VcpuContext};
use vm_memory::{Address, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors building or running a VM; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// /dev/kvm is missing or unusable.
    #[error("cannot use /dev/kvm (is KVM available and are you in the kvm group?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed while building the VM.
    #[error("KVM refused to {what}")]
    KvmSetup {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be made.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// A raw disk image could not be opened (missing, locked by another process...).
    #[error(transparent)]
    Disk(#[from] sealvm_virtio_blk::backend::RawFileError),
    /// A vhost-user backend could not be reached.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// A host resource (eventfd, socket, thread) could not be made.
    #[error("cannot set up {what}")]
    Host {
        /// What.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Host { what, source }
}

fn kvm_setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmSetup { what, source }
}

/// Devices and boot bytes that do not come from a [`VmConfig`]: what a trusted launch adds.
#[derive(Default)]
pub struct Extras {
    /// Disks served from sealvm's own storage (a bundle's encrypted disk), before the
    /// configured ones.
    pub disks: Vec<ExtraDisk>,
    /// A TPM CRB device forwarding to the swtpm data socket at this path.
    pub tpm_socket: Option<std::path::PathBuf>,
    /// The kernel and initramfs bytes to boot instead of reading `config.kernel` and
    /// `config.initramfs` (a trusted launch passes the bytes it verified).
    pub boot_images: Option<boot::BootImages>,
}

/// A disk served from sealvm's own storage.
pub struct ExtraDisk {
    /// What serves the sectors.
    pub backend: Arc<dyn BlockBackend>,
    /// Refuse guest writes.
    pub readonly: bool,
    /// The device's name in logs and counters.
    pub name: String,
}

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    _vm_fd: Arc<VmFd>,
    _mem: GuestMemory,
    vcpus: Vec<VcpuFd>,
    pio: Bus,
    mmio: Bus,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    stop: StopSignal,
    counters: Arc<ExitCounters>,
    control: Arc<RunControl>,
    cmdline: String,
    /// The API socket, bound while the VM is built and served once it runs.
    api_listener: Option<std::os::unix::net::UnixListener>,
    /// The socket files this VM bound (API, serial, console); removed when the VM is
    /// dropped, which [`Vm::run`] does on its way out.
    _socket_files: Vec<sealvm_os::socket::RemoveOnDrop>,
}

impl Vm {
    /// Builds the VM described by `config` and loads its kernel.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        Self::with_extras(config, Extras::default())
    }

    /// Builds the VM described by `config` plus `extras`.
    pub fn with_extras(config: VmConfig, mut extras: Extras) -> Result<Self, VmError> {
        config.validate()?;
        // The API socket first: a path that must be refused is refused before anything else
        // is set up.
        let mut socket_files = Vec::new();
        let api_listener = match &config.api_socket {
            Some(path) => {
                let (listener, socket_file) =
                    api::bind(path).map_err(host(format!("the API socket {}", path.display())))?;
                socket_files.push(socket_file);
                Some(listener)
            }
            None => None,
        };
        let images = match extras.boot_images.take() {
            Some(images) => images,
            None => boot::BootImages::read(&config.kernel, config.initramfs.as_deref())?,
        };
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = kvm.create_vm().map_err(VmError::Kvm)?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_setup("set the TSS address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_setup("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_setup("create the PIT"))?;

        let mem = memory::create(config.memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_info = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region stays mapped as long as `mem`, which the Vm keeps for its
            // whole life (the process exits when the VM stops).
            unsafe { vm_fd.set_user_memory_region(region_info) }
                .map_err(kvm_setup("map guest memory"))?;
        }

        let stop = StopSignal::new().map_err(host("the stop eventfd"))?;
        let mut pio = Bus::default();
        let mut mmio = Bus::default();

        let serial_irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(host("an eventfd"))?);
        vm_fd
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_setup("connect COM1's interrupt"))?;
        let (serial, serial_socket_file) = SerialDevice::new(serial_irq, &config.serial)
            .map_err(host(format!("the serial port ({:?})", config.serial)))?;
        socket_files.extend(serial_socket_file);
        pio.insert(u64::from(COM1_PORT), 8, serial);
        pio.insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            3,
            Arc::new(Mutex::new(AcpiPowerRegisters::new(stop.clone()))),
        );
        pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(stop.clone()))));

        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for disk in extras.disks {
            devices.push(Box::new(Block::new(disk.backend, disk.readonly, disk.name)));
        }
        for (i, disk) in config.disks.iter().enumerate() {
            devices.push(match disk {
                DiskConfig::Raw { path, readonly } => {
                    let file: Arc<dyn BlockBackend> = Arc::new(RawFile::open(path, *readonly)?);
                    Box::new(Block::new(file, *readonly, format!("disk{i}")))
                }
                DiskConfig::VhostUser { socket } => Box::new(VhostUserBlk::connect(socket)?),
            });
        }
        if let Some(path) = &config.console_socket {
            let (console, socket_file) = Console::new(path.clone())
                .map_err(host(format!("the console socket {}", path.display())))?;
            devices.push(Box::new(console));
            socket_files.push(socket_file);
        }
        if devices.len() > MAX_VIRTIO_DEVICES {
            return Err(config::ConfigError(format!(
                "{} virtio devices; at most {MAX_VIRTIO_DEVICES} fit",
                devices.len()
            ))
            .into());
        }
        let mut transports = Vec::new();
        let mut mmio_infos = Vec::new();
        for (i, device) in devices.into_iter().enumerate() {
            let base = virtio_mmio_base(i);
            let gsi = virtio_gsi(i);
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(host("an eventfd"))?;
            vm_fd
                .register_irqfd(&irqfd, gsi)
                .map_err(kvm_setup("connect a virtio interrupt"))?;
            let transport = MmioTransport::new(device, mem.clone(), irqfd)
                .map_err(host("a virtio-mmio transport"))?;
            for (q, event) in transport.queue_events().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        event,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        q as u32,
                    )
                    .map_err(kvm_setup("register a queue notification"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone());
            transports.push(transport);
            mmio_infos.push(acpi::MmioDeviceInfo { base, gsi });
        }

        let device_map: Vec<String> = mmio_infos
            .iter()
            .map(|d| format!("{:#x}:{}", d.base, d.gsi))
            .collect();
        let mut cmdline = config.cmdline.trim().to_string();
        let mut append = |word: String| {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&word);
        };
        if !device_map.is_empty() {
            append(format!("sealvm.mmio={}", device_map.join(",")));
        }
        if let Some(socket) = &extras.tpm_socket {
            let crb = devices::tpm_crb::TpmCrb::new(socket);
            mmio.insert(TPM_CRB_START, TPM_CRB_SIZE, Arc::new(Mutex::new(crb)));
            append(format!("sealvm.tpm={TPM_CRB_START:#x}"));
        }
        acpi::write_tables(
            &mem,
            &acpi::AcpiConfig {
                vcpus: config.cpus,
                mmio_devices: mmio_infos,
                tpm_crb: extras.tpm_socket.is_some(),
            },
        )?;
        let loaded = boot::load(&mem, &images, &cmdline)?;
        boot::write_gdt_and_page_tables(&mem, loaded.entry)?;

        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_setup("create a vCPU"))?;
            cpu::configure(&kvm, &vcpu, id, config.cpus, loaded.entry)?;
            vcpus.push(vcpu);
        }
        tracing::info!(
            kernel = %config.kernel.display(),
            entry = ?loaded.entry,
            cpus = config.cpus,
            memory_mib = config.memory >> 20,
            devices = transports.len(),
            "VM built"
        );
        Ok(Vm {
            config,
            _vm_fd: Arc::new(vm_fd),
            _mem: mem,
            vcpus,
            pio,
            mmio,
            transports,
            stop,
            counters: Arc::default(),
            control: RunControl::new(),
            cmdline,
            api_listener,
            _socket_files: socket_files,
        })
    }

    /// A handle that stops the VM from another thread (a signal watcher).
    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    /// The command line the guest gets (with sealvm's device map appended).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM until it stops; flushes every disk before returning.
    pub fn run(mut self) -> Result<StopReason, VmError> {
        let ctx = Arc::new(VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            stop: self.stop.clone(),
            counters: self.counters.clone(),
            control: self.control.clone(),
        });
        if let Some(listener) = self.api_listener.take() {
            api::serve(
                listener,
                api::ApiContext {
                    config: self.config.clone(),
                    transports: self.transports.clone(),
                    counters: self.counters.clone(),
                    control: self.control.clone(),
                    stop: self.stop.clone(),
                },
            )
            .map_err(host("the API socket's thread"))?;
        }
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            vcpu::spawn(id as u8, vcpu, ctx.clone()).map_err(host("a vCPU thread"))?;
        }
        let reason = loop {
            // Blocking read: the stop eventfd is non-blocking, so poll it.
            let mut fd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(self.stop.event()),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut fd, 1, 1000) };
            if let Some(reason) = self.stop.reason() {
                break reason;
            }
        };
        self.control.stop();
        for transport in &self.transports {
            if let Ok(t) = transport.lock() {
                t.device().flush();
            }
        }
        tracing::info!(?reason, "VM stopped");
        Ok(reason)
    }
}
