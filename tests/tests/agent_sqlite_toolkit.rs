//! The SQLite toolkit makes a snapshot application-consistent: with it, the database file
//! in a snapshot taken while the guest is frozen holds every committed row by itself and
//! its write-ahead log is empty (it opens without recovery); without it, the same snapshot
//! has the newest rows only in the log.
//!
//! The snapshot is a copy of the raw disk taken on the host while the guest is frozen,
//! standing in for a sealvm-blk bookmark until that exists.

use sealvm_agent::AgentClient;
use sealvm_testkit::{QemuGuest, QemuGuestBuilder, Workspace};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Freezes through the agent, copies the disk, thaws; returns what the freeze reported.
fn snapshot(client: &mut AgentClient, disk: &Path, to: &Path) -> serde_json::Value {
    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    std::fs::copy(disk, to).unwrap();
    client
        .execute("guest-fsfreeze-thaw", None, TIMEOUT)
        .unwrap();
    client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap()["last-freeze"].clone()
}

/// Reads a file out of an ext4 image with debugfs; None when it does not exist.
fn extract(image: &Path, name: &str, to: &Path) -> Option<u64> {
    let _ = std::fs::remove_file(to);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /{name} {}", to.display()))
        .arg(image)
        .output()
        .expect("debugfs");
    assert!(out.status.success());
    to.exists().then(|| std::fs::metadata(to).unwrap().len())
}

/// Rows in table t of the database file alone (no WAL beside it), opened read-only.
fn rows_in_main_file(db: &Path) -> i64 {
    let out = Command::new("sqlite3")
        .arg(format!("file:{}?immutable=1", db.display()))
        .arg("PRAGMA integrity_check; SELECT count(*) FROM t;")
        .output()
        .expect("sqlite3");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("ok"),
        "integrity check: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines.next().unwrap().parse().unwrap()
}

fn app(guest: &QemuGuest, sql: &str) {
    // The application keeps its connection open on fd 3, as a real service would.
    let (out, status) = guest.run(&format!("echo \"{sql}\" >&3")).unwrap();
    assert_eq!(status, 0, "{out}");
}

#[test]
fn sqlite_toolkit_snapshot_holds_every_row_without_recovery() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let disk = dir.path().join("data.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap()
        .success());
    let guest = QemuGuestBuilder::new(images)
        .agent_channel(&socket)
        .raw_disk(&disk)
        .spawn()
        .unwrap();
    guest.wait_ready().unwrap();
    let (out, status) = guest
        .run("mount -t ext4 /dev/vda /mnt && sqlite3 /mnt/app.db 'PRAGMA journal_mode=WAL; CREATE TABLE t(x);' && mkfifo /tmp/app && (sqlite3 /mnt/app.db < /tmp/app > /tmp/app.out 2>&1 &) && exec 3>/tmp/app")
        .unwrap();
    assert_eq!(status, 0, "{out}");
    app(&guest, "INSERT INTO t VALUES (1),(2),(3);");
    let mut client = AgentClient::connect(&socket, TIMEOUT).unwrap();

    // Crash-consistent: no toolkit knows the database, the rows sit in the WAL only.
    let plain = dir.path().join("plain.ext4");
    let report = snapshot(&mut client, &disk, &plain);
    assert_eq!(report["toolkits"], json!([]));
    let db = dir.path().join("app.db");
    let wal = dir.path().join("app.db-wal");
    extract(&plain, "app.db", &db).expect("database file in the snapshot");
    assert!(
        extract(&plain, "app.db-wal", &wal).unwrap_or(0) > 0,
        "the WAL should hold the rows"
    );
    assert_eq!(
        rows_in_main_file(&db),
        0,
        "rows reached the main file without a checkpoint"
    );

    // Application-consistent: the sqlite toolkit checkpoints before the freeze.
    let (_, status) = guest
        .run("mkdir -p /etc/sealvm-agent && echo /mnt/app.db > /etc/sealvm-agent/sqlite-databases")
        .unwrap();
    assert_eq!(status, 0);
    app(&guest, "INSERT INTO t VALUES (4),(5);");
    let consistent = dir.path().join("consistent.ext4");
    let report = snapshot(&mut client, &disk, &consistent);
    assert_eq!(report["toolkits"], json!(["sqlite"]));
    extract(&consistent, "app.db", &db).expect("database file in the snapshot");
    assert_eq!(
        extract(&consistent, "app.db-wal", &wal).unwrap_or(0),
        0,
        "WAL not empty: recovery would be needed"
    );
    assert_eq!(rows_in_main_file(&db), 5);

    // The application kept running through it.
    app(
        &guest,
        "INSERT INTO t VALUES (6); SELECT 'rows=' || count(*) FROM t;",
    );
    let (out, _) = guest.run("sleep 1; cat /tmp/app.out").unwrap();
    assert!(out.contains("rows=6"), "{out}");
    guest.shutdown().unwrap();
}
