//! Wire compatibility: the same scripted client session runs against Debian's real
//! qemu-guest-agent and against sealvm-agent in the same guest, and every answer has the
//! same shape (the same keys, with values of the same JSON types).

use sealvm_agent::{AgentClient, ClientError};
use sealvm_testkit::{QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Commands qemu-ga has and sealvm-agent deliberately lacks, each with the reason.
const MISSING_ON_PURPOSE: &[(&str, &str)] = &[];

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
    run(
        "frozen-exec",
        "guest-exec",
        Some(json!({"path": "/bin/true"})),
    );
    run("frozen-freeze", "guest-fsfreeze-freeze", None);
    run(
        "frozen-file-open",
        "guest-file-open",
        Some(json!({"path": "/mnt/frozen", "mode": "w"})),
    );
    run("thaw", "guest-fsfreeze-thaw", None);
    run("status-after", "guest-fsfreeze-status", None);
    run("unknown", "guest-no-such-command", None);
    run("host-name", "guest-get-host-name", None);
    run("timezone", "guest-get-timezone", None);
    run("users", "guest-get-users", None);
    run("time", "guest-get-time", None);
    run("set-time-from-rtc", "guest-set-time", None);
    run("fsinfo", "guest-get-fsinfo", None);
    run("disks", "guest-get-disks", None);
    run("diskstats", "guest-get-diskstats", None);
    run("cpustats", "guest-get-cpustats", None);
    run("vcpus", "guest-get-vcpus", None);
    run(
        "set-vcpus-none",
        "guest-set-vcpus",
        Some(json!({"vcpus": []})),
    );
    run("memory-blocks", "guest-get-memory-blocks", None);
    run("memory-block-info", "guest-get-memory-block-info", None);
    run("interfaces", "guest-network-get-interfaces", None);
    run("devices", "guest-get-devices", None);
    run("fstrim", "guest-fstrim", Some(json!({"minimum": 0})));
    run("suspend-hybrid", "guest-suspend-hybrid", None);
    let handle = run(
        "file-open",
        "guest-file-open",
        Some(json!({"path": "/tmp/wire-file", "mode": "w+"})),
    );
    run(
        "file-write",
        "guest-file-write",
        Some(json!({"handle": handle, "buf-b64": "d2lyZS1maWxl"})),
    );
    run(
        "file-flush",
        "guest-file-flush",
        Some(json!({"handle": handle})),
    );
    run(
        "file-seek",
        "guest-file-seek",
        Some(json!({"handle": handle, "offset": 5, "whence": "set"})),
    );
    run(
        "file-read",
        "guest-file-read",
        Some(json!({"handle": handle, "count": 100})),
    );
    run(
        "file-close",
        "guest-file-close",
        Some(json!({"handle": handle})),
    );
    run(
        "file-closed-read",
        "guest-file-read",
        Some(json!({"handle": handle})),
    );
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMsealvmwirecompat wire@test";
    run(
        "ssh-add",
        "guest-ssh-add-authorized-keys",
        Some(json!({"username": "root", "keys": [key], "reset": true})),
    );
    run(
        "ssh-get",
        "guest-ssh-get-authorized-keys",
        Some(json!({"username": "root"})),
    );
    run(
        "ssh-remove",
        "guest-ssh-remove-authorized-keys",
        Some(json!({"username": "root", "keys": [key]})),
    );
    run(
        "ssh-unknown-user",
        "guest-ssh-get-authorized-keys",
        Some(json!({"username": "no-such-user"})),
    );
    run(
        "set-password",
        "guest-set-user-password",
        Some(json!({"username": "daemon", "password": "JDYkd2lyZSRjb21wYXQ=", "crypted": true})),
    );
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

/// Sends raw requests, one at a time after a guest-sync-delimited, and returns each answer
/// line as JSON: for the envelope (ids, error answers to malformed requests) that
/// [`AgentClient`] hides.
fn raw_exchange(socket: &Path, requests: &[&str]) -> Vec<Value> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut sync = vec![0xff];
    sync.extend(br#"{"execute":"guest-sync-delimited","arguments":{"id":777}}"#);
    stream.write_all(&sync).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut skipped = Vec::new();
    reader.read_until(0xff, &mut skipped).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["return"], 777);
    requests
        .iter()
        .map(|request| {
            stream.write_all(request.as_bytes()).unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{request} answered {line:?}: {e}"))
        })
        .collect()
}

