//! The qemu-guest-agent wire protocol, version 1 as QEMU's `qga` speaks it.
//!
//! Framing: the host sends JSON objects back to back (whitespace, including newlines,
//! between them is ignored). A request is `{"execute": NAME, "arguments": {...}}` with an
//! optional `"id"` echoed in the answer. The agent answers each request with one line:
//! `{"return": VALUE}` or `{"error": {"class": CLASS, "desc": TEXT}}`, followed by `\n`.
//! A byte 0xFF from the host resets the decoder (it discards any partial message); before
//! answering `guest-sync-delimited` the agent itself sends 0xFF so the host can find the
//! start of the answer after stale data. A message larger than [`MAX_MESSAGE_LEN`] is
//! refused and discarded.

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The largest request the agent accepts, in bytes (qga's own limit is 64 KiB).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The byte that resets the decoder, and that prefixes a `guest-sync-delimited` answer.
pub const DELIMITER: u8 = 0xff;

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// Its arguments (an object), if any.
    #[serde(default)]
    pub arguments: Option<Value>,
    /// A value the answer echoes.
    #[serde(default)]
    pub id: Option<Value>,
}

/// The error classes qga uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Any failure without a more specific class.
    GenericError,
    /// The command does not exist.
    CommandNotFound,
}

impl ErrorClass {
    fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// A command failure, answered as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// The class.
    pub class: ErrorClass,
    /// What went wrong, for a person.
    pub desc: String,
}

impl CommandError {
    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// Encodes a success answer as one line.
pub fn encode_return(value: Value, id: Option<&Value>) -> Vec<u8> {
    let mut answer = Map::new();
    answer.insert("return".into(), value);
    if let Some(id) = id {
        answer.insert("id".into(), id.clone());
    }
    line(Value::Object(answer))
}

/// Encodes an error answer as one line.
pub fn encode_error(error: &CommandError, id: Option<&Value>) -> Vec<u8> {
    let mut answer = Map::new();
    answer.insert(
        "error".into(),
        json!({"class": error.class.name(), "desc": error.desc}),
    );
    if let Some(id) = id {
        answer.insert("id".into(), id.clone());
    }
    line(Value::Object(answer))
}

fn line(value: Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// What the decoder found in the bytes received so far.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A well-formed request.
    Request(Request),
    /// Something that is not a request; answer with this error and go on.
    Invalid(CommandError),
}

/// Splits the host's byte stream into requests.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
    /// Set after an oversized message: skip input until the next newline or delimiter.
    skipping: bool,
}

