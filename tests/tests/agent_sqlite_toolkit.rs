//! Application-consistent bookmarks: the guest's disk is served by sealvm-blk, and
//! `sealvm-blk bookmark --agent-socket` quiesces the applications, freezes, bookmarks and
//! thaws through sealvm-agent. With the SQLite toolkit, the database file restored at the
//! bookmark holds every committed row by itself and its write-ahead log is empty (it opens
//! without recovery); without it, the same flow leaves the newest rows only in the log.

use sealvm_testkit::{Background, QemuGuest, QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn sealvm_blk() -> PathBuf {
    Workspace::locate()
        .binary("sealvm-blk")
        .expect("sealvm-blk built")
}

/// Makes an application-consistent bookmark and returns the command's report.
fn consistent_bookmark(api: &Path, agent: &Path, name: &str) -> Value {
    let out = Command::new(sealvm_blk())
        .args(["bookmark", "--api-socket"])
        .arg(api)
        .arg("--agent-socket")
        .arg(agent)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asks for a bookmark that must be application-consistent; returns stderr of the refusal.
fn refused_bookmark(api: &Path, agent: &Path, name: &str) -> String {
    let out = Command::new(sealvm_blk())
        .args([
            "bookmark",
            "--require-application-consistent",
            "--api-socket",
        ])
        .arg(api)
        .arg("--agent-socket")
        .arg(agent)
        .arg(name)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a bookmark was made without any application quiesced: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Restores the volume at `bookmark` and extracts the database and its WAL from it.
fn restore_db(dir: &Path, base: &Path, journal: &Path, bookmark: &str) -> (PathBuf, u64) {
    let image = dir.join(format!("{bookmark}.ext4"));
    let out = Command::new(sealvm_blk())
        .args(["pit", "restore", "--base"])
        .arg(base)
        .arg("--journal")
        .arg(journal)
        .args(["--at", bookmark, "--to"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = dir.join(format!("{bookmark}.db"));
    let wal = dir.join(format!("{bookmark}.db-wal"));
    for (name, to) in [("app.db", &db), ("app.db-wal", &wal)] {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /{name} {}", to.display()))
            .arg(&image)
            .output()
            .expect("debugfs");
        assert!(out.status.success());
    }
    assert!(
        db.exists(),
        "no database in the volume restored at {bookmark}"
    );
    let wal_len = std::fs::metadata(&wal).map_or(0, |m| m.len());
    (db, wal_len)
}

/// Rows in table t of the database file alone (no WAL beside it), after an integrity check.
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
        "integrity: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines.next().unwrap().parse().unwrap()
}

fn app(guest: &QemuGuest, sql: &str) {
    // The application keeps its connection open on fd 3, as a running service would.
    let (out, status) = guest.run(&format!("echo \"{sql}\" >&3")).unwrap();
    assert_eq!(status, 0, "{out}");
}

#[test]
fn sqlite_toolkit_makes_the_bookmark_open_without_recovery() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("data.ext4");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&base)
        .status()
        .unwrap()
        .success());
    let journal = dir.path().join("data.journal");
    let (socket, api, agent) = (
        dir.path().join("blk.sock"),
        dir.path().join("blk.api"),
        dir.path().join("agent.sock"),
    );
    let volume = format!("data={},journal={}", base.display(), journal.display());
    let _server = Background::sealvm_blk(&volume, &socket, Some(&api)).expect("sealvm-blk serves");
    let guest = QemuGuestBuilder::new(images)
        .vhost_user_blk(&socket)
        .agent_channel(&agent)
        .spawn()
        .unwrap();
    guest.wait_ready().unwrap();
    let (out, status) = guest
        .run("mount -t ext4 /dev/vda /mnt && sqlite3 /mnt/app.db 'PRAGMA journal_mode=WAL; CREATE TABLE t(x);' && mkfifo /tmp/app && (sqlite3 /mnt/app.db < /tmp/app > /tmp/app.out 2>&1 &) && exec 3>/tmp/app")
        .unwrap();
    assert_eq!(status, 0, "{out}");
    app(&guest, "INSERT INTO t VALUES (1),(2),(3);");

    // Frozen but without the toolkit: the rows sit in the WAL only.
    let report = consistent_bookmark(&api, &agent, "frozen-only");
    assert_eq!(report["toolkits"], json!([]));
    assert_eq!(report["application-consistent"], false, "{report}");
    assert_eq!(report["consistency"], "crash-consistent");
    let refusal = refused_bookmark(&api, &agent, "must-be-consistent");
    assert!(refusal.contains("did not all quiesce"), "{refusal}");
    assert_eq!(report["filesystems-frozen"], 1);
    let (db, wal_len) = restore_db(dir.path(), &base, &journal, "frozen-only");
    assert!(wal_len > 0, "the WAL should hold the rows");
    assert_eq!(
        rows_in_main_file(&db),
        0,
        "rows reached the main file without a checkpoint"
    );

    // With the SQLite toolkit: checkpointed before the freeze.
    let (_, status) = guest
        .run("mkdir -p /etc/sealvm-agent && echo /mnt/app.db > /etc/sealvm-agent/sqlite-databases")
        .unwrap();
    assert_eq!(status, 0);
    app(&guest, "INSERT INTO t VALUES (4),(5);");
    let report = consistent_bookmark(&api, &agent, "app-consistent");
    assert_eq!(report["toolkits"], json!(["sqlite"]));
    assert_eq!(report["application-consistent"], true, "{report}");
    assert_eq!(report["toolkit-results"][0]["result"], "quiesced");
    assert!(report["freeze-window-ms"].as_u64().is_some());
    app(&guest, "INSERT INTO t VALUES (6);");
    let (db, wal_len) = restore_db(dir.path(), &base, &journal, "app-consistent");
    assert_eq!(
        wal_len, 0,
        "WAL not empty: the database would need recovery"
    );
    assert_eq!(
        rows_in_main_file(&db),
        5,
        "rows written before the bookmark are missing"
    );

    // The application kept running through both bookmarks.
    app(&guest, "SELECT 'rows=' || count(*) FROM t;");
    let (out, _) = guest.run("sleep 1; cat /tmp/app.out").unwrap();
    assert!(out.contains("rows=6"), "{out}");
    guest.shutdown().unwrap();
}
