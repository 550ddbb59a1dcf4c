//! sealvm-agent's protocol handling, run as a real process serving a unix socket on the
//! host: bad input is answered in qemu-guest-agent's error form and never stops the agent.

use base64::Engine;
use sealvm_agent::AgentClient;
use sealvm_testkit::Workspace;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct AgentProcess {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent() -> AgentProcess {
    let binary = Workspace::locate()
        .binary("sealvm-agent")
        .expect("sealvm-agent built");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = Command::new(binary)
        .args(["serve", "--unix"])
        .arg(&socket)
        .arg("--toolkits-dir")
        .arg(dir.path().join("no-toolkits"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    AgentProcess {
        child,
        socket,
        _dir: dir,
    }
}

fn answer(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn bad_input_gets_error_answers_and_the_agent_keeps_serving() {
    let agent = start_agent();
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());

    stream.write_all(b"{\"execute\": oops}\n").unwrap();
    let a = answer(&mut reader);
    assert_eq!(a["error"]["class"], "GenericError");
    assert!(a["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("JSON parse error"));

    stream
        .write_all(br#"{"execute":"guest-no-such-command"}"#)
        .unwrap();
    assert_eq!(answer(&mut reader)["error"]["class"], "CommandNotFound");

    stream
        .write_all(br#"{"execute":"guest-exec","arguments":{"path":7}}"#)
        .unwrap();
    assert_eq!(answer(&mut reader)["error"]["class"], "GenericError");

    // qemu-ga takes a 100 KB guest-exec input; so does sealvm-agent.
    let input = base64::engine::general_purpose::STANDARD.encode(vec![b'i'; 100_000]);
    let big = json!({"execute": "guest-exec", "id": "big",
        "arguments": {"path": "/bin/cat", "input-data": input}});
    stream.write_all(big.to_string().as_bytes()).unwrap();
    let started = answer(&mut reader);
    assert!(started["return"]["pid"].is_u64(), "{started}");
    assert_eq!(started["id"], "big");

    // Past qemu-ga's 64 MiB limit a message is refused and skipped to its end of line.
    let mut oversized = br#"{"execute":"guest-ping","arguments":{"pad":""#.to_vec();
    oversized.extend(std::iter::repeat_n(
        b'x',
        sealvm_agent::protocol::MAX_MESSAGE_LEN,
    ));
    oversized.extend(b"\"}}\n");
    stream.write_all(&oversized).unwrap();
    let refused = answer(&mut reader);
    assert!(
        refused["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("limit exceeded")),
        "{refused}"
    );

    stream
        .write_all(br#"{"execute":"guest-ping","id":1}"#)
        .unwrap();
    assert_eq!(answer(&mut reader), json!({"return": {}, "id": 1}));

    // A client that vanishes mid-message does not stop the agent either.
    stream.write_all(br#"{"execute":"guest-pi"#).unwrap();
    drop(reader);
    drop(stream);
    let mut client = AgentClient::connect(&agent.socket, Duration::from_secs(10)).unwrap();
    let info = client
        .execute("guest-info", None, Duration::from_secs(10))
        .unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn client_command_prints_the_answer() {
    let agent = start_agent();
    let binary = Workspace::locate().binary("sealvm-agent").unwrap();
    let out = Command::new(&binary)
        .args(["client", "--socket"])
        .arg(&agent.socket)
        .args(["guest-sync", "--args", r#"{"id": 1234}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1234");
    let out = Command::new(&binary)
        .args(["client", "--socket"])
        .arg(&agent.socket)
        .arg("guest-bogus")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CommandNotFound"), "{stderr}");
}
