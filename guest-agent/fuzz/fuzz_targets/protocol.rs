//! Fuzzes the agent's wire decoder with arbitrary byte streams split at arbitrary points.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sealvm_agent::protocol::fuzz_decoder(data);
});
