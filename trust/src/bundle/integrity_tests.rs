//! `--integrity` bundles: a flipped, swapped or replayed-elsewhere disk sector is an error
//! for that sector only, never wrong data; the same flip in a plain bundle reads back as
//! garbage (why the mode exists).

use super::payload::{Bundle, BundleError, CreateOptions, DiskSource, VmManifest};
use std::os::unix::fs::FileExt;
use std::path::Path;

const SECRET: &[u8] = b"5ec7025ec7025ec7025ec7025ec7025ec7025ec7025ec7025ec7025ec7025ec7";
/// File offset of guest-disk sector 0: LUKS payload at 2 MiB, disk at 3 MiB inside it.
const DISK_AT: u64 = (2 << 20) + (3 << 20);

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + i / 512) as u8).collect()
}

fn create(path: &Path, integrity: bool) -> Bundle {
    let raw = path.with_extension("raw");
    std::fs::write(&raw, pattern(2 << 20)).unwrap();
    let manifest = VmManifest {
        vcpus: 1,
        memory_mib: 64,
        cmdline: String::new(),
        kernel_sha256: "00".repeat(32),
        initramfs_sha256: None,
    };
    Bundle::create_with(
        path,
        SECRET,
        &manifest,
        b"state",
        DiskSource::Raw(&raw),
        CreateOptions { integrity },
    )
    .unwrap()
}

fn edit(path: &Path, at: u64, f: impl FnOnce(&mut [u8])) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 512];
    file.read_exact_at(&mut b, at).unwrap();
    f(&mut b);
    file.write_all_at(&b, at).unwrap();
}

fn read(bundle: &Bundle, sector: u64, count: usize) -> Result<Vec<u8>, BundleError> {
    let mut buf = vec![0u8; count * 512];
    bundle.read_disk(sector * 512, &mut buf).map(|_| buf)
}

#[test]
fn a_flipped_disk_byte_fails_that_sector_only_and_a_rewrite_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.svm");
    let bundle = create(&path, true);
    assert!(bundle.has_integrity());
    assert_eq!(read(&bundle, 0, 64).unwrap(), pattern(64 * 512));
    drop(bundle);
    edit(&path, DISK_AT + 5 * 512, |b| b[7] ^= 1);
    let bundle = Bundle::open(&path, SECRET, true).unwrap();
    assert!(matches!(
        read(&bundle, 5, 1),
        Err(BundleError::DiskIntegrity { sector: 5 })
    ));
    // A request covering it fails whole; its neighbours read fine.
    assert!(matches!(
        read(&bundle, 0, 16),
        Err(BundleError::DiskIntegrity { sector: 5 })
    ));
    let all = pattern(2 << 20);
    assert_eq!(read(&bundle, 0, 5).unwrap(), all[..5 * 512]);
    assert_eq!(read(&bundle, 6, 100).unwrap(), all[6 * 512..106 * 512]);
    // The guest writing the sector again makes it readable.
    bundle.write_disk(5 * 512, &[0x77; 512]).unwrap();
    assert_eq!(read(&bundle, 5, 1).unwrap(), vec![0x77; 512]);
    drop(bundle);
    let bundle = Bundle::open(&path, SECRET, false).unwrap();
    assert_eq!(read(&bundle, 5, 1).unwrap(), vec![0x77; 512]);
}

#[test]
fn swapped_sectors_and_a_damaged_tag_sector_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.svm");
    drop(create(&path, true));
    // Swap the ciphertext of sectors 1 and 2: each is valid data, in the wrong place.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let (mut one, mut two) = ([0u8; 512], [0u8; 512]);
    file.read_exact_at(&mut one, DISK_AT + 512).unwrap();
    file.read_exact_at(&mut two, DISK_AT + 1024).unwrap();
    file.write_all_at(&two, DISK_AT + 512).unwrap();
    file.write_all_at(&one, DISK_AT + 1024).unwrap();
    // And damage the tag sector of disk sectors 32..48 (tag region after the 2 MiB disk):
    // byte 100 lies in entry 3 (XTS garbles only that 16-byte block), disk sector 35.
    edit(&path, DISK_AT + (2 << 20) + 2 * 512, |b| b[100] ^= 1);
    let bundle = Bundle::open(&path, SECRET, false).unwrap();
    assert!(matches!(
        read(&bundle, 1, 1),
        Err(BundleError::DiskIntegrity { sector: 1 })
    ));
    assert!(matches!(
        read(&bundle, 2, 1),
        Err(BundleError::DiskIntegrity { sector: 2 })
    ));
    assert!(read(&bundle, 3, 29).is_ok());
    assert!(matches!(
        read(&bundle, 35, 1),
        Err(BundleError::DiskIntegrity { sector: 35 })
    ));
    assert!(read(&bundle, 32, 3).is_ok());
    assert!(read(&bundle, 36, 28).is_ok());
}

#[test]
fn the_same_flip_in_a_plain_bundle_reads_back_as_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.svm");
    drop(create(&path, false));
    edit(&path, DISK_AT + 5 * 512, |b| b[7] ^= 1);
    let bundle = Bundle::open(&path, SECRET, false).unwrap();
    assert!(!bundle.has_integrity());
    let data = read(&bundle, 5, 1).unwrap();
    assert_ne!(
        data,
        pattern(6 * 512)[5 * 512..],
        "XTS is malleable: garbage, silently"
    );
}
