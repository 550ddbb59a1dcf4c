//! The helper's sealed partition: a GPT partition (type [`PARTITION_TYPE_GUID`], name
//! [`PARTITION_NAME`]) in the helper guest's disk image that holds the sealed key records of
//! many bundles, keyed by bundle id.
//!
//! # Store format, version 1
//!
//! The partition is split into two equal halves, A and B. Each half starts with a 512-byte
//! header: magic `SEALVMKS` (8), version u32 LE = 1 (4), reserved (4), generation u64 LE,
//! JSON length u64 LE, SHA-256 of the JSON (32); the JSON document
//! `{"records":[SealedObject, ...]}` follows at offset 512. A write goes to the half not
//! holding the newest generation, with generation + 1, then fdatasync; readers take the
//! valid half with the highest generation, so a crash mid-write leaves the previous store.
//! Nothing here is secret: the private blobs are encrypted by the host TPM.

pub mod gpt;

use crate::tpm::SealedObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The partition type GUID of a sealed partition.
pub const PARTITION_TYPE_GUID: &str = "5ea1ed00-7b3c-4a2e-9d1f-0c5e41bd5e01";
/// The partition name of a sealed partition.
pub const PARTITION_NAME: &str = "sealvm-sealed";
/// The store format version.
pub const STORE_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"SEALVMKS";
/// The smallest partition with room for two store halves of a header and one sector each.
pub const MIN_PARTITION_BYTES: u64 = 4 * 512;

