//! Fuzzes the inflight region's checks (INFLIGHT_SHMFD) with arbitrary region bytes, as a
//! frontend may write them; see sealvm_blk::inflight::fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sealvm_blk::inflight::fuzzing::start_on_region_bytes(data);
});
