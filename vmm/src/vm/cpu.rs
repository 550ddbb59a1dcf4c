//! vCPU set-up: CPUID, MSRs, FPU, local APIC, and the registers for the PVH (32-bit) or
//! Linux 64-bit entry.

use super::boot::{gdt_entries, Entry};
use super::layout::*;
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("cannot {what} for vCPU {cpu}")]
    Kvm {
        /// What was being set.
        what: &'static str,
        /// The vCPU.
        cpu: u8,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The CPUID table for vCPU `cpu` of `count`: what KVM supports, with the hypervisor bit,
/// the APIC id and the logical processor count filled in.
pub fn cpuid(kvm: &Kvm, cpu: u8, count: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // Hypervisor present; APIC id; logical processors; HTT when more than one.
                entry.ecx |= 1 << 31;
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(cpu) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // x2APIC id of this CPU.
                entry.edx = u32::from(cpu);
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Configures vCPU `cpu`: CPUID, MSRs, FPU, LAPIC LINT pins, and (for the boot vCPU) the
/// registers for `entry`. Other vCPUs wait for INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    cpu: u8,
    count: u8,
    entry: Entry,
) -> Result<(), CpuError> {
    let err = |what| move |source| CpuError::Kvm { what, cpu, source };
    let table = cpuid(kvm, cpu, count).map_err(err("read supported CPUID"))?;
    vcpu.set_cpuid2(&table).map_err(err("set CPUID"))?;
    set_msrs(vcpu).map_err(err("set MSRs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("set FPU"))?;
    set_lint(vcpu).map_err(err("set LAPIC LINT0/1"))?;
    if cpu == 0 {
        set_boot_registers(vcpu, entry).map_err(err("set registers"))?;
    }
    Ok(())
}

fn set_msrs(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    let set = vcpu.set_msrs(&msrs)?;
    if set != entries.len() {
        // Some MSR was refused; the guest copes with their reset values, so only note it.
        tracing::debug!(set, wanted = entries.len(), "KVM accepted fewer MSRs");
    }
    Ok(())
}

/// LINT0 as ExtINT (the 8259 reaches the BSP through it) and LINT1 as NMI.
fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    let get = |regs: &[std::os::raw::c_char], at: usize| {
        u32::from_le_bytes([
            regs[at] as u8,
            regs[at + 1] as u8,
            regs[at + 2] as u8,
            regs[at + 3] as u8,
        ])
    };
    let set = |regs: &mut [std::os::raw::c_char], at: usize, value: u32| {
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            regs[at + i] = *b as std::os::raw::c_char;
        }
    };
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    set(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    set(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&lapic)
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let base = ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000);
    let limit = (descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000);
    let granular = (descriptor >> 55) & 1;
    kvm_segment {
        base,
        limit: if granular == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn set_boot_registers(vcpu: &VcpuFd, entry: Entry) -> Result<(), kvm_ioctls::Error> {
    let gdt = gdt_entries(entry);
    let mut sregs = vcpu.get_sregs()?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(0x10, gdt[2]);
    let data = segment(0x18, gdt[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x20, gdt[4]);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { entry } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        Entry::Linux64 { entry } => {
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_gdt_descriptors() {
        let code = segment(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(
            (code.l, code.db, code.g, code.type_, code.present),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let flat32 = segment(0x10, 0x00cf_9b00_0000_ffff);
        assert_eq!((flat32.l, flat32.db), (0, 1));
    }
}
