//! The helper_partition fuzz target's entry point on a real helper disk and on many
//! mutations of it (what `cargo fuzz run helper_partition` explores at length): no input may
//! panic or allocate beyond its size. Mutations hit the GPT header, the entry array and the
//! store headers; half of them re-sign the GPT checksums so the checks behind them run.

use sealvm_trust::helper_partition::{fuzzing, SealedPartition};

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

const LBA: usize = 512;

/// Recomputes the entry-array and header CRCs of the primary GPT in `image`.
fn resign(image: &mut [u8]) {
    let h = LBA;
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (count, size) = (
        le32(&image[h..], 80) as usize,
        le32(&image[h..], 84) as usize,
    );
    let at = le64(&image[h..], 72) as usize;
    if let Some(table) = at
        .checked_mul(LBA)
        .and_then(|start| Some((start, start.checked_add(count.checked_mul(size)?)?)))
        .and_then(|(start, end)| image.get(start..end))
    {
        let crc = crc32fast::hash(table);
        image[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
    }
    image[h + 16..h + 20].fill(0);
    let crc = crc32fast::hash(&image[h..h + 92]);
    image[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn real_and_mutated_helper_disks_never_panic_the_parser() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("helper.img");
    SealedPartition::init(&path, 1 << 20, 3 << 20).unwrap();
    let mut image = std::fs::read(&path).unwrap();
    fuzzing::helper_disk(&image);
    // The sealed partition starts at LBA 2048 (1 MiB); its halves at +0 and +512 KiB.
    let targets: [(usize, usize); 4] = [
        (LBA, 92),                     // primary GPT header
        (2 * LBA, 128),                // the first partition entry
        (1 << 20, 64),                 // store half A header
        ((1 << 20) + (512 << 10), 64), // store half B header
    ];
    let mut state = 7u64;
    for round in 0..20_000 {
        let original = image.clone_from_slice_ranges(&targets);
        let (base, len) = targets[(lcg(&mut state) as usize) % targets.len()];
        for _ in 0..1 + lcg(&mut state) % 6 {
            let at = base + (lcg(&mut state) as usize) % len;
            image[at] = lcg(&mut state) as u8;
        }
        // Sometimes put an extreme 64-bit value where the LBAs and lengths live.
        if round % 3 == 0 {
            let at = base + ((lcg(&mut state) as usize) % (len / 8)) * 8;
            let value = [u64::MAX, 1 << 62, 0, 1, 1 << 40][(lcg(&mut state) % 5) as usize];
            image[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        if round % 2 == 0 {
            resign(&mut image);
        }
        fuzzing::helper_disk(&image);
        // Truncations too.
        if round % 97 == 0 {
            let cut = (lcg(&mut state) as usize) % image.len();
            fuzzing::helper_disk(&image[..cut]);
        }
        image.restore_ranges(&targets, original);
    }
}

/// Saves and restores the mutated ranges, so each round starts from the real image without
/// copying 3 MiB.
trait Ranges {
    fn clone_from_slice_ranges(&self, ranges: &[(usize, usize)]) -> Vec<Vec<u8>>;
    fn restore_ranges(&mut self, ranges: &[(usize, usize)], saved: Vec<Vec<u8>>);
}

impl Ranges for Vec<u8> {
    fn clone_from_slice_ranges(&self, ranges: &[(usize, usize)]) -> Vec<Vec<u8>> {
        let mut saved: Vec<Vec<u8>> = ranges
            .iter()
            .map(|&(at, len)| self[at..at + len].to_vec())
            .collect();
        saved.push(self[LBA..LBA + 92].to_vec());
        saved
    }
    fn restore_ranges(&mut self, ranges: &[(usize, usize)], saved: Vec<Vec<u8>>) {
        for (&(at, len), bytes) in ranges.iter().zip(&saved) {
            self[at..at + len].copy_from_slice(bytes);
        }
        self[LBA..LBA + 92].copy_from_slice(&saved[ranges.len()]);
    }
}
