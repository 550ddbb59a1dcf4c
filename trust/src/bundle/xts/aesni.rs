//! XTS-AES-128 on AES-NI, written with `core::arch` intrinsics.
//!
//! The `aes` crate enciphers a batch of blocks fast, but XTS around it (tweak doubling,
//! whitening before and after, copies between the caller's buffer and the batch) cost more
//! than AES itself. Here each batch of eight blocks is loaded once, whitened, enciphered
//! with the eight blocks interleaved so that both AES units stay busy, whitened again and
//! stored once.
//!
//! Where the CPU has VAES (with AVX2), the same loop runs on 256-bit registers holding two
//! blocks each ([`xts_vaes`]), so one AES instruction does two blocks' rounds.
//!
//! AES-NI and AVX (and VAES and AVX2) are detected at run time by [`Xts128::new`], and an
//! [`Xts128`] exists only once they have been, which is what makes the calls into the
//! `#[target_feature]` functions below sound.

use super::{BLOCKS_PER_SECTOR, SECTOR_SIZE};
use core::arch::x86_64::{
    __m128i, __m256i, _mm256_aesdec_epi128, _mm256_aesdeclast_epi128, _mm256_aesenc_epi128,
    _mm256_aesenclast_epi128, _mm256_broadcastsi128_si256, _mm256_loadu_si256, _mm256_storeu_si256,
    _mm256_xor_si256, _mm_aesdec_si128, _mm_aesdeclast_si128, _mm_aesenc_si128,
    _mm_aesenclast_si128, _mm_aesimc_si128, _mm_aeskeygenassist_si128, _mm_loadu_si128,
    _mm_set_epi64x, _mm_shuffle_epi32, _mm_slli_si128, _mm_storeu_si128, _mm_xor_si128,
};
use core::arch::x86_64::{
    _mm256_bslli_epi128, _mm256_clmulepi64_epi128, _mm256_set1_epi64x, _mm256_slli_epi64,
    _mm256_srl_epi64,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Blocks enciphered side by side: enough to cover the latency of `aesenc` on both units.
const LANES: usize = 8;
/// Round keys of AES-128: the initial whitening key and one per round.
const ROUND_KEYS: usize = 11;

/// One AES-128 key schedule, kept as bytes so that it zeroizes like any byte array.
type Schedule = [[u8; 16]; ROUND_KEYS];

/// XTS-AES-128 key schedules for AES-NI: the data key for encryption and (in the form
/// `aesdec` wants) for decryption, and the tweak key for encryption. Zeroized on drop.
pub(super) struct Xts128 {
    data_enc: Schedule,
    data_dec: Schedule,
    tweak_enc: Schedule,
    /// The CPU has VAES, VPCLMULQDQ and AVX2: two blocks per AES instruction (see
    /// [`xts_vaes`]).
    vaes: bool,
}

impl Xts128 {
    /// Expands the two 16-byte halves of an XTS-AES-128 key (data key first), or returns
    /// `None` when this CPU lacks AES-NI or AVX.
    pub(super) fn new(key: &[u8; 32]) -> Option<Box<Self>> {
        Self::with_vaes(key, true)
    }

    /// [`Xts128::new`], taking the VAES path only when `allow_vaes` and the CPU has it (the
    /// tests run both paths).
    pub(super) fn with_vaes(key: &[u8; 32], allow_vaes: bool) -> Option<Box<Self>> {
        if !(std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("avx")) {
            return None;
        }
        let vaes = allow_vaes
            && std::is_x86_feature_detected!("vaes")
            && std::is_x86_feature_detected!("vpclmulqdq")
            && std::is_x86_feature_detected!("avx2");
        let mut keys = Box::new(Self {
            data_enc: [[0; 16]; ROUND_KEYS],
            data_dec: [[0; 16]; ROUND_KEYS],
            tweak_enc: [[0; 16]; ROUND_KEYS],
            vaes,
        });
        let Self {
            data_enc,
            data_dec,
            tweak_enc,
            ..
        } = &mut *keys;
        // SAFETY: AES-NI was detected just above, which is all these functions require.
        unsafe {
            expand(&key[..16], data_enc);
            invert(data_enc, data_dec);
            expand(&key[16..], tweak_enc);
        }
        Some(keys)
    }

    /// True when this cipher runs on VAES.
    #[cfg(test)]
    pub(super) fn uses_vaes(&self) -> bool {
        self.vaes
    }

    /// Encrypts whole sectors in place; `buf.len()` must be a multiple of [`SECTOR_SIZE`].
    pub(super) fn encrypt(&self, buf: &mut [u8], first_sector: u64) {
        if self.vaes {
            // SAFETY: `vaes` is set only when VAES, VPCLMULQDQ, AVX2 and AES-NI were detected.
            unsafe { xts_vaes::<false>(&self.data_enc, &self.tweak_enc, buf, first_sector) }
        } else {
            // SAFETY: `self` exists only after `new` detected AES-NI and AVX on this CPU.
            unsafe { xts::<false>(&self.data_enc, &self.tweak_enc, buf, first_sector) }
        }
    }

    /// Decrypts whole sectors in place; `buf.len()` must be a multiple of [`SECTOR_SIZE`].
    pub(super) fn decrypt(&self, buf: &mut [u8], first_sector: u64) {
        if self.vaes {
            // SAFETY: `vaes` is set only when VAES, VPCLMULQDQ, AVX2 and AES-NI were detected.
            unsafe { xts_vaes::<true>(&self.data_dec, &self.tweak_enc, buf, first_sector) }
        } else {
            // SAFETY: `self` exists only after `new` detected AES-NI and AVX on this CPU.
            unsafe { xts::<true>(&self.data_dec, &self.tweak_enc, buf, first_sector) }
        }
    }
}

impl Drop for Xts128 {
    fn drop(&mut self) {
        self.data_enc.zeroize();
        self.data_dec.zeroize();
        self.tweak_enc.zeroize();
    }
}

impl ZeroizeOnDrop for Xts128 {}

/// Expands a 16-byte AES-128 key (FIPS 197 §5.2) into `out`.
///
/// # Safety
/// The CPU must support AES-NI.
#[target_feature(enable = "aes")]
unsafe fn expand(key: &[u8], out: &mut Schedule) {
    assert_eq!(key.len(), 16, "AES-128 key");
    // SAFETY: `key` holds 16 bytes (asserted) and every `out[i]` is 16 bytes, so each
    // unaligned load and store stays inside its array; AES-NI is the caller's promise.
    unsafe {
        let mut k = _mm_loadu_si128(key.as_ptr().cast());
        _mm_storeu_si128(out[0].as_mut_ptr().cast(), k);
        macro_rules! round {
            ($i:literal, $rcon:literal) => {
                // Word 3 rotated, substituted and xored with rcon, broadcast to all words,
                // then xored into the prefix-xor of the previous round key's words.
                let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k));
                k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
                k = _mm_xor_si128(k, _mm_slli_si128::<8>(k));
                k = _mm_xor_si128(k, t);
                _mm_storeu_si128(out[$i].as_mut_ptr().cast(), k);
            };
        }
        round!(1, 0x01);
        round!(2, 0x02);
        round!(3, 0x04);
        round!(4, 0x08);
        round!(5, 0x10);
        round!(6, 0x20);
        round!(7, 0x40);
        round!(8, 0x80);
        round!(9, 0x1b);
        round!(10, 0x36);
    }
}

