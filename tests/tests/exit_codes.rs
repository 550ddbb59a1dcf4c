//! The four binaries' exits, as a script sees them (one `main` set-up, sealvm-os's
//! `main_setup`): 2 and one line for a bad flag value, whether clap or the binary refuses
//! it; 1 and one line for an operation that fails; with `-v`, each cause on its own line.

use sealvm_testkit::Workspace;
use std::path::Path;
use std::process::{Command, Output};

fn run(binary: &str, args: &[&str]) -> Output {
    let path = Workspace::locate()
        .binary(binary)
        .unwrap_or_else(|e| panic!("{e} (cargo build --workspace --bins)"));
    Command::new(path)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `binary args` exits 2 with exactly one line on stderr, which starts with `starts_with`.
fn usage_error(binary: &str, args: &[&str], starts_with: &str) {
    let out = run(binary, args);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{binary} {args:?}: {text}");
    assert_eq!(text.lines().count(), 1, "{binary} {args:?}: {text}");
    assert!(text.starts_with(starts_with), "{binary} {args:?}: {text}");
}

/// `binary args` exits 2 with clap's error, whose first line names `flag` and `value`.
fn clap_refuses(binary: &str, args: &[&str], flag: &str, value: &str) {
    let out = run(binary, args);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{binary} {args:?}: {text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("invalid value '{value}'")) && first.contains(flag),
        "{binary} {args:?}: {text}"
    );
}

/// `binary args` exits 1 with one line naming `names`; with `-v` it also prints the cause
/// chain down to the OS error.
fn fails_with_chain(binary: &str, args: &[&str], names: &str) {
    let out = run(binary, args);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{binary} {args:?}: {text}");
    assert_eq!(text.lines().count(), 1, "{binary} {args:?}: {text}");
    assert!(
        text.starts_with(&format!("{binary}: ")) && text.contains(names),
        "{binary} {args:?}: {text}"
    );
    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let out = run(binary, &verbose);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{binary} {verbose:?}: {text}");
    assert!(text.contains("\n  0: "), "no cause chain: {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  1: ") && l.contains("No such file")),
        "the chain lacks the OS error: {text}"
    );
}

#[test]
fn sealvm_exits_2_for_bad_values_and_1_for_a_missing_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, [0u8; 64]).unwrap();
    usage_error(
        "sealvm",
        &["run", "--kernel", s(&kernel), "--memory", "lots"],
        "sealvm: bad size \"lots\"",
    );
    usage_error("sealvm", &["run"], "sealvm: nothing to boot");
    clap_refuses(
        "sealvm",
        &["run", "--kernel", s(&kernel), "--cpus", "few"],
        "--cpus",
        "few",
    );
    let missing = dir.path().join("missing-kernel");
    fails_with_chain(
        "sealvm",
        &["run", "--kernel", s(&missing)],
        "missing-kernel",
    );
}

#[test]
fn sealvm_blk_exits_2_for_bad_values_and_1_for_a_missing_base() {
    usage_error(
        "sealvm-blk",
        &["serve", "--volume", "no-equals-sign", "--socket", "x.sock"],
        "sealvm-blk: volume \"no-equals-sign\"",
    );
    clap_refuses(
        "sealvm-blk",
        &["serve", "--volume", "a=a.raw", "--queues", "many"],
        "--queues",
        "many",
    );
    let dir = tempfile::tempdir().unwrap();
    let (base, to) = (dir.path().join("missing.raw"), dir.path().join("out.raw"));
    fails_with_chain(
        "sealvm-blk",
        &[
            "pit",
            "restore",
            "--base",
            s(&base),
            "--journal",
            s(dir.path()),
            "--at",
            "latest",
            "--to",
            s(&to),
        ],
        "missing.raw",
    );
}

#[test]
fn sealvm_agent_exits_2_for_bad_values_and_1_for_a_missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    usage_error(
        "sealvm-agent",
        &[
            "client",
            "--socket",
            s(&socket),
            "guest-ping",
            "--args",
            "{not json",
        ],
        "sealvm-agent: --args is not valid JSON",
    );
    clap_refuses(
        "sealvm-agent",
        &["client", "--socket", "s", "guest-ping", "--timeout", "soon"],
        "--timeout",
        "soon",
    );
    fails_with_chain(
        "sealvm-agent",
        &["client", "--socket", s(&socket), "guest-ping"],
        "missing.sock",
    );
}

/// sealvm-helper has no operations yet: a bad flag exits 2, a plain run succeeds quietly.
#[test]
fn sealvm_helper_exits_2_for_an_unknown_flag_and_0_otherwise() {
    let out = run("sealvm-helper", &["--bogus"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("unexpected argument '--bogus'"), "{text}");
    let out = run("sealvm-helper", &["-v"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
}
