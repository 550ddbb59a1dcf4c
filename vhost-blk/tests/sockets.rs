//! `sealvm-blk` never steals or deletes a file at a socket path: for its vhost-user socket
//! (`--socket`) and its API socket (`--api-socket`), a regular file is refused and left
//! byte for byte, a socket another process serves is refused ("another process serves"),
//! and only a stale socket file is replaced. The socket files are removed when it stops on
//! SIGTERM or SIGINT. `serve` and `pit expose` both.

use sealvm_testkit::background::api_call;
use sealvm_testkit::loadgen::BlkDriver;
use sealvm_testkit::sockets::{self, Serving};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(20);

/// A folder with a 1 MiB raw image and the two socket paths.
struct Setup {
    dir: tempfile::TempDir,
    socket: PathBuf,
    api: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vol.raw"), vec![0u8; 1 << 20]).unwrap();
        let socket = dir.path().join("vol.sock");
        let api = dir.path().join("vol.api");
        Setup { dir, socket, api }
    }

    fn serve(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"));
        command
            .args(["serve", "--volume"])
            .arg(format!("vol={}", self.dir.path().join("vol.raw").display()))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--api-socket")
            .arg(&self.api);
        command
    }

    fn spawn(&self) -> Serving {
        Serving::spawn(&mut self.serve()).unwrap()
    }

    /// The path of the given kind of socket.
    fn path(&self, kind: Kind) -> &Path {
        match kind {
            Kind::Vhost => &self.socket,
            Kind::Api => &self.api,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Vhost,
    Api,
}

fn a_regular_file_is_refused_and_left_intact(kind: Kind) {
    let setup = Setup::new();
    let path = setup.path(kind);
    sockets::regular_file(path).unwrap();
    let refusal = sockets::expect_exit(&mut setup.serve(), WITHIN).unwrap();
    refusal.assert_not_a_socket(path);
    // Nothing else was left behind either: the other socket, bound or not, is gone.
    for other in [&setup.socket, &setup.api] {
        if other != path {
            assert!(!other.exists(), "{} left behind", other.display());
        }
    }
}

fn a_live_socket_is_refused(kind: Kind) {
    let setup = Setup::new();
    let path = setup.path(kind);
    let owner = sockets::live_socket(path).unwrap();
    let refusal = sockets::expect_exit(&mut setup.serve(), WITHIN).unwrap();
    refusal.assert_served_by_another(path);
    // The owner keeps its socket: a client still reaches it.
    let _client = std::os::unix::net::UnixStream::connect(path).unwrap();
    owner.accept().unwrap();
}

fn a_stale_socket_is_replaced_and_served(kind: Kind) {
    let setup = Setup::new();
    let path = setup.path(kind);
    sockets::stale_socket(path).unwrap();
    let mut serving = setup.spawn();
    for served in [&setup.socket, &setup.api] {
        serving.wait_until_served(served, WITHIN).unwrap();
    }
    // Both sockets work: a vhost-user frontend writes and reads back, the API answers.
    let mut driver = BlkDriver::connect(&setup.socket, Duration::from_secs(10)).unwrap();
    driver.write(8, &[7u8; 4096]).unwrap();
    assert_eq!(driver.read(8, 4096).unwrap(), vec![7u8; 4096]);
    let volumes = api_call(&setup.api, &json!({"command": "volumes"})).unwrap();
    assert_eq!(volumes[0]["name"], "vol", "{volumes}");
}

#[test]
fn a_regular_file_at_the_vhost_socket_is_refused_and_left_intact() {
    a_regular_file_is_refused_and_left_intact(Kind::Vhost);
}

#[test]
fn a_regular_file_at_the_api_socket_is_refused_and_left_intact() {
    a_regular_file_is_refused_and_left_intact(Kind::Api);
}

#[test]
fn a_live_vhost_socket_is_refused() {
    a_live_socket_is_refused(Kind::Vhost);
}

#[test]
fn a_live_api_socket_is_refused() {
    a_live_socket_is_refused(Kind::Api);
}

#[test]
fn a_stale_vhost_socket_is_replaced_and_served() {
    a_stale_socket_is_replaced_and_served(Kind::Vhost);
}

#[test]
fn a_stale_api_socket_is_replaced_and_served() {
    a_stale_socket_is_replaced_and_served(Kind::Api);
}

#[test]
fn a_second_daemon_on_the_same_api_socket_is_refused_and_the_first_keeps_answering() {
    let first = Setup::new();
    let mut running = first.spawn();
    running.wait_until_served(&first.api, WITHIN).unwrap();
    // The second daemon serves another volume on its own vhost socket, but the same API.
    let second = Setup::new();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"));
    command
        .args(["serve", "--volume"])
        .arg(format!(
            "other={}",
            second.dir.path().join("vol.raw").display()
        ))
        .arg("--socket")
        .arg(&second.socket)
        .arg("--api-socket")
        .arg(&first.api);
    let refusal = sockets::expect_exit(&mut command, WITHIN).unwrap();
    refusal.assert_served_by_another(&first.api);
    assert!(
        !second.socket.exists(),
        "the refused daemon left its vhost socket"
    );
    // The first daemon still answers on its API socket, for its own volume.
    let volumes = api_call(&first.api, &json!({"command": "volumes"})).unwrap();
    assert_eq!(volumes[0]["name"], "vol", "{volumes}");
    assert!(
        running.child().try_wait().unwrap().is_none(),
        "the first daemon stopped"
    );
}

fn removes_its_sockets_on(signal: libc::c_int) {
    let setup = Setup::new();
    let mut serving = setup.spawn();
    for served in [&setup.socket, &setup.api] {
        serving.wait_until_served(served, WITHIN).unwrap();
    }
    let output = serving.stop_with(signal).unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!setup.socket.exists(), "the vhost-user socket was left");
    assert!(!setup.api.exists(), "the API socket was left");
}

