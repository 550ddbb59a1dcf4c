//! The host side: talk to an agent through the unix socket the VMM (QEMU's chardev or
//! sealvm's console) exposes for the guest's agent port.
//!
//! Every session starts with `guest-sync-delimited` and a fresh id, so answers left over
//! from an earlier client are skipped, as libvirt does.

use crate::protocol::DELIMITER;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the agent socket {path}")]
    Connect {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving failed.
    #[error("agent connection failed")]
    Io(#[source] io::Error),
    /// No answer within the timeout.
    #[error("the agent did not answer {command} within {timeout:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// The agent sent something that is not JSON.
    #[error("the agent sent malformed JSON")]
    Malformed(#[source] serde_json::Error),
    /// The agent answered with an error.
    #[error("{command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// qga's error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// A connection to one guest agent.
pub struct AgentClient {
    stream: UnixStream,
    pending: Vec<u8>,
    next_id: i64,
}

impl AgentClient {
    /// Connects to the agent socket at `path` and synchronizes with the agent.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as i64 & 0x7fff_ffff);
        let mut client = AgentClient {
            stream,
            pending: Vec::new(),
            next_id: seed,
        };
        client.sync(timeout)?;
        Ok(client)
    }

    /// Discards stale output and checks the agent answers: guest-sync-delimited with a new id.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = vec![DELIMITER];
        message.extend(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .bytes(),
        );
        self.stream.write_all(&message).map_err(ClientError::Io)?;
        let deadline = Instant::now() + timeout;
        loop {
            // Skip to the agent's delimiter, then read answers until ours arrives.
            if let Some(at) = self.pending.iter().position(|&b| b == DELIMITER) {
                self.pending.drain(..=at);
                while let Some(answer) = self.next_answer(deadline, "guest-sync-delimited")? {
                    if answer.get("return") == Some(&json!(id)) {
                        return Ok(());
                    }
                }
            }
            self.fill(deadline, "guest-sync-delimited")?;
        }
    }

    /// Runs `command` with `arguments` and returns its `return` value. Commands that do not
    /// answer on success (guest-shutdown) return `Value::Null` when the timeout passes or the
    /// channel closes.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let mut request = json!({"execute": command});
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        self.stream
            .write_all(request.to_string().as_bytes())
            .map_err(ClientError::Io)?;
        let deadline = Instant::now() + timeout;
        let answer = match self.next_answer(deadline, command) {
            // A successful shutdown answers by going away: silence, or the channel closing.
            Err(ClientError::Timeout { .. } | ClientError::Io(_))
                if command == "guest-shutdown" =>
            {
                return Ok(Value::Null)
            }
            other => other?,
        };
        let answer = answer.ok_or_else(|| ClientError::Timeout {
            command: command.into(),
            timeout,
        })?;
        if let Some(error) = answer.get("error") {
            return Err(ClientError::Command {
                command: command.into(),
                class: error["class"].as_str().unwrap_or("").into(),
                desc: error["desc"].as_str().unwrap_or("").into(),
            });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Reads one JSON answer; Ok(None) never happens before the deadline, which is an error.
    fn next_answer(
        &mut self,
        deadline: Instant,
        command: &str,
    ) -> Result<Option<Value>, ClientError> {
        loop {
            let start = self.pending.iter().position(|b| !b.is_ascii_whitespace());
            if let Some(start) = start {
                self.pending.drain(..start);
                let mut stream =
                    serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
                match stream.next() {
                    Some(Ok(value)) => {
                        let used = stream.byte_offset();
                        self.pending.drain(..used);
                        return Ok(Some(value));
                    }
                    Some(Err(e)) if !e.is_eof() => return Err(ClientError::Malformed(e)),
                    _ => {}
                }
            }
            self.fill(deadline, command)?;
        }
    }

    fn fill(&mut self, deadline: Instant, command: &str) -> Result<(), ClientError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Timeout {
                command: command.into(),
                timeout: Duration::ZERO,
            });
        }
        self.stream
            .set_read_timeout(Some(deadline - now))
            .map_err(ClientError::Io)?;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(ClientError::Io(io::Error::from(
                io::ErrorKind::UnexpectedEof,
            ))),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(ClientError::Timeout {
                    command: command.into(),
                    timeout: Duration::ZERO,
                })
            }
            Err(e) => Err(ClientError::Io(e)),
        }
    }
}
