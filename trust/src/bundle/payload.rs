//! The bundle payload format, version 1: what sealvm keeps inside the LUKS1 container.
//!
//! # Layout (offsets in bytes from the payload start, integers little-endian)
//!
//! | offset | size | region |
//! |---|---|---|
//! | 0 | 512 | superblock (one sector) |
//! | 4 KiB | 1 MiB − 4 KiB | manifest record |
//! | 1 MiB | 1 MiB | vTPM state slot 0 |
//! | 2 MiB | 1 MiB | vTPM state slot 1 |
//! | 3 MiB | rest | guest disk (1 MiB aligned) |
//!
//! Superblock: magic `SEALVMB\0` (8), version u32 = 1 (4), flags u32 (4), bundle id (16),
//! manifest offset u64, manifest capacity u64, vTPM slot 0 offset u64, vTPM slot capacity
//! u64, disk offset u64, disk bytes u64, active vTPM slot u32, reserved u32, vTPM generation
//! u64 (at 88), rollback counter NV index u32 (at 96; 0 = no rollback protection, as in
//! bundles made before it), reserved u32, rollback generation u64 (at 104: the host TPM
//! counter's value this bundle was last launched at), zeros to 448, HMAC-SHA256 over bytes
//! 0..448 (at 448), zeros to 512.
//!
//! Manifest record: length u32, HMAC (32) over `"manifest" ‖ bundle id ‖ length ‖ json`,
//! then the manifest as JSON ([`VmManifest`]).
//!
//! vTPM slot record: magic `VTPM` (4), generation u64, length u32, HMAC (32) over
//! `"vtpm" ‖ bundle id ‖ slot u32 ‖ generation ‖ length ‖ state`, then swtpm's state blob.
//!
//! The HMAC key is HMAC-SHA256(master key, `"sealvm bundle hmac v1"`); XTS gives
//! confidentiality only, the HMACs detect tampering with the superblock, manifest and vTPM
//! state. The guest disk is not authenticated (as with dm-crypt).
//!
//! # Atomic vTPM write-back
//!
//! The new state goes to the inactive slot with generation + 1 and is synced; then the
//! superblock, one 512-byte sector, is rewritten to name that slot and synced. A crash before
//! the superblock write leaves the old superblock naming the old, intact slot; the superblock
//! write is a single aligned sector, which storage writes whole (the same assumption the
//! LUKS1 header update makes). The reader only trusts the slot the superblock names and
//! requires its generation to match, so a tampered active slot is an error, never a silent
//! fall-back to older state.

use super::integrity::{self, SectorMac};
use super::luks1::{self, LuksError, MasterKey};
use super::volume::{EncryptedVolume, VolumeError};
use super::xts::SECTOR_SIZE;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fs::{File, OpenOptions};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The payload format version this module writes and reads.
pub const PAYLOAD_VERSION: u32 = 1;
/// The payload version of `--integrity` bundles (flags bit 0 set): the guest disk is
/// followed by a tag region ([`super::integrity`]). Older readers refuse it.
pub const PAYLOAD_VERSION_INTEGRITY: u32 = 2;
const FLAG_INTEGRITY: u32 = 1;
const MAGIC: [u8; 8] = *b"SEALVMB\0";
const MIB: u64 = 1 << 20;
const MANIFEST_OFFSET: u64 = 4096;
const MANIFEST_CAPACITY: u64 = MIB - 4096;
const VTPM_OFFSET: u64 = MIB;
const VTPM_SLOT_CAPACITY: u64 = MIB;
const DISK_OFFSET: u64 = 3 * MIB;
const SB_HMAC_AT: usize = 448;
const RECORD_HEAD: usize = 48;

type HmacSha256 = Hmac<Sha256>;

/// The region of a bundle a check refers to; errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// The LUKS1 header and key slots.
    LuksHeader,
    /// The payload superblock.
    Superblock,
    /// The VM-state manifest.
    Manifest,
    /// The active vTPM state slot.
    VtpmState,
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Region::LuksHeader => "LUKS header",
            Region::Superblock => "superblock",
            Region::Manifest => "VM-state manifest",
            Region::VtpmState => "vTPM state",
        })
    }
}

