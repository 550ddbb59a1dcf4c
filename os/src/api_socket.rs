//! The API socket protocol `sealvm` and `sealvm-blk` both speak: one JSON request per line
//! in, one JSON answer per line out, on a unix socket.
//!
//! An answer is `{"return": VALUE}` or `{"error": MESSAGE, "code": CODE}` ([`Answer`]), with
//! `CODE` one of a small set ([`ErrorCode`]). A request line longer than
//! [`MAX_REQUEST_LINE`] bytes is refused with `bad-request`: the server discards it as it
//! arrives (it is never held in memory) and goes on serving the connection. Anything that
//! does not parse as a request (not JSON, not UTF-8, an unknown command, an unknown field)
//! is answered the same way. Blank lines are ignored.
//!
//! This module holds the envelope, the per-connection loop ([`serve_connection`]) and the
//! client ([`Client`], [`call`]). It deliberately knows no command: each binary keeps its
//! requests and answers as serde types in one module of its own, and binds its socket
//! with [`crate::socket::bind`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The longest request line a server reads, in bytes, newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Why a request failed, as the `code` of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request did not parse: not JSON, too long, an unknown command or field, a
    /// missing or mistyped field, or a value out of range. Resending it cannot succeed.
    BadRequest,
    /// It names something that does not exist (a volume, a bookmark, a consumer).
    NotFound,
    /// It names something that cannot do this (a volume without a journal, a live volume
    /// asked to retarget).
    Unsupported,
    /// It conflicts with what is there (a restore target that exists, a cursor that would
    /// move backwards).
    Conflict,
    /// It was valid but carrying it out failed (I/O, a timeout); the message says why.
    Failed,
}

impl ErrorCode {
    /// The code as it appears on the wire (`bad-request`, `not-found`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Failed => "failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One answer line: the request's result, or why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer<T> {
    /// `{"return": VALUE}`.
    Return {
        /// The command's result.
        #[serde(rename = "return")]
        value: T,
    },
    /// `{"error": MESSAGE, "code": CODE}`.
    Error {
        /// What went wrong, for a person (the error and its causes, joined by `: `).
        error: String,
        /// What went wrong, for a program.
        code: ErrorCode,
    },
}

/// An error a command handler returns: it knows which [`ErrorCode`] it answers with.
pub trait ApiFailure: std::error::Error {
    /// The code the error answer carries.
    fn code(&self) -> ErrorCode;
}

/// The error answer for `error`: its message is the error and every cause, joined by `: `.
pub fn error_answer<T>(error: &dyn ApiFailure) -> Answer<T> {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Answer::Error {
        error: message,
        code: error.code(),
    }
}

/// What one request line turned out to be.
enum Line {
    /// A complete line (without its newline), at most [`MAX_REQUEST_LINE`] bytes.
    Request(Vec<u8>),
    /// A line longer than the limit, discarded.
    TooLong,
    /// The client closed the connection.
    End,
}

/// Reads the next line; a line past the limit is consumed chunk by chunk and dropped.
fn read_line(reader: &mut impl BufRead) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if chunk.is_empty() {
            // A last line without a newline still counts; an empty one is the end.
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::End,
                (false, false) => Line::Request(line),
            });
        }
        let (taken, complete) = match chunk.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            let body = if complete { taken - 1 } else { taken };
            // The limit counts the newline too.
            if line.len() + taken > MAX_REQUEST_LINE {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(&chunk[..body]);
            }
        }
        reader.consume(taken);
        if complete {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Request(line)
            });
        }
    }
}

/// Serves one connection until the client closes it: each line is parsed as an `R` and
/// given to `handle`, and its result (or the parse error) is written back as one [`Answer`]
/// line. Returns when the client hangs up; an I/O error on the connection is returned.
pub fn serve_connection<R, A, E, F>(stream: UnixStream, mut handle: F) -> io::Result<()>
where
    R: DeserializeOwned,
    A: Serialize,
    E: ApiFailure,
    F: FnMut(R) -> Result<A, E>,
{
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let answer: Answer<A> = match read_line(&mut reader)? {
            Line::End => return Ok(()),
            Line::TooLong => Answer::Error {
                error: format!("bad request: a request line is at most {MAX_REQUEST_LINE} bytes"),
                code: ErrorCode::BadRequest,
            },
            Line::Request(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Request(line) => match serde_json::from_slice::<R>(&line) {
                Ok(request) => match handle(request) {
                    Ok(value) => Answer::Return { value },
                    Err(error) => error_answer(&error),
                },
                Err(error) => Answer::Error {
                    error: format!("bad request: {error}"),
                    code: ErrorCode::BadRequest,
                },
            },
        };
        let mut text = match serde_json::to_vec(&answer) {
            Ok(text) => text,
            // A handler's answer type that cannot be JSON is a bug; say so rather than die.
            Err(error) => serde_json::to_vec(&Answer::<()>::Error {
                error: format!("the answer could not be encoded: {error}"),
                code: ErrorCode::Failed,
            })?,
        };
        text.push(b'\n');
        writer.write_all(&text)?;
    }
}

/// Errors calling an API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or the exchange broke off.
    #[error("cannot talk to the API socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The request could not be encoded as JSON.
    #[error("the request cannot be encoded as JSON")]
    Encode(#[source] serde_json::Error),
    /// The answer is not an answer line.
    #[error("the API socket {path} answered {line:?}, which is not an answer")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What it sent.
        line: String,
        /// Why it is not an answer.
        #[source]
        source: serde_json::Error,
    },
    /// The server refused or failed the request.
    #[error("the API refused the request ({code}): {message}")]
    Refused {
        /// The answer's code.
        code: ErrorCode,
        /// The answer's message.
        message: String,
    },
}

