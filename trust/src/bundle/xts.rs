//! Sector encryption for LUKS `aes-xts-plain64`: XTS with a 64-bit little-endian sector
//! number as the tweak (plain64), 512-byte sectors numbered from the start of the area.
//!
//! This module only transforms buffers in memory; it does no I/O and holds no plaintext.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};

#[cfg(target_arch = "x86_64")]
mod aesni;

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

/// Key schedules for the data and the tweak cipher, in that order.
enum Inner {
    /// XTS-AES-128 on AES-NI intrinsics, when the CPU has AES-NI and AVX.
    #[cfg(target_arch = "x86_64")]
    Aes128Ni(Box<aesni::Xts128>),
    /// XTS-AES-128 on the `aes` crate (which picks AES-NI or software itself).
    Aes128(Box<(Aes128, Aes128)>),
    /// XTS-AES-256 on the `aes` crate.
    Aes256(Box<(Aes256, Aes256)>),
}

/// An `aes-xts-plain64` cipher keyed with a master key. The AES key schedules are the only
/// copy of the key it keeps, and they are zeroized on drop (by the `aes` crate's `zeroize`
/// feature, or by the AES-NI path's own `Drop`).
///
/// With a 32-byte key on an x86_64 CPU with AES-NI and AVX, XTS-AES-128 runs on the
/// intrinsics in `aesni`, which keep each batch of blocks in registers from whitening
/// through AES to whitening. Otherwise XTS is computed here around the `aes` crate rather
/// than through `xts-mode`'s per-block loop, so that the blocks of a group of sectors go to
/// AES in one `encrypt_blocks` call. The unit tests check both paths against `xts-mode` and
/// IEEE 1619.
pub struct SectorCipher {
    inner: Inner,
}

impl SectorCipher {
    /// Builds the cipher from a 32-byte (XTS-AES-128) or 64-byte (XTS-AES-256) key: the first
    /// half keys the data cipher, the second half the tweak cipher, as dm-crypt and QEMU do.
    pub fn new(key: &[u8]) -> Result<Self, XtsError> {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = <&[u8; 32]>::try_from(key).ok().and_then(aesni::Xts128::new) {
            return Ok(Self {
                inner: Inner::Aes128Ni(keys),
            });
        }
        Self::portable(key)
    }

    /// Like [`SectorCipher::new`], but always on the `aes` crate (the tests compare paths).
    fn portable(key: &[u8]) -> Result<Self, XtsError> {
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
            #[cfg(target_arch = "x86_64")]
            Inner::Aes128Ni(k) => k.encrypt(buf, first_sector),
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
            #[cfg(target_arch = "x86_64")]
            Inner::Aes128Ni(k) => k.decrypt(buf, first_sector),
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
/// Up to eight sectors go through AES in one call so AES-NI can pipeline them. Sector
/// numbers wrap modulo 2^64, as plain64's 64-bit tweak does in dm-crypt.
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
            *t = Block::from(u128::from(sector.wrapping_add(k as u64)).to_le_bytes());
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
        sector = sector.wrapping_add(sectors as u64);
    }
    // `blocks` only ever holds P xor T (whitened by the secret tweak), never bare plaintext,
    // and lives on this stack frame; the caller's buffer is where plaintext lives and the
    // caller owns its zeroizing. Volatile-zeroizing 4 KiB here per call halved throughput.
}

fn check_aligned(buf: &[u8]) -> Result<(), XtsError> {
    if !buf.len().is_multiple_of(SECTOR_SIZE) {
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

    /// Deterministic filler (xorshift64*) for test keys and buffers.
    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    /// `xts-mode` one sector at a time, with plain64 wrapping like dm-crypt's.
    fn reference(key: &[u8], buf: &mut [u8], first_sector: u64, decrypt: bool) {
        use xts_mode::{get_tweak_default, Xts128};
        fn run<C>(x: Xts128<C>, buf: &mut [u8], first_sector: u64, decrypt: bool)
        where
            C: BlockEncrypt + BlockDecrypt + aes::cipher::BlockCipher,
            C: aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
        {
            for (k, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                let tweak = get_tweak_default(first_sector.wrapping_add(k as u64).into());
                if decrypt {
                    x.decrypt_sector(sector, tweak);
                } else {
                    x.encrypt_sector(sector, tweak);
                }
            }
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        match key.len() {
            32 => run(
                Xts128::new(
                    Aes128::new_from_slice(k1).unwrap(),
                    Aes128::new_from_slice(k2).unwrap(),
                ),
                buf,
                first_sector,
                decrypt,
            ),
            64 => run(
                Xts128::new(
                    Aes256::new_from_slice(k1).unwrap(),
                    Aes256::new_from_slice(k2).unwrap(),
                ),
                buf,
                first_sector,
                decrypt,
            ),
            n => panic!("no XTS key of {n} bytes"),
        }
    }

    #[test]
    fn aes_ni_path_is_taken_when_the_cpu_has_it() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("avx") {
            let cipher = SectorCipher::new(&[1; 32]).unwrap();
            let Inner::Aes128Ni(keys) = &cipher.inner else {
                panic!("AES-NI not taken")
            };
            // The widest path the CPU has: VAES where it exists.
            assert_eq!(
                keys.uses_vaes(),
                std::is_x86_feature_detected!("vaes") && std::is_x86_feature_detected!("avx2")
            );
        }
        let cipher = SectorCipher::new(&[1; 64]).unwrap();
        assert!(matches!(cipher.inner, Inner::Aes256(_)));
    }

    #[test]
    fn every_path_matches_xts_mode_on_many_buffers_and_sector_numbers() {
        let firsts = [
            0,
            1,
            77,
            (1 << 32) - 3,
            1 << 32,
            (1 << 63) - 5,
            1 << 63,
            u64::MAX - 15,
            u64::MAX - 7,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut seed = 1;
        for key_len in [32, 64] {
            for round in 0..4 {
                seed += 1;
                let key = pseudo_random(seed, key_len);
                let mut ciphers = vec![
                    ("new", SectorCipher::new(&key).unwrap()),
                    ("portable", SectorCipher::portable(&key).unwrap()),
                ];
                #[cfg(target_arch = "x86_64")]
                if let Some(keys) = <&[u8; 32]>::try_from(&key[..])
                    .ok()
                    .and_then(|k| aesni::Xts128::with_vaes(k, false))
                {
                    ciphers.push((
                        "aes-ni without vaes",
                        SectorCipher {
                            inner: Inner::Aes128Ni(keys),
                        },
                    ));
                }
                for sectors in 1..=16 {
                    let first = firsts[(sectors + round) % firsts.len()];
                    seed += 1;
                    let plain = pseudo_random(seed, sectors * SECTOR_SIZE);
                    let mut expected = plain.clone();
                    reference(&key, &mut expected, first, false);
                    for (path, cipher) in &ciphers {
                        let what =
                            format!("{path}, {key_len}-byte key, {sectors} sectors from {first}");
                        let mut buf = plain.clone();
                        cipher.encrypt_sectors(&mut buf, first).unwrap();
                        assert!(buf == expected, "encrypt: {what}");
                        // Decrypt arbitrary ciphertext too, not only our own output.
                        let mut buf = plain.clone();
                        let mut expected_plain = plain.clone();
                        reference(&key, &mut expected_plain, first, true);
                        cipher.decrypt_sectors(&mut buf, first).unwrap();
                        assert!(buf == expected_plain, "decrypt: {what}");
                        cipher.encrypt_sectors(&mut buf, first).unwrap();
                        assert!(buf == plain, "round trip: {what}");
                    }
                }
            }
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
