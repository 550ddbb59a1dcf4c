//! The Linux guest under QEMU: how tests and the demo boot it, talk to its console, and
//! stop it. QEMU runs with `-accel tcg` here, `-accel kvm` where hardware virtualization
//! exists.

use crate::console::{Console, ConsoleError};
use crate::host::Accel;
use crate::paths::GuestImages;
use crate::GUEST_READY_LINE;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting or stopping a QEMU guest.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// qemu-system-x86_64 could not be started.
    #[error("cannot start qemu-system-x86_64 (is it installed? `cargo xtask setup` installs it)")]
    Spawn(#[source] std::io::Error),
    /// The guest console reported a problem.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A command in the guest failed.
    #[error("{command} failed in the guest: {output}")]
    GuestCommand {
        /// What was run.
        command: String,
        /// What it printed.
        output: String,
    },
    /// QEMU did not exit after the guest was told to power off.
    #[error("QEMU did not exit within {0:?} of the guest powering off")]
    NoExit(Duration),
}

/// The virtio-serial port name given to Debian's qemu-ga beside sealvm-agent's port.
pub const QEMU_GA_PORT: &str = "org.qemu.guest_agent.1";

/// How long a guest may take to reach its ready line: TCG on a loaded 2-core machine is slow.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds a QEMU command line for the Linux guest.
#[derive(Debug, Clone)]
pub struct QemuGuestBuilder {
    images: GuestImages,
    memory_mib: u32,
    shared_memory: bool,
    accel: Accel,
    echo: bool,
    cmdline_extra: Vec<String>,
    args: Vec<String>,
}

