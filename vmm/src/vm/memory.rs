//! Guest memory: one memfd mapped shared, so a vhost-user backend can map the same pages.

use super::layout::{HIMEM_START, MMIO_HOLE_START};
use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// The guest's memory.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest: room for the boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest guest this VMM lays out: RAM stops at the MMIO hole below 4 GiB.
pub const MAX_MEMORY: u64 = MMIO_HOLE_START;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Too little or too much memory was asked for.
    #[error(
        "memory size {size} bytes is outside what sealvm supports ({} MiB to {} MiB)",
        MIN_MEMORY >> 20,
        MAX_MEMORY >> 20
    )]
    Size {
        /// The size asked for.
        size: u64,
    },
    /// The host could not provide it.
    #[error("cannot allocate {size} bytes of guest memory")]
    Allocate {
        /// The size asked for.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Creates `size` bytes of guest RAM from address 0, backed by a memfd.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || size % 4096 != 0 || size < HIMEM_START {
        return Err(MemoryError::Size { size });
    }
    let allocate = |source| MemoryError::Allocate { size, source };
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd.
    let fd = unsafe { libc::memfd_create(c"sealvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(allocate(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(allocate)?;
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| allocate(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    #[test]
    fn sizes_outside_the_layout_are_refused() {
        assert!(matches!(create(1 << 20), Err(MemoryError::Size { .. })));
        assert!(matches!(create(4 << 30), Err(MemoryError::Size { .. })));
        assert!(matches!(
            create((16 << 20) + 1),
            Err(MemoryError::Size { .. })
        ));
    }

    #[test]
    fn memory_is_shared_file_backed() {
        let mem = create(16 << 20).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(vm_memory::GuestMemoryRegion::file_offset(region).is_some());
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
