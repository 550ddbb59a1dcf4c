//! A sender and a receiver on loopback TCP, with real journals on disk: the replica ends
//! with the primary's records (same seqs, times, data), resumes after a reconnect without
//! sending anything twice, and refuses a volume it may not write.

use sealvm_journal::writer::Writer;
use sealvm_journal::{Reader, RecordKind};
use sealvm_repl::receiver::{self, SessionReport};
use sealvm_repl::sender::{self, SendConfig, SendError};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;

struct Primary {
    writer: Writer,
    journal: std::path::PathBuf,
}

fn primary(dir: &Path) -> Primary {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let journal = dir.join("journal");
    let (writer, _) = Writer::open(&journal, &base, 1 << 20, |_| {}).unwrap();
    Primary { writer, journal }
}

fn write(primary: &mut Primary, offset: u64, byte: u8) {
    primary
        .writer
        .append(RecordKind::Write, offset, &vec![byte; 4096])
        .unwrap();
}

/// Every non-annotation record of a journal: (seq, kind, time, offset, payload).
fn records(journal: &Path) -> Vec<(u64, RecordKind, u64, u64, Vec<u8>)> {
    Reader::open(journal)
        .unwrap()
        .map(Result::unwrap)
        .filter(|r| !r.header.is_annotation())
        .map(|r| {
            let h = r.header;
            (h.seq, h.kind, h.time_ns, h.offset, r.payload)
        })
        .collect()
}

/// A receiver that serves `connections` connections and returns their results.
fn receiver(
    root: &Path,
    permitted: Option<Vec<String>>,
    connections: usize,
) -> (
    std::net::SocketAddr,
    JoinHandle<Vec<Result<SessionReport, String>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let root = root.to_path_buf();
    let handle = std::thread::spawn(move || {
        (0..connections)
            .map(|_| {
                let (mut stream, _) = listener.accept().unwrap();
                receiver::serve_connection(&root, permitted.clone(), &mut stream)
                    .map_err(|e| format!("{e:#}"))
            })
            .collect()
    });
    (addr, handle)
}

fn ship(config: &SendConfig, addr: std::net::SocketAddr) -> Result<sender::SendReport, SendError> {
    let mut stream = TcpStream::connect(addr).unwrap();
    sender::ship(config, &mut stream, None, || false)
}

#[test]
fn the_replica_gets_the_primarys_records_and_resumes_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = primary(&dir.path().join("primary"));
    for i in 0..40u64 {
        write(&mut primary, (i % 16) * 4096, i as u8);
    }
    primary
        .writer
        .append(RecordKind::Bookmark, 0, b"before-upgrade")
        .unwrap();
    primary
        .writer
        .append(RecordKind::ZeroExtent, 8192, &65536u64.to_le_bytes())
        .unwrap();
    let replicas = dir.path().join("replicas");
    let (addr, done) = receiver(&replicas, Some(vec!["db-data".into()]), 2);
    let mut config = SendConfig::new(primary.journal.clone(), "db-data".into());
    config.batch_records = 16;

    let first = ship(&config, addr).unwrap();
    assert_eq!(
        (first.resumed_after, first.records, first.acked),
        (0, 42, 42)
    );
    let replica_journal = receiver::replica_journal(&replicas, "db-data");
    // Wait for the receiver to finish the connection before reading its journal.
    for i in 40..50u64 {
        write(&mut primary, i * 4096, 0xee);
    }
    let second = ship(&config, addr).unwrap();
    assert_eq!(
        (second.resumed_after, second.records, second.acked),
        (42, 10, 52),
        "the second connection sends only what the replica lacks"
    );
    let reports = done.join().unwrap();
    assert_eq!(reports[0].as_ref().unwrap().records, 42);
    assert_eq!(reports[1].as_ref().unwrap().records, 10);
    assert_eq!(records(&replica_journal), records(&primary.journal));
    let cursor = sealvm_journal::consumer::list(&primary.journal).unwrap();
    assert_eq!(cursor.len(), 1);
    assert_eq!(
        (cursor[0].name.as_str(), cursor[0].seq),
        ("replica-db-data", 52)
    );
}

#[test]
fn a_volume_the_peer_may_not_write_is_refused_and_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = primary(&dir.path().join("primary"));
    write(&mut primary, 0, 1);
    let replicas = dir.path().join("replicas");
    let (addr, done) = receiver(&replicas, Some(vec!["db-data".into()]), 1);
    let config = SendConfig::new(primary.journal.clone(), "web".into());
    let error = ship(&config, addr).unwrap_err();
    assert!(
        matches!(&error, SendError::Refused(reason) if reason.contains("may not replicate")),
        "{error}"
    );
    assert!(done.join().unwrap()[0].is_err());
    assert!(!receiver::replica_dir(&replicas, "web").exists());
}

#[test]
fn a_replica_of_another_volume_under_the_same_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut one = primary(&dir.path().join("one"));
    let mut two = primary(&dir.path().join("two"));
    write(&mut one, 0, 1);
    write(&mut two, 0, 2);
    let replicas = dir.path().join("replicas");
    let (addr, done) = receiver(&replicas, None, 2);
    ship(&SendConfig::new(one.journal.clone(), "vol".into()), addr).unwrap();
    let error = ship(&SendConfig::new(two.journal.clone(), "vol".into()), addr).unwrap_err();
    assert!(
        matches!(&error, SendError::Refused(reason) if reason.contains("volume")),
        "{error}"
    );
    let reports = done.join().unwrap();
    assert!(reports[1].is_err());
    assert_eq!(
        records(&receiver::replica_journal(&replicas, "vol")),
        records(&one.journal)
    );
}