impl QemuGuestBuilder {
    /// A guest with 256 MiB of memory, accelerated as well as this host allows.
    pub fn new(images: GuestImages) -> Self {
        QemuGuestBuilder {
            images,
            memory_mib: 256,
            shared_memory: false,
            accel: Accel::detect(),
            echo: false,
            cmdline_extra: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Back guest memory with a shared memfd, as a vhost-user backend needs to map it.
    pub fn shared_memory(mut self) -> Self {
        self.shared_memory = true;
        self
    }

    /// Print the guest's console lines to stdout as they arrive.
    pub fn echo_console(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Append a word to the kernel command line.
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.cmdline_extra.push(arg.into());
        self
    }

    /// Add raw QEMU arguments (devices, chardevs).
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Attach a vhost-user-blk device served on `socket`; implies shared memory.
    pub fn vhost_user_blk(self, socket: &Path) -> Self {
        let n = self
            .args
            .iter()
            .filter(|a| a.starts_with("vhost-user-blk-pci"))
            .count();
        let id = format!("vub{n}");
        self.shared_memory().qemu_args([
            "-chardev".to_string(),
            format!("socket,id={id},path={}", socket.display()),
            "-device".to_string(),
            format!("vhost-user-blk-pci,chardev={id}"),
        ])
    }

    /// Attach a raw disk image as virtio-blk.
    pub fn raw_disk(self, image: &Path) -> Self {
        self.qemu_args([
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=virtio,cache=none,aio=threads",
                image.display()
            ),
        ])
    }

    /// Give the guest the qemu-guest-agent virtio-serial port (`org.qemu.guest_agent.0`, which
    /// the guest's init serves with sealvm-agent), with its host end a unix socket QEMU
    /// listens on at `socket`.
    pub fn agent_channel(self, socket: &Path) -> Self {
        self.serial_port(socket, "org.qemu.guest_agent.0")
    }

    /// A second agent port, [`QEMU_GA_PORT`], for Debian's qemu-ga (see
    /// [`QemuGuest::start_qemu_ga`]), with its host end at `socket`.
    pub fn qemu_ga_channel(self, socket: &Path) -> Self {
        self.serial_port(socket, QEMU_GA_PORT)
    }

    /// A named virtio-serial port whose host end is a unix socket QEMU listens on.
    pub fn serial_port(mut self, socket: &Path, name: &str) -> Self {
        if !self.args.iter().any(|a| a == "virtio-serial-pci") {
            self.args
                .extend(["-device".to_string(), "virtio-serial-pci".to_string()]);
        }
        let id = format!(
            "port{}",
            self.args
                .iter()
                .filter(|a| a.starts_with("virtserialport"))
                .count()
        );
        self.qemu_args([
            "-chardev".to_string(),
            format!(
                "socket,id={id},path={},server=on,wait=off",
                socket.display()
            ),
            "-device".to_string(),
            format!("virtserialport,chardev={id},name={name}"),
        ])
    }

    /// The full qemu-system-x86_64 argument list.
    pub fn command_line(&self) -> Vec<String> {
        let mut cmdline = vec!["console=ttyS0", "panic=-1", "quiet", "loglevel=3"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        cmdline.extend(self.cmdline_extra.iter().cloned());
        let mut args: Vec<String> = vec![
            "-M".into(),
            "q35".into(),
            "-accel".into(),
            self.accel.qemu_name().into(),
            "-cpu".into(),
            if self.accel == Accel::Kvm {
                "host"
            } else {
                "max"
            }
            .into(),
            "-smp".into(),
            "1".into(),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            path_arg(&self.images.kernel),
            "-initrd".into(),
            path_arg(&self.images.initramfs),
            "-append".into(),
            cmdline.join(" "),
        ];
        if self.shared_memory {
            args.extend([
                "-object".into(),
                format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.memory_mib
                ),
                "-numa".into(),
                "node,memdev=mem".into(),
            ]);
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Starts QEMU. The guest boots in the background; see [`QemuGuest::wait_ready`].
    pub fn spawn(self) -> Result<QemuGuest, QemuError> {
        let mut child = Command::new("qemu-system-x86_64")
            .args(self.command_line())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(QemuError::Spawn)?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let stdin = child.stdin.take().expect("stdin was piped");
        let console = Console::start(stdout, stdin, self.echo);
        Ok(QemuGuest {
            child,
            console,
            started: Instant::now(),
        })
    }
}

fn path_arg(path: &Path) -> String {
    PathBuf::from(path).display().to_string()
}

/// A running QEMU guest. Dropping it kills QEMU.
pub struct QemuGuest {
    child: Child,
    console: Console,
    started: Instant,
}

impl QemuGuest {
    /// The guest's serial console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Waits for the init script's ready line and returns the time since QEMU started.
    pub fn wait_ready(&self) -> Result<Duration, QemuError> {
        self.console.wait_for(GUEST_READY_LINE, BOOT_TIMEOUT)?;
        Ok(self.started.elapsed())
    }

    /// Runs a shell command in the guest; returns its output and exit status.
    pub fn run(&self, command: &str) -> Result<(String, i32), QemuError> {
        Ok(self.console.run(command, Duration::from_secs(60))?)
    }

    /// Starts Debian's qemu-ga (carried in the guest image) on the [`QEMU_GA_PORT`] port.
    pub fn start_qemu_ga(&self) -> Result<(), QemuError> {
        let command = format!(
            "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = {QEMU_GA_PORT} ] && \
             (qemu-ga -m virtio-serial -p /dev/$(basename $p) -t /run > /tmp/qemu-ga.log 2>&1 &); done; \
             sleep 0.2; pidof qemu-ga"
        );
        let (out, status) = self.run(&command)?;
        if status != 0 {
            return Err(QemuError::GuestCommand {
                command: "qemu-ga".into(),
                output: out,
            });
        }
        Ok(())
    }

    /// Powers the guest off from inside (syncing its filesystems) and waits for QEMU to exit.
    pub fn shutdown(mut self) -> Result<(), QemuError> {
        self.console.send("sync; poweroff -f\n")?;
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(QemuError::NoExit(limit))
    }

    /// Waits for QEMU to exit by itself (the guest powered off); true when it did in time.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
