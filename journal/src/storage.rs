//! The storage seam: the file-system operations whose order the crash argument rests on
//! (positioned writes to files that must survive, fdatasync, rename, remove, directory
//! fsync), behind one small trait that the writer's syncs, folding (in sealvm-blk) and the
//! version-1 upgrade use. [`Disk`] does them; [`Recorder`] does them too and keeps a model of
//! what a power loss would leave, so a crash test can enumerate those states between any
//! two operations (the approach of CrashMonkey and ALICE; journal/DESIGN.md "The crash
//! simulator").
//!
//! It deliberately does not cover the hot path of appending records (a positioned write
//! the crash model reads back from the file) or reads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The operations a crash can fall between.
pub trait Storage: Send + Sync {
    /// Writes all of `buf` at byte `offset` of `file` (whose path is `path`).
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()>;
    /// fdatasyncs `file`: its contents as they are now survive a power loss.
    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()>;
    /// fsyncs `file`, metadata too (punched holes, a new length).
    fn sync_all(&self, path: &Path, file: &File) -> io::Result<()>;
    /// Renames `from` to `to` (replacing `to`); durable once the directory is synced.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`; durable once the directory is synced.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// fsyncs the directory `dir`: its entries as they are now survive a power loss.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct Disk;

impl Storage for Disk {
    fn write_at(&self, _path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_all(&self, _path: &Path, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sealvm_os::durable::sync_dir(dir)
    }
}

/// The real file system as a shared seam.
pub fn disk() -> Arc<dyn Storage> {
    Arc::new(Disk)
}

/// Replaces `path` with `contents` crash-safely through `storage`: write a temporary file
/// beside it, fdatasync it, rename it over `path`, fsync the directory. After a crash `path`
/// holds the old contents or the new (a temporary file may be left behind). This is
/// `sealvm_os::durable::replace` with its steps on the seam, so the crash simulator sees
/// them; the temporary file is named the same way.
pub fn replace(storage: &dyn Storage, path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = sealvm_os::durable::parent_dir(path);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        storage.write_at(&tmp, &file, contents, 0)?;
        storage.sync_data(&tmp, &file)?;
        storage.rename(&tmp, path)?;
        storage.sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Which operation [`FailOnce`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAt {
    /// [`Storage::sync_data`].
    SyncData,
    /// [`Storage::sync_all`].
    SyncAll,
    /// [`Storage::rename`] (matched by the source's name).
    Rename,
    /// [`Storage::sync_dir`], matched by the name of the file renamed last before it (the
    /// directory sync that makes that rename durable).
    SyncDir,
}

/// The real file system, except that the first `at` operation on a file named `name` (any
/// file when `None`) fails with an injected error: for tests of what an error does where the
/// fault (a failing fdatasync or directory fsync) cannot be caused for real.
#[derive(Debug)]
pub struct FailOnce {
    at: FailAt,
    name: Option<std::ffi::OsString>,
    armed: std::sync::atomic::AtomicBool,
    renamed_last: Mutex<Option<std::ffi::OsString>>,
}

impl FailOnce {
    /// Fails the first `at` on a file named `name` (or any, with `None`).
    pub fn new(at: FailAt, name: Option<&str>) -> Arc<FailOnce> {
        Arc::new(FailOnce {
            at,
            name: name.map(Into::into),
            armed: std::sync::atomic::AtomicBool::new(true),
            renamed_last: Mutex::new(None),
        })
    }

    fn check(&self, at: FailAt, path: &Path) -> io::Result<()> {
        let named = self
            .name
            .as_ref()
            .is_none_or(|name| path.file_name() == Some(name.as_os_str()));
        if at == self.at && named && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "injected failure of {at:?} on {}",
                path.display()
            )));
        }
        Ok(())
    }
}

impl Storage for FailOnce {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        Disk.write_at(path, file, buf, offset)
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        self.check(FailAt::SyncData, path)?;
        Disk.sync_data(path, file)
    }

    fn sync_all(&self, path: &Path, file: &File) -> io::Result<()> {
        self.check(FailAt::SyncAll, path)?;
        Disk.sync_all(path, file)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(FailAt::Rename, from)?;
        Disk.rename(from, to)?;
        if let Ok(mut last) = self.renamed_last.lock() {
            *last = to.file_name().map(Into::into);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        Disk.remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let renamed = self.renamed_last.lock().ok().and_then(|last| last.clone());
        let named = dir.join(renamed.unwrap_or_default());
        self.check(FailAt::SyncDir, &named)?;
        Disk.sync_dir(dir)
    }
}

