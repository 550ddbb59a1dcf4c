//! Unix sockets that are never stolen: [`bind`] refuses a path that holds anything but a
//! socket, refuses a socket that something still answers on, and replaces only a stale one
//! (a socket file nobody listens on, left by a process that died). Every socket sealvm,
//! sealvm-blk and the agent create goes through it.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a socket was not bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path holds a regular file, directory or anything else that is not a socket.
    #[error("{path} exists and is not a socket; refusing to replace it (choose another path)")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live socket: another process accepts connections on it.
    #[error("another process serves {path}; stop it or choose another path")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The stale socket could not be removed or the new one bound.
    #[error("cannot bind unix socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Binds a listening unix socket at `path`, replacing only a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale socket");
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(error) => return Err(bind_err(error)),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(bind_err(error)),
    }
    UnixListener::bind(path).map_err(bind_err)
}

/// Removes the socket file at `path` when it is a socket (on the way out of a server);
/// anything else there is left alone.
pub fn remove(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.raw");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn a_directory_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            bind(dir.path()),
            Err(SocketError::NotASocket { .. })
        ));
    }

    #[test]
    fn a_live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let first = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(SocketError::InUse { .. })));
        // The first server still gets its clients.
        let _client = UnixStream::connect(&path).unwrap();
        first.accept().unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its file behind");
        let second = bind(&path).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        second.accept().unwrap();
    }

    #[test]
    fn remove_leaves_other_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        remove(&file);
        assert!(file.exists());
        let sock = dir.path().join("s");
        drop(bind(&sock).unwrap());
        remove(&sock);
        assert!(!sock.exists());
    }
}
