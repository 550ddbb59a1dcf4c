//! Private scratch directories on memory for a vTPM's state while swtpm serves it.
//!
//! A scratch directory lives on /dev/shm (tmpfs) and nowhere else: there is no fallback to
//! a disk temp directory, because swtpm's state files there would outlive a power cut. The
//! directory is mode 0700 and made visible under its final name only once complete (it is
//! built under a dot name and renamed), and it holds an `.owner` file the creating process
//! keeps an exclusive `flock` on. The directory is removed when the [`Scratch`] drops; a
//! process killed with SIGKILL cannot do that, so [`Scratch::create`] first removes every
//! `sealvm-vtpm-*` directory whose owner lock is free (its owner is dead).
//!
//! This module does not put anything in the directory but the owner file; the caller
//! creates its files 0600 (and starts swtpm with umask 077).

use sealvm_os::lock::{self, LockMode, Wait};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where scratch directories live: the memory file system.
pub const MEMORY_DIR: &str = "/dev/shm";
/// The name prefix of every scratch directory.
pub const PREFIX: &str = "sealvm-vtpm-";
const OWNER_FILE: &str = ".owner";
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Errors making a scratch directory.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// The base directory is missing or is not a memory file system; sealvm will not put
    /// vTPM state on a disk.
    #[error(
        "{base} is not a memory file system (tmpfs): sealvm keeps vTPM state on memory only \
         and will not fall back to disk (mount a tmpfs on /dev/shm)"
    )]
    NotMemory {
        /// The directory that was refused.
        base: String,
    },
    /// Creating, locking or renaming the directory failed.
    #[error("cannot make a private scratch directory in {base}")]
    Io {
        /// The base directory.
        base: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A private directory on memory, removed (with everything in it) on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    _owner: File,
}

impl Scratch {
    /// Makes a scratch directory on /dev/shm, after removing those of dead owners.
    pub fn create() -> Result<Self, ScratchError> {
        Self::create_in(Path::new(MEMORY_DIR))
    }

    /// Makes a scratch directory in `base`, which must be a memory file system.
    pub fn create_in(base: &Path) -> Result<Self, ScratchError> {
        if !is_memory_fs(base) {
            return Err(ScratchError::NotMemory {
                base: base.display().to_string(),
            });
        }
        let removed = remove_abandoned(base);
        if removed > 0 {
            tracing::info!(removed, base = %base.display(), "removed vTPM scratch directories of dead sealvm processes");
        }
        let io = |source| ScratchError::Io {
            base: base.display().to_string(),
            source,
        };
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).map_err(|e| io(e.into()))?;
        let name = format!("{PREFIX}{}-{}", std::process::id(), hex::encode(random));
        let building = base.join(format!(".{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&building)
            .map_err(io)?;
        let result = (|| {
            // The mode passed to mkdir is masked by the umask; 0700 can only lose bits to
            // it, but say it explicitly so the directory is exactly 0700.
            std::fs::set_permissions(&building, std::fs::Permissions::from_mode(0o700))?;
            let owner = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(building.join(OWNER_FILE))?;
            lock::lock(&owner, LockMode::Exclusive, Wait::NoWait).map_err(|e| match e {
                lock::LockError::Io(e) => e,
                lock::LockError::Held => std::io::Error::other("fresh owner file locked"),
            })?;
            let path = base.join(&name);
            // Not a crash-safe file replacement (sealvm_os::durable): a directory on a
            // memory file system, renamed so it appears only once it is locked; a crash
            // loses it whatever is synced.
            std::fs::rename(&building, &path)?;
            Ok(Self {
                path,
                _owner: owner,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        result.map_err(io)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(%error, dir = %self.path.display(), "cannot remove vTPM scratch directory");
        }
    }
}

/// True when `dir` is on tmpfs or ramfs.
pub fn is_memory_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is a valid value for it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated path and `stat` a writable statfs that outlives
    // the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let kind = stat.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// Removes the scratch directories in `base` whose owner lock is free (their process is
/// dead); returns how many. Directories of live processes and of other users are left.
pub fn remove_abandoned(base: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = File::open(dir.join(OWNER_FILE)) else {
            continue;
        };
        if lock::lock(&owner, LockMode::Exclusive, Wait::NoWait).is_ok()
            && std::fs::remove_dir_all(&dir).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn scratch_is_refused_on_a_disk_file_system() {
        // The crate's own target directory is on a disk, never tmpfs.
        let disk = Path::new(env!("CARGO_MANIFEST_DIR"));
        assert!(!is_memory_fs(disk));
        assert!(matches!(
            Scratch::create_in(disk),
            Err(ScratchError::NotMemory { .. })
        ));
        assert!(matches!(
            Scratch::create_in(Path::new("/nonexistent-sealvm-base")),
            Err(ScratchError::NotMemory { .. })
        ));
    }

    #[test]
    fn scratch_is_private_and_removed_on_drop() {
        if !is_memory_fs(Path::new(MEMORY_DIR)) {
            eprintln!("SKIP: /dev/shm is not a tmpfs here");
            return;
        }
        let scratch = Scratch::create().unwrap();
        let path = scratch.path().to_path_buf();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(path.join(OWNER_FILE)).unwrap().mode() & 0o777,
            0o600
        );
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn abandoned_scratch_is_removed_but_a_live_one_is_kept() {
        if !is_memory_fs(Path::new(MEMORY_DIR)) {
            eprintln!("SKIP: /dev/shm is not a tmpfs here");
            return;
        }
        let live = Scratch::create().unwrap();
        // A dead owner: the directory exists with an owner file nobody locks.
        let dead = Path::new(MEMORY_DIR).join(format!("{PREFIX}dead-test-{}", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(OWNER_FILE), b"").unwrap();
        std::fs::write(dead.join("tpm2-00.permall"), b"state").unwrap();
        remove_abandoned(Path::new(MEMORY_DIR));
        assert!(!dead.exists(), "dead owner's scratch left behind");
        assert!(live.path().exists(), "a live scratch was removed");
    }
}
