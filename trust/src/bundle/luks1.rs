//! The LUKS1 container format, version 1, as `cryptsetup` and QEMU read it.
//!
//! sealvm writes exactly one flavour: cipher `aes`, mode `xts-plain64`, 32-byte master key
//! (XTS-AES-128), hash `sha256`. It reads that and also XTS-AES-256 (`qemu-img create -f luks`
//! defaults) so long as the hash is sha256.
//!
//! # Layout (all integers big-endian, offsets in bytes)
//!
//! The partition header (`phdr`) is 592 bytes at offset 0:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic `4C 55 4B 53 BA BE` ("LUKS\xba\xbe") |
//! | 6 | 2 | version, 1 |
//! | 8 | 32 | cipher name, NUL-padded: `aes` |
//! | 40 | 32 | cipher mode, NUL-padded: `xts-plain64` |
//! | 72 | 32 | hash spec, NUL-padded: `sha256` |
//! | 104 | 4 | payload offset, in 512-byte sectors |
//! | 108 | 4 | key bytes (32 for XTS-AES-128) |
//! | 112 | 20 | master-key digest: PBKDF2(hash, master key, salt, iterations, 20) |
//! | 132 | 32 | master-key digest salt |
//! | 164 | 4 | master-key digest iterations |
//! | 168 | 40 | UUID, ASCII, NUL-padded |
//! | 208 | 8 × 48 | key slots |
//!
//! Each 48-byte key slot: `active` (4; `0x00AC71F3` enabled, `0x0000DEAD` disabled),
//! PBKDF2 iterations (4), salt (32), key-material offset in sectors (4), AF stripes (4).
//!
//! A slot's key material is the master key split by the anti-forensic splitter into
//! `stripes` (4000) blocks of `key bytes` each, using sha256 as the diffuser, then encrypted
//! with `aes-xts-plain64` under PBKDF2(sha256, secret, slot salt, iterations, key bytes),
//! sectors numbered from 0 at the slot's offset. sealvm puts slot *i* at sector
//! `8 + 256 · i` (4 KiB aligned, 128 000 bytes rounded to 128 KiB, as cryptsetup does) and
//! the payload at sector 4096 (2 MiB). The payload is encrypted with the master key,
//! `aes-xts-plain64`, sector 0 being the first payload sector.
//!
//! The key-slot secret is a high-entropy random value sealed by the host TPM, never a
//! human passphrase, so sealvm uses the LUKS1 minimum of 1000 PBKDF2 iterations: brute force
//! is bounded by the secret's 256 bits, not by the iteration count.

use super::xts::{SectorCipher, XtsError, SECTOR_SIZE};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use zeroize::Zeroizing;

/// The format version this module writes and reads.
pub const LUKS_VERSION: u16 = 1;
/// The magic that starts every LUKS header.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Length of the LUKS1 partition header in bytes.
pub const PHDR_LEN: usize = 592;
/// Number of key slots in a LUKS1 header.
pub const KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot.
pub const AF_STRIPES: u32 = 4000;
/// Master-key length sealvm writes: XTS-AES-128.
pub const MASTER_KEY_LEN: usize = 32;
/// Payload offset sealvm writes, in 512-byte sectors (2 MiB).
pub const PAYLOAD_OFFSET_SECTORS: u32 = 4096;
/// PBKDF2 iterations for key slots and the master-key digest (the LUKS1 minimum).
pub const PBKDF2_ITERATIONS: u32 = 1000;
/// The most PBKDF2 iterations a header may ask for, per key slot and for the master-key
/// digest. The count is in the unauthenticated header, so without a cap a tampered header
/// makes every open burn minutes of CPU before it is refused. sealvm writes 1000; 2^20 still
/// opens containers that qemu-img or cryptsetup made with a short `iter-time`.
pub const MAX_PBKDF2_ITERATIONS: u32 = 1 << 20;

const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const FIRST_SLOT_SECTOR: u32 = 8;
const SLOT_STRIDE_SECTORS: u32 = 256;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;

/// The master key, zeroized on drop. Never printed.
pub type MasterKey = Zeroizing<Vec<u8>>;

