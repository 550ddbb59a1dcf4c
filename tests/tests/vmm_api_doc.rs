//! `vmm/API.md` is what sealvm's API socket does: every example request on the page is
//! sent to a real `sealvm run` of the probe guest (in page order, `shutdown` last), and every
//! answer must have the documented shape; every command the VMM knows has an example; and
//! bad input (not JSON, an unknown command or field, an over-long line) gets an error answer
//! with a code while the VMM keeps serving.

use sealvm::vm::api::protocol::Request;
use sealvm_os::api_socket::{Answer, Client, ErrorCode, MAX_REQUEST_LINE};
use sealvm_testkit::api_doc::{self, Example};
use sealvm_testkit::{Background, SealvmVm, Workspace};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// String values compared exactly; every other string matches any string.
const EXACT_KEYS: &[&str] = &["code", "state", "kind"];

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/API.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The probe guest and sealvm, or why this host cannot run them.
fn prerequisites() -> Result<(PathBuf, PathBuf), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let workspace = Workspace::locate();
    let probe = workspace
        .probe_guest()
        .map_err(|e| format!("{e} (run cargo xtask images)"))?;
    let sealvm = workspace
        .binary("sealvm")
        .map_err(|e| format!("{e} (run cargo build -p sealvm)"))?;
    Ok((sealvm, probe))
}

/// A `sealvm run` of the probe guest for the page's examples, and what it needs running.
struct Vm {
    vm: SealvmVm,
    _backend: Background,
    _console: UnixStream,
}

/// `sealvm run` of the probe guest with a raw disk, a vhost-user disk served by sealvm-blk
/// and a console whose client says hello back, the API on `DIR/vm.api`; returned once the
/// probe has written, read and flushed its disk and talked on the console.
fn start_vm(dir: &Path, sealvm: &Path, probe: &Path) -> Vm {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let volume = dir.join("web1.raw");
    std::fs::write(&volume, vec![0u8; 8 << 20]).unwrap();
    let backend_socket = dir.join("web1.sock");
    let backend =
        Background::sealvm_blk(&format!("web1={}", volume.display()), &backend_socket, None)
            .expect("start sealvm-blk");
    let console = dir.join("agent.sock");
    let args: Vec<String> = [
        "--kernel",
        &probe.display().to_string(),
        "--memory",
        "64M",
        "--cmdline",
        "probe.linger=1",
        "--disk",
        &format!("path={}", disk.display()),
        "--disk",
        &format!("vhost-user={}", backend_socket.display()),
        "--console",
        &format!("socket={}", console.display()),
        "--api-socket",
        &dir.join("vm.api").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = SealvmVm::start(sealvm, &args).expect("start sealvm");
    wait_for_path(&console);
    let mut client = UnixStream::connect(&console).expect("connect to the console");
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut hello = Vec::new();
    let mut byte = [0u8; 1];
    while !hello.ends_with(b"\n") {
        client.read_exact(&mut byte).expect("the probe's hello");
        hello.push(byte[0]);
    }
    client.write_all(b"host says hello\n").unwrap();
    let done = vm.wait_for("PROBE DONE", Duration::from_secs(60));
    assert!(
        done.is_some_and(|line| line.ends_with("fail=0")),
        "the probe did not pass:\n{}",
        vm.output()
    );
    wait_for_path(&dir.join("vm.api"));
    Vm {
        vm,
        _backend: backend,
        _console: client,
    }
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_documented_example_answers_as_documented() {
    let (sealvm, probe) = match prerequisites() {
        Ok(found) => found,
        Err(reason) => {
            eprintln!("SKIPPED every_documented_example_answers_as_documented: {reason}");
            return;
        }
    };
    let examples = api_doc::examples(&page()).expect("API.md's examples parse");
    assert!(!examples.is_empty(), "API.md has no examples");
    let dir = tempfile::tempdir().unwrap();
    let mut vm = start_vm(dir.path(), &sealvm, &probe);
    let use_socat = api_doc::have_socat();
    if !use_socat {
        eprintln!("socat is not installed: the examples are sent without it");
    }
    // Page order, but shutdown last: after it there is no VM to ask.
    let (last, first): (Vec<&Example>, Vec<&Example>) = examples
        .iter()
        .partition(|e| e.command().as_deref() == Some("shutdown"));
    let show = std::env::var_os("API_DOC_SHOW").is_some();
    let mut wrong = Vec::new();
    for example in first.into_iter().chain(last) {
        assert_eq!(example.socket, "vm.api", "API.md line {}", example.line);
        let line = api_doc::send(dir.path(), example, use_socat)
            .unwrap_or_else(|e| panic!("API.md line {}: {e}", example.line));
        let actual: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("API.md line {}: {line:?} is not JSON: {e}", example.line));
        let difference = api_doc::shape_mismatch(&example.answer, &actual, EXACT_KEYS);
        // API_DOC_SHOW=1 lists every answer, to refresh the page's examples from.
        if let Some(difference) = difference.or(show.then(|| "shown".to_string())) {
            wrong.push(format!(
                "API.md line {}: {}\n  {difference}\n  the VMM answered:\n{line}",
                example.line, example.request,
            ));
        }
    }
    let status = vm.vm.wait_exit(Duration::from_secs(20));
    assert!(
        wrong.is_empty(),
        "{} of {} examples differ from the VMM:\n{}",
        wrong.len(),
        examples.len(),
        wrong.join("\n")
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "sealvm did not exit cleanly after shutdown: {status:?}"
    );
}

#[test]
fn every_command_has_an_example() {
    let refused = serde_json::from_value::<Request>(json!({"command": "\u{0}"}))
        .expect_err("no command is named NUL");
    let commands = api_doc::variants_in_error(&refused.to_string());
    assert!(
        commands.len() >= 5,
        "serde's unknown-variant message no longer lists the commands: {refused}"
    );
    let documented = api_doc::documented_commands(&api_doc::examples(&page()).unwrap());
    let missing: Vec<&String> = commands
        .iter()
        .filter(|c| !documented.contains(*c))
        .collect();
    assert!(
        missing.is_empty(),
        "vmm/API.md has no example of {missing:?}"
    );
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|c| !commands.contains(c))
        .collect();
    assert!(
        unknown.is_empty(),
        "vmm/API.md shows commands sealvm does not know: {unknown:?}"
    );
}

