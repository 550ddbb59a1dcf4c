//! Fuzzes virtio-blk request parsing and execution with arbitrary chains and guest memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sealvm_virtio_blk::fuzzing::run_one(data);
});
