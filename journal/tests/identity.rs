//! Every open checks that the journal, its segments, the volume's image and the folded base
//! belong together, and says what does not match.

use sealvm_journal::dir::JournalError;
use sealvm_journal::format::RecordKind;
use sealvm_journal::writer::{Writer, WriterError};
use std::path::Path;

fn open(journal: &Path, base: &Path) -> Result<Writer, WriterError> {
    Writer::open(journal, base, 4096, |_| {}).map(|(w, _)| w)
}

fn mismatch(result: Result<Writer, WriterError>) -> (String, &'static str) {
    match result {
        Err(WriterError::Journal(JournalError::Mismatch { path, what, .. })) => {
            (path.display().to_string(), what)
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a journal opened with parts that do not belong together"),
    }
}

#[test]
fn a_journal_paired_with_the_wrong_image_or_segment_is_refused_naming_the_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("a.raw");
    std::fs::write(&base, vec![1u8; 8192]).unwrap();
    let journal = tmp.path().join("a.journal");
    {
        let mut w = open(&journal, &base).unwrap();
        w.append(RecordKind::Write, 0, &[7; 512]).unwrap();
        let identity = *w.identity();
        assert_eq!(identity.volume_bytes, 8192);
        assert_ne!(identity.journal, identity.volume);
    }
    // Another image of the same size.
    let other = tmp.path().join("b.raw");
    std::fs::write(&other, vec![2u8; 8192]).unwrap();
    let (path, what) = mismatch(open(&journal, &other));
    assert!(
        path.ends_with("b.raw") && what.contains("fingerprint"),
        "{path} {what}"
    );
    // An image of another size.
    std::fs::write(&other, vec![1u8; 4096]).unwrap();
    assert_eq!(mismatch(open(&journal, &other)).1, "size in bytes");
    // A segment of another journal, dropped in under the next name.
    let second = tmp.path().join("b.journal");
    std::fs::write(&other, vec![1u8; 8192]).unwrap();
    {
        let mut w = open(&second, &other).unwrap();
        w.append(RecordKind::Write, 0, &[8; 512]).unwrap();
    }
    let stray = journal.join("segment-000000000002.svj");
    let mut bytes = std::fs::read(second.join("segment-000000000001.svj")).unwrap();
    // Renumber its header's first seq so only the identity differs (and fix its CRC).
    bytes[52..60].copy_from_slice(&2u64.to_le_bytes());
    let crc = crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&stray, &bytes).unwrap();
    let (path, what) = mismatch(open(&journal, &base));
    assert!(path.ends_with("segment-000000000002.svj"), "{path}");
    assert_eq!(what, "journal UUID");
    std::fs::remove_file(&stray).unwrap();
    // A folded base of the wrong size.
    std::fs::write(journal.join("folded-base.raw"), vec![0u8; 512]).unwrap();
    let (path, _) = mismatch(open(&journal, &base));
    assert!(path.ends_with("folded-base.raw"), "{path}");
    std::fs::remove_file(journal.join("folded-base.raw")).unwrap();
    open(&journal, &base).unwrap();
}

fn crc32c(bytes: &[u8]) -> u32 {
    // The header CRC is CRC32C (Castagnoli), bit by bit: the test needs no crate for it.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
