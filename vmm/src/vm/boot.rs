//! Loading the kernel and writing what the guest finds at its entry point: PVH start info
//! (an ELF with a PVH note) or Linux's zero page (a bzImage, or an ELF vmlinux without the
//! note), the e820 map, command line and initramfs.

use super::layout::*;
use super::memory::GuestMemory;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use std::io::Cursor;
use std::path::Path;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend as _};

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// The PVH start-info magic.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux's magic in the zero page.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader type.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The minimum alignment Linux wants for the initramfs.
const INITRAMFS_ALIGN: u64 = 4096;

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot open kernel {path}")]
    KernelFile {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF with a valid header nor a bzImage.
    #[error("kernel {path} is not a loadable ELF (vmlinux, PVH) nor a bzImage: {reason}")]
    KernelFormat {
        /// The path given.
        path: String,
        /// What the loaders said.
        reason: String,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}")]
    Initramfs {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of RAM.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel")]
    InitramfsTooBig {
        /// Its size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {} fit", CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh {
        /// The PHYS32_ENTRY address from the ELF note.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64 {
        /// The 64-bit entry point.
        entry: u64,
    },
}

/// The Linux zero page as bytes vm-memory can copy.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a repr(C) packed struct of plain integers; every bit pattern is
// valid and it has no padding the guest could observe as uninitialized.
unsafe impl ByteValued for ZeroPage {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: repr(C) plain integers, size asserted by linux-loader to be 56 bytes (no padding).
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: repr(C) plain integers (u64, u64, u32, u32), no padding.
unsafe impl ByteValued for MemmapEntry {}

/// The guest's physical memory map.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, mem_size - HIMEM_START, E820_RAM),
    ]
}

/// What was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// How to enter it.
    pub entry: Entry,
}

/// The bytes the guest boots, read once: the kernel and the optional initramfs. A trusted
/// launch verifies these bytes against the bundle's digests and boots the same bytes, so a
/// file swapped after the check is never loaded.
#[derive(Clone)]
pub struct BootImages {
    /// The kernel image (ELF or bzImage).
    pub kernel: Vec<u8>,
    /// The initramfs, when there is one.
    pub initramfs: Option<Vec<u8>>,
    /// Where the kernel came from, for messages.
    pub kernel_name: String,
}

impl BootImages {
    /// Reads `kernel` and `initramfs` into memory, each once.
    pub fn read(kernel: &Path, initramfs: Option<&Path>) -> Result<Self, BootError> {
        let kernel_bytes = std::fs::read(kernel).map_err(|source| BootError::KernelFile {
            path: kernel.display().to_string(),
            source,
        })?;
        let initramfs = initramfs
            .map(|path| {
                std::fs::read(path).map_err(|source| BootError::Initramfs {
                    path: path.display().to_string(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            kernel: kernel_bytes,
            initramfs,
            kernel_name: kernel.display().to_string(),
        })
    }
}

/// Loads the kernel of `images` (ELF or bzImage), its initramfs and the command line, and
/// writes the start info or zero page. The ACPI tables must be written separately at
/// [`ACPI_START`].
pub fn load(mem: &GuestMemory, images: &BootImages, cmdline: &str) -> Result<Loaded, BootError> {
    let path = images.kernel_name.clone();
    let mut file = Cursor::new(images.kernel.as_slice());
    let (result, bzimage) = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => (result, false),
        Err(elf_error) => {
            file.set_position(0);
            match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
                Ok(result) => (result, true),
                Err(bz_error) => {
                    return Err(BootError::KernelFormat {
                        path,
                        reason: format!("as ELF: {elf_error}; as bzImage: {bz_error}"),
                    })
                }
            }
        }
    };
    let mem_size = mem.last_addr().raw_value() + 1;
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::GuestMemory {
            what: "command line",
        })?;
    let initramfs = match &images.initramfs {
        Some(data) => Some(load_initramfs(
            mem,
            data,
            result.kernel_end.max(HIMEM_START),
        )?),
        None => None,
    };
    let pvh = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if !bzimage => Some(entry.raw_value()),
        _ => None,
    };
    let entry = match pvh {
        Some(entry) => {
            write_start_info(mem, mem_size, initramfs)?;
            Entry::Pvh { entry }
        }
        None => {
            write_zero_page(mem, mem_size, &result, bzimage, cmdline.len(), initramfs)?;
            let entry = if bzimage {
                // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
                result.kernel_load.raw_value() + 0x200
            } else {
                result.kernel_load.raw_value()
            };
            Entry::Linux64 { entry }
        }
    };
    Ok(Loaded { entry })
}