/// Errors creating, opening or updating a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The LUKS1 layer failed (wrong secret, bad header, I/O).
    #[error("LUKS container")]
    Luks(#[from] LuksError),
    /// Sector I/O on the payload failed.
    #[error("payload I/O")]
    Volume(#[from] VolumeError),
    /// Opening, creating or reading a file failed.
    #[error("cannot open {path}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the bundle open for writing (a running launch).
    #[error("bundle {path} is in use by another sealvm (one writer at a time)")]
    InUse {
        /// The bundle.
        path: String,
        /// Why the lock was not granted.
        #[source]
        source: sealvm_os::lock::LockError,
    },
    /// A region's HMAC, magic or bounds check failed: the bundle was tampered with or damaged.
    #[error("{0} failed its integrity check (tampered or damaged bundle)")]
    Integrity(Region),
    /// The payload version is not one this build reads.
    #[error("unsupported bundle payload version {0}")]
    UnsupportedVersion(u32),
    /// The manifest or vTPM state does not fit its region.
    #[error("{region} of {len} bytes exceeds its capacity of {capacity} bytes")]
    TooLarge {
        /// Which region.
        region: Region,
        /// Bytes needed.
        len: u64,
        /// Bytes available.
        capacity: u64,
    },
    /// A guest-disk sector failed its integrity check (`--integrity` bundles): its
    /// ciphertext, its tag or its place was changed outside sealvm, or a crash tore its
    /// write. The sector is not returned.
    #[error(
        "guest disk sector {sector} failed its integrity check (tampered, or torn by a crash)"
    )]
    DiskIntegrity {
        /// The disk sector (512 bytes) that failed.
        sector: u64,
    },
    /// The manifest is not valid JSON for [`VmManifest`].
    #[error("manifest JSON")]
    ManifestJson(#[source] serde_json::Error),
}

/// The VM state kept in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmManifest {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// SHA-256 of the kernel image, hex.
    pub kernel_sha256: String,
    /// SHA-256 of the initramfs, hex, when there is one.
    pub initramfs_sha256: Option<String>,
}

/// The steps of a vTPM write-back, for crash tests that stop between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Before the new slot is written.
    SlotWrite,
    /// After the slot write, before its sync.
    SlotSync,
    /// Before the superblock is rewritten.
    SuperblockWrite,
    /// After the superblock write, before its sync.
    SuperblockSync,
}

#[derive(Debug, Clone)]
struct Superblock {
    bundle_id: [u8; 16],
    disk_bytes: u64,
    active_slot: u32,
    generation: u64,
    rollback: Option<RollbackMark>,
    /// Payload version 2: the disk carries per-sector tags (see [`super::integrity`]).
    integrity: bool,
}

/// A bundle's authenticated rollback mark: which host TPM counter guards it and the value
/// it was last launched at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackMark {
    /// The NV index of the host TPM counter.
    pub counter_index: u32,
    /// The counter value recorded at the last launch.
    pub generation: u64,
}

/// An open bundle: the unlocked container with verified superblock. Holds the master key
/// (zeroized on drop); never `Debug`.
pub struct Bundle {
    header: luks1::Header,
    volume: EncryptedVolume,
    superblock: Superblock,
    master_key: MasterKey,
    hmac_key: Zeroizing<Vec<u8>>,
    /// The sector MAC of an `--integrity` bundle, and the lock that makes a tag sector's
    /// read-modify-write atomic against concurrent writers of neighbouring sectors.
    integrity: Option<(SectorMac, Mutex<()>)>,
}

/// Options of [`Bundle::create_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Give every disk sector a MAC checked on every read (payload version 2).
    pub integrity: bool,
}

/// Where the guest disk's initial contents come from.
pub enum DiskSource<'a> {
    /// An all-zero disk of this many bytes (rounded up to 1 MiB).
    Empty(u64),
    /// A raw image whose bytes are copied in (size rounded up to 1 MiB).
    Raw(&'a Path),
}

impl Bundle {
    /// Creates a new bundle at `path` (which must not exist) with `secret` in key slot 0.
    pub fn create(
        path: &Path,
        secret: &[u8],
        manifest: &VmManifest,
        vtpm_state: &[u8],
        disk: DiskSource<'_>,
    ) -> Result<Self, BundleError> {
        Self::create_with(
            path,
            secret,
            manifest,
            vtpm_state,
            disk,
            CreateOptions::default(),
        )
    }

