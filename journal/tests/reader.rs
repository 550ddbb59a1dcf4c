//! The cursor reader against a live writer: reading from any seq, resuming at a cursor,
//! following with a deadline, across rotation, and saying so when records were folded.

use sealvm_journal::dir::{self, JournalError};
use sealvm_journal::format::RecordKind;
use sealvm_journal::reader::Reader;
use sealvm_journal::writer::Writer;
use std::path::Path;
use std::time::{Duration, Instant};

fn writer(dir: &Path) -> Writer {
    let base = dir.join("base.raw");
    if !base.exists() {
        std::fs::write(&base, vec![0u8; 64 * 512]).unwrap();
    }
    Writer::open(&dir.join("j"), &base, 4096, |_| {}).unwrap().0
}

fn write(writer: &mut Writer, count: u64) {
    for _ in 0..count {
        let seq = writer.next_seq();
        writer
            .append(RecordKind::Write, (seq % 64) * 512, &[seq as u8; 512])
            .unwrap();
    }
}

fn seqs(reader: &mut Reader) -> Vec<u64> {
    reader
        .by_ref()
        .map(|r| r.unwrap())
        .filter(|r| !r.header.is_annotation())
        .map(|r| r.header.seq)
        .collect()
}

#[test]
fn a_reader_from_any_seq_yields_the_records_after_it_across_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path());
    write(&mut w, 40);
    let journal = tmp.path().join("j");
    assert!(dir::segments(&journal).unwrap().len() > 3, "no rotation");
    for from in [0, 1, 7, 8, 20, 39, 40] {
        let mut reader = Reader::from(&journal, from).unwrap();
        assert_eq!(seqs(&mut reader), (from + 1..=40).collect::<Vec<_>>());
    }
    // Payloads come with the records.
    let record = Reader::from(&journal, 9).unwrap().next().unwrap().unwrap();
    assert_eq!((record.header.seq, record.payload[0]), (10, 10));
}

#[test]
fn a_cursor_resumes_where_a_reader_stopped_after_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path());
    let journal = tmp.path().join("j");
    write(&mut w, 5);
    let mut reader = Reader::open(&journal).unwrap();
    assert_eq!(seqs(&mut reader), [1, 2, 3, 4, 5]);
    let cursor = reader.cursor();
    assert_eq!(cursor.last_seq, 5);
    write(&mut w, 30);
    // The same reader reads on, and a new one from the saved cursor reads the same.
    assert_eq!(
        seqs(&mut Reader::at(&journal, cursor).unwrap()),
        (6..=35).collect::<Vec<_>>()
    );
    let mut reader = Reader::open(&journal).unwrap();
    assert_eq!(seqs(&mut reader).len(), 35);
}

#[test]
fn follow_is_woken_by_the_writer_and_gives_up_at_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path());
    let journal = tmp.path().join("j");
    let signal = w.signal();
    let mut reader = Reader::open(&journal).unwrap();
    let started = Instant::now();
    let none = reader
        .follow(&signal, Instant::now() + Duration::from_millis(100))
        .unwrap();
    assert!(none.is_none());
    assert!(started.elapsed() >= Duration::from_millis(100));
    let appender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        write(&mut w, 20);
        w
    });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 20 {
        let record = reader
            .follow(&signal, deadline)
            .unwrap()
            .expect("the writer's records arrive before the deadline");
        if !record.header.is_annotation() {
            got.push(record.header.seq);
        }
    }
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    // Woken, not polling: the records arrived long before the deadline.
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(appender.join().unwrap());
}

#[test]
fn a_reader_says_clearly_when_its_records_were_folded_away() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path());
    let journal = tmp.path().join("j");
    write(&mut w, 40);
    let mut reader = Reader::from(&journal, 2).unwrap();
    assert_eq!(reader.next().unwrap().unwrap().header.seq, 3);
    // Fold the first two segments away, as the folder does: state first, then the files.
    let segments = dir::segments(&journal).unwrap();
    let folded_through = segments[2].0 - 1;
    w.update_state(|s| s.base_seq = folded_through).unwrap();
    std::fs::remove_file(&segments[0].1).unwrap();
    std::fs::remove_file(&segments[1].1).unwrap();
    // The open segment still reads (its file is held open); the next one is gone.
    let err = reader
        .by_ref()
        .find_map(|r| r.err())
        .expect("reading on past a folded segment did not fail");
    assert!(
        matches!(err, JournalError::FoldedAway { base_seq, .. } if base_seq == folded_through),
        "{err}"
    );
    assert!(
        reader.next().is_none(),
        "an iterator goes on after an error"
    );
    match Reader::from(&journal, 1) {
        Err(JournalError::FoldedAway { asked: 1, base_seq }) => {
            assert_eq!(base_seq, folded_through)
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let mut fresh = Reader::from(&journal, folded_through).unwrap();
    assert_eq!(
        seqs(&mut fresh),
        (folded_through + 1..=40).collect::<Vec<_>>()
    );
}
