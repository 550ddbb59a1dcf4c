//! `cargo xtask setup`: install the Debian packages the tests and the demo use.

use anyhow::{bail, Result};
use sealvm_testkit::command::{self as process, output, step};
use std::process::Command;

/// Debian packages sealvm's tests, demo and benchmarks need, with what each is for.
const PACKAGES: &[(&str, &str)] = &[
    ("swtpm", "the host TPM stand-in and the per-VM vTPM"),
    ("swtpm-tools", "swtpm_setup, to manufacture vTPM state"),
    ("libtss2-dev", "TPM 2.0 software stack for tss-esapi"),
    ("tpm2-tools", "inspecting the host TPM in tests"),
    ("pkg-config", "finding libtss2 at build time"),
    (
        "qemu-system-x86",
        "QEMU, the vhost-user client and Linux guest host",
    ),
    (
        "qemu-utils",
        "qemu-img and qemu-storage-daemon, the peer backend",
    ),
    ("busybox-static", "the Linux guest's userland"),
    ("cpio", "inspecting initramfs archives"),
    ("fio", "storage benchmarks"),
    ("cryptsetup-bin", "cryptsetup luksDump for bundle interop"),
    ("acpica-tools", "iasl, to disassemble sealvm's ACPI tables"),
    ("gdisk", "sgdisk, to list the helper's sealed partition"),
    (
        "openssl",
        "openssl speed, the XTS throughput peer in the bench",
    ),
    ("e2fsprogs", "mkfs.ext4 for guest filesystems"),
    (
        "socat",
        "talking to the API sockets by hand, as API.md shows, and its test",
    ),
    (
        "qemu-guest-agent",
        "the real agent the wire-compatibility test compares with",
    ),
    (
        "libvirt-daemon",
        "libvirtd, driving the agent through libvirt in the agent tests",
    ),
    (
        "libvirt-daemon-driver-qemu",
        "libvirt's QEMU driver (a recommends, so named here)",
    ),
    (
        "libvirt-daemon-log",
        "virtlogd, which libvirt's QEMU driver needs",
    ),
    (
        "libvirt-clients",
        "virsh, the client the agent tests drive libvirt with",
    ),
    (
        "udev",
        "needed by libtss2's tpm-udev; named so it comes from QEMU's suite, whose libudev1 it must match",
    ),
    (
        "python3-venv",
        "a private venv for QEMU's qemu.qmp client in the agent tests",
    ),
];

/// Packages that must come from the same suite as QEMU: libvirt's QEMU driver is built
/// against one QEMU and refuses to mix suites with it.
const FOLLOW_QEMU_SUITE: &[&str] = &[
    "qemu-system-x86",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-log",
    "libvirt-clients",
    // QEMU from backports brings libudev1 from there; bookworm's udev (which libtss2-dev
    // pulls in through tpm-udev) then cannot be installed beside it.
    "udev",
];

/// Where the backports suite is written when QEMU must come from it.
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/sealvm-bookworm-backports.list";

/// Installs whatever in [`PACKAGES`] is missing; does nothing when all are installed.
pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !installed(name))
        .collect();
    if missing.is_empty() {
        step("setup: every package is installed");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these packages are missing: {}\nrun as root: apt-get update && apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("setup: installing {}", missing.join(" ")));
    let qemu_from_backports = if missing.contains(&"qemu-system-x86") {
        is_backport("qemu-utils")
    } else {
        is_backport("qemu-system-x86")
    };
    if qemu_from_backports {
        // qemu-utils on this machine kind comes from bookworm-backports, and Debian's QEMU
        // 7.2 system emulator refuses to sit beside it: take the emulator from there too.
        std::fs::write(
            BACKPORTS_LIST,
            "deb http://deb.debian.org/debian bookworm-backports main\n",
        )?;
    }
    process::run(Command::new("apt-get").arg("update").arg("-q"))?;
    let (from_backports, rest): (Vec<&str>, Vec<&str>) = missing
        .iter()
        .copied()
        .partition(|name| qemu_from_backports && FOLLOW_QEMU_SUITE.contains(name));
    if !from_backports.is_empty() {
        let mut args = vec!["-t", "bookworm-backports"];
        args.extend(&from_backports);
        apt_install(&args)?;
    }
    if !rest.is_empty() {
        apt_install(&rest)?;
    }
    let still: Vec<&str> = missing.into_iter().filter(|n| !installed(n)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(())
}

fn apt_install(args: &[&str]) -> Result<()> {
    process::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(args),
    )
}

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .map(|status| status.ends_with("installed") && status.starts_with("install ok"))
        .unwrap_or(false)
}

/// True when `package` is installed from bookworm-backports.
fn is_backport(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .map(|version| version.contains("bpo"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|uid| uid.trim() == "0")
        .unwrap_or(false)
}