    /// [`Self::create`] with options (`--integrity`).
    pub fn create_with(
        path: &Path,
        secret: &[u8],
        manifest: &VmManifest,
        vtpm_state: &[u8],
        disk: DiskSource<'_>,
        options: CreateOptions,
    ) -> Result<Self, BundleError> {
        let file_err = |p: &Path| {
            let path = p.display().to_string();
            move |source| BundleError::File { path, source }
        };
        let (disk_bytes, raw) = match disk {
            DiskSource::Empty(bytes) => (bytes, None),
            DiskSource::Raw(p) => {
                let f = File::open(p).map_err(file_err(p))?;
                let len = f.metadata().map_err(file_err(p))?.len();
                (len, Some(f))
            }
        };
        let disk_bytes = disk_bytes.div_ceil(MIB) * MIB;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(file_err(path))?;
        let tag_bytes = if options.integrity {
            integrity::region_bytes(disk_bytes)
        } else {
            0
        };
        let (header, master_key) =
            luks1::format(&file, secret, DISK_OFFSET + disk_bytes + tag_bytes)?;
        let volume = EncryptedVolume::new(file, &header, &master_key)?;
        let mut bundle_id = [0u8; 16];
        getrandom::getrandom(&mut bundle_id).map_err(LuksError::Random)?;
        let mut bundle = Self {
            hmac_key: derive_key(&master_key, b"sealvm bundle hmac v1"),
            integrity: options.integrity.then(|| integrity_mac(&master_key)),
            header,
            volume,
            superblock: Superblock {
                bundle_id,
                disk_bytes,
                active_slot: 1,
                generation: 0,
                rollback: None,
                integrity: options.integrity,
            },
            master_key,
        };
        bundle.write_manifest(manifest)?;
        bundle.write_vtpm_state(vtpm_state)?;
        if let Some(mut raw) = raw {
            bundle.import_disk(&mut raw)?;
        } else {
            bundle.zero_disk()?;
        }
        bundle.volume.sync()?;
        Ok(bundle)
    }