/// An operation a [`Recorder`] is about to do, told to its hook first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A positioned write to this file.
    Write(PathBuf),
    /// An fdatasync or fsync of this file.
    Sync(PathBuf),
    /// A rename from, to.
    Rename(PathBuf, PathBuf),
    /// A removal.
    Remove(PathBuf),
    /// A directory fsync.
    SyncDir(PathBuf),
}

/// One state a power loss could leave in the recorded directory: file names and contents.
pub type CrashState = BTreeMap<String, Vec<u8>>;

/// Called before each operation: the place to enumerate crash states.
pub type Hook = Box<dyn FnMut(&Op) + Send>;

/// What has been made durable in the recorded directory.
#[derive(Default)]
struct Durable {
    /// Inode to its contents at its last sync.
    files: HashMap<u64, Vec<u8>>,
    /// Directory entries (name to inode) at the last directory fsync.
    entries: BTreeMap<String, u64>,
}

/// A [`Storage`] for crash tests: does every operation on the real file system, and keeps
/// what the syncs made durable in one directory (`root`, its regular files only), so that
/// [`Recorder::crash_states`] can list what a power loss would leave at any moment: each
/// directory entry as of the last directory fsync or as now (renames, removals and new
/// files not yet durable), each file's durable contents plus any subset of the 512-byte
/// sectors written since (unsynced writes dropped, reordered or torn; a file extension
/// whose earlier sectors never arrived reads as zeroes).
///
/// Files are told apart by inode number: keep `root` on a file system that does not reuse
/// them soon after a removal (tmpfs), or a new file may inherit a removed one's durable
/// contents in the model.
pub struct Recorder {
    root: PathBuf,
    durable: Mutex<Durable>,
    hook: Mutex<Option<Hook>>,
}

const SECTOR: usize = 512;

