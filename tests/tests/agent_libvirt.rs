//! libvirt drives sealvm-agent as it drives qemu-guest-agent: a private virtlogd and
//! libvirtd (session mode, every socket and state file in a temporary directory, never the
//! machine's own) run a transient TCG domain booting the Linux guest with the agent
//! channel, and virsh's agent commands are checked one by one in that one boot.
//!
//! As root the daemons run as `nobody` (libvirt's session mode is what keeps all its paths
//! under the directories it is given); as another user, as that user.

use base64::Engine;
use sealvm_testkit::Workspace;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const DOMAIN: &str = "sealvm-agent-libvirt";
/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// The private daemons and their directory; dropping it destroys the domain and stops both
/// daemons.
struct Libvirt {
    dir: tempfile::TempDir,
    as_nobody: bool,
}

impl Libvirt {
    fn start() -> Libvirt {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid only reads the process's effective user id.
        let as_nobody = unsafe { libc::geteuid() } == 0;
        for sub in ["run", "config", "cache", "data", "home"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let libvirt = Libvirt { dir, as_nobody };
        libvirt.hand_over(libvirt.dir.path());
        for (daemon, pid_file) in [("virtlogd", "virtlogd.pid"), ("libvirtd", "libvirtd.pid")] {
            let pid_file = libvirt.path(pid_file);
            let out = libvirt
                .command(daemon)
                .arg("-d")
                .arg("-p")
                .arg(&pid_file)
                .output()
                .unwrap_or_else(|e| panic!("cannot start {daemon}: {e}"));
            assert!(out.status.success(), "{daemon}: {}", text(&out.stderr));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !libvirt.path("run/libvirt/libvirt-sock").exists() {
            assert!(Instant::now() < deadline, "libvirtd made no socket");
            std::thread::sleep(Duration::from_millis(100));
        }
        libvirt
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Gives `path` (recursively) to the daemons' user.
    fn hand_over(&self, path: &Path) {
        if !self.as_nobody {
            return;
        }
        let status = Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A command run as the daemons' user with the private directories.
    fn command(&self, program: &str) -> Command {
        let mut command = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--",
                program,
            ]);
            c
        } else {
            Command::new(program)
        };
        command
            .current_dir(self.dir.path())
            .env("HOME", self.path("home"))
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env("XDG_DATA_HOME", self.path("data"));
        command
    }

    /// Runs virsh; returns its output whatever the status.
    fn virsh_output(&self, args: &[&str]) -> Output {
        self.command("virsh")
            .args(["-c", "qemu:///session"])
            .args(args)
            .output()
            .expect("virsh")
    }

    /// Runs virsh and returns its stdout; panics with stderr when it fails.
    fn virsh(&self, args: &[&str]) -> String {
        let out = self.virsh_output(args);
        assert!(
            out.status.success(),
            "virsh {}: {}{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `virsh qemu-agent-command`: the answer's `return`.
    fn agent(&self, request: Value) -> Value {
        let out = self.virsh(&[
            "qemu-agent-command",
            DOMAIN,
            &request.to_string(),
            "--timeout",
            "30",
        ]);
        let answer: Value = serde_json::from_str(out.trim()).expect("agent answer is JSON");
        answer["return"].clone()
    }

    /// Runs a shell command in the guest through guest-exec; returns (exit code, stdout).
    fn exec(&self, script: &str) -> (i64, String) {
        let started = self.agent(json!({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}));
        let pid = started["pid"].as_i64().expect("guest-exec pid");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status =
                self.agent(json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if status["exited"] == true {
                let out = base64::engine::general_purpose::STANDARD
                    .decode(status["out-data"].as_str().unwrap_or(""))
                    .unwrap();
                return (status["exitcode"].as_i64().unwrap(), text(&out));
            }
            assert!(Instant::now() < deadline, "{script} never finished");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads a guest file through guest-file-open/read/close.
    fn read_file(&self, path: &str) -> String {
        let handle = self.agent(json!({"execute": "guest-file-open", "arguments": {"path": path}}));
        let read = self.agent(json!({"execute": "guest-file-read",
            "arguments": {"handle": handle, "count": 65536}}));
        self.agent(json!({"execute": "guest-file-close", "arguments": {"handle": handle}}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(read["buf-b64"].as_str().unwrap())
            .unwrap();
        assert_eq!(read["count"], bytes.len());
        text(&bytes)
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.virsh_output(&["destroy", DOMAIN]);
        for pid_file in ["libvirtd.pid", "virtlogd.pid"] {
            if let Some(pid) = std::fs::read_to_string(self.path(pid_file))
                .ok()
                .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill only sends a signal, to the daemon this test started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Why this machine cannot run the test, if it cannot.
fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = [
        "/usr/sbin/libvirtd",
        "/usr/sbin/virtlogd",
        "/usr/bin/virsh",
        "/usr/bin/setpriv",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} missing; `cargo xtask setup` installs libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-daemon-log and libvirt-clients",
            missing.join(", ")
        )
    })
}

fn domain_xml(dir: &Path) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        "<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=3</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{console}'/></serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = p("vmlinuz"),
        initrd = p("initramfs.cpio.gz"),
        disk = p("data.ext4"),
        console = p("console.log"),
    )
}

/// `key : value` lines of `virsh guestinfo`.
fn guestinfo_fields(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn libvirt_drives_the_agent_through_virsh() {
    if let Some(why) = missing_tools() {
        eprintln!("skipped: libvirt_drives_the_agent_through_virsh: {why}");
        return;
    }
    let images = Workspace::locate().linux_guest().expect("guest images");
    let libvirt = Libvirt::start();
    // The daemons' user must read the images and write the disk: copies in its directory.
    std::fs::copy(&images.kernel, libvirt.path("vmlinuz")).unwrap();
    std::fs::copy(&images.initramfs, libvirt.path("initramfs.cpio.gz")).unwrap();
    let disk = libvirt.path("data.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .output()
        .expect("mkfs.ext4");
    assert!(mkfs.status.success(), "{}", text(&mkfs.stderr));
    std::fs::write(libvirt.path("domain.xml"), domain_xml(libvirt.dir.path())).unwrap();
    libvirt.hand_over(libvirt.dir.path());

    let started = Instant::now();
    libvirt.virsh(&["create", "domain.xml"]);
    let deadline = Instant::now() + sealvm_testkit::qemu::BOOT_TIMEOUT;
    loop {
        let ping = libvirt.virsh_output(&[
            "qemu-agent-command",
            DOMAIN,
            r#"{"execute":"guest-ping"}"#,
            "--timeout",
            "5",
        ]);
        if ping.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered libvirt: {}\nconsole: {}",
            text(&ping.stderr),
            std::fs::read_to_string(libvirt.path("console.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "agent answered libvirt {:?} after create",
        started.elapsed()
    );

    // guest-exec through libvirt, which also mounts the disk for the filesystem commands.
    let (code, out) = libvirt.exec("mount -t ext4 /dev/vda /mnt && echo mounted");
    assert_eq!((code, out.trim()), (0, "mounted"));

    // domfsinfo maps the agent's disk address to the domain's disk target.
    let fsinfo = libvirt.virsh(&["domfsinfo", DOMAIN]);
    let row: Vec<&str> = fsinfo
        .lines()
        .find(|l| l.trim_start().starts_with("/mnt"))
        .unwrap_or_else(|| panic!("no /mnt in domfsinfo:\n{fsinfo}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["/mnt", "vda", "ext4", "vda"], "{fsinfo}");

    // guestinfo, every part.
    let info = guestinfo_fields(&libvirt.virsh(&["guestinfo", DOMAIN]));
    let field = |key: &str| {
        info.get(key)
            .cloned()
            .unwrap_or_else(|| panic!("guestinfo lacks {key}: {info:?}"))
    };
    assert_eq!(field("os.machine"), "x86_64");
    assert!(field("os.kernel-release").contains("cloud-amd64"));
    assert_eq!(field("timezone.name"), "UTC");
    assert_eq!(field("timezone.offset"), "0");
    assert_eq!(field("hostname"), "sealvm-guest");
    assert_eq!(field("user.count"), "0");
    assert_eq!(field("fs.count"), "1");
    assert_eq!(field("fs.0.mountpoint"), "/mnt");
    assert_eq!(field("fs.0.fstype"), "ext4");
    assert_eq!(field("fs.0.disk.0.alias"), "vda");
    let total: u64 = field("fs.0.total-bytes").parse().unwrap();
    let used: u64 = field("fs.0.used-bytes").parse().unwrap();
    assert!(total > used && total < 32 << 20, "{total} {used}");
    assert_eq!(field("disk.0.name"), "/dev/vda");
    assert_eq!(field("disk.0.alias"), "vda");
    assert_eq!(field("disk.0.guest_bus"), "virtio");
    let interfaces: usize = field("if.count").parse().unwrap();
    let eth0 = (0..interfaces)
        .find(|i| field(&format!("if.{i}.name")) == "eth0")
        .expect("eth0 in guestinfo");
    assert_eq!(field(&format!("if.{eth0}.addr.0.addr")), "10.0.2.15");
    assert_eq!(field(&format!("if.{eth0}.addr.0.prefix")), "24");

    // domtime: get, set (then the hardware clock follows), and --sync from the RTC.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest_time = |libvirt: &Libvirt| -> i64 {
        let out = libvirt.virsh(&["domtime", DOMAIN]);
        out.trim()
            .strip_prefix("Time:")
            .unwrap_or_else(|| panic!("{out}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!((guest_time(&libvirt) - now).abs() < 120);
    libvirt.virsh(&["domtime", DOMAIN, "--time", "2000000000"]);
    assert!((guest_time(&libvirt) - 2_000_000_000).abs() < 60);
    libvirt.virsh(&["domtime", DOMAIN, "--sync"]);
    assert!(
        (guest_time(&libvirt) - 2_000_000_000).abs() < 60,
        "--sync read the hardware clock that --time had set"
    );
    libvirt.virsh(&["domtime", DOMAIN, "--time", &now.to_string()]);

    let addresses = libvirt.virsh(&["domifaddr", DOMAIN, "--source", "agent"]);
    assert!(
        addresses
            .lines()
            .any(|l| l.contains("eth0") && l.contains("10.0.2.15/24")),
        "{addresses}"
    );
    assert!(addresses.contains("127.0.0.1/8"), "{addresses}");
    let hostname = libvirt.virsh(&["domhostname", DOMAIN, "--source", "agent"]);
    assert_eq!(hostname.trim(), "sealvm-guest");

    // Freeze and thaw, all filesystems and by mountpoint (libvirt thaws only all).
    assert_eq!(
        libvirt.virsh(&["domfsfreeze", DOMAIN]).trim(),
        "Froze 1 filesystem(s)"
    );
    let frozen = libvirt.agent(json!({"execute": "guest-fsfreeze-status"}));
    assert_eq!(frozen, "frozen");
    assert_eq!(
        libvirt.virsh(&["domfsthaw", DOMAIN]).trim(),
        "Thawed 1 filesystem(s)"
    );
    assert_eq!(
        libvirt
            .virsh(&["domfsfreeze", DOMAIN, "--mountpoint", "/mnt"])
            .trim(),
        "Froze 1 filesystem(s)"
    );
    assert_eq!(
        libvirt.virsh(&["domfsthaw", DOMAIN]).trim(),
        "Thawed 1 filesystem(s)"
    );

    // set-user-password: a clear password is hashed in the guest; a crypted one is kept.
    libvirt.virsh(&["set-user-password", DOMAIN, "root", "s3cret"]);
    libvirt.virsh(&[
        "set-user-password",
        DOMAIN,
        "daemon",
        "$6$salt$hash",
        "--encrypted",
    ]);
    let shadow = libvirt.read_file("/etc/shadow");
    let entry = |user: &str| {
        shadow
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{user}:")))
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_else(|| panic!("{user} not in {shadow}"))
            .to_string()
    };
    assert!(entry("root").starts_with('$'), "{shadow}");
    assert_eq!(entry("daemon"), "$6$salt$hash");
    let unknown = libvirt.virsh_output(&["set-user-password", DOMAIN, "no-such-user", "x"]);
    assert!(!unknown.status.success());

    // The file commands through qemu-agent-command: write, seek, read back.
    let handle = libvirt.agent(json!({"execute": "guest-file-open",
        "arguments": {"path": "/mnt/via-libvirt", "mode": "w+"}}));
    let wrote = libvirt.agent(json!({"execute": "guest-file-write",
        "arguments": {"handle": handle, "buf-b64": "c2VhbHZtLWFnZW50"}}));
    assert_eq!(wrote["count"], 12);
    let at = libvirt.agent(json!({"execute": "guest-file-seek",
        "arguments": {"handle": handle, "offset": 7, "whence": "set"}}));
    assert_eq!(at["position"], 7);
    libvirt.agent(json!({"execute": "guest-file-flush", "arguments": {"handle": handle}}));
    let read = libvirt.agent(json!({"execute": "guest-file-read",
        "arguments": {"handle": handle, "count": 100}}));
    assert_eq!(
        read,
        json!({"count": 5, "buf-b64": "YWdlbnQ=", "eof": true})
    );
    libvirt.agent(json!({"execute": "guest-file-close", "arguments": {"handle": handle}}));
    let (_, out) = libvirt.exec("cat /mnt/via-libvirt");
    assert_eq!(out, "sealvm-agent");

    // An orderly shutdown through the agent: the guest's shutdown program runs and the
    // transient domain goes away.
    libvirt.virsh(&["shutdown", DOMAIN, "--mode", "agent"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while libvirt.virsh_output(&["domstate", DOMAIN]).status.success() {
        assert!(Instant::now() < deadline, "the domain did not shut down");
        std::thread::sleep(Duration::from_millis(250));
    }
    let console = std::fs::read_to_string(libvirt.path("console.log")).unwrap_or_default();
    assert!(
        console.contains("sealvm-guest: shutdown: poweroff"),
        "{console}"
    );
    eprintln!("libvirt test took {:?}", started.elapsed());
}