/// A connection to an API socket, for several requests in turn.
pub struct Client {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the API socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let io_error = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        let writer = UnixStream::connect(path).map_err(io_error)?;
        let reader = BufReader::new(writer.try_clone().map_err(io_error)?);
        Ok(Client {
            path: path.to_path_buf(),
            writer,
            reader,
        })
    }

    /// Sends `line` as it is (a newline is added) and returns the answer, whichever kind.
    /// For tests of what a server does with bad input, and for tools that relay lines.
    pub fn send_line(&mut self, line: &str) -> Result<Answer<Value>, ClientError> {
        let io_error = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(io_error)?;
        let mut answer = String::new();
        let read = self.reader.read_line(&mut answer).map_err(io_error)?;
        if read == 0 {
            return Err(io_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection without answering",
            )));
        }
        serde_json::from_str(&answer).map_err(|source| ClientError::Malformed {
            path: self.path.clone(),
            line: answer.trim_end().to_string(),
            source,
        })
    }

    /// Sends `request` and returns its `return` value; an error answer is
    /// [`ClientError::Refused`].
    pub fn call(&mut self, request: impl Serialize) -> Result<Value, ClientError> {
        let line = serde_json::to_string(&request).map_err(ClientError::Encode)?;
        match self.send_line(&line)? {
            Answer::Return { value } => Ok(value),
            Answer::Error { error, code } => Err(ClientError::Refused {
                code,
                message: error,
            }),
        }
    }
}

/// Connects to the API socket at `path`, sends `request` and returns its `return` value.
pub fn call(path: &Path, request: impl Serialize) -> Result<Value, ClientError> {
    Client::connect(path)?.call(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Cursor;

    #[derive(Debug, thiserror::Error)]
    #[error("no such thing")]
    struct Missing(#[source] io::Error);

    impl ApiFailure for Missing {
        fn code(&self) -> ErrorCode {
            ErrorCode::NotFound
        }
    }

    #[derive(Deserialize)]
    #[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
    enum Request {
        Echo { text: String },
        Missing {},
    }

    fn serve_in_background() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = crate::socket::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve_connection(stream, |request: Request| match request {
                    Request::Echo { text } => Ok(json!({ "text": text })),
                    Request::Missing {} => Err(Missing(io::Error::other("gone"))),
                });
            }
        });
        (dir, path)
    }

    #[test]
    fn answers_are_return_or_error_with_code() {
        let ok: Answer<Value> = Answer::Return { value: json!(1) };
        assert_eq!(serde_json::to_value(&ok).unwrap(), json!({"return": 1}));
        let refused: Answer<Value> = Answer::Error {
            error: "no".into(),
            code: ErrorCode::NotFound,
        };
        assert_eq!(
            serde_json::to_value(&refused).unwrap(),
            json!({"error": "no", "code": "not-found"})
        );
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::NotFound,
            ErrorCode::Unsupported,
            ErrorCode::Conflict,
            ErrorCode::Failed,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; MAX_REQUEST_LINE * 3];
        input.extend_from_slice(b"\n{\"a\":1}\n");
        // A small buffer: the long line arrives in many chunks, none of them kept.
        let mut reader = BufReader::with_capacity(1000, Cursor::new(input));
        assert!(matches!(read_line(&mut reader).unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut reader).unwrap(), Line::Request(l) if l == b"{\"a\":1}"));
        assert!(matches!(read_line(&mut reader).unwrap(), Line::End));
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_read() {
        let mut input = vec![b' '; MAX_REQUEST_LINE - 1];
        input.push(b'\n');
        let mut reader = BufReader::with_capacity(1000, Cursor::new(input));
        assert!(
            matches!(read_line(&mut reader).unwrap(), Line::Request(l) if l.len() == MAX_REQUEST_LINE - 1)
        );
    }

    #[test]
    fn bad_input_is_answered_and_the_connection_keeps_serving() {
        let (_dir, path) = serve_in_background();
        let mut client = Client::connect(&path).unwrap();
        let refused = |answer: Answer<Value>| match answer {
            Answer::Error { error, code } => (code, error),
            other => panic!("expected an error, got {other:?}"),
        };
        let (code, error) = refused(client.send_line("{not json").unwrap());
        assert_eq!(code, ErrorCode::BadRequest, "{error}");
        let (code, error) = refused(client.send_line(r#"{"command":"reboot"}"#).unwrap());
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(error.contains("unknown variant"), "{error}");
        let (code, error) = refused(
            client
                .send_line(r#"{"command":"echo","text":"a","extra":1}"#)
                .unwrap(),
        );
        assert_eq!(code, ErrorCode::BadRequest);
        assert!(error.contains("unknown field"), "{error}");
        let (code, _) = refused(client.send_line(&"x".repeat(MAX_REQUEST_LINE * 2)).unwrap());
        assert_eq!(code, ErrorCode::BadRequest);
        let (code, error) = refused(client.send_line(r#"{"command":"missing"}"#).unwrap());
        assert_eq!(code, ErrorCode::NotFound);
        assert_eq!(error, "no such thing: gone");
        assert_eq!(
            client
                .call(json!({"command": "echo", "text": "still here"}))
                .unwrap(),
            json!({"text": "still here"})
        );
    }

    #[test]
    fn call_returns_the_value_or_the_refusal() {
        let (_dir, path) = serve_in_background();
        assert_eq!(
            call(&path, json!({"command": "echo", "text": "hi"})).unwrap(),
            json!({"text": "hi"})
        );
        match call(&path, json!({"command": "missing"})) {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, ErrorCode::NotFound);
                assert!(message.contains("no such thing"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
