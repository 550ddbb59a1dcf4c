//! Wire compatibility: the same scripted client session runs against Debian's real
//! qemu-guest-agent and against sealvm-agent in the same guest, and every answer has the
//! same shape (the same keys, with values of the same JSON types).

use sealvm_agent::{AgentClient, ClientError};
use sealvm_testkit::{QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The shape of a JSON value: object keys with the shapes of their values, the element
/// shape of arrays (from the first element), and type names for everything else.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => json!([items.first().map(shape)]),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

/// Runs the session and returns each step's answer (the `return` value, or the error
/// object for steps expected to fail).
fn session(socket: &Path) -> BTreeMap<&'static str, Value> {
    let mut client =
        AgentClient::connect(socket, TIMEOUT).expect("agent answers guest-sync-delimited");
    let mut answers = BTreeMap::new();
    let mut run = |step: &'static str, command: &str, args: Option<Value>| -> Value {
        let answer = match client.execute(command, args, TIMEOUT) {
            Ok(value) => value,
            Err(ClientError::Command { class, desc, .. }) => {
                json!({"error": {"class": class, "desc": desc}})
            }
            Err(e) => panic!("{step}: {e}"),
        };
        answers.insert(step, answer.clone());
        answer
    };
    run("sync", "guest-sync", Some(json!({"id": 123})));
    run("ping", "guest-ping", None);
    run("info", "guest-info", None);
    run("osinfo", "guest-get-osinfo", None);
    run("status-before", "guest-fsfreeze-status", None);
    run("freeze", "guest-fsfreeze-freeze", None);
    run("status-frozen", "guest-fsfreeze-status", None);
    run("thaw", "guest-fsfreeze-thaw", None);
    run("status-after", "guest-fsfreeze-status", None);
    run("unknown", "guest-no-such-command", None);
    let started = run(
        "exec",
        "guest-exec",
        Some(json!({"path": "/bin/echo", "arg": ["wire"], "capture-output": true})),
    );
    let pid = started["pid"].clone();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = run(
            "exec-status",
            "guest-exec-status",
            Some(json!({"pid": pid})),
        );
        if status["exited"] == json!(true) {
            break;
        }
        assert!(Instant::now() < deadline, "guest-exec never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
    answers
}

#[test]
fn sealvm_agent_answers_like_qemu_guest_agent() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("sealvm-agent.sock");
    let theirs = dir.path().join("qemu-ga.sock");
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
        .agent_channel(&ours)
        .raw_disk(&disk)
        .qemu_ga_channel(&theirs)
        .spawn()
        .unwrap();
    guest.wait_ready().unwrap();
    let (out, status) = guest.run("mount -t ext4 /dev/vda /mnt").unwrap();
    assert_eq!(status, 0, "{out}");
    guest.start_qemu_ga().expect("qemu-ga runs in the guest");

    let sealvm = session(&ours);
    let qemu_ga = session(&theirs);
    let (log, _) = guest.run("cat /tmp/qemu-ga.log").unwrap();

    for (step, theirs) in &qemu_ga {
        let ours = &sealvm[step];
        let expected = if *step == "info" {
            // Compare the envelope and one command entry, not the number of commands.
            json!({"version": "string", "supported_commands": [shape(&theirs["supported_commands"][0])]})
        } else {
            shape(theirs)
        };
        let got = if *step == "info" {
            json!({"version": "string", "supported_commands": [shape(&ours["supported_commands"][0])]})
        } else {
            shape(ours)
        };
        assert_eq!(
            got, expected,
            "step {step}: sealvm-agent {ours} vs qemu-ga {theirs}\nqemu-ga log: {log}"
        );
    }
    // Same values where the protocol fixes them.
    for step in [
        "sync",
        "ping",
        "status-before",
        "freeze",
        "status-frozen",
        "thaw",
        "status-after",
    ] {
        assert_eq!(sealvm[step], qemu_ga[step], "step {step}");
    }
    assert_eq!(
        sealvm["unknown"]["error"]["class"],
        qemu_ga["unknown"]["error"]["class"]
    );
    assert_eq!(
        sealvm["osinfo"]["kernel-release"],
        qemu_ga["osinfo"]["kernel-release"]
    );
    assert_eq!(
        sealvm["exec-status"]["out-data"],
        qemu_ga["exec-status"]["out-data"]
    );
    guest.shutdown().unwrap();
}
