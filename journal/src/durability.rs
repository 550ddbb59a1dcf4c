//! Making appended records durable: the writer's health (a failed fdatasync poisons it,
//! see [`crate::writer`]), which new segments' directory entries are durable, and
//! [`SyncTarget`], the handle a flush syncs outside the writer's lock. Rotation syncs
//! nothing; a sync makes the closed segments, the directory and the active segment durable
//! in that order (journal/DESIGN.md "Segments").

use crate::storage::Storage;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Health shared by a writer and the sync handles it gives out.
pub(crate) struct Health {
    poisoned: Mutex<Option<String>>,
    is_poisoned: AtomicBool,
    /// fdatasyncs still to fail (the writer's fault seam for tests).
    pub(crate) injected_failures: AtomicU32,
    /// Where syncs, renames and removals go.
    pub(crate) storage: Arc<dyn Storage>,
}

impl Health {
    pub(crate) fn new(storage: Arc<dyn Storage>) -> Health {
        Health {
            poisoned: Mutex::new(None),
            is_poisoned: AtomicBool::new(false),
            injected_failures: AtomicU32::new(0),
            storage,
        }
    }
}

impl Health {
    /// Fails if an earlier sync failed.
    pub(crate) fn check(&self) -> io::Result<()> {
        if !self.is_poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self
            .poisoned
            .lock()
            .map(|p| p.clone().unwrap_or_default())
            .unwrap_or_default();
        Err(io::Error::other(format!(
            "{why}; the kernel may have dropped data it could not write, so no later flush \
             can be trusted: restart sealvm-blk to reopen and replay the journal"
        )))
    }

    /// fdatasyncs a segment through the seam; a failure poisons the writer.
    pub(crate) fn fdatasync(&self, file: &File, path: &Path) -> io::Result<()> {
        self.check()?;
        let result = if self
            .injected_failures
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.storage.sync_data(path, file)
        };
        if let Err(e) = &result {
            if let Ok(mut poisoned) = self.poisoned.lock() {
                poisoned.get_or_insert_with(|| {
                    format!(
                        "fdatasync of journal segment {} failed: {e}",
                        path.display()
                    )
                });
            }
            self.is_poisoned.store(true, Ordering::Release);
            tracing::error!(segment = %path.display(), error = %e, "fdatasync failed; the journal refuses every later write and flush until it is reopened");
        }
        result
    }

    /// fsyncs the journal directory, so the segment files created in it survive a power
    /// loss; a failure poisons the writer like a failed fdatasync.
    pub(crate) fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.check()?;
        let result = self.storage.sync_dir(dir);
        if let Err(e) = &result {
            if let Ok(mut poisoned) = self.poisoned.lock() {
                poisoned.get_or_insert_with(|| {
                    format!("fsync of journal directory {} failed: {e}", dir.display())
                });
            }
            self.is_poisoned.store(true, Ordering::Release);
            tracing::error!(dir = %dir.display(), error = %e, "fsync of the journal directory failed; the journal refuses every later write and flush until it is reopened");
        }
        result
    }
}

/// Which segment files' directory entries are durable: rotation creates a segment under
/// the writer's lock without syncing the directory, and the next sync does.
#[derive(Debug, Default)]
pub(crate) struct DirEntries {
    /// Segments created by this writer (a generation count).
    pub(crate) created: AtomicU64,
    /// The generation the last completed directory fsync covered.
    pub(crate) synced: AtomicU64,
}

/// A closed segment a sync must still make durable.
pub(crate) struct ClosedSegment {
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
    pub(crate) durable: Arc<AtomicBool>,
}

/// A handle to make the journal durable outside the writer's lock: every closed segment
/// not yet synced, the directory entries of new segments, then (for a flush) the active
/// segment as it was when the handle was taken.
pub struct SyncTarget {
    pub(crate) closed: Vec<ClosedSegment>,
    pub(crate) dir: PathBuf,
    /// The directory generation to make durable, if entries are not durable yet.
    pub(crate) dir_generation: Option<u64>,
    pub(crate) entries: Arc<DirEntries>,
    pub(crate) active: Option<(Arc<File>, PathBuf)>,
    /// The ordinal of the active segment.
    pub ordinal: u32,
    /// Its length when the handle was taken: what the sync covers.
    pub end: u64,
    pub(crate) health: Arc<Health>,
}

impl SyncTarget {
    /// True if the sync has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.active.is_none()
            && self.dir_generation.is_none()
            && self
                .closed
                .iter()
                .all(|c| c.durable.load(Ordering::Acquire))
    }

    /// fdatasyncs every closed segment not yet durable, fsyncs the directory if a segment
    /// was created since the last sync, then fdatasyncs the active segment (for a handle
    /// from [`Writer::sync_target`]). A failure poisons the writer.
    pub fn sync(&self) -> io::Result<()> {
        for closed in &self.closed {
            if !closed.durable.load(Ordering::Acquire) {
                self.health.fdatasync(&closed.file, &closed.path)?;
                closed.durable.store(true, Ordering::Release);
            }
        }
        if let Some(generation) = self.dir_generation {
            if self.entries.synced.load(Ordering::Acquire) < generation {
                self.health.sync_dir(&self.dir)?;
                self.entries.synced.fetch_max(generation, Ordering::AcqRel);
            }
        }
        match &self.active {
            Some((file, path)) => self.health.fdatasync(file, path),
            None => Ok(()),
        }
    }
}
