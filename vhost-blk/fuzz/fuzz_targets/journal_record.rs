//! Fuzzes the journal's segment scanner (record decoding and the torn-versus-damaged
//! decision) with arbitrary segment bytes; see sealvm_journal::fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sealvm_journal::fuzzing::scan_segment_bytes(data);
});