/// Errors reading, writing or unlocking a LUKS1 container.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// Reading or writing the container file failed.
    #[error("cannot {what} the LUKS container")]
    Io {
        /// What was being done ("read the header", "write key slot 0").
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than the header or the key material it describes.
    #[error("LUKS container truncated: {what} needs {needed} bytes, file has {len}")]
    Truncated {
        /// Which part is missing.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Actual file length.
        len: u64,
    },
    /// The first six bytes are not the LUKS magic.
    #[error("not a LUKS container (bad magic)")]
    BadMagic,
    /// The header version is not 1.
    #[error("unsupported LUKS version {0} (sealvm reads LUKS1)")]
    UnsupportedVersion(u16),
    /// Cipher, mode or key length other than aes-xts-plain64 with 32 or 64 bytes.
    #[error("unsupported cipher {cipher}-{mode} with {key_bytes}-byte key (sealvm reads aes-xts-plain64)")]
    UnsupportedCipher {
        /// Cipher name from the header.
        cipher: String,
        /// Cipher mode from the header.
        mode: String,
        /// Key bytes from the header.
        key_bytes: u32,
    },
    /// A hash other than sha256.
    #[error("unsupported LUKS hash {0} (sealvm reads sha256)")]
    UnsupportedHash(String),
    /// A header field is out of range (offset, stripes, iterations).
    #[error("malformed LUKS header: {0}")]
    Malformed(&'static str),
    /// No active key slot opens with the given secret (wrong secret, or tampered slot/digest).
    #[error("no LUKS key slot opens with this secret (wrong key, or key slot or master-key digest tampered)")]
    WrongSecret,
    /// The XTS layer refused the key or buffer.
    #[error("XTS cipher")]
    Xts(#[from] XtsError),
    /// The system random source failed.
    #[error("cannot get random bytes")]
    Random(#[source] getrandom::Error),
}

/// One LUKS1 key slot as stored in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// True when the slot holds key material.
    pub active: bool,
    /// PBKDF2 iterations for the slot secret.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Where the key material starts, in 512-byte sectors from the file start.
    pub key_material_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// The parsed LUKS1 partition header. Holds no secret: the digest is one-way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cipher name, e.g. `aes`.
    pub cipher_name: String,
    /// Cipher mode, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// Hash spec, e.g. `sha256`.
    pub hash_spec: String,
    /// Payload start in 512-byte sectors.
    pub payload_offset: u32,
    /// Master-key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of the master-key digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of the master-key digest.
    pub mk_digest_iterations: u32,
    /// Container UUID.
    pub uuid: String,
    /// The eight key slots.
    pub key_slots: Vec<KeySlot>,
}

impl Header {
    /// Parses a 592-byte header, checking magic, version, cipher and hash.
    pub fn parse(bytes: &[u8]) -> Result<Self, LuksError> {
        if bytes.len() < PHDR_LEN {
            return Err(LuksError::Truncated {
                what: "header",
                needed: PHDR_LEN as u64,
                len: bytes.len() as u64,
            });
        }
        if bytes[0..6] != LUKS_MAGIC {
            return Err(LuksError::BadMagic);
        }
        let version = u16::from_be_bytes([bytes[6], bytes[7]]);
        if version != LUKS_VERSION {
            return Err(LuksError::UnsupportedVersion(version));
        }
        let be32 = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut key_slots = Vec::with_capacity(KEY_SLOTS);
        for i in 0..KEY_SLOTS {
            let at = 208 + 48 * i;
            let active = match be32(at) {
                SLOT_ACTIVE => true,
                SLOT_DISABLED => false,
                _ => {
                    return Err(LuksError::Malformed(
                        "key slot state is neither active nor disabled",
                    ))
                }
            };
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&bytes[at + 8..at + 40]);
            key_slots.push(KeySlot {
                active,
                iterations: be32(at + 4),
                salt,
                key_material_offset: be32(at + 40),
                stripes: be32(at + 44),
            });
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&bytes[112..132]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&bytes[132..164]);
        let header = Self {
            cipher_name: c_string(&bytes[8..40]),
            cipher_mode: c_string(&bytes[40..72]),
            hash_spec: c_string(&bytes[72..104]),
            payload_offset: be32(104),
            key_bytes: be32(108),
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations: be32(164),
            uuid: c_string(&bytes[168..208]),
            key_slots,
        };
        header.check_supported()?;
        Ok(header)
    }

    fn check_supported(&self) -> Result<(), LuksError> {
        if self.cipher_name != "aes"
            || self.cipher_mode != "xts-plain64"
            || !(self.key_bytes == 32 || self.key_bytes == 64)
        {
            return Err(LuksError::UnsupportedCipher {
                cipher: self.cipher_name.clone(),
                mode: self.cipher_mode.clone(),
                key_bytes: self.key_bytes,
            });
        }
        if self.hash_spec != "sha256" {
            return Err(LuksError::UnsupportedHash(self.hash_spec.clone()));
        }
        if self.mk_digest_iterations == 0 || self.mk_digest_iterations > MAX_PBKDF2_ITERATIONS {
            return Err(LuksError::Malformed(
                "master-key digest iterations zero or above the cap",
            ));
        }
        for slot in self.key_slots.iter().filter(|s| s.active) {
            if slot.stripes == 0
                || slot.stripes > 100_000
                || slot.iterations == 0
                || slot.iterations > MAX_PBKDF2_ITERATIONS
            {
                return Err(LuksError::Malformed(
                    "key slot stripes or iterations out of range",
                ));
            }
            if slot.key_material_offset < 1 || slot.key_material_offset >= self.payload_offset {
                return Err(LuksError::Malformed(
                    "key slot material overlaps header or payload",
                ));
            }
        }
        Ok(())
    }

    /// Serializes the header into its 592 bytes.
    pub fn to_bytes(&self) -> [u8; PHDR_LEN] {
        let mut b = [0u8; PHDR_LEN];
        b[0..6].copy_from_slice(&LUKS_MAGIC);
        b[6..8].copy_from_slice(&LUKS_VERSION.to_be_bytes());
        put_c_string(&mut b[8..40], &self.cipher_name);
        put_c_string(&mut b[40..72], &self.cipher_mode);
        put_c_string(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        put_c_string(&mut b[168..208], &self.uuid);
        for (i, slot) in self.key_slots.iter().enumerate() {
            let at = 208 + 48 * i;
            let state = if slot.active {
                SLOT_ACTIVE
            } else {
                SLOT_DISABLED
            };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&slot.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&slot.salt);
            b[at + 40..at + 44].copy_from_slice(&slot.key_material_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&slot.stripes.to_be_bytes());
        }
        b
    }

    /// Byte offset of the payload in the file.
    pub fn payload_offset_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR_SIZE as u64
    }
}