/// Requests whose answers' envelopes must match qemu-ga's exactly (ids echoed, null too).
const RAW_REQUESTS: &[&str] = &[
    r#"{"execute":"guest-ping","id":null}"#,
    r#"{"execute":"guest-ping","id":{"nested":[1,"two"]}}"#,
    r#"{"execute":"guest-ping","bogus":1,"id":5}"#,
    r#"{"exec-oob":"guest-ping","id":6}"#,
    r#"{"execute":7,"id":"seven"}"#,
    r#"{"arguments":{},"id":8}"#,
    r#"{"execute":"guest-ping","arguments":[],"id":9}"#,
    r#"{"execute":"guest-no-such-command","id":10}"#,
    r#"{"execute":"guest-ping","arguments":{"pad":1},"id":11}"#,
    r#"[1,2]"#,
];

/// The qemu.qmp release the client comparison installs from PyPI.
const QEMU_QMP: &str = "qemu.qmp==0.0.6";

/// What QEMU's qemu-ga-client does, over the same library (qemu.qmp's legacy
/// `QEMUMonitorProtocol`, connected without negotiation): one connection per command, as
/// the client makes, for ping, sync, info, fsfreeze status/freeze/thaw, fstrim, ifconfig
/// (guest-network-get-interfaces) and cat (guest-file-open/read/close). Prints each
/// command's result (or the exception qemu.qmp raised) as one JSON object.
const QMP_CLIENT_SCRIPT: &str = r#"
import base64, json, sys
from qemu.qmp.legacy import QEMUMonitorProtocol

address = sys.argv[1]
results = {}

def step(name, run):
    qga = QEMUMonitorProtocol(address)
    qga.connect(negotiate=False)
    qga.settimeout(30)
    try:
        results[name] = {"return": run(qga)}
    except Exception as error:
        results[name] = {"exception": type(error).__name__}
    finally:
        qga.close()

def cat(qga):
    handle = qga.cmd("guest-file-open", path="/etc/passwd")
    data, eof = b"", False
    while not eof:
        read = qga.cmd("guest-file-read", handle=handle, count=1024)
        data += base64.b64decode(read["buf-b64"])
        eof = read["eof"]
    qga.cmd("guest-file-close", handle=handle)
    return data.decode()

step("ping", lambda q: q.cmd("guest-ping"))
step("sync", lambda q: q.cmd("guest-sync", id=123456789))
step("info", lambda q: sorted(c["name"] for c in q.cmd("guest-info")["supported_commands"]))
step("fsfreeze-status", lambda q: q.cmd("guest-fsfreeze-status"))
step("fsfreeze-freeze", lambda q: q.cmd("guest-fsfreeze-freeze"))
step("fsfreeze-status-frozen", lambda q: q.cmd("guest-fsfreeze-status"))
step("fsfreeze-thaw", lambda q: q.cmd("guest-fsfreeze-thaw"))
step("fstrim", lambda q: q.cmd("guest-fstrim", minimum=0))
step("ifconfig", lambda q: q.cmd("guest-network-get-interfaces"))
step("cat", cat)
step("unknown", lambda q: q.cmd("guest-no-such-command"))
print(json.dumps(results))
"#;

/// A venv with [`QEMU_QMP`] under the test's scratch directory, made once; `Err` says
/// why there is none (no python3-venv, PyPI out of reach).
fn qemu_qmp_python() -> Result<std::path::PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-qmp-0.0.6");
    let python = venv.join("bin").join("python3");
    let ready = venv.join("installed");
    if ready.exists() {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv failed (python3-venv missing?): {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }
    let pip = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", QEMU_QMP])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip install {QEMU_QMP} failed (is PyPI reachable?): {}",
            String::from_utf8_lossy(&pip.stderr)
        ));
    }
    std::fs::write(&ready, QEMU_QMP).map_err(|e| e.to_string())?;
    Ok(python)
}