/// Copies the initramfs as high in RAM as it fits, page aligned; returns (address, size).
fn load_initramfs(
    mem: &GuestMemory,
    data: &[u8],
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = data.len() as u64;
    let top = mem.last_addr().raw_value() + 1;
    let start = top
        .checked_sub(size)
        .map(|a| a & !(INITRAMFS_ALIGN - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitramfsTooBig { size })?;
    mem.write_slice(data, GuestAddress(start))
        .map_err(|_| BootError::GuestMemory { what: "initramfs" })?;
    Ok((start, size))
}

fn write_start_info(
    mem: &GuestMemory,
    mem_size: u64,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        });
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64),
        )
        .map_err(|_| BootError::GuestMemory {
            what: "PVH memory map",
        })?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        // One module: the initramfs, described right after the start info.
        let module_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
        let mut module = [0u8; 32];
        module[0..8].copy_from_slice(&addr.to_le_bytes());
        module[8..16].copy_from_slice(&size.to_le_bytes());
        mem.write_slice(&module, GuestAddress(module_addr))
            .map_err(|_| BootError::GuestMemory {
                what: "PVH module list",
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = module_addr;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::GuestMemory {
            what: "PVH start info",
        })
}

fn write_zero_page(
    mem: &GuestMemory,
    mem_size: u64,
    result: &KernelLoaderResult,
    bzimage: bool,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let (true, Some(header)) = (bzimage, result.setup_header) {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = ACPI_START;
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory { what: "zero page" })
}

/// Writes the GDT and, for a 64-bit entry, identity page tables for the first 4 GiB.
pub fn write_gdt_and_page_tables(mem: &GuestMemory, entry: Entry) -> Result<(), BootError> {
    let gdt = gdt_entries(entry);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(|_| BootError::GuestMemory { what: "GDT" })?;
    }
    if let Entry::Linux64 { .. } = entry {
        let err = |_| BootError::GuestMemory {
            what: "page tables",
        };
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
            .map_err(err)?;
        for i in 0..4u64 {
            let pd = PDE_START + i * 0x1000;
            mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + i * 8))
                .map_err(err)?;
            for j in 0..512u64 {
                let addr = ((i << 30) | (j << 21)) | 0x83; // present, writable, 2 MiB page
                mem.write_obj(addr, GuestAddress(pd + j * 8)).map_err(err)?;
            }
        }
    }
    Ok(())
}

/// The GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub fn gdt_entries(entry: Entry) -> [u64; 5] {
    let code = match entry {
        // 32-bit flat code for PVH, 64-bit code for the Linux entry.
        Entry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
        Entry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Encodes one GDT descriptor from flags (access byte in the low 8 bits, G/DB/L/AVL in
/// bits 12..16), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_well_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn junk_kernel_is_refused_with_both_reasons() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("junk");
        std::fs::write(&kernel, vec![0x42u8; 8192]).unwrap();
        let images = BootImages::read(&kernel, None).unwrap();
        let error = load(&mem, &images, "").unwrap_err();
        assert!(matches!(error, BootError::KernelFormat { .. }), "{error}");
        let missing = BootImages::read(&dir.path().join("nope"), None)
            .err()
            .unwrap();
        assert!(matches!(missing, BootError::KernelFile { .. }));
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let map = e820_map(64 << 20);
        assert_eq!(map.last().unwrap().0 + map.last().unwrap().1, 64 << 20);
        assert!(map
            .iter()
            .any(|&(a, s, t)| t == E820_RESERVED && a <= ACPI_START && a + s >= ACPI_END));
    }
}