/// Turns an encryption schedule into the one the equivalent inverse cipher uses with
/// `aesdec`: reversed, with InvMixColumns applied to the inner round keys.
///
/// # Safety
/// The CPU must support AES-NI.
#[target_feature(enable = "aes")]
unsafe fn invert(enc: &Schedule, dec: &mut Schedule) {
    // SAFETY: every load and store is of one 16-byte array element; AES-NI is the caller's
    // promise.
    unsafe {
        dec[0] = enc[ROUND_KEYS - 1];
        dec[ROUND_KEYS - 1] = enc[0];
        for i in 1..ROUND_KEYS - 1 {
            let k = _mm_loadu_si128(enc[ROUND_KEYS - 1 - i].as_ptr().cast());
            _mm_storeu_si128(dec[i].as_mut_ptr().cast(), _mm_aesimc_si128(k));
        }
    }
}

/// XTS over the whole sectors of `buf`: per sector, T = E_tweak(plain64(sector)); block j
/// becomes E_data(P xor T·α^j) xor T·α^j. `data` is the encryption schedule, or with
/// `DECRYPT` the decryption one; the tweak is always encrypted. Sector numbers wrap
/// modulo 2^64. Trailing bytes short of a whole sector are left alone (callers check).
///
/// AVX is enabled only for its three-operand encodings of the same SSE instructions, which
/// spare register copies. Tweak doubling runs on the integer units, which are otherwise
/// idle here, rather than on the vector units that AES keeps busy.
///
/// # Safety
/// The CPU must support AES-NI and AVX.
#[target_feature(enable = "aes,avx")]
unsafe fn xts<const DECRYPT: bool>(
    data: &Schedule,
    tweak: &Schedule,
    buf: &mut [u8],
    first_sector: u64,
) {
    // SAFETY: every load and store is an unaligned 16-byte access to a 16-byte array (a
    // round key, a `u128`) or to a 16-byte chunk of `buf` from `chunks_exact_mut(16)`; the
    // other intrinsics only compute on values; AES-NI and AVX are the caller's promise.
    unsafe {
        let rk: [__m128i; ROUND_KEYS] = load_schedule(data);
        let tk: [__m128i; ROUND_KEYS] = load_schedule(tweak);
        let mut sector = first_sector;
        for group in buf.chunks_mut(LANES * SECTOR_SIZE) {
            // The group's sector tweaks, enciphered side by side (lanes past the group's
            // last sector are computed and ignored).
            let mut t = [tk[0]; LANES];
            for (i, x) in t.iter_mut().enumerate() {
                let plain64 = sector.wrapping_add(i as u64);
                *x = _mm_xor_si128(_mm_set_epi64x(0, plain64 as i64), tk[0]);
            }
            for k in &tk[1..ROUND_KEYS - 1] {
                for x in &mut t {
                    *x = _mm_aesenc_si128(*x, *k);
                }
            }
            let mut sector_tweaks = [0u128; LANES];
            for (x, out) in t.iter().zip(&mut sector_tweaks) {
                let x = _mm_aesenclast_si128(*x, tk[ROUND_KEYS - 1]);
                _mm_storeu_si128((out as *mut u128).cast(), x);
            }
            for (sector_buf, mut tweak) in group.chunks_exact_mut(SECTOR_SIZE).zip(sector_tweaks) {
                for batch in sector_buf.chunks_exact_mut(LANES * 16) {
                    // T·α^j for this batch's blocks; whitening with it folds into the
                    // first and last round keys.
                    let mut tw = [rk[0]; LANES];
                    let mut x = [rk[0]; LANES];
                    for ((w, b), block) in tw.iter_mut().zip(&mut x).zip(batch.chunks_exact(16)) {
                        *w = _mm_set_epi64x((tweak >> 64) as i64, tweak as i64);
                        tweak = double(tweak);
                        let block = _mm_loadu_si128(block.as_ptr().cast());
                        *b = _mm_xor_si128(block, _mm_xor_si128(*w, rk[0]));
                    }
                    for k in &rk[1..ROUND_KEYS - 1] {
                        for b in &mut x {
                            *b = if DECRYPT {
                                _mm_aesdec_si128(*b, *k)
                            } else {
                                _mm_aesenc_si128(*b, *k)
                            };
                        }
                    }
                    for ((w, b), block) in tw.iter().zip(&x).zip(batch.chunks_exact_mut(16)) {
                        let last = _mm_xor_si128(*w, rk[ROUND_KEYS - 1]);
                        let out = if DECRYPT {
                            _mm_aesdeclast_si128(*b, last)
                        } else {
                            _mm_aesenclast_si128(*b, last)
                        };
                        _mm_storeu_si128(block.as_mut_ptr().cast(), out);
                    }
                }
            }
            sector = sector.wrapping_add((group.len() / SECTOR_SIZE) as u64);
        }
    }
}

