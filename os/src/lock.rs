//! Advisory whole-file locks (`flock(2)`), the one way sealvm's binaries lock images,
//! journals and histories. A lock lives as long as the file descriptor it was taken on.
//! [`lock`] locks a file the caller opened (an image, a bundle); [`lock_file`] opens a
//! dedicated lock file (a journal's `serve.lock`, `fold.lock`) and locks it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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

/// Why a lock file was not opened and locked.
#[derive(Debug, thiserror::Error)]
pub enum LockFileError {
    /// The lock file could not be opened or created.
    #[error("cannot open the lock file {path}")]
    Open {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another open file description holds a conflicting lock.
    #[error("{path} is locked by another process")]
    Held {
        /// The lock file.
        path: PathBuf,
    },
    /// The kernel refused the lock for another reason.
    #[error("cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Opens the lock file at `path` (created if missing, never truncated) and takes a `mode`
/// lock on it, waiting or not as `wait` says. The lock lasts as long as the returned file.
pub fn lock_file(path: &Path, mode: LockMode, wait: Wait) -> Result<File, LockFileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| LockFileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    lock(&file, mode, wait).map_err(|error| match error {
        LockError::Held => LockFileError::Held {
            path: path.to_path_buf(),
        },
        LockError::Io(source) => LockFileError::Lock {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Ok(file)
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

    #[test]
    fn lock_file_creates_the_file_keeps_its_contents_and_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.lock");
        let held = lock_file(&path, LockMode::Exclusive, Wait::NoWait).unwrap();
        assert!(path.is_file());
        std::fs::write(&path, b"kept").unwrap();
        match lock_file(&path, LockMode::Shared, Wait::NoWait) {
            Err(LockFileError::Held { path: named }) => assert_eq!(named, path),
            other => panic!("a held lock file was taken: {other:?}"),
        }
        drop(held);
        let _shared = lock_file(&path, LockMode::Shared, Wait::NoWait).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"kept",
            "the lock file was truncated"
        );
        let missing_dir = dir.path().join("no-such-dir").join("serve.lock");
        assert!(matches!(
            lock_file(&missing_dir, LockMode::Shared, Wait::NoWait),
            Err(LockFileError::Open { .. })
        ));
    }
}
