//! A guest's serial console seen from the host: everything the guest printed, searchable
//! while the guest runs, and a way to run shell commands on it.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Errors talking to a guest console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The awaited text did not appear in time.
    #[error("waited {waited:?} for {wanted:?} on the guest console; it printed:\n{output}")]
    Timeout {
        /// What was awaited.
        wanted: String,
        /// How long.
        waited: Duration,
        /// The last part of the console output, for the test log.
        output: String,
    },
    /// The guest's console closed (the guest or its VMM exited) before the text appeared.
    #[error("the guest console closed before {wanted:?} appeared; it printed:\n{output}")]
    Closed {
        /// What was awaited.
        wanted: String,
        /// The last part of the console output.
        output: String,
    },
    /// Writing to the guest console failed.
    #[error("cannot write to the guest console")]
    Write(#[source] std::io::Error),
}

#[derive(Default)]
struct Transcript {
    text: String,
    closed: bool,
}

/// The console of one running guest. Cloning shares the same transcript.
#[derive(Clone)]
pub struct Console {
    transcript: Arc<(Mutex<Transcript>, Condvar)>,
    input: Arc<Mutex<Box<dyn Write + Send>>>,
    commands_run: Arc<Mutex<u64>>,
}

impl Console {
    /// Starts reading `output` on a thread. When `echo` is set every line is also printed to
    /// stdout as it arrives (the demo shows the guest that way).
    pub fn start(
        output: impl Read + Send + 'static,
        input: impl Write + Send + 'static,
        echo: bool,
    ) -> Self {
        let transcript = Arc::new((Mutex::new(Transcript::default()), Condvar::new()));
        let reader_side = Arc::clone(&transcript);
        thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).replace('\r', "");
                        // The markers `run` wraps commands in are plumbing, not guest output.
                        if echo && !text.contains("@@") {
                            print!("  guest| {text}");
                            let _ = std::io::stdout().flush();
                        }
                        let (lock, cvar) = &*reader_side;
                        lock.lock().expect("transcript lock").text.push_str(&text);
                        cvar.notify_all();
                    }
                }
            }
            let (lock, cvar) = &*reader_side;
            lock.lock().expect("transcript lock").closed = true;
            cvar.notify_all();
        });
        Console {
            transcript,
            input: Arc::new(Mutex::new(Box::new(input))),
            commands_run: Arc::new(Mutex::new(0)),
        }
    }

    /// Everything the guest printed so far.
    pub fn transcript(&self) -> String {
        self.transcript
            .0
            .lock()
            .expect("transcript lock")
            .text
            .clone()
    }

    /// Waits until `wanted` appears anywhere in the output after byte `from`, and returns the
    /// byte offset just past it.
    pub fn wait_for_after(
        &self,
        from: usize,
        wanted: &str,
        timeout: Duration,
    ) -> Result<usize, ConsoleError> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.transcript;
        let mut transcript = lock.lock().expect("transcript lock");
        loop {
            let start = from.min(transcript.text.len());
            if let Some(at) = transcript.text[start..].find(wanted) {
                return Ok(start + at + wanted.len());
            }
            let tail = || tail_of(&transcript.text);
            if transcript.closed {
                return Err(ConsoleError::Closed {
                    wanted: wanted.into(),
                    output: tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ConsoleError::Timeout {
                    wanted: wanted.into(),
                    waited: timeout,
                    output: tail(),
                });
            }
            transcript = cvar
                .wait_timeout(transcript, deadline - now)
                .expect("transcript lock")
                .0;
        }
    }

    /// Waits until `wanted` appears anywhere in the output.
    pub fn wait_for(&self, wanted: &str, timeout: Duration) -> Result<usize, ConsoleError> {
        self.wait_for_after(0, wanted, timeout)
    }

    /// Types `text` on the console.
    pub fn send(&self, text: &str) -> Result<(), ConsoleError> {
        let mut input = self.input.lock().expect("console input lock");
        input
            .write_all(text.as_bytes())
            .and_then(|()| input.flush())
            .map_err(ConsoleError::Write)
    }

    /// Runs `command` in the guest's shell and returns what it printed and its exit status.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<(String, i32), ConsoleError> {
        let id = {
            let mut n = self.commands_run.lock().expect("counter lock");
            *n += 1;
            *n
        };
        // The markers are split by an empty string so the echoed command line never matches.
        let begin = format!("@@BEGIN{id}@@");
        let end = format!("@@END{id}@@");
        let start = self
            .transcript
            .0
            .lock()
            .expect("transcript lock")
            .text
            .len();
        self.send(&format!(
            "echo '@@BEGIN{id}''@@'; {command}; echo \"@@END{id}\"'@@' $?\n"
        ))?;
        let body_start = self.wait_for_after(start, &begin, timeout)?;
        let body_end = self.wait_for_after(body_start, &end, timeout)?;
        let status_end = self.wait_for_after(body_end, "\n", timeout)?;
        let text = self.transcript();
        let output = text[body_start..body_end - end.len()]
            .trim_start_matches('\n')
            .to_string();
        let status = text[body_end..status_end].trim().parse().unwrap_or(-1);
        Ok((output, status))
    }
}

fn tail_of(text: &str) -> String {
    let keep = 4000;
    if text.len() <= keep {
        return text.to_string();
    }
    let mut cut = text.len() - keep;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &text[cut..])
}
