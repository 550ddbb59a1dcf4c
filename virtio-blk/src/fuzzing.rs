//! Turns arbitrary bytes into a guest memory image and a descriptor chain, and runs the
//! request parser and executor on them. The cargo-fuzz target in `fuzz/` calls
//! [`run_one`]; a crash it finds is replayed by adding its input to the unit tests below.
//!
//! Input layout: byte 0 is the number of segments (mod 16); then per segment 13 bytes
//! (`addr` u64 LE, `len` u32 LE, `flags` u8: bit 0 writable); everything after fills the
//! first 64 KiB of guest memory. The disk is 64 sectors in memory.

use crate::backend::BlockBackend;
use crate::request::{Limits, Request, Segment};
use std::io;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEMORY_LEN: usize = 64 << 10;
const DISK_SECTORS: u64 = 64;

/// A disk held in memory, for fuzzing and tests.
pub struct MemoryDisk {
    data: Mutex<Vec<u8>>,
}

impl MemoryDisk {
    /// A zeroed disk of `len` bytes.
    pub fn new(len: usize) -> Self {
        MemoryDisk {
            data: Mutex::new(vec![0; len]),
        }
    }
}

impl BlockBackend for MemoryDisk {
    fn capacity_bytes(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = data
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut data = self.data.lock().map_err(|_| io::Error::other("poisoned"))?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let dst = data
            .get_mut(start..start + buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn device_id(&self) -> &[u8] {
        b"fuzz"
    }
}

/// Runs one fuzz input; panics only if the crate has a bug.
pub fn run_one(input: &[u8]) {
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let count = usize::from(count % 16);
    let Some(table) = rest.get(..count * 13) else {
        return;
    };
    let chain: Vec<Segment> = table
        .chunks_exact(13)
        .map(|c| Segment {
            addr: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
            writable: c[12] & 1 != 0,
        })
        .collect();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_LEN)]) else {
        return;
    };
    let image = &rest[count * 13..];
    let image = &image[..image.len().min(MEMORY_LEN)];
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    let disk = MemoryDisk::new((DISK_SECTORS * crate::SECTOR_SIZE) as usize);
    let limits = Limits::for_capacity(DISK_SECTORS, false);
    match Request::parse(&mem, &chain, &limits) {
        Ok(request) => {
            let (used, _) = request.execute(&mem, &disk, &limits);
            assert!(u64::from(used) <= request.data_len + 1);
        }
        Err(rejected) => {
            assert!(rejected.answer(&mem) <= 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::run_one;

    /// Inputs that once crashed, or that reach interesting paths; each must run cleanly.
    #[test]
    fn replayed_inputs_run_cleanly() {
        let mut header_then_status = vec![2u8];
        header_then_status.extend(0x100u64.to_le_bytes());
        header_then_status.extend(16u32.to_le_bytes());
        header_then_status.push(0);
        header_then_status.extend(0x200u64.to_le_bytes());
        header_then_status.extend(1u32.to_le_bytes());
        header_then_status.push(1);
        let mut max_len = vec![1u8];
        max_len.extend(u64::MAX.to_le_bytes());
        max_len.extend(u32::MAX.to_le_bytes());
        max_len.push(1);
        for input in [vec![], vec![15], header_then_status, max_len] {
            run_one(&input);
        }
    }
}
