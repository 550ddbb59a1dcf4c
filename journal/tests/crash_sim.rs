//! The crash simulator: runs workloads against the real writer and the version-1 upgrade
//! with every sync, rename and removal going through the storage seam's [`Recorder`], and
//! enumerates the states a power loss could leave (after every step of the writer's
//! workloads, and before every storage operation of the upgrade): each directory entry as
//! durable or as now, each file's durable bytes plus any subset of the sectors written since
//! (dropped, reordered, torn at sector granularity, a file extension whose earlier sectors
//! never arrived reading as zeroes). Each state must open, hold every write acknowledged by
//! a flush, hold nothing that was not written, and show every point in time still in reach
//! as it was live (the approach of CrashMonkey and ALICE). Rotation syncs nothing, so closed
//! segments torn at any sector, new segments lost and new segments' headers lost are among
//! the states. Deliberately broken orders must be caught: a flush acknowledged before its
//! fdatasync, a flush that does not sync the segments rotation closed, and an upgrade that
//! renames a rewritten segment before syncing it.
//!
//! Folding is simulated in sealvm-blk (vhost-blk/tests/crash_fold.rs), which owns it.

use sealvm_journal::format::RecordKind;
use sealvm_journal::reader::Reader;
use sealvm_journal::storage::{CrashState, Recorder, Storage};
use sealvm_journal::upgrade::upgrade_with;
use sealvm_journal::writer::Writer;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTORS: u64 = 32;
const SECTOR: usize = 512;

/// What the workload was told: the model the crash states are checked against.
struct Model {
    /// The volume after each seq (index = seq).
    images: Vec<Vec<u8>>,
    /// Every record up to here was acknowledged by a completed flush (or bookmark).
    acked_through: u64,
    /// Bookmarks acknowledged, with their seqs.
    bookmarks: Vec<(String, u64)>,
}

struct Sim {
    journal: PathBuf,
    base: PathBuf,
    crash_dir: PathBuf,
    recorder: Arc<Recorder>,
    model: Model,
    states: u64,
    violations: Vec<String>,
}

/// How the workload's flushes order their steps (all but `Correct` are deliberately
/// broken, for tests that the simulator catches them).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlushOrder {
    Correct,
    AckBeforeSync,
    ActiveOnly,
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

