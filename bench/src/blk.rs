//! sealvm-blk against qemu-storage-daemon, driven by the project's vhost-user load
//! generator with no VM: IOPS and p50/p99 latency for random 4 KiB reads at queue depth 1
//! and 32, random 4 KiB writes with a flush every 8 writes, and 64 KiB sequential writes.
//! sealvm-blk runs twice, journal off (a raw file) and journal on; every backend serves the
//! same kind of file in the same run. Then, with no peer (qemu-storage-daemon keeps no
//! history): `pit restore` time against the journal's length, and `pit expose` retarget
//! time against the records between the two points.

use crate::pattern::{Offsets, Pattern, VOLUME_BYTES};
use crate::table::Row;
use anyhow::{ensure, Result};
use sealvm_blk::api::protocol::Request;
use sealvm_blk::volume::JournaledVolume;
use sealvm_testkit::command::{self as process, step};
use sealvm_testkit::loadgen::{types, BlkDriver, Slot};
use sealvm_testkit::{Background, Workspace};
use sealvm_virtio_blk::BlockBackend;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Journal lengths (4 KiB write records) at which `pit restore` is timed.
const HISTORY_RECORDS: [u64; 3] = [1_000, 10_000, 40_000];
/// Records between the two points of a timed retarget (at most the longest history).
const RETARGET_DISTANCES: [u64; 4] = [10, 100, 1_000, 10_000];
/// Retargets per distance (each way); the row shows their mean.
const RETARGET_REPEATS: u32 = 5;
/// Each pattern runs this long per backend.
const RUN_TIME: Duration = Duration::from_secs(3);

const PATTERNS: [Pattern; 4] = [
    Pattern::RandRead { depth: 1 },
    Pattern::RandRead { depth: 32 },
    Pattern::RandWriteFlush,
    Pattern::SeqWrite64k,
];

