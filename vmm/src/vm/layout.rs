//! Where things live in guest-physical memory and I/O space. One table, so the boot code,
//! the ACPI tables and the device code agree.
//!
//! ```text
//! 0x0000_0500  GDT                          0x0000_6000  PVH start info
//! 0x0000_7000  Linux zero page / PVH memmap 0x0000_9000  PML4, PDPT, PDs (64-bit entry)
//! 0x0002_0000  kernel command line (4 KiB)  0x000e_0000  RSDP, XSDT, FADT, MADT, DSDT...
//! 0x0010_0000  kernel (bzImage protected-mode part, or ELF at its own addresses)
//! top of RAM   initramfs, page aligned, as high as fits
//! 0xd000_0000  virtio-mmio windows, 4 KiB each, GSI 5, 6, ...
//! 0xfec0_0000  IOAPIC                       0xfee0_0000  local APICs
//! I/O 0x3f8    COM1 (IRQ 4)                 I/O 0x600    ACPI sleep control, 0x601 status,
//! I/O 0x60/64  i8042 (reset only)                        0x602 reset register
//! ```

/// The GDT the vCPUs start with.
pub const GDT_START: u64 = 0x500;
/// The PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux's zero page (boot_params) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The PVH memory map (follows the start info's page).
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Identity page tables for the 64-bit entry: PML4, then PDPT, then PDs.
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories mapping the first 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Most bytes of command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the low usable RAM below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables, starting with the RSDP (where a BIOS-less OS searches for it).
pub const ACPI_START: u64 = 0xe0000;
/// End of the area reserved for the tables.
pub const ACPI_END: u64 = 0x100000;
/// Where kernels are loaded ("high memory").
pub const HIMEM_START: u64 = 0x100000;
/// Start of the MMIO hole below 4 GiB; RAM stops here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// The first virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The GSI of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// IOAPIC inputs (GSIs 0..24).
pub const IOAPIC_PINS: u32 = 24;
/// Room for a TPM CRB device (MSFT0101), used by trusted launch.
pub const TPM_CRB_START: u64 = 0xfed4_0000;
/// Size of the CRB window.
pub const TPM_CRB_SIZE: u64 = 0x5000;
/// The IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) and identity map page, below the IOAPIC.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt.
pub const COM1_GSI: u32 = 4;
/// ACPI hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (FADT SLEEP_STATUS_REG).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT RESET_REG).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The value written to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The S5 (soft off) sleep type, as the DSDT's `_S5_` package gives it.
pub const S5_SLEEP_TYPE: u8 = 5;

/// The virtio-mmio window of device `index`.
pub fn virtio_mmio_base(index: usize) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// The GSI of virtio-mmio device `index`.
pub fn virtio_gsi(index: usize) -> u32 {
    VIRTIO_FIRST_GSI + index as u32
}

/// Most virtio-mmio devices: one GSI each, from [`VIRTIO_FIRST_GSI`] to the last IOAPIC pin.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_FIRST_GSI) as usize;