impl Decoder {
    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == DELIMITER {
                self.buffer.clear();
                self.skipping = false;
            } else if self.skipping {
                if byte == b'\n' {
                    self.skipping = false;
                }
            } else {
                self.buffer.push(byte);
            }
        }
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Option<Decoded> {
        let start = self.buffer.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buffer.clear();
            return None;
        };
        self.buffer.drain(..start);
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                let consumed = stream.byte_offset();
                self.buffer.drain(..consumed);
                Some(match serde_json::from_value::<Request>(value) {
                    Ok(request) => Decoded::Request(request),
                    Err(e) => {
                        Decoded::Invalid(CommandError::generic(format!("Invalid request: {e}")))
                    }
                })
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buffer.len() > MAX_MESSAGE_LEN {
                    self.buffer.clear();
                    self.skipping = true;
                    return Some(Decoded::Invalid(CommandError::generic(format!(
                        "Message too large (over {MAX_MESSAGE_LEN} bytes)"
                    ))));
                }
                None
            }
            Some(Err(e)) => {
                // Drop the bad input up to the end of its line so the next request parses.
                let end = self
                    .buffer
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.buffer.len(), |i| i + 1);
                self.buffer.drain(..end);
                Some(Decoded::Invalid(CommandError::generic(format!(
                    "JSON parse error, {e}"
                ))))
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(decoder: &mut Decoder) -> Vec<Decoded> {
        std::iter::from_fn(|| decoder.next_message()).collect()
    }

    #[test]
    fn splits_back_to_back_and_partial_messages() {
        let mut d = Decoder::default();
        d.push(br#"{"execute":"guest-ping"}{"execute":"guest-sync","arguments":{"id":5}}  {"exe"#);
        let got = requests(&mut d);
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[1], Decoded::Request(r) if r.execute == "guest-sync"));
        d.push(br#"cute":"guest-info","id":"x"}"#);
        match requests(&mut d).as_slice() {
            [Decoded::Request(r)] => {
                assert_eq!(r.execute, "guest-info");
                assert_eq!(r.id, Some(json!("x")));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_json_is_answered_and_the_stream_recovers() {
        let mut d = Decoder::default();
        d.push(b"{\"execute\": nope}\n{\"execute\":\"guest-ping\"}\n");
        let got = requests(&mut d);
        assert!(matches!(&got[0], Decoded::Invalid(e) if e.desc.starts_with("JSON parse error")));
        assert!(matches!(&got[1], Decoded::Request(r) if r.execute == "guest-ping"));
    }

    #[test]
    fn non_request_objects_are_invalid() {
        let mut d = Decoder::default();
        d.push(br#"{"exec":"guest-ping"} [1,2] {"execute":"guest-ping","bogus":1}"#);
        let got = requests(&mut d);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|g| matches!(g, Decoded::Invalid(_))));
    }

    #[test]
    fn delimiter_discards_a_partial_message() {
        let mut d = Decoder::default();
        d.push(br#"{"execute":"gue"#);
        d.push(&[DELIMITER]);
        d.push(br#"{"execute":"guest-ping"}"#);
        assert!(
            matches!(requests(&mut d).as_slice(), [Decoded::Request(r)] if r.execute == "guest-ping")
        );
    }

    #[test]
    fn oversized_message_is_refused_then_skipped() {
        let mut d = Decoder::default();
        let mut big = br#"{"execute":"guest-ping","arguments":{"x":""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE_LEN + 10));
        d.push(&big);
        assert!(
            matches!(d.next_message(), Some(Decoded::Invalid(e)) if e.desc.contains("too large"))
        );
        d.push(b"aaaa\"}}\n{\"execute\":\"guest-ping\"}");
        assert!(
            matches!(requests(&mut d).as_slice(), [Decoded::Request(r)] if r.execute == "guest-ping")
        );
    }

    #[test]
    fn answers_are_single_lines_with_id() {
        let ok = encode_return(json!({}), Some(&json!(7)));
        assert_eq!(ok, b"{\"id\":7,\"return\":{}}\n".to_vec());
        let err = encode_error(&CommandError::generic("boom"), None);
        let v: Value = serde_json::from_slice(&err).unwrap();
        assert_eq!(
            v,
            json!({"error": {"class": "GenericError", "desc": "boom"}})
        );
    }
}

/// Feeds arbitrary bytes to a [`Decoder`] in chunks, as a fuzzer or a replayed crash input
/// does: the first byte picks the chunk size, the rest is the stream. Panics only on a bug.
pub fn fuzz_decoder(input: &[u8]) {
    let Some((&chunk, stream)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = Decoder::default();
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        while let Some(decoded) = decoder.next_message() {
            if let Decoded::Invalid(error) = decoded {
                let line = encode_error(&error, None);
                assert!(line.ends_with(b"\n"));
            }
        }
        assert!(decoder.buffer.len() <= MAX_MESSAGE_LEN + chunk);
    }
}

#[cfg(test)]
mod fuzz_replay {
    /// Inputs worth keeping: each must decode without a panic.
    #[test]
    fn replayed_inputs_decode_cleanly() {
        for input in [
            &b""[..],
            b"\x01{\"execute\":\"guest-ping\"}",
            b"\x03{{{{[[[\"\\u12",
            b"\x07\xff\xff{\"execute\":1}\n\xff",
            b"\x02{\"execute\":\"x\",\"arguments\":{\"a\":[1e999999]}}",
        ] {
            super::fuzz_decoder(input);
        }
    }
}