#[test]
fn sigterm_removes_both_socket_files() {
    removes_its_sockets_on(libc::SIGTERM);
}

#[test]
fn sigint_removes_both_socket_files() {
    removes_its_sockets_on(libc::SIGINT);
}

/// `pit expose` of the latest point of a journal made by a `serve` that ran and stopped.
struct Exposed {
    setup: Setup,
}

impl Exposed {
    fn new() -> Self {
        let setup = Setup::new();
        let journal = setup.dir.path().join("vol.journal");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"));
        command
            .args(["serve", "--volume"])
            .arg(format!(
                "vol={},journal={}",
                setup.dir.path().join("vol.raw").display(),
                journal.display()
            ))
            .arg("--socket")
            .arg(&setup.socket);
        let mut serving = Serving::spawn(&mut command).unwrap();
        serving.wait_until_served(&setup.socket, WITHIN).unwrap();
        let output = serving.stop_with(libc::SIGTERM).unwrap();
        assert!(output.status.success(), "{output:?}");
        Exposed { setup }
    }

    fn expose(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"));
        command
            .args(["pit", "expose", "--at", "latest", "--base"])
            .arg(self.setup.dir.path().join("vol.raw"))
            .arg("--journal")
            .arg(self.setup.dir.path().join("vol.journal"))
            .arg("--socket")
            .arg(&self.setup.socket)
            .arg("--api-socket")
            .arg(&self.setup.api);
        command
    }
}

#[test]
fn pit_expose_refuses_a_regular_file_and_a_live_socket() {
    let exposed = Exposed::new();
    let setup = &exposed.setup;
    sockets::regular_file(&setup.socket).unwrap();
    let refusal = sockets::expect_exit(&mut exposed.expose(), WITHIN).unwrap();
    refusal.assert_not_a_socket(&setup.socket);
    std::fs::remove_file(&setup.socket).unwrap();

    let owner = sockets::live_socket(&setup.api).unwrap();
    let refusal = sockets::expect_exit(&mut exposed.expose(), WITHIN).unwrap();
    refusal.assert_served_by_another(&setup.api);
    assert!(
        !setup.socket.exists(),
        "the refused expose left its vhost socket"
    );
    let _client = std::os::unix::net::UnixStream::connect(&setup.api).unwrap();
    owner.accept().unwrap();
}

#[test]
fn pit_expose_replaces_stale_sockets_and_removes_them_on_sigterm() {
    let exposed = Exposed::new();
    let setup = &exposed.setup;
    sockets::stale_socket(&setup.socket).unwrap();
    sockets::stale_socket(&setup.api).unwrap();
    let mut serving = Serving::spawn(&mut exposed.expose()).unwrap();
    for served in [&setup.socket, &setup.api] {
        serving.wait_until_served(served, WITHIN).unwrap();
    }
    let volumes = api_call(&setup.api, &json!({"command": "volumes"})).unwrap();
    assert_eq!(volumes[0]["name"], "point-in-time", "{volumes}");
    let output = serving.stop_with(libc::SIGTERM).unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!setup.socket.exists(), "the vhost-user socket was left");
    assert!(!setup.api.exists(), "the API socket was left");
}