    /// Opens the bundle at `path` with the key-slot `secret` and verifies its superblock.
    pub fn open(path: &Path, secret: &[u8], writable: bool) -> Result<Self, BundleError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| BundleError::File {
                path: path.display().to_string(),
                source,
            })?;
        if writable {
            // One writer per bundle: two launches of one bundle would serve one disk to
            // two guests and race the rollback counter. Held as long as the file is open.
            sealvm_os::lock::lock(
                &file,
                sealvm_os::lock::LockMode::Exclusive,
                sealvm_os::lock::Wait::NoWait,
            )
            .map_err(|source| BundleError::InUse {
                path: path.display().to_string(),
                source,
            })?;
        }
        let (header, master_key, _) = luks1::unlock(&file, secret)?;
        let volume = EncryptedVolume::new(file, &header, &master_key)?;
        let hmac_key = derive_key(&master_key, b"sealvm bundle hmac v1");
        let superblock = read_superblock(&volume, &hmac_key)?;
        let tag_bytes = if superblock.integrity {
            integrity::region_bytes(superblock.disk_bytes)
        } else {
            0
        };
        if DISK_OFFSET + superblock.disk_bytes + tag_bytes > volume.sectors() * SECTOR_SIZE as u64 {
            return Err(BundleError::Integrity(Region::Superblock));
        }
        Ok(Self {
            integrity: superblock.integrity.then(|| integrity_mac(&master_key)),
            header,
            volume,
            superblock,
            master_key,
            hmac_key,
        })
    }

    /// The LUKS1 header (no secrets).
    pub fn luks_header(&self) -> &luks1::Header {
        &self.header
    }

    /// The bundle id: the LUKS UUID, readable without the key, which keys the sealed record
    /// in the helper partition.
    pub fn id(&self) -> String {
        self.header.uuid.clone()
    }

    /// Guest disk size in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.superblock.disk_bytes
    }

    /// The generation of the current vTPM state (counts write-backs).
    pub fn vtpm_generation(&self) -> u64 {
        self.superblock.generation
    }

    /// The rollback mark in the authenticated superblock, if the bundle has one.
    pub fn rollback_mark(&self) -> Option<RollbackMark> {
        self.superblock.rollback
    }

    /// Records `mark` in the superblock (authenticated, one sector) and syncs it. The bundle
    /// must be open for writing.
    pub fn write_rollback_mark(&mut self, mark: RollbackMark) -> Result<(), BundleError> {
        let mut next = self.superblock.clone();
        next.rollback = Some(mark);
        self.volume
            .write_sectors(0, &superblock_bytes(&next, &self.hmac_key))?;
        self.volume.sync()?;
        self.superblock = next;
        Ok(())
    }

    /// The master key, for re-keying slots. Zeroized when the bundle drops.
    pub fn master_key(&self) -> &[u8] {
        &self.master_key
    }

    /// A 32-byte key for swtpm's own state encryption (`--key`), derived from the master key.
    pub fn vtpm_encryption_key(&self) -> Zeroizing<Vec<u8>> {
        derive_key(&self.master_key, b"sealvm vtpm state key v1")
    }

    /// Reads and verifies the manifest.
    pub fn manifest(&self) -> Result<VmManifest, BundleError> {
        let json = self.read_record(
            MANIFEST_OFFSET,
            MANIFEST_CAPACITY,
            Region::Manifest,
            |len| {
                record_mac(
                    &self.hmac_key,
                    b"manifest",
                    &self.superblock.bundle_id,
                    &[],
                    len,
                )
            },
        )?;
        serde_json::from_slice(&json).map_err(BundleError::ManifestJson)
    }

    /// Reads and verifies the active vTPM state blob.
    pub fn vtpm_state(&self) -> Result<Zeroizing<Vec<u8>>, BundleError> {
        let sb = &self.superblock;
        let offset = VTPM_OFFSET + u64::from(sb.active_slot) * VTPM_SLOT_CAPACITY;
        let mut prefix = Vec::with_capacity(16);
        prefix.extend_from_slice(&sb.active_slot.to_le_bytes());
        prefix.extend_from_slice(&sb.generation.to_le_bytes());
        let state = self.read_record(offset, VTPM_SLOT_CAPACITY, Region::VtpmState, |len| {
            record_mac(&self.hmac_key, b"vtpm", &sb.bundle_id, &prefix, len)
        })?;
        Ok(Zeroizing::new(state.to_vec()))
    }

    /// Writes `state` as the new vTPM state, atomically (see the module docs).
    pub fn write_vtpm_state(&mut self, state: &[u8]) -> Result<(), BundleError> {
        self.write_vtpm_state_until(state, |_| ControlFlow::Continue(()))
            .map(|_| ())
    }

    /// [`Self::write_vtpm_state`] with a step hook called before each step; `Break` stops
    /// the write-back there, as a crash would, and returns the step it stopped before
    /// (`Ok(None)` when it ran to the end). For crash tests; not an error path.
    pub(crate) fn write_vtpm_state_until(
        &mut self,
        state: &[u8],
        mut hook: impl FnMut(WriteStep) -> ControlFlow<()>,
    ) -> Result<Option<WriteStep>, BundleError> {
        macro_rules! step {
            ($step:expr) => {
                if hook($step).is_break() {
                    return Ok(Some($step));
                }
            };
        }
        let slot = 1 - self.superblock.active_slot;
        let generation = self.superblock.generation + 1;
        let mut prefix = Vec::with_capacity(16);
        prefix.extend_from_slice(&slot.to_le_bytes());
        prefix.extend_from_slice(&generation.to_le_bytes());
        let record = {
            let id = self.superblock.bundle_id;
            let key = &self.hmac_key;
            build_record(
                b"VTPM",
                generation,
                state,
                VTPM_SLOT_CAPACITY,
                Region::VtpmState,
                |len| record_mac(key, b"vtpm", &id, &prefix, len),
            )?
        };
        step!(WriteStep::SlotWrite);
        let offset = VTPM_OFFSET + u64::from(slot) * VTPM_SLOT_CAPACITY;
        self.volume
            .write_sectors(offset / SECTOR_SIZE as u64, &record)?;
        step!(WriteStep::SlotSync);
        self.volume.sync()?;
        let mut next = self.superblock.clone();
        next.active_slot = slot;
        next.generation = generation;
        step!(WriteStep::SuperblockWrite);
        self.volume
            .write_sectors(0, &superblock_bytes(&next, &self.hmac_key))?;
        step!(WriteStep::SuperblockSync);
        self.volume.sync()?;
        self.superblock = next;
        Ok(None)
    }

    /// Flushes the container to stable storage.
    pub fn sync(&self) -> Result<(), BundleError> {
        Ok(self.volume.sync()?)
    }

    /// Byte offset of the guest disk from the start of the LUKS payload (for `qemu-img`
    /// style access through the plain LUKS view).
    pub fn disk_offset_in_payload() -> u64 {
        DISK_OFFSET
    }

    fn write_manifest(&mut self, manifest: &VmManifest) -> Result<(), BundleError> {
        let json = serde_json::to_vec(manifest).map_err(BundleError::ManifestJson)?;
        let id = self.superblock.bundle_id;
        let record = build_record(
            &[0; 4],
            0,
            &json,
            MANIFEST_CAPACITY,
            Region::Manifest,
            |len| record_mac(&self.hmac_key, b"manifest", &id, &[], len),
        )?;
        self.volume
            .write_sectors(MANIFEST_OFFSET / SECTOR_SIZE as u64, &record)?;
        Ok(())
    }

    /// Reads a record (head + body) at `offset` and checks its MAC; returns the body.
    fn read_record(
        &self,
        offset: u64,
        capacity: u64,
        region: Region,
        mac: impl Fn(&[u8]) -> HmacSha256,
    ) -> Result<Zeroizing<Vec<u8>>, BundleError> {
        let mut head = [0u8; SECTOR_SIZE];
        self.volume
            .read_sectors(offset / SECTOR_SIZE as u64, &mut head)?;
        let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as u64;
        if len > capacity - RECORD_HEAD as u64 {
            return Err(BundleError::Integrity(region));
        }
        let total = (RECORD_HEAD as u64 + len).div_ceil(SECTOR_SIZE as u64) * SECTOR_SIZE as u64;
        let mut record = Zeroizing::new(vec![0u8; total as usize]);
        self.volume
            .read_sectors(offset / SECTOR_SIZE as u64, &mut record)?;
        let body = &record[RECORD_HEAD..RECORD_HEAD + len as usize];
        let mut m = mac(&record[..16]);
        m.update(body);
        m.verify_slice(&record[16..48])
            .map_err(|_| BundleError::Integrity(region))?;
        Ok(Zeroizing::new(body.to_vec()))
    }
}

