//! Arbitrary bytes as a replication connection: the receiver's decoder and stream checks
//! must refuse, never panic. The decoding lives in `sealvm_repl::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let piece = data.first().map_or(1, |&b| usize::from(b) + 1);
    let _ = sealvm_repl::fuzzing::receive_bytes(data, piece);
});
