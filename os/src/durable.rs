//! Crash-safe file replacement: write a temporary file beside the target, fdatasync it,
//! rename it over the target, fsync the directory. After a crash the target holds the old
//! contents or the new, never a mix; once [`replace`] returns `Ok`, the new contents
//! survive a power loss. Every step's error is returned, none is ignored: a rename whose
//! directory entry never reached the disk is not a replacement.
//!
//! [`StepHook`] lets crash tests stop the sequence between any two steps.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The steps of [`replace_with`], in order, for crash tests that stop between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The temporary file is written.
    Write,
    /// The temporary file is fdatasync'ed.
    SyncFile,
    /// The temporary file is renamed over the target.
    Rename,
    /// The directory is fsync'ed.
    SyncDir,
}

/// Called before each [`Step`]; an error stops the sequence there (a simulated crash).
pub type StepHook<'a> = &'a mut dyn FnMut(Step) -> io::Result<()>;

/// A replacement that failed, naming the file and the step.
#[derive(Debug, thiserror::Error)]
#[error("cannot replace {path} ({step:?} failed)")]
pub struct ReplaceError {
    /// The target file.
    pub path: PathBuf,
    /// The step that failed.
    pub step: Step,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `contents` durably, the new file created with permission `mode`
/// (before the umask).
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), ReplaceError> {
    replace_with(path, mode, |file| file.write_all(contents), &mut |_| Ok(()))
}

/// Replaces `path` with what `write` puts into the temporary file, calling `hook` before
/// each step. The temporary file is removed when a step fails before the rename.
pub fn replace_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
    hook: StepHook<'_>,
) -> Result<(), ReplaceError> {
    let fail = |step: Step| {
        let path = path.to_path_buf();
        move |source| ReplaceError { path, step, source }
    };
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| fail(Step::Write)(io::Error::other("the path names no file")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        hook(Step::Write).map_err(fail(Step::Write))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fail(Step::Write))?;
        write(&mut file).map_err(fail(Step::Write))?;
        hook(Step::SyncFile).map_err(fail(Step::SyncFile))?;
        file.sync_data().map_err(fail(Step::SyncFile))?;
        hook(Step::Rename).map_err(fail(Step::Rename))?;
        std::fs::rename(&tmp, path).map_err(fail(Step::Rename))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    hook(Step::SyncDir).map_err(fail(Step::SyncDir))?;
    sync_dir(&dir).map_err(fail(Step::SyncDir))
}

/// fsyncs a directory, making creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory a path's entry lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replace_writes_new_contents_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"old").unwrap();
        replace(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_file_and_no_temporary() {
        for stop in [Step::Write, Step::SyncFile, Step::Rename] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state");
            std::fs::write(&path, b"old").unwrap();
            let mut hook = |step: Step| {
                if step == stop {
                    Err(io::Error::other("power cut"))
                } else {
                    Ok(())
                }
            };
            let error = replace_with(&path, 0o644, |f| f.write_all(b"new"), &mut hook)
                .expect_err("the hook stops the replacement");
            assert_eq!(error.step, stop);
            assert_eq!(std::fs::read(&path).unwrap(), b"old");
            let entries = std::fs::read_dir(dir.path()).unwrap().count();
            assert_eq!(entries, 1, "a temporary file was left after {stop:?}");
        }
    }

    #[test]
    fn a_failed_directory_sync_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let mut hook = |step: Step| {
            if step == Step::SyncDir {
                Err(io::Error::other("EIO"))
            } else {
                Ok(())
            }
        };
        let error = replace_with(&path, 0o644, |f| f.write_all(b"new"), &mut hook).unwrap_err();
        assert_eq!(error.step, Step::SyncDir);
    }
}
