//! The agent's transport loop: a virtio-serial or virtio-console port (a character device),
//! or, for tests on the host, a unix socket it listens on.
//!
//! A port reads end-of-file while no host is connected; the loop then waits and reads again.
//! A freeze outlives the connection that asked for it, as with qemu-ga: tools that connect
//! once per command (qemu-ga-client, scripts) thaw from a later connection, and the freeze
//! timeout is the safety net when nobody does.

use crate::agent::{Agent, Reply};
use crate::protocol::{encode_error, Decoded, Decoder};
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors that stop the agent (bad input never does).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port or socket could not be opened.
    #[error("cannot open the agent channel {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The unix socket could not be bound: its path holds something that is not a socket,
    /// or another process serves it.
    #[error("cannot listen on the agent socket")]
    Socket(#[source] sealvm_os::socket::SocketError),
}

/// How long to wait before reading a port again after the host went away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// Serves requests from a character-device port forever.
pub fn serve_port(agent: &Agent, path: &Path) -> Result<(), ServeError> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ServeError::Open {
                path: path.to_path_buf(),
                source,
            })
    };
    let mut port = open()?;
    tracing::info!(path = %path.display(), "serving on port");
    loop {
        match serve_stream(agent, &mut port) {
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "port read failed"),
        }
        std::thread::sleep(RECONNECT_PAUSE);
        // A hot-unplugged port comes back under the same name; reopen to be sure.
        if let Ok(reopened) = open() {
            port = reopened;
        }
    }
}

/// Listens on a unix socket and serves one client at a time, forever. The path is bound
/// with [`sealvm_os::socket::bind_removing`]: a file that is not a socket and a socket
/// another process serves are refused, a stale socket file is replaced; the socket file is
/// removed when this returns.
pub fn serve_unix(agent: &Agent, path: &Path) -> Result<(), ServeError> {
    let (listener, _socket_file) =
        sealvm_os::socket::bind_removing(path).map_err(ServeError::Socket)?;
    tracing::info!(path = %path.display(), "serving on unix socket");
    for stream in listener.incoming() {
        match stream {
            Ok(mut stream) => {
                if let Err(e) = serve_stream(agent, &mut stream) {
                    tracing::debug!(error = %e, "client connection failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

/// Serves one connection until end-of-file.
pub fn serve_stream<S: Read + Write>(agent: &Agent, stream: &mut S) -> io::Result<()> {
    let mut decoder = Decoder::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        decoder.push(&buf[..n]);
        while let Some(decoded) = decoder.next_message() {
            let reply = match decoded {
                Decoded::Request(request) => {
                    tracing::debug!(command = %request.execute, "request");
                    agent.handle(request)
                }
                Decoded::Invalid(error, id) => {
                    tracing::debug!(%error, "invalid input");
                    Reply::Send(encode_error(&error, id.as_ref()))
                }
            };
            if let Reply::Send(bytes) = reply {
                stream.write_all(&bytes)?;
                stream.flush()?;
            }
        }
    }
}