/// Record head: magic (4), generation u64 (8), length u32 (4), MAC (32); body follows. The MAC
/// covers the domain, the bundle id, the caller's prefix, the first 16 head bytes and the body.
fn build_record(
    magic: &[u8; 4],
    generation: u64,
    body: &[u8],
    capacity: u64,
    region: Region,
    mac: impl Fn(&[u8]) -> HmacSha256,
) -> Result<Zeroizing<Vec<u8>>, BundleError> {
    let len = body.len() as u64;
    if len > capacity - RECORD_HEAD as u64 {
        return Err(BundleError::TooLarge {
            region,
            len,
            capacity: capacity - RECORD_HEAD as u64,
        });
    }
    let total = (RECORD_HEAD as u64 + len).div_ceil(SECTOR_SIZE as u64) * SECTOR_SIZE as u64;
    let mut record = Zeroizing::new(vec![0u8; total as usize]);
    record[0..4].copy_from_slice(magic);
    record[4..12].copy_from_slice(&generation.to_le_bytes());
    record[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    record[RECORD_HEAD..RECORD_HEAD + body.len()].copy_from_slice(body);
    let mut m = mac(&record[..16]);
    m.update(body);
    let tag = m.finalize().into_bytes();
    record[16..48].copy_from_slice(&tag);
    Ok(record)
}

fn record_mac(key: &[u8], domain: &[u8], id: &[u8; 16], prefix: &[u8], head: &[u8]) -> HmacSha256 {
    // Key length is never rejected by HMAC; new_from_slice only fails for fixed-size MACs.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    m.update(domain);
    m.update(id);
    m.update(prefix);
    m.update(head);
    m
}

/// The sector MAC of an `--integrity` bundle, keyed from its master key.
fn integrity_mac(master_key: &[u8]) -> (SectorMac, Mutex<()>) {
    let key = derive_key(master_key, b"sealvm disk integrity v1");
    (SectorMac::new(&key), Mutex::new(()))
}

fn derive_key(master_key: &[u8], label: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(master_key).expect("HMAC accepts any key length");
    m.update(label);
    Zeroizing::new(m.finalize().into_bytes().to_vec())
}

fn superblock_bytes(sb: &Superblock, hmac_key: &[u8]) -> [u8; SECTOR_SIZE] {
    let mut b = [0u8; SECTOR_SIZE];
    b[0..8].copy_from_slice(&MAGIC);
    if sb.integrity {
        b[8..12].copy_from_slice(&PAYLOAD_VERSION_INTEGRITY.to_le_bytes());
        b[12..16].copy_from_slice(&FLAG_INTEGRITY.to_le_bytes());
    } else {
        b[8..12].copy_from_slice(&PAYLOAD_VERSION.to_le_bytes());
    }
    b[16..32].copy_from_slice(&sb.bundle_id);
    let fields = [
        MANIFEST_OFFSET,
        MANIFEST_CAPACITY,
        VTPM_OFFSET,
        VTPM_SLOT_CAPACITY,
        DISK_OFFSET,
        sb.disk_bytes,
    ];
    for (i, v) in fields.iter().enumerate() {
        b[32 + 8 * i..40 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    b[80..84].copy_from_slice(&sb.active_slot.to_le_bytes());
    b[88..96].copy_from_slice(&sb.generation.to_le_bytes());
    if let Some(mark) = sb.rollback {
        b[96..100].copy_from_slice(&mark.counter_index.to_le_bytes());
        b[104..112].copy_from_slice(&mark.generation.to_le_bytes());
    }
    let mut m = <HmacSha256 as Mac>::new_from_slice(hmac_key).expect("HMAC accepts any key length");
    m.update(b"superblock");
    m.update(&b[..SB_HMAC_AT]);
    b[SB_HMAC_AT..SB_HMAC_AT + 32].copy_from_slice(&m.finalize().into_bytes());
    b
}

fn read_superblock(volume: &EncryptedVolume, hmac_key: &[u8]) -> Result<Superblock, BundleError> {
    let mut b = [0u8; SECTOR_SIZE];
    volume.read_sectors(0, &mut b)?;
    parse_superblock(&b, hmac_key)
}

/// Checks and decodes a decrypted superblock sector.
fn parse_superblock(b: &[u8; SECTOR_SIZE], hmac_key: &[u8]) -> Result<Superblock, BundleError> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(hmac_key).expect("HMAC accepts any key length");
    m.update(b"superblock");
    m.update(&b[..SB_HMAC_AT]);
    m.verify_slice(&b[SB_HMAC_AT..SB_HMAC_AT + 32])
        .map_err(|_| BundleError::Integrity(Region::Superblock))?;
    if b[0..8] != MAGIC {
        return Err(BundleError::Integrity(Region::Superblock));
    }
    let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let flags = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    let integrity = match (version, flags) {
        (PAYLOAD_VERSION, 0) => false,
        (PAYLOAD_VERSION_INTEGRITY, FLAG_INTEGRITY) => true,
        _ => return Err(BundleError::UnsupportedVersion(version)),
    };
    let layout = [le64(32), le64(40), le64(48), le64(56), le64(64)];
    if layout
        != [
            MANIFEST_OFFSET,
            MANIFEST_CAPACITY,
            VTPM_OFFSET,
            VTPM_SLOT_CAPACITY,
            DISK_OFFSET,
        ]
    {
        return Err(BundleError::Integrity(Region::Superblock));
    }
    let active_slot = u32::from_le_bytes([b[80], b[81], b[82], b[83]]);
    if active_slot > 1 {
        return Err(BundleError::Integrity(Region::Superblock));
    }
    let mut bundle_id = [0u8; 16];
    bundle_id.copy_from_slice(&b[16..32]);
    Ok(Superblock {
        bundle_id,
        disk_bytes: le64(72),
        active_slot,
        generation: le64(88),
        rollback: match u32::from_le_bytes([b[96], b[97], b[98], b[99]]) {
            0 => None,
            counter_index => Some(RollbackMark {
                counter_index,
                generation: le64(104),
            }),
        },
        integrity,
    })
}

mod disk;

/// Entry points for the `bundle_header` fuzz target (trust/fuzz), kept here so a crash found
/// there replays as an ordinary unit test.
pub mod fuzzing {
    use super::*;

    /// The HMAC key the fuzz target signs superblocks with.
    pub const FUZZ_KEY: &[u8] = b"fuzz-superblock-key";

    /// Feeds `data` to the superblock parser twice: as it is (the MAC check must refuse
    /// junk) and signed with [`FUZZ_KEY`], so the field checks behind the MAC are reached.
    /// Neither may panic.
    pub fn superblock(data: &[u8]) {
        let mut b = [0u8; SECTOR_SIZE];
        let n = data.len().min(SECTOR_SIZE);
        b[..n].copy_from_slice(&data[..n]);
        let _ = parse_superblock(&b, FUZZ_KEY);
        let mut m = <HmacSha256 as Mac>::new_from_slice(FUZZ_KEY).expect("any key length");
        m.update(b"superblock");
        m.update(&b[..SB_HMAC_AT]);
        let tag = m.finalize().into_bytes();
        b[SB_HMAC_AT..SB_HMAC_AT + 32].copy_from_slice(&tag);
        if let Ok(sb) = parse_superblock(&b, FUZZ_KEY) {
            assert!(sb.active_slot <= 1);
        }
    }
}
