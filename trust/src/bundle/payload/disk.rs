//! The guest disk of a bundle: sector reads and writes through XTS, with the per-sector
//! tags of `--integrity` bundles ([`super::super::integrity`]), and filling a new bundle's
//! disk. Split from `payload` so that the layout and its regions stay in one file and the
//! I/O path in another.

use super::{Bundle, BundleError, DISK_OFFSET, MIB};
use crate::bundle::integrity::{self, TagEntry};
use crate::bundle::volume::VolumeError;
use crate::bundle::xts::SECTOR_SIZE;
use std::fs::File;
use zeroize::Zeroizing;

impl Bundle {
    /// Reads guest-disk bytes at `offset` (both sector aligned), decrypting them. In an
    /// `--integrity` bundle every sector's tag is checked first; a sector that fails is
    /// [`BundleError::DiskIntegrity`] and nothing of the request is returned.
    pub fn read_disk(&self, offset: u64, buf: &mut [u8]) -> Result<(), BundleError> {
        self.check_disk(offset, buf.len())?;
        let first = (DISK_OFFSET + offset) / SECTOR_SIZE as u64;
        let Some((mac, _)) = &self.integrity else {
            return Ok(self.volume.read_sectors(first, buf)?);
        };
        let disk_sector = offset / SECTOR_SIZE as u64;
        let count = (buf.len() / SECTOR_SIZE) as u64;
        let (_, tags) = self.read_tags(disk_sector, count)?;
        let base = disk_sector % integrity::ENTRIES_PER_SECTOR;
        self.volume.read_sectors_checked(first, buf, |ciphertext| {
            for (i, sector) in ciphertext.chunks_exact(SECTOR_SIZE).enumerate() {
                let at = base as usize + i;
                let entry = TagEntry::read(
                    &tags[at / 16 * SECTOR_SIZE..(at / 16 + 1) * SECTOR_SIZE],
                    at % 16,
                );
                let expected = mac.tag(first + i as u64, entry.generation, sector);
                if !integrity::tags_equal(&expected, &entry.tag) {
                    return Err(BundleError::DiskIntegrity {
                        sector: disk_sector + i as u64,
                    });
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Writes guest-disk bytes at `offset` (both sector aligned), encrypting them; in an
    /// `--integrity` bundle also each sector's tag, with its write generation advanced.
    pub fn write_disk(&self, offset: u64, data: &[u8]) -> Result<(), BundleError> {
        self.check_disk(offset, data.len())?;
        let first = (DISK_OFFSET + offset) / SECTOR_SIZE as u64;
        let Some((mac, lock)) = &self.integrity else {
            return Ok(self.volume.write_sectors(first, data)?);
        };
        // Neighbouring sectors share tag sectors: one writer at a time per bundle.
        let _guard = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let disk_sector = offset / SECTOR_SIZE as u64;
        let count = (data.len() / SECTOR_SIZE) as u64;
        let (tag_first, mut tags) = self.read_tags(disk_sector, count)?;
        let base = disk_sector % integrity::ENTRIES_PER_SECTOR;
        self.volume
            .write_sectors_observed(first, data, |ciphertext| {
                for (i, sector) in ciphertext.chunks_exact(SECTOR_SIZE).enumerate() {
                    let at = base as usize + i;
                    let slice = &mut tags[at / 16 * SECTOR_SIZE..(at / 16 + 1) * SECTOR_SIZE];
                    let mut entry = TagEntry::read(slice, at % 16);
                    entry.generation = entry.generation.wrapping_add(1);
                    entry.tag = mac.tag(first + i as u64, entry.generation, sector);
                    entry.write(slice, at % 16);
                }
            })?;
        Ok(self.volume.write_sectors(tag_first, &tags)?)
    }

    /// The tag sectors covering disk sectors `disk_sector..disk_sector + count`: the payload
    /// sector of the first, and their contents.
    fn read_tags(&self, disk_sector: u64, count: u64) -> Result<(u64, Vec<u8>), BundleError> {
        let region = (DISK_OFFSET + self.superblock.disk_bytes) / SECTOR_SIZE as u64;
        let first_tag = disk_sector / integrity::ENTRIES_PER_SECTOR;
        let last_tag = (disk_sector + count.max(1) - 1) / integrity::ENTRIES_PER_SECTOR;
        let mut tags = vec![0u8; ((last_tag - first_tag + 1) as usize) * SECTOR_SIZE];
        self.volume.read_sectors(region + first_tag, &mut tags)?;
        Ok((region + first_tag, tags))
    }

    /// True for an `--integrity` bundle.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    fn check_disk(&self, offset: u64, len: usize) -> Result<(), BundleError> {
        let end = offset.saturating_add(len as u64);
        if !offset.is_multiple_of(SECTOR_SIZE as u64) || end > self.superblock.disk_bytes {
            return Err(VolumeError::OutOfRange {
                first: offset / SECTOR_SIZE as u64,
                end: end.div_ceil(SECTOR_SIZE as u64),
                sectors: self.superblock.disk_bytes / SECTOR_SIZE as u64,
            }
            .into());
        }
        Ok(())
    }

    pub(super) fn import_disk(&self, raw: &mut File) -> Result<(), BundleError> {
        use std::io::Read;
        let mut buf = Zeroizing::new(vec![0u8; MIB as usize]);
        let mut offset = 0;
        loop {
            buf.fill(0);
            let mut filled = 0;
            while filled < buf.len() {
                let n = raw
                    .read(&mut buf[filled..])
                    .map_err(|source| BundleError::File {
                        path: "raw disk".into(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            self.write_disk(offset, &buf)?;
            offset += MIB;
        }
        while offset < self.superblock.disk_bytes {
            buf.fill(0);
            self.write_disk(offset, &buf)?;
            offset += MIB;
        }
        Ok(())
    }

    pub(super) fn zero_disk(&self) -> Result<(), BundleError> {
        let zeros = vec![0u8; MIB as usize];
        let mut offset = 0;
        while offset < self.superblock.disk_bytes {
            self.write_disk(offset, &zeros)?;
            offset += MIB;
        }
        Ok(())
    }
}
