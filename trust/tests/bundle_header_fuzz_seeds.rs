//! The bundle_header fuzz target's entry points on a real header and on many mutations of it
//! (what `cargo fuzz run bundle_header` explores at length): no input may panic.

use sealvm_trust::bundle::luks1;
use sealvm_trust::bundle::payload::fuzzing;

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[test]
fn real_and_mutated_headers_never_panic_the_parsers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.svm");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    luks1::format(&file, b"secret", 1 << 20).unwrap();
    let real = std::fs::read(&path).unwrap()[..1024].to_vec();
    // The real header parses and round-trips.
    luks1::fuzz_header(&real);
    assert!(luks1::Header::parse(&real).is_ok());
    let mut state = 42u64;
    for _ in 0..20_000 {
        let mut input = real.clone();
        for _ in 0..1 + lcg(&mut state) % 8 {
            let at = (lcg(&mut state) as usize) % input.len();
            input[at] = lcg(&mut state) as u8;
        }
        let len = (lcg(&mut state) as usize) % (input.len() + 1);
        luks1::fuzz_header(&input[..len]);
        fuzzing::superblock(&input[..len.min(512)]);
    }
    // Superblocks with the right magic but wild fields, signed so the checks behind the
    // MAC run.
    for _ in 0..5_000 {
        let mut sb = vec![0u8; 512];
        for b in sb.iter_mut() {
            *b = lcg(&mut state) as u8;
        }
        sb[..8].copy_from_slice(b"SEALVMB\0");
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        fuzzing::superblock(&sb);
    }
}
