//! The decrypted, sector-addressed view of a LUKS1 payload: reads decrypt and writes
//! encrypt per 512-byte sector on the fly, so plaintext only ever exists in the caller's
//! buffers, never in the file.

use super::luks1::Header;
use super::xts::{SectorCipher, XtsError, SECTOR_SIZE};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Errors from sector I/O on the encrypted payload.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request reaches past the end of the payload.
    #[error("sectors {first}..{end} are outside the payload of {sectors} sectors")]
    OutOfRange {
        /// First sector requested.
        first: u64,
        /// One past the last sector requested.
        end: u64,
        /// Payload size in sectors.
        sectors: u64,
    },
    /// Reading or writing the container file failed.
    #[error("cannot {what} payload sectors at {first}")]
    Io {
        /// "read", "write" or "sync".
        what: &'static str,
        /// First sector of the request.
        first: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The buffer is not whole sectors, or the key is malformed.
    #[error("XTS cipher")]
    Xts(#[from] XtsError),
}

/// An open LUKS1 payload. Sector numbers are relative to the payload start, which is also
/// the plain64 tweak, so QEMU and dm-crypt see the same bytes.
pub struct EncryptedVolume {
    file: File,
    cipher: SectorCipher,
    payload_offset: u64,
    sectors: u64,
}

impl EncryptedVolume {
    /// Wraps `file` whose header is `header`, using the unlocked `master_key`. The payload runs
    /// from the header's payload offset to the end of the file.
    pub fn new(file: File, header: &Header, master_key: &[u8]) -> Result<Self, VolumeError> {
        let len = file
            .metadata()
            .map_err(|source| VolumeError::Io {
                what: "stat",
                first: 0,
                source,
            })?
            .len();
        let payload_offset = header.payload_offset_bytes();
        Ok(Self {
            file,
            cipher: SectorCipher::new(master_key)?,
            payload_offset,
            sectors: len.saturating_sub(payload_offset) / SECTOR_SIZE as u64,
        })
    }

    /// Payload size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Reads and decrypts whole sectors starting at `first` into `buf`.
    pub fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_range(first, buf.len())?;
        self.file
            .read_exact_at(buf, self.payload_offset + first * SECTOR_SIZE as u64)
            .map_err(|source| VolumeError::Io {
                what: "read",
                first,
                source,
            })?;
        self.cipher.decrypt_sectors(buf, first)?;
        Ok(())
    }

    /// Encrypts `data` (whole sectors) into a scratch buffer and writes it at `first`. The
    /// caller's plaintext is left as it was.
    pub fn write_sectors(&self, first: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_range(first, data.len())?;
        let mut scratch = zeroize::Zeroizing::new(data.to_vec());
        self.cipher.encrypt_sectors(&mut scratch, first)?;
        self.file
            .write_all_at(&scratch, self.payload_offset + first * SECTOR_SIZE as u64)
            .map_err(|source| VolumeError::Io {
                what: "write",
                first,
                source,
            })
    }

    /// Reads whole sectors at `first`, shows their ciphertext to `check`, and decrypts them
    /// into `buf` only when it accepts (integrity-checked reads).
    pub fn read_sectors_checked<E: From<VolumeError>>(
        &self,
        first: u64,
        buf: &mut [u8],
        check: impl FnOnce(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.check_range(first, buf.len())?;
        self.file
            .read_exact_at(buf, self.payload_offset + first * SECTOR_SIZE as u64)
            .map_err(|source| VolumeError::Io {
                what: "read",
                first,
                source,
            })?;
        check(buf)?;
        self.cipher
            .decrypt_sectors(buf, first)
            .map_err(VolumeError::from)?;
        Ok(())
    }

    /// [`Self::write_sectors`] that shows the ciphertext to `observe` before writing it
    /// (integrity tags are computed over ciphertext).
    pub fn write_sectors_observed(
        &self,
        first: u64,
        data: &[u8],
        observe: impl FnOnce(&[u8]),
    ) -> Result<(), VolumeError> {
        self.check_range(first, data.len())?;
        let mut scratch = zeroize::Zeroizing::new(data.to_vec());
        self.cipher.encrypt_sectors(&mut scratch, first)?;
        observe(&scratch);
        self.file
            .write_all_at(&scratch, self.payload_offset + first * SECTOR_SIZE as u64)
            .map_err(|source| VolumeError::Io {
                what: "write",
                first,
                source,
            })
    }

    /// Flushes written sectors to stable storage (fdatasync).
    pub fn sync(&self) -> Result<(), VolumeError> {
        self.file.sync_data().map_err(|source| VolumeError::Io {
            what: "sync",
            first: 0,
            source,
        })
    }

    fn check_range(&self, first: u64, len: usize) -> Result<(), VolumeError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(XtsError::NotSectorAligned(len).into());
        }
        let end = first.saturating_add((len / SECTOR_SIZE) as u64);
        if end > self.sectors {
            return Err(VolumeError::OutOfRange {
                first,
                end,
                sectors: self.sectors,
            });
        }
        Ok(())
    }
}
