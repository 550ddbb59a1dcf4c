//! Rotation syncs nothing under the writer's lock: the closed segment, the new segment's
//! header and its directory entry become durable with the next flush. So a power loss may
//! tear a closed segment, lose a later one or a later one's header. Replay cuts there and
//! removes the later segments when no sync point after the damage says a flush had covered
//! it, and refuses the journal when one does.

use sealvm_journal::dir::{self, JournalError};
use sealvm_journal::format::{self, RecordKind};
use sealvm_journal::writer::{Writer, WriterError};
use std::path::{Path, PathBuf};

const SEGMENT_BYTES: u64 = 4096;

fn open(journal: &Path, base: &Path) -> Result<(Writer, Vec<u64>), WriterError> {
    let mut seqs = Vec::new();
    let (writer, _) = Writer::open(journal, base, SEGMENT_BYTES, |r| {
        if !r.header.is_annotation() {
            seqs.push(r.header.seq);
        }
    })?;
    Ok((writer, seqs))
}

/// A journal of 24 one-sector writes over 4 KiB segments (seven records each), flushed at
/// the end or not; returns the base and the journal.
fn journal_with_closed_segments(tmp: &Path, flush: bool) -> (PathBuf, PathBuf) {
    let base = tmp.join("base.raw");
    std::fs::write(&base, vec![0u8; 64 * 512]).unwrap();
    let journal = tmp.join("journal");
    let (mut writer, _) = open(&journal, &base).unwrap();
    for i in 0..24u64 {
        writer
            .append(RecordKind::Write, (i % 64) * 512, &[i as u8 + 1; 512])
            .unwrap();
    }
    if flush {
        let target = writer.sync_target();
        target.sync().unwrap();
        writer
            .record_sync_point(target.ordinal, target.end)
            .unwrap();
    }
    assert!(dir::segments(&journal).unwrap().len() >= 3);
    (base, journal)
}

fn segment(journal: &Path, i: usize) -> PathBuf {
    dir::segments(journal).unwrap()[i].1.clone()
}

#[test]
fn rotation_leaves_the_closed_segment_to_the_next_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_closed_segments(tmp.path(), false);
    let (mut writer, _) = open(&journal, &base).unwrap();
    let before = writer.segments().len();
    writer.append(RecordKind::Write, 0, &[9; 512]).unwrap();
    writer.rotate().unwrap();
    let closed = &writer.segments()[before - 1];
    assert!(!closed.is_durable(), "rotation synced the closed segment");
    let target = writer.sync_target();
    target.sync().unwrap();
    assert!(
        writer
            .segments()
            .iter()
            .take(before)
            .all(|s| s.is_durable()),
        "a flush left a closed segment unsynced"
    );
}

#[test]
fn a_closed_segment_torn_by_a_power_loss_is_cut_with_the_later_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_closed_segments(tmp.path(), false);
    let first = segment(&journal, 0);
    let records_in_first =
        (SEGMENT_BYTES - format::SEGMENT_HEADER_LEN as u64) / format::record_len(512);
    // The last two records of the first segment never reached the disk.
    let keep = format::SEGMENT_HEADER_LEN as u64 + (records_in_first - 2) * format::record_len(512);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(keep + 100)
        .unwrap();
    let (writer, seqs) = open(&journal, &base).unwrap();
    assert_eq!(seqs, (1..=records_in_first - 2).collect::<Vec<_>>());
    assert_eq!(writer.next_seq(), records_in_first - 1);
    assert_eq!(
        dir::segments(&journal).unwrap().len(),
        1,
        "segments after the cut were kept"
    );
    assert_eq!(std::fs::metadata(&first).unwrap().len(), keep);
}

#[test]
fn a_later_segment_whose_header_was_lost_is_cut_there() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_closed_segments(tmp.path(), false);
    let second = segment(&journal, 1);
    let mut bytes = std::fs::read(&second).unwrap();
    bytes[..format::SEGMENT_HEADER_LEN].fill(0);
    std::fs::write(&second, &bytes).unwrap();
    let (mut writer, seqs) = open(&journal, &base).unwrap();
    let first_of_second = dir::segments(&journal).unwrap()[1].0;
    assert_eq!(seqs, (1..first_of_second).collect::<Vec<_>>());
    // The second segment is kept empty, with its header written again.
    assert_eq!(dir::segments(&journal).unwrap().len(), 2);
    assert_eq!(
        std::fs::metadata(&second).unwrap().len(),
        format::SEGMENT_HEADER_LEN as u64
    );
    writer.append(RecordKind::Write, 0, &[1; 512]).unwrap();
    drop(writer);
    let (_, seqs) = open(&journal, &base).unwrap();
    assert_eq!(seqs.last(), Some(&first_of_second));
}

#[test]
fn a_torn_closed_segment_that_a_later_sync_point_covers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, journal) = journal_with_closed_segments(tmp.path(), true);
    let first = segment(&journal, 0);
    let original = std::fs::read(&first).unwrap();
    let len = original.len() as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let listed = dir::segments(&journal).unwrap();
    match open(&journal, &base) {
        Err(WriterError::Journal(JournalError::Gap { path, .. })) => assert_eq!(path, first),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a flushed closed segment that lost its tail was cut"),
    }
    assert_eq!(
        dir::segments(&journal).unwrap(),
        listed,
        "a refused journal was changed"
    );
    // The same for a lost header.
    let second = segment(&journal, 1);
    std::fs::write(&first, &original).unwrap();
    let mut bytes = std::fs::read(&second).unwrap();
    bytes[..format::SEGMENT_HEADER_LEN].fill(0);
    std::fs::write(&second, &bytes).unwrap();
    assert!(matches!(
        open(&journal, &base),
        Err(WriterError::Journal(JournalError::BadSegmentHeader { .. }))
    ));
}

#[test]
fn a_reader_stops_at_a_power_loss_break_without_changing_the_journal() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, journal) = journal_with_closed_segments(tmp.path(), false);
    let first = segment(&journal, 0);
    let len = std::fs::metadata(&first).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let listed = dir::segments(&journal).unwrap();
    let mut reader = sealvm_journal::reader::Reader::open(&journal).unwrap();
    let mut seqs = Vec::new();
    while let Some((header, _)) = reader.next_record().unwrap() {
        seqs.push(header.seq);
    }
    let records_in_first =
        (SEGMENT_BYTES - format::SEGMENT_HEADER_LEN as u64) / format::record_len(512);
    assert_eq!(seqs, (1..records_in_first).collect::<Vec<_>>());
    assert!(reader.summary().cut_by_power_loss);
    assert_eq!(
        dir::segments(&journal).unwrap(),
        listed,
        "a reader changed the journal"
    );
    assert_eq!(std::fs::metadata(&first).unwrap().len(), len - 100);
}
