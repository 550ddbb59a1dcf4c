//! Advisory whole-file locks (`flock(2)`), the one way sealvm's binaries lock images,
//! journals and histories. A lock lives as long as the file descriptor it was taken on.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Shared (many holders) or exclusive (one holder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers: any number of shared holders, no exclusive one.
    Shared,
    /// A writer: no other holder of either kind.
    Exclusive,
}

/// Whether to wait for a conflicting holder to let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until the lock is granted.
    Block,
    /// Fail at once with [`LockError::Held`] when another holder conflicts.
    NoWait,
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock.
    #[error("the file is locked by another process")]
    Held,
    /// The kernel refused for another reason.
    #[error("flock failed")]
    Io(#[source] io::Error),
}

/// Takes a `mode` lock on `file`, waiting or not as `wait` says. The lock is released when
/// `file` (and every descriptor duplicated from it) is closed.
pub fn lock(file: &File, mode: LockMode, wait: Wait) -> Result<(), LockError> {
    let mut operation = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    if wait == Wait::NoWait {
        operation |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open for the
        // duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Err(LockError::Held),
            _ => return Err(LockError::Io(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let a = File::open(&path).unwrap();
        let b = File::open(&path).unwrap();
        lock(&a, LockMode::Shared, Wait::NoWait).unwrap();
        lock(&b, LockMode::Shared, Wait::NoWait).unwrap();
        let c = File::open(&path).unwrap();
        assert!(matches!(
            lock(&c, LockMode::Exclusive, Wait::NoWait),
            Err(LockError::Held)
        ));
        drop(a);
        drop(b);
        lock(&c, LockMode::Exclusive, Wait::NoWait).unwrap();
    }
}
