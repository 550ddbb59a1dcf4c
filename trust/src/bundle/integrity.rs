//! Per-sector integrity for bundles made with `--integrity` (payload version 2): XTS is
//! malleable, so each guest-disk sector carries a MAC, checked on every read; a mismatch is
//! an error for that sector, never wrong data.
//!
//! # Tag region, payload version 2
//!
//! After the guest disk (at payload offset 3 MiB + disk bytes, rounded to 1 MiB) one
//! 32-byte entry per disk sector, 16 entries per 512-byte tag sector, entry *i* for disk
//! sector *i*: write generation u64 LE (8), tag (16), zeros (8). The tag sectors are
//! ordinary payload sectors (XTS under the master key), so cryptsetup and QEMU still read
//! the container.
//!
//! The tag of a sector is `AES_k(POLYVAL_h(s ‖ g ‖ C))`: POLYVAL (RFC 8452) over a block
//! holding the payload sector number `s` and the write generation `g` (u64 LE each), then
//! the sector's 512 bytes of ciphertext `C`; AES-128 under `k` turns that almost-universal
//! hash into a MAC. `h ‖ k` is HMAC-SHA256(master key, `"sealvm disk integrity v1"`). The
//! generation counts the sector's writes.
//!
//! What it does not do: replace a journal. Data and tags are written separately, so a
//! sector torn by a crash reads as an integrity error (never wrong data) until it is
//! written again; and a sector's older (ciphertext, entry) pair put back together verifies
//! (per-sector replay needs a hash tree).

use super::xts::SECTOR_SIZE;
use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes128;
use polyval::universal_hash::UniversalHash;
use polyval::Polyval;
use zeroize::Zeroizing;

/// Bytes of one tag entry.
pub const ENTRY_BYTES: usize = 32;
/// Tag entries per 512-byte tag sector.
pub const ENTRIES_PER_SECTOR: u64 = (SECTOR_SIZE / ENTRY_BYTES) as u64;

/// The MAC of one sector (see the module docs). Keys zeroized on drop.
pub struct SectorMac {
    hash_key: Zeroizing<[u8; 16]>,
    cipher: Aes128,
}

impl SectorMac {
    /// Keys the MAC from 32 bytes derived from the master key: POLYVAL key, then AES key.
    pub fn new(key: &[u8]) -> Self {
        let mut hash_key = Zeroizing::new([0u8; 16]);
        hash_key.copy_from_slice(&key[..16]);
        Self {
            hash_key,
            cipher: Aes128::new_from_slice(&key[16..32]).expect("a 16-byte AES key"),
        }
    }

    /// The tag of payload sector `sector` at write generation `generation` with ciphertext
    /// `ciphertext` (one sector).
    pub fn tag(&self, sector: u64, generation: u64, ciphertext: &[u8]) -> [u8; 16] {
        let mut hash = Polyval::new((&*self.hash_key).into());
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&sector.to_le_bytes());
        head[8..].copy_from_slice(&generation.to_le_bytes());
        hash.update(&[head.into()]);
        hash.update_padded(ciphertext);
        let mut block = hash.finalize();
        self.cipher.encrypt_block(&mut block);
        block.into()
    }
}

/// One sector's entry in the tag region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagEntry {
    /// How many times the sector was written.
    pub generation: u64,
    /// Its tag.
    pub tag: [u8; 16],
}

impl TagEntry {
    /// Reads entry `index` (within its tag sector) from `tag_sector`.
    pub fn read(tag_sector: &[u8], index: usize) -> Self {
        let at = index * ENTRY_BYTES;
        let mut generation = [0u8; 8];
        generation.copy_from_slice(&tag_sector[at..at + 8]);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&tag_sector[at + 8..at + 24]);
        Self {
            generation: u64::from_le_bytes(generation),
            tag,
        }
    }

    /// Writes this entry as entry `index` of `tag_sector`.
    pub fn write(&self, tag_sector: &mut [u8], index: usize) {
        let at = index * ENTRY_BYTES;
        tag_sector[at..at + 8].copy_from_slice(&self.generation.to_le_bytes());
        tag_sector[at + 8..at + 24].copy_from_slice(&self.tag);
        tag_sector[at + 24..at + 32].fill(0);
    }
}

/// Bytes of tag region for a disk of `disk_bytes`, rounded up to 1 MiB.
pub fn region_bytes(disk_bytes: u64) -> u64 {
    let sectors = disk_bytes / SECTOR_SIZE as u64;
    let tag_sectors = sectors.div_ceil(ENTRIES_PER_SECTOR);
    (tag_sectors * SECTOR_SIZE as u64).div_ceil(1 << 20) * (1 << 20)
}

/// Compares two tags in constant time.
pub fn tags_equal(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_binds_sector_generation_and_every_ciphertext_byte() {
        let mac = SectorMac::new(&[3u8; 32]);
        let data = vec![0x5au8; SECTOR_SIZE];
        let tag = mac.tag(7, 1, &data);
        assert_ne!(tag, mac.tag(8, 1, &data), "sector not bound");
        assert_ne!(tag, mac.tag(7, 2, &data), "generation not bound");
        for at in [0, 1, 255, 511] {
            let mut flipped = data.clone();
            flipped[at] ^= 1;
            assert_ne!(tag, mac.tag(7, 1, &flipped), "byte {at} not covered");
        }
        assert_ne!(
            tag,
            SectorMac::new(&[4u8; 32]).tag(7, 1, &data),
            "key not used"
        );
        assert_eq!(tag, mac.tag(7, 1, &data));
    }

    #[test]
    fn entries_round_trip_and_region_covers_the_disk() {
        let mut sector = [0xffu8; SECTOR_SIZE];
        let entry = TagEntry {
            generation: 9,
            tag: [1; 16],
        };
        entry.write(&mut sector, 15);
        assert_eq!(TagEntry::read(&sector, 15), entry);
        assert_eq!(region_bytes(8 << 20), 1 << 20);
        assert!(region_bytes(1 << 30) >= (1 << 30) / 512 * 32);
        assert!(tags_equal(&[2; 16], &[2; 16]) && !tags_equal(&[2; 16], &[3; 16]));
    }
}
