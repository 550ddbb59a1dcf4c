//! The sealed partition against Debian's gdisk.

use super::*;
use std::process::Command;

fn record(id: &str) -> SealedObject {
    SealedObject {
        bundle_id: id.into(),
        pcr_bank: "sha256".into(),
        pcrs: vec![16, 23],
        expected: vec!["00".repeat(32), "00".repeat(32)],
        policy_digest: "11".repeat(32),
        storage_key_name: "000b".into(),
        public: "abcd".into(),
        private: "ef01".into(),
        rollback_counter: None,
    }
}

fn sgdisk(args: &[&str], image: &Path) -> String {
    let out = Command::new("sgdisk")
        .args(args)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sgdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sgdisk_lists_the_sealed_partition_and_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("helper.img");
    let partition = SealedPartition::init(&image, 4 << 20, 64 << 20).unwrap();
    for i in 0..20 {
        partition.put(record(&format!("bundle-{i}"))).unwrap();
    }
    let mut replaced = record("bundle-3");
    replaced.pcrs = vec![7];
    partition.put(replaced.clone()).unwrap();
    drop(partition);
    let listing = sgdisk(&["-p"], &image);
    assert!(listing.contains("sealvm-sealed"), "{listing}");
    let info = sgdisk(&["-i", "1"], &image);
    assert!(
        info.to_uppercase()
            .contains(&PARTITION_TYPE_GUID.to_uppercase()),
        "{info}"
    );
    let verify = sgdisk(&["-v"], &image);
    assert!(verify.contains("No problems found"), "{verify}");

    let partition = SealedPartition::open(&image, false).unwrap();
    assert_eq!(partition.records().unwrap().len(), 20);
    assert_eq!(partition.get("bundle-3").unwrap(), replaced);
    assert_eq!(partition.get("bundle-19").unwrap(), record("bundle-19"));
    assert!(matches!(
        partition.get("nope"),
        Err(HelperPartitionError::NoRecord(_))
    ));
}

#[test]
fn partition_added_beside_sgdisk_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("helper.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    sgdisk(&["-n", "1:2048:+8M", "-c", "1:root"], &image);
    SealedPartition::init(&image, 4 << 20, 0)
        .unwrap()
        .put(record("x"))
        .unwrap();
    let listing = sgdisk(&["-p"], &image);
    assert!(
        listing.contains("root") && listing.contains("sealvm-sealed"),
        "{listing}"
    );
    assert_eq!(
        SealedPartition::open(&image, false)
            .unwrap()
            .get("x")
            .unwrap(),
        record("x")
    );
    assert!(matches!(
        SealedPartition::init(&image, 4 << 20, 0),
        Err(HelperPartitionError::AlreadyExists)
    ));
}

#[test]
fn image_without_partition_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plain.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert!(matches!(
        SealedPartition::open(&image, false),
        Err(HelperPartitionError::Missing)
    ));
}

#[test]
fn torn_store_write_falls_back_to_previous_copy() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("helper.img");
    let partition = SealedPartition::init(&image, 4 << 20, 32 << 20).unwrap();
    partition.put(record("a")).unwrap(); // generation 1, half B
    partition.put(record("b")).unwrap(); // generation 2, half A
                                         // Damage the newest copy's JSON as a torn write would.
    partition
        .file
        .write_all_at(b"garbage", partition.layout.start + 512 + 3)
        .unwrap();
    let records = partition.records().unwrap();
    assert_eq!(records, vec![record("a")]);
}
