//! Crafted helper disks with valid GPT checksums: every out-of-range size or offset is
//! refused with an error, never a panic or a huge allocation (the crashes found in review:
//! inverted entry, huge start LBA, one-sector partition, entry array at a huge LBA).

use super::gpt::{self, DiskImage};
use super::*;
use std::os::unix::fs::FileExt;

/// A helper image with an empty sealed partition; returns (dir, path, image LBAs).
fn helper_image() -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("helper.img");
    SealedPartition::init(&path, 1 << 20, 4 << 20).unwrap();
    (dir, path, (4 << 20) / gpt::LBA)
}

/// Rewrites the sealed partition's entry with `edit` and valid checksums.
fn craft_entry(path: &Path, lbas: u64, edit: impl FnOnce(&mut gpt::Entry)) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut table = gpt::read(&file).unwrap();
    edit(&mut table.entries[0].1);
    gpt::write(&file, &table, lbas).unwrap();
}

/// Opening and reading the records must fail with an error, and the fuzz entry point must
/// not panic on the bytes.
fn refused(path: &Path) -> HelperPartitionError {
    let bytes = std::fs::read(path).unwrap();
    fuzzing::helper_disk(&bytes);
    match SealedPartition::open(path, false).and_then(|p| p.records()) {
        Ok(_) => panic!("a crafted helper disk was read"),
        Err(error) => error,
    }
}

#[test]
fn inverted_partition_entry_is_refused() {
    let (_dir, path, lbas) = helper_image();
    craft_entry(&path, lbas, |e| {
        let first = e.first_lba;
        e.first_lba = e.last_lba + 5;
        e.last_lba = first;
    });
    let error = refused(&path);
    assert!(
        matches!(
            error,
            HelperPartitionError::Gpt(gpt::GptError::EntryOutOfRange { .. })
        ),
        "{error}"
    );
}

#[test]
fn huge_start_lba_is_refused() {
    let (_dir, path, lbas) = helper_image();
    craft_entry(&path, lbas, |e| {
        e.first_lba = 1 << 62;
        e.last_lba = (1 << 62) + 2047;
    });
    let error = refused(&path);
    assert!(
        matches!(
            error,
            HelperPartitionError::Gpt(gpt::GptError::EntryOutOfRange { .. })
        ),
        "{error}"
    );
}

#[test]
fn partition_past_the_end_of_the_disk_is_refused() {
    let (_dir, path, lbas) = helper_image();
    craft_entry(&path, lbas, |e| e.last_lba = lbas + 100);
    let error = refused(&path);
    assert!(
        matches!(
            error,
            HelperPartitionError::Gpt(gpt::GptError::EntryOutOfRange { .. })
        ),
        "{error}"
    );
}

#[test]
fn one_sector_partition_with_a_huge_store_length_is_refused_without_allocating() {
    let (_dir, path, lbas) = helper_image();
    let mut start = 0;
    craft_entry(&path, lbas, |e| {
        e.last_lba = e.first_lba;
        start = e.first_lba * gpt::LBA;
    });
    // A store header claiming 1 TiB of JSON: what release builds tried to allocate.
    let mut head = [0u8; 512];
    head[0..8].copy_from_slice(b"SEALVMKS");
    head[8..12].copy_from_slice(&1u32.to_le_bytes());
    head[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&head, start).unwrap();
    let error = refused(&path);
    assert!(
        matches!(error, HelperPartitionError::TooSmall { bytes: 512 }),
        "{error}"
    );
}

#[test]
fn entry_array_at_a_huge_lba_is_refused() {
    let (_dir, path, _) = helper_image();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut header = [0u8; 92];
    file.read_exact_at(&mut header, gpt::LBA).unwrap();
    header[72..80].copy_from_slice(&(1u64 << 60).to_le_bytes());
    header[16..20].fill(0);
    let crc = crc32fast::hash(&header);
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, gpt::LBA).unwrap();
    let error = refused(&path);
    assert!(
        matches!(
            error,
            HelperPartitionError::Gpt(gpt::GptError::EntriesOutOfRange { .. })
        ),
        "{error}"
    );
}

#[test]
fn store_length_beyond_its_half_is_ignored_not_allocated() {
    let (_dir, path, _) = helper_image();
    let partition = SealedPartition::open(&path, false).unwrap();
    let start = partition.layout.start;
    drop(partition);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    for half in [0, 512 * 1024] {
        let mut head = [0u8; 64];
        file.read_exact_at(&mut head, start + half).unwrap();
        head[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        file.write_all_at(&head, start + half).unwrap();
    }
    assert!(matches!(refused(&path), HelperPartitionError::Corrupt));
}

#[test]
fn byte_images_shorter_than_a_read_fail_cleanly() {
    let image: &[u8] = &[0u8; 100];
    let mut buf = [0u8; 64];
    assert!(image.read_at(&mut buf, 80).is_err());
    assert!(image.read_at(&mut buf, u64::MAX).is_err());
    assert!(image.read_at(&mut buf, 36).is_ok());
}
