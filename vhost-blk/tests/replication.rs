//! Replication as a user runs it: `sealvm-blk serve` journals a volume written through a
//! vhost-user frontend, `sealvm-blk replicate` ships the live journal to
//! `sealvm-blk receive` on loopback, and the replica's points in time, restored with
//! `sealvm-blk pit restore`, equal the primary's byte for byte.

use sealvm_testkit::background::BlkDaemon;
use sealvm_testkit::loadgen::BlkDriver;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const VOLUME_BYTES: u64 = 4 << 20;

fn blk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `sealvm-blk receive --once` on a free port; returns the child and the address. The
/// sender retries its connection while the receiver starts.
fn receive_once(dir: &Path, allow: &[&str]) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = blk();
    command
        .args(["receive", "--once", "--listen", &addr, "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in allow {
        command.args(["--allow", name]);
    }
    (command.spawn().unwrap(), addr)
}

/// `sealvm-blk receive --once` with mutual TLS from the certificates in `certs`.
fn receive_once_tls(dir: &Path, certs: &Path, allow: &[&str]) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut command = blk();
    command
        .args(["receive", "--once", "--listen", &addr, "--dir"])
        .arg(dir)
        .arg("--tls-cert")
        .arg(certs.join("receiver.pem"))
        .arg("--tls-key")
        .arg(certs.join("receiver.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for rule in allow {
        command.args(["--allow", rule]);
    }
    (command.spawn().unwrap(), addr)
}

fn wait(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn replicate_once(journal: &Path, name: &str, to: &str) -> Output {
    replicate_once_with(journal, name, to, &[])
}

fn replicate_once_with(journal: &Path, name: &str, to: &str, extra: &[String]) -> Output {
    // The receiver may still be starting: try for a few seconds.
    for _ in 0..100 {
        let out = blk()
            .args([
                "replicate",
                "--once",
                "--json",
                "--name",
                name,
                "--to",
                to,
                "--journal",
            ])
            .arg(journal)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("cannot connect") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return out;
    }
    panic!("could not connect to the receiver at {to}");
}

fn restore(base: &Path, journal: &Path, at: &str, to: &Path) -> Vec<u8> {
    let out = blk()
        .args(["pit", "restore", "--at", at, "--base"])
        .arg(base)
        .arg("--journal")
        .arg(journal)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pit restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(to).unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "replicate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("replicate --json prints one JSON object")
}

fn write_pattern(driver: &mut BlkDriver, round: u8) {
    for i in 0..64u64 {
        let sector = (i * 37 + u64::from(round) * 11) % (VOLUME_BYTES / 512 - 8);
        let data: Vec<u8> = (0..4096).map(|b| (b as u8) ^ round ^ (i as u8)).collect();
        driver.write(sector, &data).unwrap();
    }
    driver.flush().unwrap();
}

fn setup(dir: &Path) -> (BlkDaemon, PathBuf, PathBuf) {
    let base = dir.join("vol.raw");
    std::fs::write(&base, vec![0u8; VOLUME_BYTES as usize]).unwrap();
    let journal = dir.join("vol.journal");
    let spec = format!("vol={},journal={}", base.display(), journal.display());
    let daemon = BlkDaemon::serve(dir, "vol", &spec).expect("start sealvm-blk");
    (daemon, base, journal)
}

#[test]
fn a_replica_restores_to_the_primarys_points_and_resumes_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, base, journal) = setup(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    write_pattern(&mut driver, 1);
    let out = blk()
        .args(["bookmark", "--api-socket"])
        .arg(&daemon.api)
        .arg("first")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_pattern(&mut driver, 2);

    let replicas = dir.path().join("replicas");
    let (receiver, addr) = receive_once(&replicas, &["vol"]);
    let first = report(&replicate_once(&journal, "vol", &addr));
    assert!(wait(receiver).status.success());
    assert_eq!(first["resumed-after"], 0);
    let shipped = first["records"].as_u64().unwrap();
    assert_eq!(shipped, 129, "64 + 64 writes and a bookmark: {first}");

    // More writes while serving; the next connection sends only those.
    write_pattern(&mut driver, 3);
    let (receiver, addr) = receive_once(&replicas, &["vol"]);
    let second = report(&replicate_once(&journal, "vol", &addr));
    assert!(wait(receiver).status.success());
    assert_eq!(second["resumed-after"], first["acked"]);
    assert_eq!(second["records"], 64);

    let replica_base = replicas.join("vol").join("base.raw");
    let replica_journal = replicas.join("vol").join("journal");
    for at in ["first", "latest"] {
        let primary = restore(&base, &journal, at, &dir.path().join(format!("p-{at}.raw")));
        let replica = restore(
            &replica_base,
            &replica_journal,
            at,
            &dir.path().join(format!("r-{at}.raw")),
        );
        assert!(
            primary == replica,
            "the replica at {at} differs from the primary"
        );
        assert!(primary.iter().any(|&b| b != 0), "nothing was written");
    }
    drop(daemon);
}

