//! `vhost-blk/API.md` is what sealvm-blk's API socket does: every example request on the
//! page is sent, in page order, to a real `sealvm-blk` serving the volumes the page's
//! sessions name, and every answer must have the documented shape; every command the
//! server knows has an example; and bad input (not JSON, an unknown command or field, an
//! over-long line) gets an error answer with a code while the server keeps serving.

use sealvm_blk::api::protocol::Request;
use sealvm_os::api_socket::{Answer, Client, ErrorCode, MAX_REQUEST_LINE};
use sealvm_testkit::api_doc;
use sealvm_testkit::loadgen::BlkDriver;
use sealvm_testkit::{Background, Workspace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// String values compared exactly; every other string matches any string.
const EXACT_KEYS: &[&str] = &["code", "name"];
const TIMEOUT: Duration = Duration::from_secs(10);

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("API.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blk() -> PathBuf {
    Workspace::locate()
        .binary("sealvm-blk")
        .expect("build sealvm-blk first")
}

/// Starts `sealvm-blk ARGS --socket DIR/S.sock... --api-socket DIR/NAME.api` in `dir` (so
/// the page's relative paths land there) and waits for every socket.
fn start(dir: &Path, name: &str, args: &[&str], sockets: &[&str]) -> Background {
    let api = dir.join(format!("{name}.api"));
    let sockets: Vec<PathBuf> = sockets
        .iter()
        .map(|s| dir.join(format!("{s}.sock")))
        .collect();
    let mut command = Command::new(blk());
    command.current_dir(dir).args(args);
    for socket in &sockets {
        command.arg("--socket").arg(socket);
    }
    command
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut waited: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
    waited.push(&api);
    Background::start(&mut command, &waited)
        .unwrap_or_else(|e| panic!("start the {name} daemon: {e}"))
}

fn image(dir: &Path, name: &str) {
    std::fs::File::create(dir.join(name))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
}

/// The daemons the page's sessions talk to, started when first named: `web1.api` (one
/// journaled volume, written to before the session), `web1-pit.api` (web1 exposed at the
/// bookmark `before-upgrade`) and `shop.api` (a journaled `db` and a plain `logs`).
struct Daemons {
    dir: PathBuf,
    running: BTreeMap<String, Background>,
    /// The guest's writes to web1, kept open so the counters show a connected frontend.
    _web1_driver: Option<BlkDriver>,
}

impl Daemons {
    /// Starts the daemon that serves `api` (a file name in the test's folder) unless it
    /// runs; returns the socket's path.
    fn socket_for(&mut self, api: &str) -> PathBuf {
        let name = api
            .strip_suffix(".api")
            .unwrap_or_else(|| panic!("{api}: the page's sockets end in .api"))
            .to_string();
        if !self.running.contains_key(&name) {
            let dir = self.dir.clone();
            let daemon = match name.as_str() {
                "web1" => {
                    image(&dir, "web1.raw");
                    let daemon = start(
                        &dir,
                        "web1",
                        &["serve", "--volume", "web1=web1.raw,journal=web1.journal"],
                        &["web1"],
                    );
                    // What a guest would do: write two blocks and flush.
                    let mut driver = BlkDriver::connect(&dir.join("web1.sock"), TIMEOUT).unwrap();
                    driver.write(0, &[0xa5; 4096]).unwrap();
                    driver.write(8, &[0x5a; 4096]).unwrap();
                    driver.flush().unwrap();
                    self._web1_driver = Some(driver);
                    daemon
                }
                "web1-pit" => start(
                    &dir,
                    "web1-pit",
                    &[
                        "pit",
                        "expose",
                        "--base",
                        "web1.raw",
                        "--journal",
                        "web1.journal",
                        "--at",
                        "before-upgrade",
                    ],
                    &["web1-pit"],
                ),
                "shop" => {
                    image(&dir, "db.raw");
                    image(&dir, "logs.raw");
                    start(
                        &dir,
                        "shop",
                        &[
                            "serve",
                            "--volume",
                            "db=db.raw,journal=db.journal",
                            "--volume",
                            "logs=logs.raw",
                        ],
                        &["db", "logs"],
                    )
                }
                other => {
                    panic!("the page names {other}.api; this test knows web1, web1-pit and shop")
                }
            };
            self.running.insert(name.clone(), daemon);
        }
        self.dir.join(format!("{name}.api"))
    }
}

#[test]
fn every_documented_example_answers_as_documented() {
    let examples = api_doc::examples(&page()).expect("API.md's examples parse");
    assert!(!examples.is_empty(), "API.md has no examples");
    let dir = tempfile::tempdir().unwrap();
    let mut daemons = Daemons {
        dir: dir.path().to_path_buf(),
        running: BTreeMap::new(),
        _web1_driver: None,
    };
    let use_socat = api_doc::have_socat();
    if !use_socat {
        eprintln!("socat is not installed: the examples are sent without it");
    }
    let mut wrong = Vec::new();
    for example in &examples {
        daemons.socket_for(&example.socket);
        let line = api_doc::send(dir.path(), example, use_socat)
            .unwrap_or_else(|e| panic!("API.md line {}: {e}", example.line));
        let actual: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("API.md line {}: {line:?} is not JSON: {e}", example.line));
        let difference = api_doc::shape_mismatch(&example.answer, &actual, EXACT_KEYS);
        // API_DOC_SHOW=1 lists every answer, to refresh the page's examples from.
        let show = std::env::var_os("API_DOC_SHOW").is_some();
        if let Some(difference) = difference.or(show.then(|| "shown".to_string())) {
            wrong.push(format!(
                "API.md line {}: {}\n  {difference}\n  the daemon answered:\n{line}",
                example.line, example.request,
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} examples differ from the daemon:\n{}",
        wrong.len(),
        examples.len(),
        wrong.join("\n")
    );
}

#[test]
fn every_command_has_an_example() {
    let refused = serde_json::from_value::<Request>(json!({"command": "\u{0}"}))
        .expect_err("no command is named NUL");
    let commands = api_doc::variants_in_error(&refused.to_string());
    assert!(
        commands.len() > 5,
        "serde's unknown-variant message no longer lists the commands: {refused}"
    );
    let documented = api_doc::documented_commands(&api_doc::examples(&page()).unwrap());
    let missing: Vec<&String> = commands
        .iter()
        .filter(|c| !documented.contains(*c))
        .collect();
    assert!(missing.is_empty(), "API.md has no example of {missing:?}");
    let unknown: Vec<&String> = documented
        .iter()
        .filter(|c| !commands.contains(c))
        .collect();
    assert!(
        unknown.is_empty(),
        "API.md shows commands the server does not know: {unknown:?}"
    );
}

#[test]
fn bad_input_is_answered_with_a_code_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    image(dir.path(), "vol.raw");
    let _daemon = start(
        dir.path(),
        "vol",
        &["serve", "--volume", "vol=vol.raw,journal=vol.journal"],
        &["vol"],
    );
    let api = dir.path().join("vol.api");
    let mut client = Client::connect(&api).unwrap();
    let code_of = |answer: Answer<Value>| match answer {
        Answer::Error { error, code } => {
            assert!(!error.is_empty());
            code
        }
        Answer::Return { value } => panic!("bad input was accepted: {value}"),
    };
    let over_long = format!(
        r#"{{"command":"bookmark","name":"{}"}}"#,
        "x".repeat(MAX_REQUEST_LINE)
    );
    for bad in [
        "not json",
        r#"{"command":"reboot"}"#,
        r#"{"command":"counters","volume":"vol","colour":"red"}"#,
        r#"{"command":"bookmark"}"#,
        r#"{"name":"no command"}"#,
        over_long.as_str(),
    ] {
        let answer = client.send_line(bad).unwrap();
        assert_eq!(code_of(answer), ErrorCode::BadRequest, "{:.80}", bad);
        // Still serving on the same connection.
        let counters = client.call(json!({"command": "counters"})).unwrap();
        assert!(counters["requests"].is_u64(), "{counters}");
    }
    // The over-long line made no bookmark.
    let bookmarks = client.call(json!({"command": "bookmarks"})).unwrap();
    assert_eq!(bookmarks, json!([]));
    // And a new connection is served too.
    assert!(sealvm_os::api_socket::call(&api, json!({"command": "volumes"})).is_ok());
}