/// Blocks per VAES batch: eight 256-bit registers of two blocks each.
const VAES_BATCH: usize = 16;

/// [`xts`] on VAES: the same computation with two blocks per 256-bit register and eight
/// registers in flight, so each AES instruction does the work of two. The sector tweaks are
/// enciphered as in [`xts`]; the per-block tweaks T·α^j live in the registers too, two per
/// register, and advance by α^16 per batch with [`mul_alpha`].
///
/// # Safety
/// The CPU must support AES-NI, AVX2, VAES and VPCLMULQDQ.
#[target_feature(enable = "aes,avx,avx2,vaes,vpclmulqdq")]
unsafe fn xts_vaes<const DECRYPT: bool>(
    data: &Schedule,
    tweak: &Schedule,
    buf: &mut [u8],
    first_sector: u64,
) {
    // SAFETY: every 128-bit load and store reads or writes one 16-byte array (round key,
    // u128); every 256-bit one reads the two-u128 array `first_pair` or a 32-byte chunk of
    // `buf` from `chunks_exact_mut(32)`; the rest computes on values; the features are the
    // caller's promise.
    unsafe {
        let rk: [__m256i; ROUND_KEYS] = load_schedule(data).map(|k| _mm256_broadcastsi128_si256(k));
        let tk: [__m128i; ROUND_KEYS] = load_schedule(tweak);
        let mut sector = first_sector;
        for group in buf.chunks_mut(LANES * SECTOR_SIZE) {
            let mut t = [tk[0]; LANES];
            for (i, x) in t.iter_mut().enumerate() {
                let plain64 = sector.wrapping_add(i as u64);
                *x = _mm_xor_si128(_mm_set_epi64x(0, plain64 as i64), tk[0]);
            }
            for k in &tk[1..ROUND_KEYS - 1] {
                for x in &mut t {
                    *x = _mm_aesenc_si128(*x, *k);
                }
            }
            let mut sector_tweaks = [0u128; LANES];
            for (x, out) in t.iter().zip(&mut sector_tweaks) {
                let x = _mm_aesenclast_si128(*x, tk[ROUND_KEYS - 1]);
                _mm_storeu_si128((out as *mut u128).cast(), x);
            }
            for (sector_buf, tweak) in group.chunks_exact_mut(SECTOR_SIZE).zip(sector_tweaks) {
                // Register i holds T·α^(2i) and T·α^(2i+1); the next batch is α^16 on.
                let first_pair = [tweak, double(tweak)];
                let t0 = _mm256_loadu_si256(first_pair.as_ptr().cast());
                // Each from the first pair, not in a chain: eight independent products.
                let mut tw = [
                    t0,
                    mul_alpha::<2>(t0),
                    mul_alpha::<4>(t0),
                    mul_alpha::<6>(t0),
                    mul_alpha::<8>(t0),
                    mul_alpha::<10>(t0),
                    mul_alpha::<12>(t0),
                    mul_alpha::<14>(t0),
                ];
                for batch in sector_buf.chunks_exact_mut(VAES_BATCH * 16) {
                    let mut x = [rk[0]; VAES_BATCH / 2];
                    for ((w, b), block) in tw.iter().zip(&mut x).zip(batch.chunks_exact(32)) {
                        let block = _mm256_loadu_si256(block.as_ptr().cast());
                        *b = _mm256_xor_si256(block, _mm256_xor_si256(*w, rk[0]));
                    }
                    for k in &rk[1..ROUND_KEYS - 1] {
                        for b in &mut x {
                            *b = if DECRYPT {
                                _mm256_aesdec_epi128(*b, *k)
                            } else {
                                _mm256_aesenc_epi128(*b, *k)
                            };
                        }
                    }
                    for ((w, b), block) in tw.iter_mut().zip(&x).zip(batch.chunks_exact_mut(32)) {
                        let last = _mm256_xor_si256(*w, rk[ROUND_KEYS - 1]);
                        let out = if DECRYPT {
                            _mm256_aesdeclast_epi128(*b, last)
                        } else {
                            _mm256_aesenclast_epi128(*b, last)
                        };
                        _mm256_storeu_si256(block.as_mut_ptr().cast(), out);
                        *w = mul_alpha::<16>(*w);
                    }
                }
            }
            sector = sector.wrapping_add((group.len() / SECTOR_SIZE) as u64);
        }
    }
}