/// Formats `file` as a LUKS1 container with a fresh random master key and `secret` in key
/// slot 0, sized for `payload_bytes` of payload (which is left as it was: call sites fill it
/// through the encrypted view). Returns the header and the master key.
pub fn format(
    file: &File,
    secret: &[u8],
    payload_bytes: u64,
) -> Result<(Header, MasterKey), LuksError> {
    let mut master_key = Zeroizing::new(vec![0u8; MASTER_KEY_LEN]);
    getrandom::getrandom(&mut master_key).map_err(LuksError::Random)?;
    let mut mk_digest_salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut mk_digest_salt).map_err(LuksError::Random)?;
    let mut uuid_bytes = [0u8; 16];
    getrandom::getrandom(&mut uuid_bytes).map_err(LuksError::Random)?;
    let key_slots = (0..KEY_SLOTS as u32)
        .map(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_material_offset: FIRST_SLOT_SECTOR + i * SLOT_STRIDE_SECTORS,
            stripes: AF_STRIPES,
        })
        .collect();
    let mut header = Header {
        cipher_name: "aes".into(),
        cipher_mode: "xts-plain64".into(),
        hash_spec: "sha256".into(),
        payload_offset: PAYLOAD_OFFSET_SECTORS,
        key_bytes: MASTER_KEY_LEN as u32,
        mk_digest: [0; DIGEST_LEN],
        mk_digest_salt,
        mk_digest_iterations: PBKDF2_ITERATIONS,
        uuid: uuid_v4(uuid_bytes),
        key_slots,
    };
    header.mk_digest = master_key_digest(&header, &master_key);
    file.set_len(header.payload_offset_bytes() + payload_bytes)
        .map_err(|source| LuksError::Io {
            what: "size",
            source,
        })?;
    set_key_slot(file, &mut header, &master_key, 0, secret)?;
    Ok((header, master_key))
}