/// Errors finding, reading or updating the sealed partition.
#[derive(Debug, thiserror::Error)]
pub enum HelperPartitionError {
    /// The helper disk image cannot be opened.
    #[error("cannot open helper disk {path}")]
    Open {
        /// The image path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the GPT failed.
    #[error("helper disk partition table")]
    Gpt(#[from] gpt::GptError),
    /// The image has no partition with the sealed type GUID and name.
    #[error(
        "the helper disk has no `sealvm-sealed` partition (run `sealvm helper-partition init`)"
    )]
    Missing,
    /// The image already has a sealed partition.
    #[error("the helper disk already has a `sealvm-sealed` partition")]
    AlreadyExists,
    /// Partition I/O failed.
    #[error("cannot {0} the sealed partition")]
    Io(&'static str, #[source] std::io::Error),
    /// Neither half of the store is valid.
    #[error("the sealed partition's store is damaged (no valid copy)")]
    Corrupt,
    /// The records do not fit the partition.
    #[error("the sealed records ({0} bytes) do not fit the partition")]
    Full(u64),
    /// The store JSON does not encode or decode.
    #[error("sealed store JSON")]
    Json(#[source] serde_json::Error),
    /// The partition is too small to hold the two store halves.
    #[error("the sealed partition ({bytes} bytes) is too small for its store (at least {MIN_PARTITION_BYTES} bytes)")]
    TooSmall {
        /// The partition's size.
        bytes: u64,
    },
    /// No record for this bundle.
    #[error("no sealed key for bundle {0} in the helper partition")]
    NoRecord(String),
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Store {
    records: Vec<SealedObject>,
}

/// An open sealed partition.
pub struct SealedPartition {
    file: File,
    layout: Layout,
}

/// Where the store's two halves are in the image, checked against the image's size.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Byte offset of the partition.
    start: u64,
    /// Bytes per half (a multiple of 512, at least 1024).
    half: u64,
}

impl Layout {
    /// The layout of `entry`'s partition, refused unless it lies inside `disk_bytes` and
    /// has room for both halves.
    fn of(entry: &gpt::Entry, disk_bytes: u64) -> Result<Self, HelperPartitionError> {
        let out_of_range = || {
            HelperPartitionError::Gpt(gpt::GptError::EntryOutOfRange {
                slot: 0,
                first_lba: entry.first_lba,
                last_lba: entry.last_lba,
                disk_lbas: disk_bytes / gpt::LBA,
            })
        };
        let start = entry
            .first_lba
            .checked_mul(gpt::LBA)
            .ok_or_else(out_of_range)?;
        let bytes = entry
            .last_lba
            .checked_sub(entry.first_lba)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(gpt::LBA))
            .ok_or_else(out_of_range)?;
        if start.checked_add(bytes).is_none_or(|end| end > disk_bytes) {
            return Err(out_of_range());
        }
        if bytes < MIN_PARTITION_BYTES {
            return Err(HelperPartitionError::TooSmall { bytes });
        }
        Ok(Self {
            start,
            half: bytes / 2 / 512 * 512,
        })
    }
}

impl SealedPartition {
    /// Adds a sealed partition of `bytes` to the image at `path` (creating the image with
    /// `image_bytes` if it does not exist) and writes an empty store.
    pub fn init(path: &Path, bytes: u64, image_bytes: u64) -> Result<Self, HelperPartitionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| HelperPartitionError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|e| HelperPartitionError::Io("stat", e))?
            .len();
        if len == 0 {
            file.set_len(image_bytes)
                .map_err(|e| HelperPartitionError::Io("size", e))?;
        }
        if find(&file).is_ok() {
            return Err(HelperPartitionError::AlreadyExists);
        }
        let entry = gpt::add_partition(
            &file,
            gpt::guid_bytes(PARTITION_TYPE_GUID),
            PARTITION_NAME,
            bytes,
        )?;
        let partition = Self::from_entry(file, &entry)?;
        let zero = vec![0u8; 512];
        for half in [0, partition.layout.half] {
            partition
                .file
                .write_all_at(&zero, partition.layout.start + half)
                .map_err(|e| HelperPartitionError::Io("clear", e))?;
        }
        partition.write_store(&Store::default(), 0)?;
        Ok(partition)
    }

    /// Opens the sealed partition of the image at `path`.
    pub fn open(path: &Path, writable: bool) -> Result<Self, HelperPartitionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| HelperPartitionError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let entry = find(&file)?;
        Self::from_entry(file, &entry)
    }

    fn from_entry(file: File, entry: &gpt::Entry) -> Result<Self, HelperPartitionError> {
        let disk_bytes =
            gpt::DiskImage::len_bytes(&file).map_err(|e| HelperPartitionError::Io("stat", e))?;
        let layout = Layout::of(entry, disk_bytes)?;
        Ok(Self { file, layout })
    }

    /// All records.
    pub fn records(&self) -> Result<Vec<SealedObject>, HelperPartitionError> {
        Ok(read_store(&self.file, &self.layout)?.0.records)
    }

    /// The record for `bundle_id`.
    pub fn get(&self, bundle_id: &str) -> Result<SealedObject, HelperPartitionError> {
        self.records()?
            .into_iter()
            .find(|r| r.bundle_id == bundle_id)
            .ok_or_else(|| HelperPartitionError::NoRecord(bundle_id.to_string()))
    }

    /// Stores `record`, replacing any record of the same bundle.
    pub fn put(&self, record: SealedObject) -> Result<(), HelperPartitionError> {
        let (mut store, generation) = read_store(&self.file, &self.layout)?;
        store.records.retain(|r| r.bundle_id != record.bundle_id);
        store.records.push(record);
        self.write_store(&store, generation + 1)
    }

    fn write_store(&self, store: &Store, generation: u64) -> Result<(), HelperPartitionError> {
        let json = serde_json::to_vec(store).map_err(HelperPartitionError::Json)?;
        if json.len() as u64 > self.layout.half - 512 {
            return Err(HelperPartitionError::Full(json.len() as u64));
        }
        // Generation g lives in half g % 2, so the newest copy is never overwritten.
        let half = if generation.is_multiple_of(2) {
            0
        } else {
            self.layout.half
        };
        let mut head = [0u8; 512];
        head[0..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&STORE_VERSION.to_le_bytes());
        head[16..24].copy_from_slice(&generation.to_le_bytes());
        head[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
        head[32..64].copy_from_slice(&Sha256::digest(&json));
        let io = |e| HelperPartitionError::Io("write", e);
        self.file
            .write_all_at(&json, self.layout.start + half + 512)
            .map_err(io)?;
        self.file
            .write_all_at(&head, self.layout.start + half)
            .map_err(io)?;
        self.file
            .sync_data()
            .map_err(|e| HelperPartitionError::Io("sync", e))
    }
}

