//! sealvm-blk's exits, as a script sees them: 2 and one line for a bad flag value, 1 and
//! one line for an operation that fails, and the cause chain with `-v`.

use std::process::{Command, Output};

fn sealvm_blk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_malformed_volume_spec_exits_2_with_one_line() {
    let out = sealvm_blk(&["serve", "--volume", "no-equals-sign", "--socket", "x.sock"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("sealvm-blk: volume \"no-equals-sign\""),
        "{text}"
    );
}

#[test]
fn a_flag_value_clap_refuses_exits_2_naming_the_flag() {
    let out = sealvm_blk(&["serve", "--volume", "a=a.raw", "--queues", "many"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("invalid value 'many'") && first.contains("--queues"),
        "{text}"
    );
}

#[test]
fn a_restore_from_a_missing_base_exits_1_and_v_prints_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("missing.raw");
    let to = dir.path().join("out.raw");
    let args = [
        "pit",
        "restore",
        "--base",
        base.to_str().unwrap(),
        "--journal",
        dir.path().to_str().unwrap(),
        "--at",
        "latest",
        "--to",
        to.to_str().unwrap(),
    ];
    let out = sealvm_blk(&args);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("sealvm-blk: "), "{text}");
    assert!(text.contains("missing.raw"), "{text}");

    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let out = sealvm_blk(&verbose);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("\n  0: "), "no cause chain: {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  1: ") && l.contains("No such file")),
        "the chain lacks the OS error: {text}"
    );
}
