//! The crash simulator: runs workloads against the real writer, records through its sync
//! seam ([`Writer::set_sync_observer`]) what each fdatasync and directory fsync made durable,
//! and after every step enumerates the states a power loss could leave: every durable byte
//! kept, and any subset of the sectors written since (dropped, reordered, torn at sector
//! granularity, a file extension whose earlier sectors never arrived reading as zeroes), a
//! segment whose directory entry was not yet durable present or absent. Each state must
//! open, hold every write acknowledged by a flush, hold nothing that was not written, and
//! show every acknowledged bookmark as it was live (the approach of CrashMonkey and ALICE).
//! Rotation syncs nothing, so closed segments torn at any sector, new segments lost and
//! new segments' headers lost are among the states. A workload that acknowledges a flush
//! before its fdatasync must be caught, and one whose flush does not sync the segments
//! rotation closed.
//!
//! What it does not cover yet: folding (its steps are crash-tested by stopping after each
//! one in sealvm-blk's fold tests) and the v1 upgrade's renames.

use sealvm_journal::format::RecordKind;
use sealvm_journal::writer::{SyncEvent, Writer};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTORS: u64 = 32;
const SECTOR: usize = 512;

/// What the recorded syncs made durable.
#[derive(Default)]
struct Durable {
    /// Segment file name to its durable contents.
    files: HashMap<String, Vec<u8>>,
    /// Segment files whose directory entry is durable.
    entries: HashSet<String>,
}

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
    durable: Arc<Mutex<Durable>>,
    model: Model,
    states: u64,
    violations: Vec<String>,
}

/// A segment at a crash point: name, durable contents (if any were synced), current
/// contents, whether its directory entry is durable.
type SegmentNow = (String, Option<Vec<u8>>, Vec<u8>, bool);

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

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

impl Sim {
    fn new(tmp: &Path) -> (Sim, Writer) {
        let base = tmp.join("base.raw");
        std::fs::write(&base, vec![0x11u8; SECTORS as usize * SECTOR]).unwrap();
        let journal = tmp.join("journal");
        let (writer, _) = Writer::open(&journal, &base, 4096, |_| {}).unwrap();
        let durable = Arc::new(Mutex::new(Durable::default()));
        {
            // What open made is durable: the state file and the first segment.
            let mut d = durable.lock().unwrap();
            for entry in std::fs::read_dir(&journal).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "svj") {
                    d.files
                        .insert(file_name(&path), std::fs::read(&path).unwrap());
                    d.entries.insert(file_name(&path));
                }
            }
        }
        let recorder = durable.clone();
        let dir = journal.clone();
        writer.set_sync_observer(Arc::new(move |event| {
            let mut d = recorder.lock().unwrap();
            match event {
                SyncEvent::File(path) => {
                    let bytes = std::fs::read(path).unwrap();
                    d.files.insert(file_name(path), bytes);
                }
                SyncEvent::Dir(_) => {
                    for entry in std::fs::read_dir(&dir).unwrap() {
                        let path = entry.unwrap().path();
                        if path.extension().is_some_and(|e| e == "svj") {
                            d.entries.insert(file_name(&path));
                        }
                    }
                }
            }
        }));
        let shm = Path::new("/dev/shm");
        let crash_dir = if shm.is_dir() {
            shm.join(format!(
                "sealvm-crash-sim-{}-{}",
                std::process::id(),
                file_name(tmp)
            ))
        } else {
            tmp.join("crash")
        };
        let sim = Sim {
            journal,
            base,
            crash_dir,
            durable,
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
            {
                let mut d = self.durable.lock().unwrap();
                d.files
                    .insert(file_name(&path), std::fs::read(&path).unwrap());
                for (_, segment) in sealvm_journal::dir::segments(&self.journal).unwrap() {
                    d.entries.insert(file_name(&segment));
                }
            }
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
        let mut files: Vec<SegmentNow> = Vec::new();
        let mut entries = std::fs::read_dir(&self.journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "svj"))
            .collect::<Vec<_>>();
        entries.sort();
        {
            let d = self.durable.lock().unwrap();
            for path in entries {
                let name = file_name(&path);
                let current = std::fs::read(&path).unwrap();
                files.push((
                    name.clone(),
                    d.files.get(&name).cloned(),
                    current,
                    d.entries.contains(&name),
                ));
            }
        }
        // The units a power loss may or may not have written: sectors that differ from
        // the durable contents.
        let mut units: Vec<(usize, usize)> = Vec::new();
        for (i, (_, durable, current, _)) in files.iter().enumerate() {
            let durable = durable.as_deref().unwrap_or(&[]);
            for s in 0..current.len().div_ceil(SECTOR) {
                let range = s * SECTOR..((s + 1) * SECTOR).min(current.len());
                if durable.get(range.clone()) != Some(&current[range]) {
                    units.push((i, s));
                }
            }
        }
        let k = units.len();
        let mut subsets: Vec<Vec<bool>> = Vec::new();
        if k <= 10 {
            for mask in 0..(1u32 << k) {
                subsets.push((0..k).map(|i| mask & (1 << i) != 0).collect());
            }
        } else {
            for n in 0..=k {
                subsets.push((0..k).map(|i| i < n).collect());
                subsets.push((0..k).map(|i| i != n).collect());
            }
            let mut rng = Rng(0x5eed ^ (k as u64) ^ (self.states << 7));
            for _ in 0..200 {
                subsets.push((0..k).map(|_| rng.next() % 2 == 0).collect());
            }
        }
        for subset in subsets {
            for drop_new_entries in [false, true] {
                let mut state: Vec<(String, Vec<u8>)> = Vec::new();
                for (i, (name, durable, current, entry_durable)) in files.iter().enumerate() {
                    if drop_new_entries && !entry_durable {
                        continue;
                    }
                    let mut bytes = durable.clone().unwrap_or_default();
                    for (unit, _) in units.iter().zip(&subset).filter(|(u, &on)| on && u.0 == i) {
                        let range = unit.1 * SECTOR..((unit.1 + 1) * SECTOR).min(current.len());
                        if bytes.len() < range.end {
                            bytes.resize(range.end, 0);
                        }
                        bytes[range.clone()].copy_from_slice(&current[range]);
                    }
                    state.push((name.clone(), bytes));
                }
                if drop_new_entries && state.len() == files.len() {
                    continue; // every entry is durable: the same states as above
                }
                self.check(&state);
            }
        }
    }

    fn check(&mut self, state: &[(String, Vec<u8>)]) {
        self.states += 1;
        let _ = std::fs::remove_dir_all(&self.crash_dir);
        std::fs::create_dir_all(&self.crash_dir).unwrap();
        std::fs::copy(
            self.journal.join("state.json"),
            self.crash_dir.join("state.json"),
        )
        .unwrap();
        for (name, bytes) in state {
            std::fs::write(self.crash_dir.join(name), bytes).unwrap();
        }
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
    let tmp = tempfile::tempdir().unwrap();
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
