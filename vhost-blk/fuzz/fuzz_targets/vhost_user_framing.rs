//! Fuzzes the framing of the vhost-user messages sealvm-blk reads from its frontend (the
//! connection that answers the inflight messages); see sealvm_blk::inflight::fuzzing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sealvm_blk::inflight::fuzzing::frame_messages(data);
});
