//! The journal's benchmarks: sealvm-blk beside qemu-storage-daemon driven by libblkio (the
//! `blkio` crate: the client QEMU's virtio-blk-vhost-user driver and fio's libblkio engine
//! use, which nobody here wrote), with the journal off and on; the index's memory per
//! written extent; and how much a whole-device discard grows the journal.

use crate::pattern::{Offsets, Pattern, VOLUME_BYTES};
use crate::table::Row;
use anyhow::{anyhow, ensure, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use sealvm_blk::api::protocol::{Counters, Request};
use sealvm_testkit::command::{self as process, step};
use sealvm_testkit::{Background, Workspace};
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const RUN_TIME: Duration = Duration::from_secs(3);
const BUF_BYTES: usize = 64 << 10;

const PATTERNS: [Pattern; 6] = [
    Pattern::RandRead { depth: 1 },
    Pattern::RandRead { depth: 32 },
    Pattern::RandWrite { depth: 1 },
    Pattern::RandWrite { depth: 32 },
    Pattern::RandWriteFlush,
    Pattern::SeqWrite64k,
];

/// A libblkio connection to a vhost-user-blk socket with one queue and a buffer of
/// `BUF_BYTES` per possible request in flight.
struct Client {
    _blkio: Blkio,
    queue: Blkioq,
    buffers: usize,
}

impl Client {
    fn connect(socket: &Path) -> Result<Client> {
        let libblkio = |e: blkio::Error| anyhow!("libblkio: {}", e.message());
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(libblkio)?;
        let path = socket.to_str().ok_or_else(|| anyhow!("socket path"))?;
        blkio.set_str("path", path).map_err(libblkio)?;
        blkio.connect().map_err(libblkio)?;
        blkio.set_i32("num-queues", 1).map_err(libblkio)?;
        let region = blkio.alloc_mem_region(32 * BUF_BYTES).map_err(libblkio)?;
        let mut started = blkio.start().map_err(libblkio)?;
        blkio.map_mem_region(&region).map_err(libblkio)?;
        let queue = started.queues.remove(0);
        Ok(Client {
            _blkio: blkio,
            queue,
            buffers: region.addr,
        })
    }

    fn buffer(&self, slot: usize) -> *mut u8 {
        (self.buffers + slot * BUF_BYTES) as *mut u8
    }

    fn submit(&mut self, pattern: Pattern, slot: usize, offset: u64) {
        let flags = ReqFlags::empty();
        let buf = self.buffer(slot);
        let len = pattern.request_bytes();
        match pattern {
            Pattern::RandRead { .. } => self.queue.read(offset, buf, len, slot, flags),
            _ => self.queue.write(offset, buf, len, slot, flags),
        }
    }

    /// Waits for one completion; returns its slot.
    fn complete(&mut self) -> Result<usize> {
        let mut done = [MaybeUninit::<Completion>::uninit()];
        let n = self
            .queue
            .do_io(&mut done, 1, None, None)
            .map_err(|e| anyhow!("libblkio: {}", e.message()))?;
        ensure!(n == 1, "no completion");
        // SAFETY: do_io initialized the first `n` (= 1) completions.
        let completion = unsafe { done[0].assume_init_read() };
        ensure!(completion.ret == 0, "request failed: {}", completion.ret);
        Ok(completion.user_data)
    }

    fn flush(&mut self) -> Result<()> {
        self.queue.flush(usize::MAX, ReqFlags::empty());
        self.complete().map(drop)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.queue.discard(offset, len, 0, ReqFlags::empty());
        self.complete().map(drop)
    }
}

/// IOPS of `pattern` for RUN_TIME.
fn measure(client: &mut Client, pattern: Pattern) -> Result<f64> {
    let mut offsets = Offsets::new();
    let depth = usize::from(pattern.depth());
    let started = Instant::now();
    let mut ops = 0u64;
    for slot in 0..depth {
        let at = offsets.next(pattern);
        client.submit(pattern, slot, at);
    }
    let mut in_flight = depth;
    while in_flight > 0 {
        let slot = client.complete()?;
        ops += 1;
        if matches!(pattern, Pattern::RandWriteFlush) && ops % 8 == 0 {
            client.flush()?;
        }
        if started.elapsed() < RUN_TIME {
            let at = offsets.next(pattern);
            client.submit(pattern, slot, at);
        } else {
            in_flight -= 1;
        }
    }
    Ok(ops as f64 / started.elapsed().as_secs_f64())
}

fn serve(blk: &Path, dir: &Path, backend: &str, image: &Path, socket: &Path) -> Result<Background> {
    Ok(match backend {
        "qemu-storage-daemon" => Background::qemu_storage_daemon(image, socket)?,
        _ => {
            let mut volume = format!("bench={}", image.display());
            if backend.ends_with("on") {
                let journal = dir.join(format!("{}.journal", socket.display()));
                volume.push_str(&format!(",journal={}", journal.display()));
            }
            Background::start(
                Command::new(blk)
                    .args(["serve", "--volume", &volume, "--socket"])
                    .arg(socket)
                    .arg("--api-socket")
                    .arg(socket.with_extension("api")),
                &[socket],
            )?
        }
    })
}

/// Every row of the journal's benchmarks.
pub fn rows(workspace: &Workspace) -> Result<Vec<Row>> {
    process::run(
        Command::new(env!("CARGO"))
            .current_dir(workspace.root())
            .args(["build", "--quiet", "--release", "--bin", "sealvm-blk"]),
    )?;
    let blk = workspace.target_dir().join("release").join("sealvm-blk");
    let dir = tempfile::tempdir()?;
    let backends = [
        "qemu-storage-daemon",
        "sealvm-blk journal off",
        "sealvm-blk journal on",
    ];
    let mut results = Vec::new();
    for backend in backends {
        step(&format!("bench: libblkio against {backend}"));
        let name = backend.replace(' ', "-");
        let image = dir.path().join(format!("{name}.raw"));
        std::fs::File::create(&image)?.set_len(VOLUME_BYTES)?;
        let socket = dir.path().join(format!("{name}.sock"));
        let _server = serve(&blk, dir.path(), backend, &image, &socket)?;
        let mut client = Client::connect(&socket)?;
        let mut measured = Vec::new();
        for pattern in PATTERNS {
            measured.push(measure(&mut client, pattern)?);
        }
        results.push(measured);
    }
    println!();
    println!(
        "{:<40} {:>20} {:>24} {:>24}",
        "libblkio client (IOPS)", backends[0], backends[1], backends[2]
    );
    for (i, pattern) in PATTERNS.iter().enumerate() {
        println!(
            "{:<40} {:>20.0} {:>24.0} {:>24.0}",
            pattern.name(),
            results[0][i],
            results[1][i],
            results[2][i]
        );
    }
    let mut rows = Vec::new();
    for (mode, index) in [("journal off", 1), ("journal on", 2)] {
        for (i, pattern) in PATTERNS.iter().enumerate() {
            rows.push(Row {
                name: format!("libblkio, sealvm-blk {mode}: {} (IOPS)", pattern.name()),
                ours: results[index][i],
                peer: Some(("qsd".into(), results[0][i])),
                lower_is_better: false,
            });
        }
    }
    rows.push(discard_growth(&blk, dir.path())?);
    rows.push(index_memory_per_extent()?);
    Ok(rows)
}

/// How many bytes a libblkio discard of a whole 1 GiB journaled volume adds to the journal.
fn discard_growth(blk: &Path, dir: &Path) -> Result<Row> {
    step("bench: whole-device discard");
    let image = dir.join("discard.raw");
    std::fs::File::create(&image)?.set_len(1 << 30)?;
    let socket = dir.join("discard.sock");
    let _server = serve(blk, dir, "sealvm-blk journal on", &image, &socket)?;
    let api = socket.with_extension("api");
    let journal_bytes = || -> Result<u64> {
        let answer = sealvm_blk::api::call(&api, Request::Counters { volume: None })?;
        let counters: Counters = serde_json::from_value(answer)?;
        counters
            .journal
            .map(|journal| journal.journal_bytes)
            .ok_or_else(|| anyhow!("the volume is served without a journal"))
    };
    let mut client = Client::connect(&socket)?;
    let before = journal_bytes()?;
    let chunk = 1 << 30;
    let mut at = 0;
    while at < 1 << 30 {
        client.discard(at, chunk)?;
        at += chunk;
    }
    Ok(Row {
        name: "journal growth of a whole-device discard of 1 GiB (bytes)".into(),
        ours: (journal_bytes()? - before) as f64,
        peer: None,
        lower_is_better: true,
    })
}

/// Resident memory of the extent map per extent, for 1 MiB extents written in order
/// (what a volume written once in 1 MiB writes costs).
fn index_memory_per_extent() -> Result<Row> {
    step("bench: index memory per extent");
    const EXTENTS: u64 = 1 << 20;
    let rss = || -> Result<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm")?;
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("bad /proc/self/statm"))?;
        Ok(pages * 4096)
    };
    let before = rss()?;
    let mut map = sealvm_journal::ExtentMap::new();
    for i in 0..EXTENTS {
        map.insert(
            i * 2048,
            2048,
            sealvm_journal::Source::Data {
                segment: (i / 64) as u32,
                offset: ((i % 64) * (1 << 20) + 48) as u32,
            },
        );
    }
    let used = rss()?.saturating_sub(before);
    ensure!(map.len() as u64 == EXTENTS, "the map merged extents");
    drop(map);
    Ok(Row {
        name: "journal index: bytes per written extent (1 TiB in 1 MiB writes)".into(),
        ours: used as f64 / EXTENTS as f64,
        peer: None,
        lower_is_better: true,
    })
}
