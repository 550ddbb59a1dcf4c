//! `sealvm run` never steals or deletes a file at a socket path: for its API socket
//! (`--api-socket`), its serial socket (`--serial socket=`) and its console socket
//! (`--console socket=`), a regular file is refused and left byte for byte, a socket another
//! process serves is refused ("another process serves"), and only a stale socket file is
//! replaced. The socket files are removed when it stops: on SIGTERM, SIGINT or the API's
//! `shutdown`.
//!
//! The probe guest (images/probe-guest) runs on /dev/kvm; without /dev/kvm the tests say
//! why they skip.

use sealvm_testkit::sockets::{self, Serving};
use sealvm_testkit::Workspace;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Api,
    Serial,
    Console,
}

const KINDS: [Kind; 3] = [Kind::Api, Kind::Serial, Kind::Console];

/// A folder with the three socket paths, and the `sealvm run` of the lingering probe guest
/// that serves all three.
struct Setup {
    _dir: tempfile::TempDir,
    api: PathBuf,
    serial: PathBuf,
    console: PathBuf,
}

impl Setup {
    /// None (after saying why) when this host cannot run the probe guest.
    fn new() -> Option<Self> {
        if let Err(error) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            eprintln!("SKIPPED: sealvm needs /dev/kvm: {error}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("vm.api");
        let serial = dir.path().join("serial.sock");
        let console = dir.path().join("console.sock");
        Some(Setup {
            _dir: dir,
            api,
            serial,
            console,
        })
    }

    fn path(&self, kind: Kind) -> &Path {
        match kind {
            Kind::Api => &self.api,
            Kind::Serial => &self.serial,
            Kind::Console => &self.console,
        }
    }

    fn run(&self) -> Command {
        let workspace = Workspace::locate();
        let mut command = Command::new(workspace.binary("sealvm").expect("build sealvm first"));
        command
            .arg("run")
            .arg("--kernel")
            .arg(
                workspace
                    .probe_guest()
                    .expect("run cargo xtask images first"),
            )
            .args(["--memory", "64M", "--cmdline", "probe.linger=1"])
            .arg("--api-socket")
            .arg(&self.api)
            .arg("--serial")
            .arg(format!("socket={}", self.serial.display()))
            .arg("--console")
            .arg(format!("socket={}", self.console.display()));
        command
    }
}

fn a_regular_file_is_refused_and_left_intact(kind: Kind) {
    let Some(setup) = Setup::new() else { return };
    let path = setup.path(kind);
    sockets::regular_file(path).unwrap();
    let refusal = sockets::expect_exit(&mut setup.run(), WITHIN).unwrap();
    refusal.assert_not_a_socket(path);
    for other in KINDS.map(|k| setup.path(k)) {
        if other != path {
            assert!(!other.exists(), "{kind:?}: {} left behind", other.display());
        }
    }
}

fn a_live_socket_is_refused(kind: Kind) {
    let Some(setup) = Setup::new() else { return };
    let path = setup.path(kind);
    let owner = sockets::live_socket(path).unwrap();
    let refusal = sockets::expect_exit(&mut setup.run(), WITHIN).unwrap();
    refusal.assert_served_by_another(path);
    // The owner keeps its socket: a client still reaches it.
    let _client = std::os::unix::net::UnixStream::connect(path).unwrap();
    owner.accept().unwrap();
}

#[test]
fn a_regular_file_at_the_api_socket_is_refused_and_left_intact() {
    a_regular_file_is_refused_and_left_intact(Kind::Api);
}

#[test]
fn a_regular_file_at_the_serial_socket_is_refused_and_left_intact() {
    a_regular_file_is_refused_and_left_intact(Kind::Serial);
}

#[test]
fn a_regular_file_at_the_console_socket_is_refused_and_left_intact() {
    a_regular_file_is_refused_and_left_intact(Kind::Console);
}

#[test]
fn a_live_api_socket_is_refused() {
    a_live_socket_is_refused(Kind::Api);
}

#[test]
fn a_live_serial_socket_is_refused() {
    a_live_socket_is_refused(Kind::Serial);
}

#[test]
fn a_live_console_socket_is_refused() {
    a_live_socket_is_refused(Kind::Console);
}

/// How a test ends the VM.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Signal(libc::c_int),
    /// The API's `shutdown` command.
    ApiShutdown,
}

/// A line sent to the API socket and the answer.
fn api_call(path: &Path, line: &str) -> String {
    let mut api = std::os::unix::net::UnixStream::connect(path).unwrap();
    std::io::Write::write_all(&mut api, format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(api), &mut answer).unwrap();
    answer
}

/// Stale files at all three paths: each is replaced and served, and ending the VM removes
/// them.
fn stale_sockets_are_replaced_served_and_removed(ending: Ending) {
    let Some(setup) = Setup::new() else { return };
    for kind in KINDS {
        sockets::stale_socket(setup.path(kind)).unwrap();
    }
    let mut serving = Serving::spawn(&mut setup.run()).unwrap();
    for kind in KINDS {
        serving
            .wait_until_served(setup.path(kind), WITHIN)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
    // The API answers: it is sealvm's, not a leftover.
    let answer = api_call(&setup.api, r#"{"command":"info"}"#);
    assert!(answer.starts_with(r#"{"return""#), "{answer}");
    let output = match ending {
        Ending::Signal(signal) => serving.stop_with(signal).unwrap(),
        Ending::ApiShutdown => {
            let answer = api_call(&setup.api, r#"{"command":"shutdown"}"#);
            assert!(answer.starts_with(r#"{"return""#), "{answer}");
            serving.into_child().wait_with_output().unwrap()
        }
    };
    assert!(output.status.success(), "{ending:?}: {output:?}");
    for kind in KINDS {
        assert!(
            !setup.path(kind).exists(),
            "{kind:?}: the socket file was left after {ending:?}"
        );
    }
}

#[test]
fn stale_sockets_are_replaced_served_and_removed_on_sigterm() {
    stale_sockets_are_replaced_served_and_removed(Ending::Signal(libc::SIGTERM));
}

#[test]
fn stale_sockets_are_replaced_served_and_removed_on_sigint() {
    stale_sockets_are_replaced_served_and_removed(Ending::Signal(libc::SIGINT));
}

#[test]
fn stale_sockets_are_replaced_served_and_removed_on_api_shutdown() {
    stale_sockets_are_replaced_served_and_removed(Ending::ApiShutdown);
}
