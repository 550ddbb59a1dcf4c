//! `sealvm-agent serve --unix PATH` never steals or deletes a file at its socket path: a
//! regular file is refused and left byte for byte, a socket another process serves is
//! refused ("another process serves"), and only a stale socket file is replaced. SIGTERM
//! and SIGINT end it and remove the socket file.

use sealvm_testkit::sockets::{self, Serving};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

fn serve(dir: &Path, socket: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sealvm-agent"));
    command
        .args(["serve", "--unix"])
        .arg(socket)
        .arg("--toolkits-dir")
        .arg(dir.join("no-toolkits"));
    command
}

#[test]
fn a_regular_file_at_the_socket_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    sockets::regular_file(&socket).unwrap();
    let refusal = sockets::expect_exit(&mut serve(dir.path(), &socket), WITHIN).unwrap();
    refusal.assert_not_a_socket(&socket);
}

#[test]
fn a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let owner = sockets::live_socket(&socket).unwrap();
    let refusal = sockets::expect_exit(&mut serve(dir.path(), &socket), WITHIN).unwrap();
    refusal.assert_served_by_another(&socket);
    let _client = UnixStream::connect(&socket).unwrap();
    owner.accept().unwrap();
}

#[test]
fn a_stale_socket_is_replaced_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    sockets::stale_socket(&socket).unwrap();
    let mut agent = Serving::spawn(&mut serve(dir.path(), &socket)).unwrap();
    agent.wait_until_served(&socket, WITHIN).unwrap();
    // The agent answers: the socket is its, not the stale file.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(br#"{"execute":"guest-ping","id":7}"#)
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["id"], 7, "{line}");
    assert!(answer.get("return").is_some(), "{line}");
}

fn removes_its_socket_on(signal: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut agent = Serving::spawn(&mut serve(dir.path(), &socket)).unwrap();
    agent.wait_until_served(&socket, WITHIN).unwrap();
    let output = agent.stop_with(signal).unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!socket.exists(), "the agent left its socket file");
}

#[test]
fn sigterm_removes_the_socket_file() {
    removes_its_socket_on(libc::SIGTERM);
}

#[test]
fn sigint_removes_the_socket_file() {
    removes_its_socket_on(libc::SIGINT);
}