/// Writes `secret` into key slot `slot` (enabling it) and rewrites the header. Other slots
/// are untouched, so a caller can add the new secret and then disable the old one.
pub fn set_key_slot(
    file: &File,
    header: &mut Header,
    master_key: &[u8],
    slot: usize,
    secret: &[u8],
) -> Result<(), LuksError> {
    let key_bytes = master_key.len();
    let ks = header
        .key_slots
        .get_mut(slot)
        .ok_or(LuksError::Malformed("key slot index out of range"))?;
    getrandom::getrandom(&mut ks.salt).map_err(LuksError::Random)?;
    ks.iterations = PBKDF2_ITERATIONS;
    ks.stripes = AF_STRIPES;
    let mut material = af_split(master_key, ks.stripes as usize)?;
    let slot_key = slot_key(secret, ks, key_bytes);
    SectorCipher::new(&slot_key)?.encrypt_sectors(&mut material, 0)?;
    file.write_all_at(
        &material,
        u64::from(ks.key_material_offset) * SECTOR_SIZE as u64,
    )
    .map_err(|source| LuksError::Io {
        what: "write key slot",
        source,
    })?;
    ks.active = true;
    write_header(file, header)
}

/// Disables key slot `slot` and overwrites its key material with random bytes.
pub fn kill_key_slot(file: &File, header: &mut Header, slot: usize) -> Result<(), LuksError> {
    let key_bytes = header.key_bytes as usize;
    let ks = header
        .key_slots
        .get_mut(slot)
        .ok_or(LuksError::Malformed("key slot index out of range"))?;
    let mut noise = vec![0u8; material_len(key_bytes, ks.stripes)];
    getrandom::getrandom(&mut noise).map_err(LuksError::Random)?;
    file.write_all_at(
        &noise,
        u64::from(ks.key_material_offset) * SECTOR_SIZE as u64,
    )
    .map_err(|source| LuksError::Io {
        what: "wipe key slot",
        source,
    })?;
    ks.active = false;
    ks.iterations = 0;
    ks.salt = [0; SALT_LEN];
    write_header(file, header)
}

/// Reads and parses the header of `file`.
pub fn read_header(file: &File) -> Result<Header, LuksError> {
    let len = file
        .metadata()
        .map_err(|source| LuksError::Io {
            what: "stat",
            source,
        })?
        .len();
    if len < PHDR_LEN as u64 {
        return Err(LuksError::Truncated {
            what: "header",
            needed: PHDR_LEN as u64,
            len,
        });
    }
    let mut bytes = [0u8; PHDR_LEN];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|source| LuksError::Io {
            what: "read the header",
            source,
        })?;
    let header = Header::parse(&bytes)?;
    if len < header.payload_offset_bytes() {
        return Err(LuksError::Truncated {
            what: "key material",
            needed: header.payload_offset_bytes(),
            len,
        });
    }
    Ok(header)
}

/// Opens `file` with `secret`: tries every active key slot and returns the header, the
/// master key and the slot that opened.
pub fn unlock(file: &File, secret: &[u8]) -> Result<(Header, MasterKey, usize), LuksError> {
    let header = read_header(file)?;
    let key_bytes = header.key_bytes as usize;
    for (index, ks) in header
        .key_slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.active)
    {
        let mut material = Zeroizing::new(vec![0u8; material_len(key_bytes, ks.stripes)]);
        file.read_exact_at(
            &mut material,
            u64::from(ks.key_material_offset) * SECTOR_SIZE as u64,
        )
        .map_err(|source| LuksError::Io {
            what: "read key slot",
            source,
        })?;
        let slot_key = slot_key(secret, ks, key_bytes);
        SectorCipher::new(&slot_key)?.decrypt_sectors(&mut material, 0)?;
        let candidate = af_merge(&material[..key_bytes * ks.stripes as usize], key_bytes);
        if constant_time_eq(&master_key_digest(&header, &candidate), &header.mk_digest) {
            return Ok((header, candidate, index));
        }
    }
    Err(LuksError::WrongSecret)
}

