//! `cargo xtask setup`: install the Debian packages the tests and the demo use.

use crate::process::{self, output, step};
use anyhow::{bail, Result};
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
        "qemu-guest-agent",
        "the real agent the wire-compatibility test compares with",
    ),
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
    let qemu_from_backports = missing.contains(&"qemu-system-x86") && qemu_utils_is_backport();
    if qemu_from_backports {
        // qemu-utils on this machine kind comes from bookworm-backports, and Debian's QEMU
        // 7.2 system emulator refuses to sit beside it: take the emulator from there too.
        std::fs::write(
            BACKPORTS_LIST,
            "deb http://deb.debian.org/debian bookworm-backports main\n",
        )?;
    }
    process::run(Command::new("apt-get").arg("update").arg("-q"))?;
    let rest: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|name| !(qemu_from_backports && *name == "qemu-system-x86"))
        .collect();
    if qemu_from_backports {
        apt_install(&["-t", "bookworm-backports", "qemu-system-x86"])?;
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

fn qemu_utils_is_backport() -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "qemu-utils"]))
        .map(|version| version.contains("bpo"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|uid| uid.trim() == "0")
        .unwrap_or(false)
}
