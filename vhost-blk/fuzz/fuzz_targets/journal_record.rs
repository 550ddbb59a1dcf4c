//! Fuzzes journal record decoding with arbitrary segment bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sealvm_blk::journal::format::fuzz_decode(data);
});