/// Reads the newest valid half of the store in `image`.
fn read_store(
    image: &dyn gpt::DiskImage,
    layout: &Layout,
) -> Result<(Store, u64), HelperPartitionError> {
    let mut best: Option<(u64, Vec<u8>)> = None;
    for half in [0, layout.half] {
        if let Some((generation, json)) = read_half(image, layout, half)? {
            if best.as_ref().is_none_or(|(g, _)| generation > *g) {
                best = Some((generation, json));
            }
        }
    }
    let (generation, json) = best.ok_or(HelperPartitionError::Corrupt)?;
    let store = serde_json::from_slice(&json).map_err(HelperPartitionError::Json)?;
    Ok((store, generation))
}

/// One half's JSON and generation, or `None` when its header or checksum does not hold.
fn read_half(
    image: &dyn gpt::DiskImage,
    layout: &Layout,
    half: u64,
) -> Result<Option<(u64, Vec<u8>)>, HelperPartitionError> {
    let mut head = [0u8; 64];
    image
        .read_at(&mut head, layout.start + half)
        .map_err(|e| HelperPartitionError::Io("read", e))?;
    if head[0..8] != MAGIC {
        return Ok(None);
    }
    let generation = u64::from_le_bytes(head[16..24].try_into().unwrap_or([0; 8]));
    let len = u64::from_le_bytes(head[24..32].try_into().unwrap_or([0; 8]));
    // The layout was checked against the image: the JSON area of a half is inside it, so
    // `len` bounds the allocation by the image's size.
    if len > layout.half - 512 {
        return Ok(None);
    }
    let mut json = vec![0u8; len as usize];
    image
        .read_at(&mut json, layout.start + half + 512)
        .map_err(|e| HelperPartitionError::Io("read", e))?;
    if Sha256::digest(&json)[..] != head[32..64] {
        return Ok(None);
    }
    Ok(Some((generation, json)))
}

fn find(file: &dyn gpt::DiskImage) -> Result<gpt::Entry, HelperPartitionError> {
    let table = match gpt::read(file) {
        Ok(t) => t,
        Err(gpt::GptError::NoGpt) => return Err(HelperPartitionError::Missing),
        Err(e) => return Err(e.into()),
    };
    let type_guid = gpt::guid_bytes(PARTITION_TYPE_GUID);
    table
        .entries
        .into_iter()
        .map(|(_, e)| e)
        .find(|e| e.type_guid == type_guid && e.name == PARTITION_NAME)
        .ok_or(HelperPartitionError::Missing)
}

/// Entry points for the `helper_partition` fuzz target, in an ordinary module so a crash
/// found once replays as a unit test.
pub mod fuzzing {
    use super::*;

    /// Treats `data` as a whole helper disk image: finds the sealed partition and decodes
    /// its store. Any input must end in `Ok` or an error, never a panic, and no allocation
    /// may exceed the input's size.
    pub fn helper_disk(data: &[u8]) {
        let Ok(entry) = find(&data) else { return };
        let Ok(layout) = Layout::of(&entry, data.len() as u64) else {
            return;
        };
        if let Ok((store, _)) = read_store(&data, &layout) {
            for record in &store.records {
                let _ = record.pcrs.len();
            }
        }
    }
}

#[cfg(test)]
mod crafted_tests;
#[cfg(test)]
mod tests;