struct Measured {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs every pattern against the three backends; returns one row per pattern and
/// sealvm-blk mode, with qemu-storage-daemon as the peer.
pub fn run(workspace: &Workspace) -> Result<Vec<Row>> {
    process::run(
        Command::new(env!("CARGO"))
            .current_dir(workspace.root())
            .args(["build", "--quiet", "--release", "--bin", "sealvm-blk"]),
    )?;
    let blk = workspace.target_dir().join("release").join("sealvm-blk");
    let dir = tempfile::tempdir()?;
    let mut results: Vec<(&str, Vec<Measured>)> = Vec::new();
    for backend in [
        "qemu-storage-daemon",
        "sealvm-blk journal off",
        "sealvm-blk journal on",
    ] {
        step(&format!("bench: {backend}"));
        let image = dir
            .path()
            .join(format!("{}.raw", backend.replace(' ', "-")));
        std::fs::File::create(&image)?.set_len(VOLUME_BYTES)?;
        let socket = dir
            .path()
            .join(format!("{}.sock", backend.replace(' ', "-")));
        let _server = match backend {
            "qemu-storage-daemon" => Background::qemu_storage_daemon(&image, &socket)?,
            _ => {
                let mut volume = format!("bench={}", image.display());
                if backend.ends_with("on") {
                    volume.push_str(&format!(
                        ",journal={}",
                        dir.path().join("journal").display()
                    ));
                }
                // The release build, for a fair comparison with Debian's optimized QEMU.
                Background::start(
                    Command::new(&blk)
                        .args(["serve", "--volume", &volume, "--socket"])
                        .arg(&socket),
                    &[&socket],
                )?
            }
        };
        let mut driver = BlkDriver::connect(&socket, Duration::from_secs(10))?;
        let mut measured = Vec::new();
        for pattern in PATTERNS {
            measured.push(measure(&mut driver, pattern)?);
        }
        results.push((backend, measured));
    }

    println!();
    println!(
        "{:<36} {:>28} {:>28} {:>28}",
        "vhost-user-blk (IOPS, p50/p99 us)", results[0].0, results[1].0, results[2].0
    );
    for (i, pattern) in PATTERNS.iter().enumerate() {
        let cell = |m: &Measured| format!("{:.0} ({:.0}/{:.0})", m.iops, m.p50_us, m.p99_us);
        println!(
            "{:<36} {:>28} {:>28} {:>28}",
            pattern.name(),
            cell(&results[0].1[i]),
            cell(&results[1].1[i]),
            cell(&results[2].1[i])
        );
    }
    let mut rows = Vec::new();
    for (mode, index) in [("journal off", 1), ("journal on", 2)] {
        for (i, pattern) in PATTERNS.iter().enumerate() {
            rows.push(Row {
                name: format!("sealvm-blk {mode}: {} (IOPS)", pattern.name()),
                ours: results[index].1[i].iops,
                peer: Some(("qsd".into(), results[0].1[i].iops)),
                lower_is_better: false,
            });
        }
    }
    rows.extend(history_rows(&blk, dir.path())?);
    Ok(rows)
}

/// Restore time against history length and retarget time against distance, measured with
/// the release `sealvm-blk` (`pit restore` wall time including process start; retarget as
/// the API round trip on a `pit expose` daemon). The journal is written in-process.
fn history_rows(blk: &Path, dir: &Path) -> Result<Vec<Row>> {
    let base = dir.join("history-base.raw");
    std::fs::File::create(&base)?.set_len(VOLUME_BYTES)?;
    let journal = dir.join("history.journal");
    let (volume, _) = JournaledVolume::open(&base, &journal, false)?;
    let data = vec![0x5au8; 4096];
    let mut offsets = Offsets::new();
    let mut written = 0u64;
    let mut rows = Vec::new();
    println!();
    println!("{:<52} {:>12}", "journal history", "time (ms)");
    let restore = |to: &Path| -> Result<Duration> {
        let started = Instant::now();
        process::output(
            Command::new(blk)
                .args(["pit", "restore", "--at", "latest", "--base"])
                .arg(&base)
                .arg("--journal")
                .arg(&journal)
                .arg("--to")
                .arg(to),
        )?;
        let took = started.elapsed();
        std::fs::remove_file(to)?;
        Ok(took)
    };
    // The first copy of the base pays for cold caches; keep it out of the rows.
    restore(&dir.join("warm-up.raw"))?;
    for history in HISTORY_RECORDS {
        step(&format!("bench: pit restore after {history} records"));
        while written < history {
            volume.write_at(offsets.random_block(), &data)?;
            written += 1;
        }
        volume.flush()?;
        let ms = restore(&dir.join("restored.raw"))?.as_secs_f64() * 1e3;
        let name = format!("pit restore, 256 MiB volume, {history} 4K records (ms)");
        println!("{name:<52} {ms:>12.1}");
        rows.push(Row {
            name,
            ours: ms,
            peer: None,
            lower_is_better: true,
        });
    }
    drop(volume);

    step("bench: pit expose retarget");
    let socket = dir.join("expose.sock");
    let api = dir.join("expose.api");
    let _expose = Background::start(
        Command::new(blk)
            .args(["pit", "expose", "--at", "0", "--base"])
            .arg(&base)
            .arg("--journal")
            .arg(&journal)
            .arg("--socket")
            .arg(&socket)
            .arg("--api-socket")
            .arg(&api),
        &[&socket, &api],
    )?;
    let retarget = |seq: u64| -> Result<Duration> {
        let started = Instant::now();
        sealvm_blk::api::call(
            &api,
            Request::Retarget {
                at: seq.to_string(),
            },
        )?;
        Ok(started.elapsed())
    };
    // The first retarget to the end reads the whole journal once; time only what follows.
    retarget(written)?;
    retarget(0)?;
    for distance in RETARGET_DISTANCES {
        let mut total = Duration::ZERO;
        for _ in 0..RETARGET_REPEATS {
            total += retarget(distance)?;
            total += retarget(0)?;
        }
        let ms = total.as_secs_f64() * 1e3 / f64::from(2 * RETARGET_REPEATS);
        let name = format!("pit retarget across {distance} records (ms)");
        println!("{name:<52} {ms:>12.3}");
        rows.push(Row {
            name,
            ours: ms,
            peer: None,
            lower_is_better: true,
        });
    }
    Ok(rows)
}

fn measure(driver: &mut BlkDriver, pattern: Pattern) -> Result<Measured> {
    let mut offsets = Offsets::new();
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut ops = 0u64;
    match pattern {
        Pattern::RandRead { depth } | Pattern::RandWrite { depth } => {
            let (request_type, data) = match pattern {
                Pattern::RandRead { .. } => (types::IN, Vec::new()),
                _ => (types::OUT, vec![0x5au8; 4096]),
            };
            let reply = if data.is_empty() { 4096 } else { 0 };
            let mut issued = vec![Instant::now(); usize::from(depth)];
            for slot in 0..depth {
                let sector = offsets.random_block() / 512;
                issued[usize::from(slot)] = Instant::now();
                driver.submit(Slot(slot), request_type, sector, &data, reply)?;
            }
            let mut in_flight = depth;
            while in_flight > 0 {
                let (slot, state) = driver.complete()?;
                ensure!(state == 0, "{} failed with status {state}", pattern.name());
                latencies.push(issued[usize::from(slot.0)].elapsed());
                ops += 1;
                if started.elapsed() < RUN_TIME {
                    let sector = offsets.random_block() / 512;
                    issued[usize::from(slot.0)] = Instant::now();
                    driver.submit(slot, request_type, sector, &data, reply)?;
                } else {
                    in_flight -= 1;
                }
            }
        }
        Pattern::RandWriteFlush => {
            let data = vec![0x5au8; 4096];
            while started.elapsed() < RUN_TIME {
                let t = Instant::now();
                driver.write(offsets.random_block() / 512, &data)?;
                ops += 1;
                if ops % 8 == 0 {
                    driver.flush()?;
                }
                latencies.push(t.elapsed());
            }
        }
        Pattern::SeqWrite64k => {
            let data = vec![0xa5u8; 64 << 10];
            while started.elapsed() < RUN_TIME {
                let t = Instant::now();
                driver.write(offsets.next(pattern) / 512, &data)?;
                ops += 1;
                latencies.push(t.elapsed());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Ok(Measured {
        iops: ops as f64 / elapsed,
        p50_us: percentile(0.50),
        p99_us: percentile(0.99),
    })
}