/// Makes `dir` hold exactly the files of `state`.
fn write_state_dir(dir: &Path, state: &CrashState) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in state {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// A temporary directory on tmpfs when there is one: the recorder tells files apart by
/// inode number, which tmpfs does not reuse soon (and syncs cost nothing there).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

impl Sim {
    fn new(tmp: &Path) -> (Sim, Writer) {
        let base = tmp.join("base.raw");
        std::fs::write(&base, vec![0x11u8; SECTORS as usize * SECTOR]).unwrap();
        let journal = tmp.join("journal");
        std::fs::create_dir(&journal).unwrap();
        let recorder = Recorder::new(&journal).unwrap();
        let (writer, _) =
            Writer::open_with(&journal, &base, 4096, recorder.clone(), |_| {}).unwrap();
        let crash_dir = tmp.join("crash");
        let sim = Sim {
            journal,
            base,
            crash_dir,
            recorder,
            model: Model {
                images: vec![vec![0x11u8; SECTORS as usize * SECTOR]],
                acked_through: 0,
                bookmarks: Vec::new(),
            },
            states: 0,
            violations: Vec::new(),
        };
        (sim, writer)
    }

    fn write(&mut self, writer: &mut Writer, sector: u64, sectors: u64, byte: u8) {
        let data = vec![byte; sectors as usize * SECTOR];
        writer
            .append(RecordKind::Write, sector * SECTOR as u64, &data)
            .unwrap();
        let mut image = self.model.images.last().unwrap().clone();
        let at = sector as usize * SECTOR;
        image[at..at + data.len()].copy_from_slice(&data);
        self.model.images.push(image);
    }

    fn zero(&mut self, writer: &mut Writer, sector: u64, sectors: u64) {
        let len = sectors * SECTOR as u64;
        writer
            .append(
                RecordKind::ZeroExtent,
                sector * SECTOR as u64,
                &len.to_le_bytes(),
            )
            .unwrap();
        let mut image = self.model.images.last().unwrap().clone();
        let at = sector as usize * SECTOR;
        image[at..at + len as usize].fill(0);
        self.model.images.push(image);
    }

    /// A flush as the volume does it: sync (closed segments not yet durable, new directory
    /// entries, the active segment), then acknowledge, then the sync point. The broken
    /// orders: `AckBeforeSync` acknowledges first, and a power loss may then come before the
    /// fdatasync; `ActiveOnly` syncs the active segment and the directory but not the
    /// segments rotation closed since the last flush.
    fn flush(&mut self, writer: &mut Writer, order: FlushOrder) {
        let last = writer.next_seq() - 1;
        if order == FlushOrder::ActiveOnly {
            let active = writer.active();
            let (path, ordinal, end) = (active.path.clone(), writer.active_ordinal(), active.bytes);
            std::fs::File::open(&path).unwrap().sync_data().unwrap();
            sealvm_os::durable::sync_dir(&self.journal).unwrap();
            self.recorder.mark_synced(&path).unwrap();
            self.recorder.mark_dir_synced().unwrap();
            self.model.acked_through = last;
            writer.record_sync_point(ordinal, end).unwrap();
            return;
        }
        let target = writer.sync_target();
        if order == FlushOrder::AckBeforeSync {
            self.model.acked_through = last;
            self.crash_point();
        }
        target.sync().unwrap();
        self.model.acked_through = last;
        writer
            .record_sync_point(target.ordinal, target.end)
            .unwrap();
    }

    fn bookmark(&mut self, writer: &mut Writer, name: &str) {
        let seq = writer
            .append(RecordKind::Bookmark, 0, name.as_bytes())
            .unwrap()
            .seq;
        let image = self.model.images.last().unwrap().clone();
        self.model.images.push(image);
        let target = writer.sync_target();
        target.sync().unwrap();
        self.model.acked_through = seq;
        self.model.bookmarks.push((name.into(), seq));
        writer
            .record_sync_point(target.ordinal, target.end)
            .unwrap();
    }

    /// Enumerates the power-loss states possible now and checks each.
    fn crash_point(&mut self) {
        let states = self
            .recorder
            .crash_states(9, 120, 0x5eed ^ (self.states << 7))
            .unwrap();
        for state in states {
            self.check(&state);
        }
    }

    fn check(&mut self, state: &CrashState) {
        self.states += 1;
        write_state_dir(&self.crash_dir, state);
        let mut image = self.model.images[0].clone();
        let mut seen_bookmarks = Vec::new();
        let mut wrong_points = Vec::new();
        let images = &self.model.images;
        let opened = Writer::open(&self.crash_dir, &self.base, 4096, |record| {
            let h = record.header;
            match h.kind {
                RecordKind::Write => {
                    let at = h.offset as usize;
                    image[at..at + record.payload.len()].copy_from_slice(record.payload);
                }
                RecordKind::ZeroExtent => {
                    let len = u64::from_le_bytes(record.payload.try_into().unwrap()) as usize;
                    let at = h.offset as usize;
                    image[at..at + len].fill(0);
                }
                RecordKind::Bookmark => {
                    seen_bookmarks
                        .push((String::from_utf8_lossy(record.payload).into_owned(), h.seq));
                    // Every point in time still in reach reads as it did live.
                    if images.get(h.seq as usize) != Some(&image) {
                        wrong_points.push(h.seq);
                    }
                }
                _ => {}
            }
        });
        let violation = match opened {
            Err(e) => Some(format!("the state does not open: {e}")),
            Ok((writer, _)) => {
                let last = writer.next_seq() - 1;
                if last < self.model.acked_through {
                    Some(format!(
                        "records up to seq {} were acknowledged by a flush, the state ends at {last}",
                        self.model.acked_through
                    ))
                } else if self.model.images.get(last as usize) != Some(&image) {
                    Some(format!("the volume at seq {last} is not what was written"))
                } else if !wrong_points.is_empty() {
                    Some(format!(
                        "points in time {wrong_points:?} read differently than live"
                    ))
                } else if !self
                    .model
                    .bookmarks
                    .iter()
                    .all(|b| seen_bookmarks.contains(b))
                {
                    Some("an acknowledged bookmark is missing".into())
                } else {
                    None
                }
            }
        };
        if let Some(v) = violation {
            if self.violations.len() < 5 {
                self.violations.push(format!("state {}: {v}", self.states));
            }
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.crash_dir);
    }
}

/// Runs workload `name` (a seeded mix of writes, zero extents, flushes and bookmarks over
/// 4 KiB segments, so it rotates often) and returns the states checked and violations.
fn run(name: &str, seed: u64, ops: usize, order: FlushOrder) -> (u64, Vec<String>) {
    let tmp = scratch();
    let (mut sim, mut writer) = Sim::new(tmp.path());
    let mut rng = Rng(seed);
    for i in 0..ops {
        match rng.next() % 10 {
            0..=4 => {
                let sector = rng.next() % (SECTORS - 4);
                let sectors = 1 + rng.next() % 4;
                sim.write(&mut writer, sector, sectors, (i % 250) as u8 + 1);
            }
            5 => {
                let sector = rng.next() % (SECTORS - 8);
                sim.zero(&mut writer, sector, 1 + rng.next() % 8);
            }
            6 | 7 => sim.flush(&mut writer, order),
            8 if name != "writes-and-flushes" => sim.bookmark(&mut writer, &format!("b{i}")),
            _ => {
                let sector = rng.next() % SECTORS;
                sim.write(&mut writer, sector, 1, 0xee);
            }
        }
        sim.crash_point();
    }
    println!(
        "crash simulator: workload {name}: {} crash states checked over {ops} steps, {} segments, {} violations",
        sim.states,
        sealvm_journal::dir::segments(&sim.journal).unwrap().len(),
        sim.violations.len()
    );
    (sim.states, sim.violations.clone())
}

#[test]
fn every_power_loss_state_keeps_every_flushed_write_and_every_point_in_time() {
    for (name, seed) in [
        ("writes-and-flushes", 1),
        ("bookmarks-zero-extents-rotation", 2),
    ] {
        let (states, violations) = run(name, seed, 60, FlushOrder::Correct);
        assert!(violations.is_empty(), "{name}: {violations:#?}");
        assert!(states >= 1000, "{name}: only {states} crash states");
    }
}

#[test]
fn a_flush_acknowledged_before_its_fdatasync_is_caught() {
    let (_, violations) = run(
        "acknowledged-before-fdatasync",
        3,
        40,
        FlushOrder::AckBeforeSync,
    );
    assert!(
        violations
            .iter()
            .any(|v| v.contains("acknowledged by a flush")),
        "the simulator missed an acknowledgement made before the fdatasync: {violations:?}"
    );
}

#[test]
fn a_flush_that_leaves_a_closed_segment_unsynced_is_caught() {
    let (_, violations) = run(
        "closed-segment-left-unsynced",
        4,
        40,
        FlushOrder::ActiveOnly,
    );
    assert!(
        !violations.is_empty(),
        "the simulator missed a flush that did not sync the segment rotation closed"
    );
}

/// The volume after each record of the journal in `dir` (seq and image) and its bookmarks,
/// read with the cursor reader over the image `base`.
type Points = (Vec<(u64, Vec<u8>)>, Vec<(String, u64)>);

fn points(dir: &Path, base: &[u8]) -> Result<Points, String> {
    let mut image = base.to_vec();
    let (mut images, mut bookmarks) = (Vec::new(), Vec::new());
    let reader = Reader::open(dir).map_err(|e| e.to_string())?;
    for record in reader {
        let record = record.map_err(|e| e.to_string())?;
        let h = &record.header;
        match h.kind {
            RecordKind::Write => {
                let at = h.offset as usize;
                image[at..at + record.payload.len()].copy_from_slice(&record.payload);
            }
            RecordKind::ZeroExtent => {
                let len = u64::from_le_bytes(record.payload[..8].try_into().unwrap()) as usize;
                image[h.offset as usize..h.offset as usize + len].fill(0);
            }
            RecordKind::Bookmark => {
                bookmarks.push((String::from_utf8_lossy(&record.payload).into_owned(), h.seq))
            }
            _ => {}
        }
        if !h.is_annotation() {
            images.push((h.seq, image.clone()));
        }
    }
    Ok((images, bookmarks))
}

/// A copy of the version-1 fixture (base.raw and journal/) in `to`.
fn v1_fixture(to: &Path) -> (PathBuf, PathBuf) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    std::fs::copy(from.join("base.raw"), to.join("base.raw")).unwrap();
    std::fs::create_dir(to.join("journal")).unwrap();
    for entry in std::fs::read_dir(from.join("journal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("journal").join(entry.file_name())).unwrap();
    }
    (to.join("base.raw"), to.join("journal"))
}

/// A deliberately broken upgrade: a rewritten segment's fdatasync is put off until after
/// its rename (the seam reorders the two steps).
struct SyncAfterRename {
    inner: Arc<Recorder>,
    deferred: Mutex<Option<(PathBuf, File)>>,
}

impl Storage for SyncAfterRename {
    fn write_at(&self, path: &Path, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(path, file, buf, offset)
    }

    fn sync_data(&self, path: &Path, file: &File) -> io::Result<()> {
        if path.extension().is_some_and(|e| e == "upgrade") {
            *self.deferred.lock().unwrap() = Some((path.to_path_buf(), file.try_clone()?));
            return Ok(());
        }
        self.inner.sync_data(path, file)
    }

    fn sync_all(&self, path: &Path, file: &File) -> io::Result<()> {
        self.inner.sync_all(path, file)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)?;
        if let Some((_, file)) = self.deferred.lock().unwrap().take() {
            self.inner.sync_data(to, &file)?;
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner.remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
}

/// Upgrades the version-1 fixture through the recorder and, before every storage operation
/// and at the end, checks every crash state: it reads (as version 1, 2 or a mix) every
/// point in time as before the upgrade, a second upgrade finishes the job, and the writer
/// then opens it at the same last point. Returns the states checked and violations.
fn upgrade_workload(broken: bool) -> (u64, Vec<String>) {
    let tmp = scratch();
    let (base, journal) = v1_fixture(tmp.path());
    let base_bytes = std::fs::read(&base).unwrap();
    let expected = points(&journal, &base_bytes).unwrap();
    assert_eq!(expected.0.len(), 14, "the fixture changed");
    let recorder = Recorder::new(&journal).unwrap();
    let crash_dir = tmp.path().join("crash");
    let result = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let check = {
        let (result, recorder) = (result.clone(), Arc::downgrade(&recorder));
        let (base, crash_dir, expected) = (base.clone(), crash_dir.clone(), expected.clone());
        move |op: &str| {
            let Some(recorder) = recorder.upgrade() else {
                return;
            };
            let mut result = result.lock().unwrap();
            for state in recorder.crash_states(12, 200, 0x1234 ^ result.0).unwrap() {
                result.0 += 1;
                write_state_dir(&crash_dir, &state);
                let violation = match points(&crash_dir, &base_bytes) {
                    Err(e) => Some(format!("does not read: {e}")),
                    Ok(found) if found != expected => {
                        Some("a point in time reads differently than before".into())
                    }
                    Ok(_) => match sealvm_journal::upgrade::upgrade(&crash_dir, &base) {
                        Err(e) => Some(format!("a second upgrade fails: {e}")),
                        Ok(_) => match Writer::open(&crash_dir, &base, 4096, |_| {}) {
                            Err(e) => Some(format!("does not open after upgrading: {e}")),
                            Ok((writer, _)) if writer.next_seq() != 15 => {
                                Some(format!("opens at seq {}", writer.next_seq() - 1))
                            }
                            Ok(_) => None,
                        },
                    },
                };
                if let Some(v) = violation {
                    if result.1.len() < 5 {
                        let files: Vec<_> = state.keys().cloned().collect();
                        result.1.push(format!("before {op}: {v} ({files:?})"));
                    }
                }
            }
        }
    };
    let hook_check = check.clone();
    recorder.set_hook(Box::new(move |op| hook_check(&format!("{op:?}"))));
    if broken {
        let storage = SyncAfterRename {
            inner: recorder.clone(),
            deferred: Mutex::new(None),
        };
        upgrade_with(&journal, &base, &storage).unwrap();
    } else {
        upgrade_with(&journal, &base, recorder.as_ref()).unwrap();
    }
    recorder.clear_hook();
    check("the end");
    let _ = std::fs::remove_dir_all(&crash_dir);
    let result = result.lock().unwrap().clone();
    println!(
        "crash simulator: workload v1-upgrade{}: {} crash states checked, {} violations",
        if broken { " (sync after rename)" } else { "" },
        result.0,
        result.1.len()
    );
    result
}

#[test]
fn every_power_loss_state_of_an_upgrade_reads_every_point_and_upgrades_again() {
    let (states, violations) = upgrade_workload(false);
    assert!(violations.is_empty(), "{violations:#?}");
    // Every operation leaves few enough unsynced sectors that its states are enumerated
    // exhaustively (about 800 in all for the three segments of the fixture).
    assert!(states >= 500, "only {states} crash states");
}

#[test]
fn an_upgrade_that_renames_before_it_syncs_is_caught() {
    let (_, violations) = upgrade_workload(true);
    assert!(
        !violations.is_empty(),
        "the simulator missed a segment renamed before its fdatasync"
    );
}
