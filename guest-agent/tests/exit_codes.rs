//! sealvm-agent's exits, as a script sees them: 2 and one line for a bad flag value, 1 and
//! one line for an operation that fails, and the cause chain with `-v`.

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealvm-agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_args_json_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let out = agent(&[
        "client",
        "--socket",
        socket.to_str().unwrap(),
        "guest-ping",
        "--args",
        "{not json",
    ]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("sealvm-agent: --args is not valid JSON"),
        "{text}"
    );
}

#[test]
fn a_flag_value_clap_refuses_exits_2_naming_the_flag() {
    let out = agent(&["client", "--socket", "s", "guest-ping", "--timeout", "soon"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("invalid value 'soon'") && first.contains("--timeout"),
        "{text}"
    );
}

#[test]
fn a_client_of_a_missing_socket_exits_1_and_v_prints_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    let args = ["client", "--socket", socket.to_str().unwrap(), "guest-ping"];
    let out = agent(&args);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("sealvm-agent: ") && text.contains("missing.sock"),
        "{text}"
    );

    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let out = agent(&verbose);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("\n  0: "), "no cause chain: {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  1: ") && l.contains("No such file")),
        "the chain lacks the OS error: {text}"
    );
}