#[test]
fn a_receiver_refuses_a_volume_it_does_not_allow() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _base, journal) = setup(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    write_pattern(&mut driver, 1);
    let replicas = dir.path().join("replicas");
    let (receiver, addr) = receive_once(&replicas, &["other"]);
    let out = replicate_once(&journal, "vol", &addr);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("may not replicate volume \"vol\""),
        "{stderr}"
    );
    assert!(!wait(receiver).status.success());
    assert!(!replicas.join("vol").exists());
}

fn certs_init(dir: &Path, senders: &[&str]) {
    let mut command = blk();
    command.args(["certs", "init", "--dir"]).arg(dir);
    for sender in senders {
        command.args(["--sender", sender]);
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sender_tls(certs: &Path, sender: &str, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        certs
            .join(format!("sender-{sender}.pem"))
            .display()
            .to_string(),
        "--tls-key".into(),
        certs
            .join(format!("sender-{sender}.key"))
            .display()
            .to_string(),
        "--ca".into(),
        ca.display().to_string(),
    ]
}

#[test]
fn mutual_tls_admits_only_the_sender_a_volume_is_assigned_to() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, base, journal) = setup(dir.path());
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    write_pattern(&mut driver, 7);
    let certs = dir.path().join("certs");
    certs_init(&certs, &["site-a", "site-b"]);
    let ca = certs.join("ca.pem");
    let other = dir.path().join("other-ca");
    certs_init(&other, &["site-a"]);
    let replicas = dir.path().join("replicas");
    let rule = ["site-a:vol"];

    // No certificate: the handshake fails, nothing is written.
    let (receiver, addr) = receive_once_tls(&replicas, &certs, &rule);
    let out = replicate_once(&journal, "vol", &addr);
    assert!(!out.status.success(), "a plain sender got through");
    assert!(!wait(receiver).status.success());
    // A certificate named site-a, but from another CA.
    let (receiver, addr) = receive_once_tls(&replicas, &certs, &rule);
    let out = replicate_once_with(&journal, "vol", &addr, &sender_tls(&other, "site-a", &ca));
    assert!(
        !out.status.success(),
        "a foreign CA's certificate got through"
    );
    assert!(!wait(receiver).status.success());
    // site-b is a good certificate, but vol is assigned to site-a.
    let (receiver, addr) = receive_once_tls(&replicas, &certs, &rule);
    let out = replicate_once_with(&journal, "vol", &addr, &sender_tls(&certs, "site-b", &ca));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("may not replicate volume \"vol\""),
        "{stderr}"
    );
    assert!(!wait(receiver).status.success());
    assert!(
        !replicas.join("vol").exists(),
        "a refused sender created a replica"
    );

    // site-a gets through and the replica is the primary.
    let (receiver, addr) = receive_once_tls(&replicas, &certs, &rule);
    let shipped = report(&replicate_once_with(
        &journal,
        "vol",
        &addr,
        &sender_tls(&certs, "site-a", &ca),
    ));
    let received = wait(receiver);
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(shipped["records"], 64);
    let primary = restore(&base, &journal, "latest", &dir.path().join("p.raw"));
    let replica = restore(
        &replicas.join("vol").join("base.raw"),
        &replicas.join("vol").join("journal"),
        "latest",
        &dir.path().join("r.raw"),
    );
    assert!(primary == replica, "the replica differs from the primary");
}
