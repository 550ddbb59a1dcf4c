//! The crash simulator over folding: a journaled volume whose journal and folding go
//! through the storage seam's [`Recorder`] runs writes, flushes and bookmarks over 4 KiB
//! segments, and folds what retention no longer keeps. Before every storage operation of
//! every fold (making the folded base, syncing the closed segment, the journal state,
//! applying records, removing the segment) and after every fold, each state a power loss
//! could leave must open to a volume that holds every write acknowledged by a flush, and
//! every point in time still in reach (from the folded history on) must read as it did
//! live. A fold that removes the segment before it syncs the folded base must be caught.

use sealvm_blk::volume::{JournalOptions, JournaledVolume, Retention};
use sealvm_journal::dir::FOLDED_BASE_NAME;
use sealvm_journal::format::RecordKind;
use sealvm_journal::reader::Reader;
use sealvm_journal::storage::{CrashState, Recorder, Storage};
use sealvm_virtio_blk::BlockBackend;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTORS: u64 = 16;
const SECTOR: usize = 512;

/// What the workload was told.
#[derive(Clone, Default)]
struct Model {
    /// The volume after each seq (index = seq).
    images: Vec<Vec<u8>>,
    /// Every record up to here was acknowledged by a flush or a bookmark.
    acked_through: u64,
    /// Bookmarks acknowledged, with their seqs.
    bookmarks: Vec<(String, u64)>,
}

struct Checker {
    base: PathBuf,
    crash_dir: PathBuf,
    states: u64,
    violations: Vec<String>,
}

fn options() -> JournalOptions {
    JournalOptions {
        segment_bytes: 4096,
        retention: Retention {
            max_age_s: None,
            max_bytes: Some(4096),
            consumer_budget: None,
        },
        ..JournalOptions::default()
    }
}

