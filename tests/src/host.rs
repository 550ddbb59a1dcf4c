//! What this host can virtualize.
//!
//! Here `/dev/kvm` may be a nested, software-assisted KVM (kvm-pvm) that runs a small
//! freestanding guest but not a stock Linux kernel; Linux guests then run under QEMU's TCG.

use std::path::Path;

/// How QEMU should run a Linux guest on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl Accel {
    /// KVM when the host has hardware virtualization a stock kernel can use, TCG otherwise.
    pub fn detect() -> Self {
        if hardware_virtualization().is_ok() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The value for QEMU's `-accel`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Ok when `/dev/kvm` is backed by hardware virtualization that runs a stock Linux kernel;
/// otherwise the reason it is not, in words a skipped test can print.
pub fn hardware_virtualization() -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm on this host".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is the nested, software-assisted kvm-pvm, which cannot run a stock Linux kernel".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| {
            line.split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        });
    if has_flag {
        Ok(())
    } else {
        Err("the CPU shows no vmx or svm flag, so /dev/kvm is not hardware virtualization".into())
    }
}
