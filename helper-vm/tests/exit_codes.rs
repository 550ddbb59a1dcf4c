//! sealvm-helper's exits: it has no operations yet, so what can be checked is that a bad
//! flag exits 2 with clap's one-line error and that a plain run succeeds quietly.

use std::process::Command;

#[test]
fn an_unknown_flag_exits_2_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_sealvm-helper"))
        .arg("--bogus")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("unexpected argument '--bogus'"), "{text}");
}

#[test]
fn a_plain_run_succeeds_and_prints_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_sealvm-helper"))
        .arg("-v")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
}