/// Multiplies both 128-bit lanes of `x` by α^K in GF(2^128) (IEEE 1619 little-endian):
/// a 128-bit shift left by K, the bits carried out of the low qword moved into the high
/// one, and the K bits shifted out of the top folded back as their carry-less product with
/// 0x87 (at most K + 7 bits, so it stays in the low qword). K is at most 56.
///
/// # Safety
/// The CPU must support AVX2 and VPCLMULQDQ.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
unsafe fn mul_alpha<const K: i32>(x: __m256i) -> __m256i {
    const { assert!(K > 0 && K <= 56) };
    let shifted = _mm256_slli_epi64::<K>(x);
    // Each qword's top K bits, at the bottom of that qword (a shift count in a register:
    // `64 - K` cannot be a const generic argument on stable Rust).
    let tops = _mm256_srl_epi64(x, _mm_set_epi64x(0, 64 - K as i64));
    // The low qword's top bits move into the high qword; the high qword's are reduced.
    let carry = _mm256_bslli_epi128::<8>(tops);
    let poly = _mm256_set1_epi64x(0x87);
    let reduced = _mm256_clmulepi64_epi128::<0x01>(tops, poly);
    _mm256_xor_si256(_mm256_xor_si256(shifted, carry), reduced)
}

// Every sector splits into whole VAES batches.
const _: () = assert!(BLOCKS_PER_SECTOR.is_multiple_of(VAES_BATCH) && VAES_BATCH == 16);

/// Loads a key schedule into registers (SSE2 only, part of the x86_64 baseline).
#[inline]
fn load_schedule(schedule: &Schedule) -> [__m128i; ROUND_KEYS] {
    // SAFETY: each unaligned load reads one 16-byte round key.
    schedule.map(|k| unsafe { _mm_loadu_si128(k.as_ptr().cast()) })
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619 little-endian convention).
#[inline(always)]
fn double(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

// Every sector splits into whole batches of `LANES` blocks.
const _: () = assert!(BLOCKS_PER_SECTOR.is_multiple_of(LANES));
