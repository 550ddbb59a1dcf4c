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
    /// Powers of the hash key for the four-block CLMUL path, when the CPU has PCLMULQDQ.
    #[cfg(target_arch = "x86_64")]
    powers: Option<Zeroizing<[[u8; 16]; 4]>>,
}

impl SectorMac {
    /// Keys the MAC from 32 bytes derived from the master key: POLYVAL key, then AES key.
    pub fn new(key: &[u8]) -> Self {
        let mut hash_key = Zeroizing::new([0u8; 16]);
        hash_key.copy_from_slice(&key[..16]);
        Self {
            #[cfg(target_arch = "x86_64")]
            powers: clmul::detected().then(|| {
                // SAFETY: PCLMULQDQ was detected just above.
                Zeroizing::new(unsafe { clmul::powers(&hash_key) })
            }),
            hash_key,
            cipher: Aes128::new_from_slice(&key[16..32]).expect("a 16-byte AES key"),
        }
    }

    /// POLYVAL over `head` then `data` (a multiple of 64 bytes on the fast path).
    fn polyval(&self, head: &[u8; 16], data: &[u8]) -> [u8; 16] {
        #[cfg(target_arch = "x86_64")]
        if let Some(powers) = &self.powers {
            if data.len().is_multiple_of(64) {
                // SAFETY: `powers` exists only when PCLMULQDQ was detected.
                return unsafe { clmul::hash(powers, head, data) };
            }
        }
        let mut hash = Polyval::new((&*self.hash_key).into());
        hash.update(&[(*head).into()]);
        hash.update_padded(data);
        hash.finalize().into()
    }

    /// The tag of payload sector `sector` at write generation `generation` with ciphertext
    /// `ciphertext` (one sector).
    pub fn tag(&self, sector: u64, generation: u64, ciphertext: &[u8]) -> [u8; 16] {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&sector.to_le_bytes());
        head[8..].copy_from_slice(&generation.to_le_bytes());
        let mut block = self.polyval(&head, ciphertext).into();
        self.cipher.encrypt_block(&mut block);
        block.into()
    }
}

/// POLYVAL on PCLMULQDQ four blocks at a time: the four products with H^4..H^1 (powers in
/// POLYVAL's dot domain) are summed unreduced and reduced once, so the multiplies of four
/// blocks run side by side instead of one long dependency chain. Cross-checked against the
/// `polyval` crate in the tests.
#[cfg(target_arch = "x86_64")]
mod clmul {
    use core::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_loadu_si128, _mm_set_epi64x, _mm_shuffle_epi32,
        _mm_slli_si128, _mm_srli_si128, _mm_storeu_si128, _mm_xor_si128,
    };

    /// True when the CPU has PCLMULQDQ.
    pub(super) fn detected() -> bool {
        std::is_x86_feature_detected!("pclmulqdq")
    }

    /// The 256-bit carry-less product of `a` and `b` as (low, high).
    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    unsafe fn wide(a: __m128i, b: __m128i) -> (__m128i, __m128i) {
        let lo = _mm_clmulepi64_si128::<0x00>(a, b);
        let hi = _mm_clmulepi64_si128::<0x11>(a, b);
        let mid = _mm_xor_si128(
            _mm_clmulepi64_si128::<0x01>(a, b),
            _mm_clmulepi64_si128::<0x10>(a, b),
        );
        (
            _mm_xor_si128(lo, _mm_slli_si128::<8>(mid)),
            _mm_xor_si128(hi, _mm_srli_si128::<8>(mid)),
        )
    }

    /// (low, high) · x^-128 modulo x^128 + x^127 + x^126 + x^121 + 1 (POLYVAL's reduction,
    /// two folds by the constant 0xc2 << 56).
    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    unsafe fn reduce(lo: __m128i, hi: __m128i) -> __m128i {
        let poly = _mm_set_epi64x(0xc200_0000_0000_0000u64 as i64, 0);
        let t = _mm_clmulepi64_si128::<0x10>(lo, poly);
        let lo = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(lo), t);
        let t = _mm_clmulepi64_si128::<0x10>(lo, poly);
        let lo = _mm_xor_si128(_mm_shuffle_epi32::<0x4e>(lo), t);
        _mm_xor_si128(lo, hi)
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq")]
    unsafe fn dot(a: __m128i, b: __m128i) -> __m128i {
        // SAFETY: PCLMULQDQ is this function's own precondition.
        unsafe {
            let (lo, hi) = wide(a, b);
            reduce(lo, hi)
        }
    }

    /// H, H², H³, H⁴ in the dot domain, as bytes.
    ///
    /// # Safety
    /// The CPU must support PCLMULQDQ.
    #[target_feature(enable = "pclmulqdq")]
    pub(super) unsafe fn powers(h: &[u8; 16]) -> [[u8; 16]; 4] {
        // SAFETY: 16-byte loads and stores of 16-byte arrays; PCLMULQDQ is the caller's
        // promise.
        unsafe {
            let h1 = _mm_loadu_si128(h.as_ptr().cast());
            let h2 = dot(h1, h1);
            let h3 = dot(h2, h1);
            let h4 = dot(h3, h1);
            let mut out = [[0u8; 16]; 4];
            for (o, v) in out.iter_mut().zip([h1, h2, h3, h4]) {
                _mm_storeu_si128(o.as_mut_ptr().cast(), v);
            }
            out
        }
    }

    /// POLYVAL over `head` then `data` (whole 64-byte groups).
    ///
    /// # Safety
    /// The CPU must support PCLMULQDQ; `data.len()` must be a multiple of 64.
    #[target_feature(enable = "pclmulqdq")]
    pub(super) unsafe fn hash(powers: &[[u8; 16]; 4], head: &[u8; 16], data: &[u8]) -> [u8; 16] {
        // SAFETY: every load reads a 16-byte array or a 16-byte chunk of `data` from
        // `chunks_exact`; PCLMULQDQ is the caller's promise.
        unsafe {
            let p = powers.map(|k| _mm_loadu_si128(k.as_ptr().cast::<__m128i>()));
            let mut acc = dot(_mm_loadu_si128(head.as_ptr().cast()), p[0]);
            for group in data.chunks_exact(64) {
                let block = |i: usize| _mm_loadu_si128(group[16 * i..].as_ptr().cast::<__m128i>());
                let (mut lo, mut hi) = wide(_mm_xor_si128(acc, block(0)), p[3]);
                for (i, power) in [(1, p[2]), (2, p[1]), (3, p[0])] {
                    let (l, h) = wide(block(i), power);
                    lo = _mm_xor_si128(lo, l);
                    hi = _mm_xor_si128(hi, h);
                }
                acc = reduce(lo, hi);
            }
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), acc);
            out
        }
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
    fn the_clmul_polyval_matches_the_polyval_crate() {
        let mac = SectorMac::new(&(0..32).collect::<Vec<u8>>());
        #[cfg(target_arch = "x86_64")]
        if mac.powers.is_none() {
            eprintln!("SKIP (clmul path): no PCLMULQDQ here");
            return;
        }
        let mut seed = 1u64;
        for len in [0usize, 64, 512, 4096] {
            for _ in 0..20 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (seed >> 33) as u8
                    })
                    .collect();
                let head = [(seed >> 40) as u8; 16];
                let mut reference = Polyval::new((&*mac.hash_key).into());
                reference.update(&[head.into()]);
                reference.update_padded(&data);
                let expected: [u8; 16] = reference.finalize().into();
                assert_eq!(mac.polyval(&head, &data), expected, "len {len}");
            }
        }
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
