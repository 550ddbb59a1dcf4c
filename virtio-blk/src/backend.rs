//! What a virtio-blk request runs against: the [`BlockBackend`] trait, and [`RawFile`], a
//! raw image file with positioned I/O and fdatasync.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sealvm_os::lock::{lock, LockError, LockMode, Wait};

/// Storage a virtio-blk device serves. Offsets and lengths are in bytes and already checked
/// against the capacity by the request parser. Methods take `&self` so that several queues
/// can share one backend; implementations do their own locking.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes (a multiple of 512).
    fn capacity_bytes(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset`; durable only after [`BlockBackend::flush`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the storage `len` bytes at `offset` are unused; reading them back may return
    /// anything. Unsupported by default.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Makes `len` bytes at `offset` read back as zeroes, freeing space when `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = unmap;
        write_zero_buffers(self, offset, len)
    }
    /// The id returned for `VIRTIO_BLK_T_GET_ID` (up to 20 bytes).
    fn device_id(&self) -> &[u8];
    /// The cache mode the driver chose last (true: write-through), if the backend keeps it
    /// across restarts of the process; a frontend that reconnects does not say it again.
    fn saved_write_through(&self) -> Option<bool> {
        None
    }
    /// Keeps the driver's cache mode for [`BlockBackend::saved_write_through`]; by default
    /// it is not kept.
    fn save_write_through(&self, write_through: bool) -> io::Result<()> {
        let _ = write_through;
        Ok(())
    }
}

/// Zeroes `len` bytes at `offset` by writing zero-filled buffers of up to 1 MiB: the way
/// to zero a range on storage that has no cheaper one.
pub fn write_zero_buffers<B: BlockBackend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64);
        backend.write_at(offset + done, &zeroes[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Errors opening a raw image.
#[derive(Debug, thiserror::Error)]
pub enum RawFileError {
    /// The file could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image's lock.
    #[error("disk image {path} is in use by another process (it holds the image's lock)")]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// The image size is not a whole number of sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    NotSectorMultiple {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// A raw disk image: positioned reads and writes, fdatasync for flush, hole punching for
/// discard. It holds an exclusive (or, read-only, shared) `flock` while open, so two VMs
/// never write the same image.
pub struct RawFile {
    file: File,
    capacity: u64,
    id: Vec<u8>,
}

impl RawFile {
    /// Opens and locks `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, RawFileError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| RawFileError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let mode = if read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        lock(&file, mode, Wait::NoWait).map_err(|error| match error {
            LockError::Held => RawFileError::Locked {
                path: path.to_path_buf(),
            },
            LockError::Io(source) => RawFileError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let size = file
            .metadata()
            .map_err(|source| RawFileError::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size % crate::SECTOR_SIZE != 0 {
            return Err(RawFileError::NotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut id = name.unwrap_or_default().into_bytes();
        id.truncate(crate::DEVICE_ID_LEN);
        Ok(RawFile {
            file,
            capacity: size,
            id,
        })
    }
}

impl BlockBackend for RawFile {
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.punch_hole(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap && self.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        write_zero_buffers(self, offset, len)
    }

    fn device_id(&self) -> &[u8] {
        &self.id
    }
}

impl RawFile {
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
            i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        );
        // SAFETY: fallocate only reads its integer arguments and the descriptor `file` owns.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
