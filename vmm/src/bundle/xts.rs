//! Sector encryption for LUKS `aes-xts-plain64`: XTS with a 64-bit little-endian sector
//! number as the tweak (plain64), 512-byte sectors numbered from the start of the area.
//!
//! This module only transforms buffers in memory; it does no I/O and holds no plaintext.

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use xts_mode::{get_tweak_default, Xts128};

/// Size of one LUKS1 sector in bytes; the plain64 tweak counts these.
pub const SECTOR_SIZE: usize = 512;

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
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// An `aes-xts-plain64` cipher keyed with a master key. The AES key schedules are the only
/// copy of the key it keeps; they are dropped with it (the `aes` crate zeroizes them when
/// its `zeroize` feature is on, which the workspace enables).
pub struct SectorCipher {
    inner: Inner,
}

impl SectorCipher {
    /// Builds the cipher from a 32-byte (XTS-AES-128) or 64-byte (XTS-AES-256) key: the first
    /// half keys the data cipher, the second half the tweak cipher, as dm-crypt and QEMU do.
    pub fn new(key: &[u8]) -> Result<Self, XtsError> {
        let half = key.len() / 2;
        let inner = match key.len() {
            32 => Inner::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(&key[..half]).map_err(|_| XtsError::KeyLength(32))?,
                Aes128::new_from_slice(&key[half..]).map_err(|_| XtsError::KeyLength(32))?,
            ))),
            64 => Inner::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(&key[..half]).map_err(|_| XtsError::KeyLength(64))?,
                Aes256::new_from_slice(&key[half..]).map_err(|_| XtsError::KeyLength(64))?,
            ))),
            n => return Err(XtsError::KeyLength(n)),
        };
        Ok(Self { inner })
    }

    /// Encrypts `buf` in place; its first 512 bytes are sector `first_sector`.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        check_aligned(buf)?;
        let first = u128::from(first_sector);
        match &self.inner {
            Inner::Aes128(x) => x.encrypt_area(buf, SECTOR_SIZE, first, get_tweak_default),
            Inner::Aes256(x) => x.encrypt_area(buf, SECTOR_SIZE, first, get_tweak_default),
        }
        Ok(())
    }

    /// Decrypts `buf` in place; its first 512 bytes are sector `first_sector`.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        check_aligned(buf)?;
        let first = u128::from(first_sector);
        match &self.inner {
            Inner::Aes128(x) => x.decrypt_area(buf, SECTOR_SIZE, first, get_tweak_default),
            Inner::Aes256(x) => x.decrypt_area(buf, SECTOR_SIZE, first, get_tweak_default),
        }
        Ok(())
    }
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
