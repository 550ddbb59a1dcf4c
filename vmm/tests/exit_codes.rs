//! sealvm's exits, as a script sees them: 2 and one line for a bad flag value, 1 and one
//! line for an operation that fails, and the cause chain with `-v`.

use std::process::{Command, Output};

fn sealvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealvm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_malformed_memory_size_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, [0u8; 64]).unwrap();
    let out = sealvm(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "lots",
    ]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("sealvm: bad size \"lots\""), "{text}");
}

#[test]
fn nothing_to_boot_is_a_usage_error() {
    let out = sealvm(&["run"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.starts_with("sealvm: nothing to boot"), "{text}");
}

#[test]
fn a_missing_kernel_exits_1_and_v_prints_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("missing-kernel");
    let args = ["run", "--kernel", kernel.to_str().unwrap()];
    let out = sealvm(&args);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("sealvm: ") && text.contains("missing-kernel"),
        "{text}"
    );

    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let out = sealvm(&verbose);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("\n  0: "), "no cause chain: {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  ") && l.contains("No such file")),
        "the chain lacks the OS error: {text}"
    );
}
