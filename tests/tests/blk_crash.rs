//! sealvm-blk driven by the project's vhost-user frontend (the load generator), without a
//! VM: requests round-trip against sealvm-blk and against qemu-storage-daemon, and a
//! backend killed with SIGKILL at random moments, many times, never loses a write that a
//! completed flush acknowledged.

use sealvm_testkit::loadgen::{BlkDriver, LoadError};
use sealvm_testkit::Background;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const SECTORS: u64 = 2048; // a 1 MiB volume

fn pattern(tag: u64, sector: u64) -> Vec<u8> {
    let mut data = vec![0u8; 512];
    for (i, chunk) in data.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&tag.to_le_bytes());
        chunk[8..16].copy_from_slice(&(sector ^ i as u64).to_le_bytes());
    }
    data
}

fn round_trip(driver: &mut BlkDriver) {
    assert_eq!(driver.capacity_sectors(), SECTORS);
    for sector in [0, 7, SECTORS - 1] {
        driver.write(sector, &pattern(42, sector)).unwrap();
    }
    driver.flush().unwrap();
    for sector in [0, 7, SECTORS - 1] {
        assert_eq!(driver.read(sector, 512).unwrap(), pattern(42, sector));
    }
    assert!(matches!(
        driver.write(SECTORS, &pattern(1, 1)),
        Err(LoadError::Status(1))
    ));
}

#[test]
fn load_generator_round_trips_against_sealvm_blk_and_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let volume = format!(
        "v={},journal={}",
        image.display(),
        dir.path().join("j").display()
    );
    let _blk = Background::sealvm_blk(&volume, &socket, None).unwrap();
    round_trip(&mut BlkDriver::connect(&socket, Duration::from_secs(10)).unwrap());

    let peer_image = dir.path().join("peer.raw");
    std::fs::File::create(&peer_image)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let peer_socket = dir.path().join("qsd.sock");
    let _qsd =
        Background::qemu_storage_daemon(&peer_image, &peer_socket).expect("qemu-storage-daemon");
    round_trip(&mut BlkDriver::connect(&peer_socket, Duration::from_secs(10)).unwrap());
    let data = std::fs::read(&peer_image).unwrap();
    assert_eq!(&data[7 * 512..8 * 512], &pattern(42, 7)[..]);
}

/// xorshift64*, seeded from the clock; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn flushed_writes_survive_sigkill_at_random_moments() {
    sigkill_rounds("");
}

/// The same with small segments and a byte limit, so segments close and old history is
/// folded into the folded base while the backend is killed: a kill can land in the middle
/// of a fold.
#[test]
fn flushed_writes_survive_sigkill_while_history_is_folded() {
    sigkill_rounds(",segment-size=8K,retain-bytes=24K");
}

fn sigkill_rounds(options: &str) {
    let seed = std::env::var("SEALVM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (set SEALVM_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let journal = dir.path().join("j");
    let socket = dir.path().join("blk.sock");
    let volume = format!(
        "v={},journal={}{options}",
        image.display(),
        journal.display()
    );

    // What each sector may hold: the value a completed flush covered, plus values written
    // after that flush (acknowledged but not yet durable: they may or may not survive).
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut pending: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut tag = 0u64;
    let mut kills = 0;
    for round in 0..25 {
        let mut backend = Background::sealvm_blk(&volume, &socket, None).unwrap();
        let mut driver = BlkDriver::connect(&socket, Duration::from_secs(5)).unwrap();
        // Everything a flush acknowledged is there; nothing else appeared.
        let chunk = (sealvm_testkit::loadgen::MAX_REQUEST_BYTES / 512) as u64;
        let mut image = Vec::with_capacity((SECTORS * 512) as usize);
        for first in (0..SECTORS).step_by(chunk as usize) {
            image.extend(
                driver
                    .read(first, (chunk.min(SECTORS - first) * 512) as usize)
                    .unwrap(),
            );
        }
        for sector in 0..SECTORS {
            let data = &image[(sector * 512) as usize..((sector + 1) * 512) as usize];
            let allowed: Vec<u64> = std::iter::once(*durable.get(&sector).unwrap_or(&0))
                .chain(pending.get(&sector).into_iter().flatten().copied())
                .collect();
            let found = allowed.iter().find(|&&t| {
                if t == 0 {
                    data.iter().all(|&b| b == 0)
                } else {
                    data == pattern(t, sector).as_slice()
                }
            });
            let Some(&found) = found else {
                panic!("round {round}: sector {sector} holds data no acknowledged write put there (allowed tags {allowed:?}, seed {seed})");
            };
            durable.insert(sector, found);
        }
        pending.clear();
        let scan = sealvm_blk::journal::scan(&journal, |_, _, _| true).unwrap();
        assert_eq!(
            scan.dropped_len, 0,
            "round {round}: the journal still has a torn tail after restart"
        );

        // Write with a flush every few writes until the backend is killed mid-stream.
        let kill_after = Duration::from_millis(20 + rng.next() % 150);
        let started = Instant::now();
        let mut since_flush: Vec<(u64, u64)> = Vec::new();
        loop {
            if started.elapsed() >= kill_after {
                backend.kill(); // SIGKILL
                kills += 1;
            }
            tag += 1;
            let sector = rng.next() % SECTORS;
            match driver.write(sector, &pattern(tag, sector)) {
                Ok(()) => {
                    pending.entry(sector).or_default().push(tag);
                    since_flush.push((sector, tag));
                }
                Err(_) => {
                    // Unacknowledged: it may still have reached the journal.
                    pending.entry(sector).or_default().push(tag);
                    break;
                }
            }
            if since_flush.len() > (rng.next() % 8) as usize {
                match driver.flush() {
                    Ok(()) => {
                        for (sector, t) in since_flush.drain(..) {
                            durable.insert(sector, t);
                            let later = pending.entry(sector).or_default();
                            later.retain(|&p| p > t);
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        drop(driver);
        drop(backend);
    }
    assert!(kills >= 25, "the backend was killed only {kills} times");
    if !options.is_empty() {
        let folded = sealvm_blk::journal::read_state(&journal).unwrap().base_seq;
        assert!(folded > 0, "nothing was folded during the run");
        assert!(
            std::fs::read(dir.path().join("vol.raw"))
                .unwrap()
                .iter()
                .all(|&b| b == 0),
            "the volume's image was written"
        );
    }
}

#[test]
fn a_frontend_that_reconnects_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let _blk = Background::sealvm_blk(&format!("v={}", image.display()), &socket, None).unwrap();
    for round in 0..3u64 {
        let mut driver = BlkDriver::connect(&socket, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connection {round}: {e:?}"));
        if round > 0 {
            assert_eq!(
                driver.read(round - 1, 512).unwrap(),
                pattern(round - 1, round - 1)
            );
        }
        driver.write(round, &pattern(round, round)).unwrap();
        driver.flush().unwrap();
    }
}