#[test]
fn bad_input_is_answered_with_a_code_and_the_vmm_keeps_serving() {
    let (sealvm, probe) = match prerequisites() {
        Ok(found) => found,
        Err(reason) => {
            eprintln!(
                "SKIPPED bad_input_is_answered_with_a_code_and_the_vmm_keeps_serving: {reason}"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut vm = start_vm(dir.path(), &sealvm, &probe);
    let api = dir.path().join("vm.api");
    let mut client = Client::connect(&api).unwrap();
    let over_long = format!(
        r#"{{"command":"info","x":"{}"}}"#,
        "x".repeat(MAX_REQUEST_LINE)
    );
    for bad in [
        "not json",
        r#"{"command":"reboot"}"#,
        r#"{"command":"pause","vcpu":0}"#,
        r#"{"no":"command"}"#,
        "\u{0}\u{1}",
        over_long.as_str(),
    ] {
        match client.send_line(bad).unwrap() {
            Answer::Error { error, code } => {
                assert_eq!(code, ErrorCode::BadRequest, "{:.80}: {error}", bad)
            }
            Answer::Return { value } => panic!("bad input was accepted: {value}"),
        }
        // Still serving on the same connection, and still running.
        let info = client.call(json!({"command": "info"})).unwrap();
        assert_eq!(info["state"], "running", "{info}");
    }
    // A new connection is served too, and shuts the VM down.
    let stopped = sealvm_os::api_socket::call(&api, json!({"command": "shutdown"})).unwrap();
    assert_eq!(stopped["state"], "stopping");
    assert!(vm
        .vm
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
}
