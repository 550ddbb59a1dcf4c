//! Unix sockets that are never stolen: [`bind`] refuses a path that holds anything but a
//! socket, refuses a socket that something still answers on, and replaces only a stale one
//! (a socket file nobody listens on, left by a process that died). Every socket sealvm,
//! sealvm-blk and the agent create goes through it, as [`bind_removing`], whose
//! [`RemoveOnDrop`] guard removes the socket file again on the way out: when the guard is
//! dropped, or, for a process that ends from a signal handler's thread with
//! `std::process::exit` (which runs no destructors), by [`remove_bound`].
//!
//! It deliberately does not serve anything: the caller owns the listener.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Binds like [`bind`] and returns, beside the listener, the guard that removes the socket
/// file when it is dropped (or by [`remove_bound`]). Keep the guard as long as the listener
/// serves: binding it to `_` drops it, and so removes the file, at once.
pub fn bind_removing(path: &Path) -> Result<(UnixListener, RemoveOnDrop), SocketError> {
    let listener = bind(path)?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let bound = BoundFile {
        path: path.to_path_buf(),
        identity: Identity::of(&meta),
    };
    lock_bound().push(bound.clone());
    Ok((listener, RemoveOnDrop { bound }))
}

/// One socket file this process bound, named by path and identified by [`Identity`], so
/// that a file someone else put at the path later is never removed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BoundFile {
    path: PathBuf,
    identity: Identity,
}

/// Which file a path names: device and inode, and the change time, because a file system
/// hands a freed inode number to the next file created (a socket bound at the same path
/// after ours was unlinked often gets our number back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

impl BoundFile {
    /// Removes the file if it is still the socket this process bound.
    fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.file_type().is_socket() && Identity::of(&meta) == self.identity);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove the socket file");
            }
        }
    }
}

/// The socket files whose [`RemoveOnDrop`] guards are alive, for [`remove_bound`].
static BOUND: Mutex<Vec<BoundFile>> = Mutex::new(Vec::new());

fn lock_bound() -> std::sync::MutexGuard<'static, Vec<BoundFile>> {
    // A thread that panicked while holding the lock left the list itself intact (every
    // change is one push or one remove), so a poisoned lock is still usable.
    BOUND
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes the socket file bound by [`bind_removing`] when dropped, if the file at the path
/// is still that socket (a socket another process bound there since is left alone).
#[must_use = "dropping the guard removes the socket file"]
#[derive(Debug)]
pub struct RemoveOnDrop {
    bound: BoundFile,
}

impl RemoveOnDrop {
    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.bound.path
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let mut bound = lock_bound();
        if let Some(at) = bound.iter().position(|b| *b == self.bound) {
            bound.swap_remove(at);
        }
        drop(bound);
        self.bound.remove();
    }
}

/// Removes every socket file whose [`RemoveOnDrop`] guard is still alive. For a process
/// about to end with `std::process::exit` (a signal handler's thread), which runs no
/// destructors; the guards dropped later, if any, find nothing left to remove.
pub fn remove_bound() {
    let bound = std::mem::take(&mut *lock_bound());
    for file in &bound {
        file.remove();
    }
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

    /// [`remove_bound`] removes every guarded file of the process, so the tests that hold
    /// guards take turns.
    static GUARDS: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        GUARDS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[test]
    fn the_guard_removes_its_socket_when_dropped() {
        let _turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, guard) = bind_removing(&path).unwrap();
        assert!(path.exists());
        drop(guard);
        assert!(!path.exists());
        drop(listener);
    }

    #[test]
    fn the_guard_leaves_a_socket_someone_else_bound_since() {
        let _turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, guard) = bind_removing(&path).unwrap();
        drop(listener);
        // Another server replaced the stale file in the meantime.
        let other = bind(&path).unwrap();
        drop(guard);
        assert!(path.exists(), "the other server's socket was removed");
        drop(other);
    }

    #[test]
    fn remove_bound_removes_every_live_guard_file_once() {
        let _turn = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.sock");
        let second = dir.path().join("b.sock");
        let (_a, guard_a) = bind_removing(&first).unwrap();
        let (_b, guard_b) = bind_removing(&second).unwrap();
        remove_bound();
        assert!(!first.exists() && !second.exists());
        assert!(!lock_bound().contains(&guard_a.bound));
        drop(guard_a);
        drop(guard_b);
    }
}
