//! Crash-safe file replacement: write a temporary file beside the target, fdatasync it,
//! rename it over the target, fsync the directory. After a crash the target holds the old
//! contents or the new, never a mix; once [`replace`] returns `Ok`, the new contents
//! survive a power loss. Every step's error is returned, none is ignored: a rename whose
//! directory entry never reached the disk is not a replacement.
//!
//! [`replace`] takes the contents as bytes; [`replace_stream`] hands the caller the
//! temporary file to fill (a copy of another file, a restored image) and does the rest.
//! [`StepHook`] lets crash tests in this crate stop the sequence between any two steps;
//! with the `failpoints` feature, [`failpoint`] lets tests of other crates make one step
//! of a replacement fail, since a directory sync cannot be made to fail for real.

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

/// Replaces `path` with what `write` puts into a temporary file beside it (created with
/// permission `mode` before the umask), then fdatasyncs, renames and fsyncs the directory.
/// An error of `write` is returned as the [`Step::Write`] failure and nothing is replaced.
pub fn replace_stream(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), ReplaceError> {
    replace_with(path, mode, write, &mut |_| Ok(()))
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
    let mut hook = |step: Step| {
        hook(step)?;
        failpoint::check(step, path)
    };
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

/// A per-thread failpoint in the replacement sequence, for tests of code that replaces
/// files through this module: arm it, run the code, and the armed step fails once with an
/// injected error. Compiled in only with the `failpoints` feature (dev-dependencies turn it
/// on); without it the check is a no-op.
#[cfg(feature = "failpoints")]
pub mod failpoint {
    use super::Step;
    use std::cell::RefCell;
    use std::ffi::OsString;
    use std::io;
    use std::path::Path;

    thread_local! {
        static ARMED: RefCell<Option<(Step, Option<OsString>)>> = const { RefCell::new(None) };
    }

    /// Makes the next replacement on this thread fail at `step` (once).
    pub fn fail_next(step: Step) {
        ARMED.with(|armed| *armed.borrow_mut() = Some((step, None)));
    }

    /// Makes the next replacement on this thread of a file named `file_name` fail at
    /// `step` (once); replacements of other files go through.
    pub fn fail_next_named(file_name: &str, step: Step) {
        ARMED.with(|armed| *armed.borrow_mut() = Some((step, Some(file_name.into()))));
    }

    /// Disarms the failpoint of this thread.
    pub fn clear() {
        ARMED.with(|armed| *armed.borrow_mut() = None);
    }

    /// Fails when `step` of replacing `path` is armed on this thread, and disarms it.
    pub(super) fn check(step: Step, path: &Path) -> io::Result<()> {
        let hit = ARMED.with(|armed| match &*armed.borrow() {
            Some((armed, name)) => {
                *armed == step
                    && name
                        .as_ref()
                        .is_none_or(|name| path.file_name() == Some(name.as_os_str()))
            }
            None => false,
        });
        if hit {
            clear();
            return Err(io::Error::other(format!("failpoint at {step:?}")));
        }
        Ok(())
    }
}

#[cfg(not(feature = "failpoints"))]
mod failpoint {
    use super::Step;
    use std::path::Path;

    pub(super) fn check(_step: Step, _path: &Path) -> std::io::Result<()> {
        Ok(())
    }
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
    fn replace_stream_fills_the_file_from_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        replace_stream(&path, 0o640, |f| {
            f.write_all(b"first ")?;
            f.write_all(b"second")
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600);
    }

    #[test]
    fn replace_stream_returns_the_writers_error_and_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, b"old").unwrap();
        let error = replace_stream(&path, 0o644, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("source unreadable"))
        })
        .unwrap_err();
        assert_eq!(error.step, Step::Write);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn an_armed_failpoint_fails_its_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        failpoint::fail_next(Step::SyncDir);
        let error = replace(&path, b"new", 0o644).unwrap_err();
        assert_eq!(error.step, Step::SyncDir);
        // The rename happened before the directory sync failed; the next call succeeds.
        replace(&path, b"newer", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
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
