//! Reads the example sessions of an `API.md` page and checks real answers against them, so
//! a page that says one thing while the daemon does another fails a test.
//!
//! An example is a line in a ```` ```console ```` block of the form
//! `$ echo 'REQUEST' | socat - UNIX-CONNECT:SOCKET` followed by the answer (one JSON value,
//! on one line or pretty-printed over several) up to the next `$` line or the end of the
//! block. [`shape_mismatch`] compares an answer with the documented one by shape: the same
//! keys, the same kinds of values (numbers that vary, like counters and times, match any
//! number of the same kind), and the exact string for the keys a test names (`code`,
//! `state`, ...).

use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

/// One documented request and its answer.
#[derive(Debug, Clone)]
pub struct Example {
    /// The socket's file name as the page writes it (`web1.api`).
    pub socket: String,
    /// The request line, as sent.
    pub request: String,
    /// The documented answer.
    pub answer: Value,
    /// The page's line number of the `$ echo` line, for messages.
    pub line: usize,
}

impl Example {
    /// The `command` the request names, when it is a JSON object that has one.
    pub fn command(&self) -> Option<String> {
        let request: Value = serde_json::from_str(&self.request).ok()?;
        request.get("command")?.as_str().map(str::to_string)
    }
}

/// True when `socat` is on the PATH, so examples can run exactly as the page writes them.
pub fn have_socat() -> bool {
    Command::new("socat")
        .arg("-V")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Sends `example` to the socket of its name in `dir` and returns the answer line (without
/// its newline): with `socat` when `use_socat` (the page's own command line, run by `sh` in
/// `dir`), otherwise as `socat` would, on a fresh connection.
pub fn send(dir: &Path, example: &Example, use_socat: bool) -> std::io::Result<String> {
    let mut line = String::new();
    if use_socat {
        let output = Command::new("sh")
            .current_dir(dir)
            .arg("-c")
            .arg(format!(
                "echo '{}' | socat - UNIX-CONNECT:{}",
                example.request, example.socket
            ))
            .output()?;
        if !output.status.success() {
            return Err(std::io::Error::other(format!(
                "socat failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        line = String::from_utf8_lossy(&output.stdout).into_owned();
    } else {
        let mut stream = UnixStream::connect(dir.join(&example.socket))?;
        writeln!(stream, "{}", example.request)?;
        BufReader::new(stream).read_line(&mut line)?;
    }
    Ok(line.trim_end().to_string())
}

/// Why a page's examples could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ApiDocError {
    /// A `$` line in a console block is not an `echo '...' | socat` line.
    #[error("line {line}: not of the form $ echo 'REQUEST' | socat - UNIX-CONNECT:SOCKET")]
    NotAnExample {
        /// The line number.
        line: usize,
    },
    /// The answer under an example is not JSON.
    #[error("line {line}: the answer is not JSON: {source}")]
    Answer {
        /// The `$` line's number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

const PREFIX: &str = "$ echo '";
const SOCAT: &str = "' | socat - UNIX-CONNECT:";

/// Every example of `markdown`, in page order.
pub fn examples(markdown: &str) -> Result<Vec<Example>, ApiDocError> {
    let mut examples = Vec::new();
    let mut in_console = false;
    // The example being read: its line, socket, request and answer lines so far.
    let mut open: Option<(usize, String, String, String)> = None;
    let finish = |open: &mut Option<(usize, String, String, String)>,
                  examples: &mut Vec<Example>|
     -> Result<(), ApiDocError> {
        if let Some((line, socket, request, answer)) = open.take() {
            let answer = serde_json::from_str(&answer)
                .map_err(|source| ApiDocError::Answer { line, source })?;
            examples.push(Example {
                socket,
                request,
                answer,
                line,
            });
        }
        Ok(())
    };
    for (index, text) in markdown.lines().enumerate() {
        let line = index + 1;
        let trimmed = text.trim_end();
        if trimmed.starts_with("```") {
            finish(&mut open, &mut examples)?;
            in_console = !in_console && trimmed == "```console";
            continue;
        }
        if !in_console {
            continue;
        }
        if trimmed.starts_with('$') {
            finish(&mut open, &mut examples)?;
            let rest = trimmed
                .strip_prefix(PREFIX)
                .ok_or(ApiDocError::NotAnExample { line })?;
            let (request, socket) = rest
                .split_once(SOCAT)
                .ok_or(ApiDocError::NotAnExample { line })?;
            open = Some((line, socket.to_string(), request.to_string(), String::new()));
        } else if let Some((_, _, _, answer)) = open.as_mut() {
            answer.push_str(trimmed);
            answer.push('\n');
        }
    }
    finish(&mut open, &mut examples)?;
    Ok(examples)
}

/// The commands the examples of a page show succeeding (their answer has `return`); an
/// example of an error does not document its command.
pub fn documented_commands(examples: &[Example]) -> BTreeSet<String> {
    examples
        .iter()
        .filter(|e| e.answer.get("return").is_some())
        .filter_map(Example::command)
        .collect()
}

/// The variant names serde lists when it refuses an unknown command: pass the error of
/// parsing `{"command": "\u0000"}` as the request type. Empty when the message has no list
/// (then serde changed its wording, and the caller should fail).
pub fn variants_in_error(message: &str) -> Vec<String> {
    let Some((_, list)) = message.split_once("expected one of ") else {
        return Vec::new();
    };
    list.split(", ")
        .filter_map(|item| {
            let item = item.trim();
            let item = item.strip_prefix('`')?;
            Some(item[..item.find('`')?].to_string())
        })
        .collect()
}

/// Where `actual` differs in shape from `documented`, as a JSON-pointer-like path and what
/// differs; `None` when they match. Objects must have the same keys; arrays the same
/// emptiness, with each element matching the documented element at its place (or the last
/// one when the answer is longer); numbers match numbers of the same kind (unsigned,
/// negative, fractional); strings match any string unless their key is in `exact_keys`.
pub fn shape_mismatch(documented: &Value, actual: &Value, exact_keys: &[&str]) -> Option<String> {
    compare(documented, actual, exact_keys, "", None)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() => "an unsigned integer",
        Value::Number(n) if n.is_i64() => "a negative integer",
        Value::Number(_) => "a fractional number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn compare(
    documented: &Value,
    actual: &Value,
    exact_keys: &[&str],
    path: &str,
    key: Option<&str>,
) -> Option<String> {
    if kind(documented) != kind(actual) {
        return Some(format!(
            "{path}: documented {} ({documented}), got {} ({actual})",
            kind(documented),
            kind(actual)
        ));
    }
    match (documented, actual) {
        (Value::Object(doc), Value::Object(got)) => {
            let doc_keys: BTreeSet<&String> = doc.keys().collect();
            let got_keys: BTreeSet<&String> = got.keys().collect();
            if doc_keys != got_keys {
                return Some(format!(
                    "{path}: documented keys {doc_keys:?}, got {got_keys:?}"
                ));
            }
            doc.iter()
                .find_map(|(k, v)| compare(v, &got[k], exact_keys, &format!("{path}/{k}"), Some(k)))
        }
        (Value::Array(doc), Value::Array(got)) => {
            if doc.is_empty() != got.is_empty() {
                return Some(format!(
                    "{path}: documented {} elements, got {}",
                    doc.len(),
                    got.len()
                ));
            }
            got.iter().enumerate().find_map(|(i, element)| {
                let model = doc.get(i).or(doc.last())?;
                compare(model, element, exact_keys, &format!("{path}/{i}"), None)
            })
        }
        (Value::String(doc), Value::String(got))
            if key.is_some_and(|k| exact_keys.contains(&k)) && doc != got =>
        {
            Some(format!("{path}: documented {doc:?}, got {got:?}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PAGE: &str = r#"
Some text.

```console
$ echo '{"command":"info"}' | socat - UNIX-CONNECT:vm.api
{"return": {"state": "running",
  "cpus": 1}}
$ echo 'oops' | socat - UNIX-CONNECT:vm.api
{"error": "bad request", "code": "bad-request"}
```

```json
{"not": "an example"}
```
"#;

    #[test]
    fn examples_are_read_with_multi_line_answers() {
        let found = examples(PAGE).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].socket, "vm.api");
        assert_eq!(found[0].request, r#"{"command":"info"}"#);
        assert_eq!(
            found[0].answer,
            json!({"return": {"state": "running", "cpus": 1}})
        );
        assert_eq!(found[0].command().as_deref(), Some("info"));
        assert_eq!(found[1].command(), None);
        assert_eq!(found[1].line, 8);
        assert_eq!(
            documented_commands(&found),
            BTreeSet::from(["info".to_string()])
        );
    }

    #[test]
    fn a_dollar_line_that_is_not_an_example_is_an_error() {
        let page = "```console\n$ socat - UNIX-CONNECT:vm.api\n```\n";
        assert!(matches!(
            examples(page),
            Err(ApiDocError::NotAnExample { line: 2 })
        ));
    }

    #[test]
    fn shapes_match_by_keys_and_kinds() {
        let doc =
            json!({"return": {"n": 1, "t": 0.5, "s": "x", "state": "running", "l": [{"a": 1}]}});
        let same = json!({"return": {"n": 7, "t": 2.25, "s": "y", "state": "running", "l": [{"a": 2}, {"a": 3}]}});
        assert_eq!(shape_mismatch(&doc, &same, &["state"]), None);
        let extra_key = json!({"return": {"n": 7, "t": 2.25, "s": "y", "state": "running", "l": [], "more": 1}});
        assert!(shape_mismatch(&doc, &extra_key, &["state"]).is_some());
        let wrong_state =
            json!({"return": {"n": 7, "t": 2.25, "s": "y", "state": "paused", "l": [{"a": 2}]}});
        assert!(shape_mismatch(&doc, &wrong_state, &["state"])
            .unwrap()
            .contains("/return/state"));
        let string_for_number =
            json!({"return": {"n": "7", "t": 2.25, "s": "y", "state": "running", "l": [{"a": 2}]}});
        assert!(shape_mismatch(&doc, &string_for_number, &[]).is_some());
        let empty_list =
            json!({"return": {"n": 7, "t": 2.25, "s": "y", "state": "running", "l": []}});
        assert!(shape_mismatch(&doc, &empty_list, &[]).is_some());
    }

    #[test]
    fn variants_are_read_from_serdes_unknown_variant_error() {
        let message = "unknown variant `\\u0000`, expected one of `volumes`, `counters`, `set-retention` at line 1 column 18";
        assert_eq!(
            variants_in_error(message),
            vec!["volumes", "counters", "set-retention"]
        );
        assert!(variants_in_error("missing field `command`").is_empty());
    }
}
