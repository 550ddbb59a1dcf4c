//! A version-1 journal (made by sealvm-blk before this crate, kept in fixtures/v1) still
//! reads, is refused for writing with a pointer to the upgrade, and upgrades to version 2
//! with the same records.

use sealvm_journal::dir::JournalError;
use sealvm_journal::format::RecordKind;
use sealvm_journal::reader::Reader;
use sealvm_journal::upgrade::upgrade;
use sealvm_journal::writer::{Writer, WriterError};
use std::path::{Path, PathBuf};

/// A copy of the fixture (base.raw and journal/) in a temporary directory.
pub fn fixture_copy(to: &Path) -> (PathBuf, PathBuf) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    std::fs::copy(from.join("base.raw"), to.join("base.raw")).unwrap();
    std::fs::create_dir(to.join("journal")).unwrap();
    for entry in std::fs::read_dir(from.join("journal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("journal").join(entry.file_name())).unwrap();
    }
    (to.join("base.raw"), to.join("journal"))
}

fn records(journal: &Path) -> Vec<(u64, RecordKind, u64, Vec<u8>)> {
    Reader::open(journal)
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|r| !r.header.is_annotation())
        .map(|r| (r.header.seq, r.header.kind, r.header.offset, r.payload))
        .collect()
}

#[test]
fn a_version_one_journal_reads_refuses_writing_and_upgrades_with_the_same_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = fixture_copy(tmp.path());
    let before = records(&journal);
    assert_eq!(before.len(), 14);
    assert_eq!(before[2].1, RecordKind::Bookmark);
    assert_eq!(before[2].3, b"v1-mark");
    assert_eq!(
        before[12].1,
        RecordKind::Write,
        "v1 journals discards as zeroes"
    );

    match Writer::open(&journal, &base, 4096, |_| {}) {
        Err(WriterError::Journal(e @ JournalError::NeedsUpgrade { .. })) => {
            assert!(e.to_string().contains("journal upgrade"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a version-1 journal was opened for writing"),
    }

    let report = upgrade(&journal, &base).unwrap();
    assert_eq!(
        (report.segments, report.records, report.zero_writes),
        (3, 14, 1)
    );
    let after = records(&journal);
    assert_eq!(after.len(), 14);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.0, new.0);
        if old.0 == 13 {
            assert_eq!(new.1, RecordKind::ZeroExtent);
            assert_eq!(new.3, 1024u64.to_le_bytes(), "the zero extent's length");
        } else {
            assert_eq!(old, new);
        }
    }
    // Upgrading again does nothing; writing works now and goes on from seq 15.
    assert_eq!(upgrade(&journal, &base).unwrap().segments, 0);
    let (mut writer, replayed) = Writer::open(&journal, &base, 4096, |_| {}).unwrap();
    assert_eq!(replayed.records, 14);
    assert_eq!(
        writer.append(RecordKind::Write, 0, &[9; 512]).unwrap().seq,
        15
    );
}

/// A directory fsync cannot be made to fail for real, so this injects the failure through
/// the storage seam ([`FailOnce`]) on the first segment's rewrite.
#[test]
fn an_upgrade_whose_directory_sync_fails_says_so_and_a_rerun_finishes_it() {
    use sealvm_journal::storage::{FailAt, FailOnce};
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = fixture_copy(tmp.path());
    let before = records(&journal);
    let segments = sealvm_journal::dir::segments(&journal).unwrap();
    let first = segments[0]
        .1
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let failing = FailOnce::new(FailAt::SyncDir, Some(&first));
    let result = sealvm_journal::upgrade::upgrade_with(&journal, &base, failing.as_ref());
    let error = result.expect_err("an upgrade whose directory sync failed succeeded");
    assert!(error.to_string().contains(&first), "{error}");
    let report = upgrade(&journal, &base).unwrap();
    assert_eq!(
        report.segments, 2,
        "the first segment was already rewritten"
    );
    let after = records(&journal);
    assert_eq!(after.len(), before.len());
    assert_eq!(after[12].1, RecordKind::ZeroExtent);
}
