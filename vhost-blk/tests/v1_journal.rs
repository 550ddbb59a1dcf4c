//! A version-1 journal (journal/tests/fixtures/v1, made by sealvm-blk before format 2)
//! still restores and exposes every point, `serve` refuses it pointing at the upgrade, and
//! after `sealvm-blk journal upgrade` it serves the same volume and points.

use sealvm_blk::image_access::PointInTimeImage;
use sealvm_blk::pit::{self, PointInTime};
use sealvm_blk::volume::JournaledVolume;
use sealvm_virtio_blk::BlockBackend;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../journal/tests/fixtures/v1")
}

fn copy(to: &Path) -> (PathBuf, PathBuf) {
    std::fs::copy(fixture().join("base.raw"), to.join("base.raw")).unwrap();
    std::fs::create_dir(to.join("journal")).unwrap();
    for entry in std::fs::read_dir(fixture().join("journal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("journal").join(entry.file_name())).unwrap();
    }
    (to.join("base.raw"), to.join("journal"))
}

fn restore_all(base: &Path, journal: &Path, out: &Path) -> Vec<Vec<u8>> {
    (0..=14)
        .map(|seq| {
            let _ = std::fs::remove_file(out);
            pit::restore(base, journal, seq, out, |_, _| {}).unwrap();
            std::fs::read(out).unwrap()
        })
        .collect()
}

#[test]
fn a_version_one_journal_restores_refuses_serving_and_upgrades_to_the_same_points() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = copy(tmp.path());
    let latest = std::fs::read(fixture().join("latest.raw")).unwrap();
    let points = pit::points(&journal).unwrap();
    assert_eq!((points.format_version, points.last_seq), (1, 14));
    assert_eq!(points.bookmarks[0].name, "v1-mark");
    let out = tmp.path().join("out.raw");
    let before = restore_all(&base, &journal, &out);
    assert_eq!(before[14], latest);
    assert_eq!(
        pit::resolve(&journal, &PointInTime::Bookmark("v1-mark".into())).unwrap(),
        3
    );
    let view = PointInTimeImage::open(&base, &journal, 4, false).unwrap();
    let mut buf = vec![0u8; latest.len()];
    view.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, before[4]);
    drop(view);

    let err = JournaledVolume::open(&base, &journal, false).err().unwrap();
    assert!(
        err.to_string().contains("sealvm-blk journal upgrade"),
        "{err}"
    );

    let upgraded = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(["journal", "upgrade", "--base"])
        .arg(&base)
        .arg("--journal")
        .arg(&journal)
        .output()
        .unwrap();
    assert!(
        upgraded.status.success(),
        "{}",
        String::from_utf8_lossy(&upgraded.stderr)
    );
    assert_eq!(pit::points(&journal).unwrap().format_version, 2);
    assert_eq!(restore_all(&base, &journal, &out), before);
    let (volume, opened) = JournaledVolume::open(&base, &journal, false).unwrap();
    assert_eq!(opened.records, 14);
    volume.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, latest);
    assert_eq!(volume.bookmarks()[0].name, "v1-mark");
    volume.write_at(0, &[0xee; 512]).unwrap();
    volume.flush().unwrap();
}