fn write_state_dir(dir: &Path, state: &CrashState) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in state {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

impl Checker {
    /// Checks one crash state against the model; `None` if it holds.
    fn violation(&self, model: &Model, state: &CrashState) -> Option<String> {
        write_state_dir(&self.crash_dir, state);
        let opened = JournaledVolume::open_with(&self.base, &self.crash_dir, options());
        let (volume, _) = match opened {
            Ok(opened) => opened,
            Err(e) => return Some(format!("the state does not open: {e}")),
        };
        let last = volume.journal_position().1;
        let base_seq = volume.base_seq();
        if last < model.acked_through {
            return Some(format!(
                "records up to seq {} were acknowledged by a flush, the state ends at {last}",
                model.acked_through
            ));
        }
        let mut image = vec![0u8; SECTORS as usize * SECTOR];
        if let Err(e) = volume.read_at(0, &mut image) {
            return Some(format!("the volume does not read: {e}"));
        }
        if model.images.get(last as usize) != Some(&image) {
            return Some(format!("the volume at seq {last} is not what was written"));
        }
        drop(volume);
        // Every point from the folded history on: the folded base (or the image) with every
        // record still in the journal applied, as `pit restore` reads it.
        let folded = self.crash_dir.join(FOLDED_BASE_NAME);
        let mut point = std::fs::read(if folded.exists() { &folded } else { &self.base }).ok()?;
        let mut checked_base = false;
        let mut seen_bookmarks = Vec::new();
        let reader = match Reader::open(&self.crash_dir) {
            Ok(reader) => reader,
            Err(e) => return Some(format!("the journal does not read: {e}")),
        };
        for record in reader {
            let record = match record {
                Ok(record) => record,
                Err(e) => return Some(format!("the journal does not read: {e}")),
            };
            let h = &record.header;
            if h.seq > base_seq && !checked_base {
                checked_base = true;
                if model.images.get(base_seq as usize) != Some(&point) {
                    return Some(format!("the folded point {base_seq} reads differently"));
                }
            }
            match h.kind {
                RecordKind::Write => {
                    let at = h.offset as usize;
                    point[at..at + record.payload.len()].copy_from_slice(&record.payload);
                }
                RecordKind::ZeroExtent => {
                    let len = u64::from_le_bytes(record.payload[..8].try_into().ok()?) as usize;
                    point[h.offset as usize..h.offset as usize + len].fill(0);
                }
                RecordKind::Bookmark => seen_bookmarks
                    .push((String::from_utf8_lossy(&record.payload).into_owned(), h.seq)),
                _ => {}
            }
            if !h.is_annotation()
                && h.seq >= base_seq
                && model.images.get(h.seq as usize) != Some(&point)
            {
                return Some(format!(
                    "point in time {} reads differently than live",
                    h.seq
                ));
            }
        }
        if !checked_base && model.images.get(base_seq as usize) != Some(&point) {
            return Some(format!("the folded point {base_seq} reads differently"));
        }
        if let Some(missing) = model
            .bookmarks
            .iter()
            .find(|b| b.1 > base_seq && !seen_bookmarks.contains(b))
        {
            return Some(format!("acknowledged bookmark {missing:?} is missing"));
        }
        None
    }

    fn check_all(&mut self, model: &Model, recorder: &Recorder, at: &str) {
        let states = recorder.crash_states(10, 60, 0xf01d ^ self.states).unwrap();
        for state in states {
            self.states += 1;
            if let Some(v) = self.violation(model, &state) {
                if self.violations.len() < 5 {
                    let files: Vec<_> = state.keys().cloned().collect();
                    self.violations.push(format!("{at}: {v} ({files:?})"));
                }
            }
        }
    }
}

/// A deliberately broken fold: the folded base's sync is put off until after the segment
/// is removed (the seam swaps the two steps).
struct RemoveBeforeSync {
    inner: Arc<Recorder>,
    deferred: Mutex<Option<(PathBuf, File)>>,
}

impl Storage for RemoveBeforeSync {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(path, file, buf, offset)
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        self.inner.sync_data(path, file)
    }

    fn sync_all(&self, path: &Path, file: &File) -> io::Result<()> {
        if path.file_name().is_some_and(|n| n == FOLDED_BASE_NAME) {
            *self.deferred.lock().unwrap() = Some((path.to_path_buf(), file.try_clone()?));
            return Ok(());
        }
        self.inner.sync_all(path, file)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)?;
        self.inner
            .sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        if let Some((folded, file)) = self.deferred.lock().unwrap().take() {
            self.inner.sync_all(&folded, &file)?;
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the fold workload; returns the states checked, folds done and violations.
fn fold_workload(seed: u64, steps: usize, broken: bool) -> (u64, u64, Vec<String>) {
    let shm = Path::new("/dev/shm");
    // The recorder tells files apart by inode number, which tmpfs does not reuse soon.
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let base = tmp.path().join("base.raw");
    std::fs::write(&base, vec![0x11u8; SECTORS as usize * SECTOR]).unwrap();
    let journal = tmp.path().join("journal");
    std::fs::create_dir(&journal).unwrap();
    let recorder = Recorder::new(&journal).unwrap();
    let storage: Arc<dyn Storage> = if broken {
        Arc::new(RemoveBeforeSync {
            inner: recorder.clone(),
            deferred: Mutex::new(None),
        })
    } else {
        recorder.clone()
    };
    let (volume, _) =
        JournaledVolume::open_with_storage(&base, &journal, options(), storage).unwrap();
    let model = Arc::new(Mutex::new(Model {
        images: vec![vec![0x11u8; SECTORS as usize * SECTOR]],
        ..Model::default()
    }));
    let checker = Arc::new(Mutex::new(Checker {
        base: base.clone(),
        crash_dir: tmp.path().join("crash"),
        states: 0,
        violations: Vec::new(),
    }));
    let mut rng = Rng(seed);
    let mut folds = 0;
    for i in 0..steps {
        let mut m = model.lock().unwrap();
        match rng.next() % 8 {
            0..=4 => {
                let sector = rng.next() % (SECTORS - 2);
                let sectors = 1 + rng.next() % 2;
                let data = vec![(i % 250) as u8 + 1; sectors as usize * SECTOR];
                volume.write_at(sector * SECTOR as u64, &data).unwrap();
                let mut image = m.images.last().unwrap().clone();
                let at = sector as usize * SECTOR;
                image[at..at + data.len()].copy_from_slice(&data);
                m.images.push(image);
            }
            5 => {
                let last = volume.journal_position().1;
                volume.flush().unwrap();
                m.acked_through = last;
            }
            6 => {
                let name = format!("b{i}");
                let bookmark = volume.bookmark(&name).unwrap();
                let image = m.images.last().unwrap().clone();
                m.images.push(image);
                m.acked_through = bookmark.seq;
                m.bookmarks.push((name, bookmark.seq));
            }
            _ => {
                // Fold with a crash point before every storage operation.
                let snapshot = m.clone();
                drop(m);
                let (hook_checker, hook_recorder) = (checker.clone(), Arc::downgrade(&recorder));
                recorder.set_hook(Box::new(move |op| {
                    if let Some(recorder) = hook_recorder.upgrade() {
                        hook_checker.lock().unwrap().check_all(
                            &snapshot,
                            &recorder,
                            &format!("before {op:?}"),
                        );
                    }
                }));
                let report = volume.fold_expired().unwrap();
                recorder.clear_hook();
                folds += report.segments;
                let m = model.lock().unwrap();
                checker
                    .lock()
                    .unwrap()
                    .check_all(&m, &recorder, "after a fold");
                continue;
            }
        }
    }
    let checker = checker.lock().unwrap();
    println!(
        "crash simulator: fold workload{}: {} crash states checked over {steps} steps, {folds} segments folded, {} violations",
        if broken { " (segment removed before the folded base is synced)" } else { "" },
        checker.states,
        checker.violations.len()
    );
    let _ = std::fs::remove_dir_all(&checker.crash_dir);
    (checker.states, folds, checker.violations.clone())
}

#[test]
fn every_power_loss_state_of_folding_keeps_every_flushed_write_and_every_later_point() {
    let (states, folds, violations) = fold_workload(7, 120, false);
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(folds >= 3, "only {folds} segments folded");
    assert!(states >= 1000, "only {states} crash states");
}

#[test]
fn a_fold_that_removes_the_segment_before_syncing_the_folded_base_is_caught() {
    let (_, folds, violations) = fold_workload(7, 120, true);
    assert!(folds >= 3, "only {folds} segments folded");
    assert!(
        !violations.is_empty(),
        "the simulator missed a segment removed before the folded base was durable"
    );
}