/// Runs [`QMP_CLIENT_SCRIPT`] against the agent at `socket`.
fn qmp_client(python: &Path, socket: &Path) -> Value {
    let out = Command::new(python)
        .arg("-c")
        .arg(QMP_CLIENT_SCRIPT)
        .arg(socket)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "qemu.qmp client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
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
    let sealvm_raw = raw_exchange(&ours, RAW_REQUESTS);
    let qemu_ga_raw = raw_exchange(&theirs, RAW_REQUESTS);
    let clients = match qemu_qmp_python() {
        Ok(python) => Some((qmp_client(&python, &ours), qmp_client(&python, &theirs))),
        Err(why) => {
            eprintln!("skipped: the qemu.qmp client comparison: {why}");
            None
        }
    };
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
        "host-name",
        "timezone",
        "users",
        "set-time-from-rtc",
        "fsinfo",
        "disks",
        "vcpus",
        "set-vcpus-none",
        "memory-block-info",
        "file-write",
        "file-seek",
        "file-read",
        "ssh-get",
    ] {
        assert_eq!(sealvm[step], qemu_ga[step], "step {step}");
    }
    // Errors of the same class where qga fails (disabled while frozen, unknown, ...).
    for (step, theirs) in &qemu_ga {
        if let Some(class) = theirs.get("error").map(|e| &e["class"]) {
            assert_eq!(
                &sealvm[step]["error"]["class"], class,
                "step {step}: sealvm-agent {} vs qemu-ga {theirs}",
                sealvm[step]
            );
        }
    }
    let names = |info: &Value| -> Vec<(String, bool)> {
        info["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["enabled"] == true,
                )
            })
            .collect()
    };
    let ours = names(&sealvm["info"]);
    let missing: Vec<String> = names(&qemu_ga["info"])
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !ours.iter().any(|(n, _)| n == name))
        .filter(|name| !MISSING_ON_PURPOSE.iter().any(|(m, _)| m == name))
        .collect();
    assert!(
        missing.is_empty(),
        "qemu-ga offers commands sealvm-agent lacks (add them, or to MISSING_ON_PURPOSE with a reason): {missing:?}"
    );
    for ((request, ours), theirs) in RAW_REQUESTS.iter().zip(&sealvm_raw).zip(&qemu_ga_raw) {
        assert_eq!(
            ours.get("id"),
            theirs.get("id"),
            "{request}: {ours} vs {theirs}"
        );
        assert_eq!(shape(ours), shape(theirs), "{request}: {ours} vs {theirs}");
        assert_eq!(
            ours["error"]["class"], theirs["error"]["class"],
            "{request}: {ours} vs {theirs}"
        );
    }
    eprintln!(
        "compared {} steps and {} raw requests; qemu-ga offers {} commands, sealvm-agent {}",
        qemu_ga.len(),
        RAW_REQUESTS.len(),
        names(&qemu_ga["info"]).len(),
        ours.len()
    );
    if let Some((sealvm_client, qemu_ga_client)) = &clients {
        let steps = qemu_ga_client.as_object().unwrap();
        for (step, theirs) in steps {
            let ours = &sealvm_client[step];
            assert_eq!(
                shape(ours),
                shape(theirs),
                "qemu.qmp client, {step}: sealvm-agent {ours} vs qemu-ga {theirs}"
            );
        }
        for step in [
            "ping",
            "sync",
            "fsfreeze-status",
            "fsfreeze-freeze",
            "fsfreeze-status-frozen",
            "fsfreeze-thaw",
            "cat",
            "unknown",
        ] {
            assert_eq!(
                sealvm_client[step], qemu_ga_client[step],
                "qemu.qmp client, {step}"
            );
        }
        // Every command qemu-ga has, sealvm-agent has (it adds its own two).
        let theirs: Vec<&Value> = qemu_ga_client["info"]["return"]
            .as_array()
            .unwrap()
            .iter()
            .collect();
        for name in theirs {
            assert!(
                sealvm_client["info"]["return"]
                    .as_array()
                    .unwrap()
                    .contains(name),
                "{name}"
            );
        }
        eprintln!("qemu.qmp client: {} commands compared", steps.len());
    }
    // The same commands enabled (qga disables some on Linux).
    for (name, enabled) in names(&qemu_ga["info"]) {
        if let Some((_, ours_enabled)) = ours.iter().find(|(n, _)| *n == name) {
            assert_eq!(*ours_enabled, enabled, "{name} enabled");
        }
    }
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