fn inode(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

impl Recorder {
    /// A recorder of `root`, whose current contents count as durable.
    pub fn new(root: &Path) -> io::Result<Arc<Recorder>> {
        let recorder = Recorder {
            root: root.to_path_buf(),
            durable: Mutex::new(Durable::default()),
            hook: Mutex::new(None),
        };
        let listing = recorder.listing()?;
        {
            let mut durable = recorder.lock();
            for (name, ino) in &listing {
                durable.files.insert(*ino, std::fs::read(root.join(name))?);
            }
            durable.entries = listing;
        }
        Ok(Arc::new(recorder))
    }

    /// Calls `hook` before every later operation.
    pub fn set_hook(&self, hook: Hook) {
        if let Ok(mut slot) = self.hook.lock() {
            *slot = Some(hook);
        }
    }

    /// Stops calling the hook.
    pub fn clear_hook(&self) {
        if let Ok(mut slot) = self.hook.lock() {
            *slot = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Durable> {
        // A poisoned lock means a test already panicked; its data is still the model.
        self.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn before(&self, op: Op) {
        // The hook is taken out while it runs, so it may use the recorder.
        let hook = self.hook.lock().ok().and_then(|mut h| h.take());
        if let Some(mut hook) = hook {
            hook(&op);
            if let Ok(mut slot) = self.hook.lock() {
                slot.get_or_insert(hook);
            }
        }
    }

    fn recorded(&self, path: &Path) -> bool {
        path.parent() == Some(self.root.as_path())
    }

    /// Regular files in the root, name to inode.
    fn listing(&self) -> io::Result<BTreeMap<String, u64>> {
        let mut listing = BTreeMap::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                listing.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    entry.metadata()?.ino(),
                );
            }
        }
        Ok(listing)
    }

    /// Records that `path`'s contents as they are now are durable (a sync the caller made
    /// outside this seam, or one it is about to report).
    pub fn mark_synced(&self, path: &Path) -> io::Result<()> {
        if !self.recorded(path) {
            return Ok(());
        }
        // A file removed since (a folded segment a sync still held) has no name to read it
        // by, and no name a crash state could show it under.
        let (contents, ino) = match std::fs::read(path).and_then(|c| Ok((c, inode(path)?))) {
            Ok(found) => found,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.lock().files.insert(ino, contents);
        Ok(())
    }

    /// Records that the root's entries as they are now are durable.
    pub fn mark_dir_synced(&self) -> io::Result<()> {
        let listing = self.listing()?;
        self.lock().entries = listing;
        Ok(())
    }

    /// The states a power loss now could leave: every combination of the entries that are
    /// not durable, and for each file every subset of its unsynced sectors when there are
    /// at most `exhaustive_below` of them in all, else the prefixes, the all-but-one sets
    /// and `samples` seeded random subsets.
    pub fn crash_states(
        &self,
        exhaustive_below: usize,
        samples: usize,
        seed: u64,
    ) -> io::Result<Vec<CrashState>> {
        let now = self.listing()?;
        let durable = self.lock();
        // Per name: the inode it may point to after a power loss (None: absent).
        let mut names: Vec<(String, Vec<Option<u64>>)> = Vec::new();
        let all: std::collections::BTreeSet<&String> =
            now.keys().chain(durable.entries.keys()).collect();
        for name in all {
            let then = durable.entries.get(name).copied();
            let current = now.get(name).copied();
            let mut choices = vec![current];
            if then != current {
                choices.push(then);
            }
            names.push((name.clone(), choices));
        }
        // Per inode that may appear: its durable contents and its current contents.
        let mut inodes: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        for (name, choices) in &names {
            for ino in choices.iter().flatten() {
                if inodes.contains_key(ino) {
                    continue;
                }
                let durable_bytes = durable.files.get(ino).cloned().unwrap_or_default();
                // An inode no longer reachable by any name keeps what is durable.
                let current = match now.get(name) {
                    Some(i) if i == ino => std::fs::read(self.root.join(name))?,
                    _ => now
                        .iter()
                        .find(|(_, i)| *i == ino)
                        .map(|(n, _)| std::fs::read(self.root.join(n)))
                        .transpose()?
                        .unwrap_or_else(|| durable_bytes.clone()),
                };
                inodes.insert(*ino, (durable_bytes, current));
            }
        }
        drop(durable);
        // The sectors that may or may not have reached the disk.
        let mut units: Vec<(u64, usize)> = Vec::new();
        for (ino, (durable, current)) in &inodes {
            for s in 0..current.len().div_ceil(SECTOR) {
                let range = s * SECTOR..((s + 1) * SECTOR).min(current.len());
                if durable.get(range.clone()) != Some(&current[range]) {
                    units.push((*ino, s));
                }
            }
        }
        let k = units.len();
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if k < exhaustive_below.min(20) {
            for mask in 0..(1u32 << k) {
                subsets.push((0..k).map(|i| mask & (1 << i) != 0).collect());
            }
        } else {
            for n in 0..=k {
                subsets.push((0..k).map(|i| i < n).collect());
                subsets.push((0..k).map(|i| i != n).collect());
            }
            let mut rng = seed | 1;
            for _ in 0..samples {
                subsets.push(
                    (0..k)
                        .map(|_| {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            rng % 2 == 0
                        })
                        .collect(),
                );
            }
        }
        let mut states = Vec::new();
        let combos: usize = names.iter().map(|(_, c)| c.len()).product();
        for subset in &subsets {
            let mut contents: HashMap<u64, Vec<u8>> = HashMap::new();
            for (ino, (durable, current)) in &inodes {
                let mut bytes = durable.clone();
                for ((_, s), _) in units
                    .iter()
                    .zip(subset)
                    .filter(|(u, &on)| on && u.0 == *ino)
                {
                    let range = s * SECTOR..((s + 1) * SECTOR).min(current.len());
                    if bytes.len() < range.end {
                        bytes.resize(range.end, 0);
                    }
                    bytes[range.clone()].copy_from_slice(&current[range]);
                }
                contents.insert(*ino, bytes);
            }
            for combo in 0..combos {
                let mut state = CrashState::new();
                let mut rest = combo;
                for (name, choices) in &names {
                    let choice = choices[rest % choices.len()];
                    rest /= choices.len();
                    if let Some(ino) = choice {
                        state.insert(name.clone(), contents[&ino].clone());
                    }
                }
                states.push(state);
            }
        }
        Ok(states)
    }
}

impl Storage for Recorder {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.before(Op::Write(path.to_path_buf()));
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        self.before(Op::Sync(path.to_path_buf()));
        file.sync_data()?;
        self.mark_synced(path)
    }

    fn sync_all(&self, path: &Path, file: &File) -> io::Result<()> {
        self.before(Op::Sync(path.to_path_buf()));
        file.sync_all()?;
        self.mark_synced(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.before(Op::Rename(from.to_path_buf(), to.to_path_buf()));
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.before(Op::Remove(path.to_path_buf()));
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.before(Op::SyncDir(dir.to_path_buf()));
        sealvm_os::durable::sync_dir(dir)?;
        if dir == self.root {
            self.mark_dir_synced()?;
        }
        Ok(())
    }
}