fn write_header(file: &File, header: &Header) -> Result<(), LuksError> {
    file.write_all_at(&header.to_bytes(), 0)
        .map_err(|source| LuksError::Io {
            what: "write the header",
            source,
        })?;
    file.sync_data().map_err(|source| LuksError::Io {
        what: "sync",
        source,
    })
}

fn material_len(key_bytes: usize, stripes: u32) -> usize {
    (key_bytes * stripes as usize).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
}

fn slot_key(secret: &[u8], ks: &KeySlot, key_bytes: usize) -> Zeroizing<Vec<u8>> {
    let mut key = Zeroizing::new(vec![0u8; key_bytes]);
    pbkdf2::pbkdf2_hmac::<Sha256>(secret, &ks.salt, ks.iterations, &mut key);
    key
}

fn master_key_digest(header: &Header, master_key: &[u8]) -> [u8; DIGEST_LEN] {
    let mut digest = [0u8; DIGEST_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(
        master_key,
        &header.mk_digest_salt,
        header.mk_digest_iterations,
        &mut digest,
    );
    digest
}

/// The LUKS1 anti-forensic splitter: `stripes - 1` random blocks, the last one the key
/// XORed with the diffused XOR of the others. Output is padded to whole sectors.
fn af_split(key: &[u8], stripes: usize) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; material_len(n, stripes as u32)]);
    getrandom::getrandom(&mut out[..n * (stripes - 1)]).map_err(LuksError::Random)?;
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for i in 0..stripes - 1 {
        xor_into(&mut acc, &out[i * n..(i + 1) * n]);
        diffuse(&mut acc);
    }
    let last = &mut out[(stripes - 1) * n..stripes * n];
    for (o, (a, k)) in last.iter_mut().zip(acc.iter().zip(key)) {
        *o = a ^ k;
    }
    Ok(out)
}

/// Inverse of [`af_split`].
fn af_merge(material: &[u8], key_bytes: usize) -> MasterKey {
    let stripes = material.len() / key_bytes;
    let mut acc = Zeroizing::new(vec![0u8; key_bytes]);
    for i in 0..stripes - 1 {
        xor_into(&mut acc, &material[i * key_bytes..(i + 1) * key_bytes]);
        diffuse(&mut acc);
    }
    xor_into(
        &mut acc,
        &material[(stripes - 1) * key_bytes..stripes * key_bytes],
    );
    acc
}

/// LUKS1's diffuser: each hash-sized block becomes H(be32(index) || block), truncated for
/// a final partial block.
fn diffuse(buf: &mut [u8]) {
    let digest_len = 32;
    for (index, block) in buf.chunks_mut(digest_len).enumerate() {
        let mut h = Sha256::new();
        h.update((index as u32).to_be_bytes());
        h.update(&*block);
        let out = h.finalize();
        let len = block.len();
        block.copy_from_slice(&out[..len]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, o) in acc.iter_mut().zip(other) {
        *a ^= o;
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn put_c_string(field: &mut [u8], value: &str) {
    let bytes = value.as_bytes();
    let len = bytes.len().min(field.len() - 1);
    field[..len].copy_from_slice(&bytes[..len]);
}

fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Entry point for the `bundle_header` fuzz target: parsing any bytes as a LUKS1 header
/// must not panic, and a header that parses must survive a round trip unchanged.
pub fn fuzz_header(data: &[u8]) {
    if let Ok(header) = Header::parse(data) {
        let bytes = header.to_bytes();
        let again = Header::parse(&bytes).expect("a serialized header parses");
        assert_eq!(again.to_bytes(), bytes);
        let _ = header.payload_offset_bytes();
    }
}
