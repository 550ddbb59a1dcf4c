//! Fuzzes the helper disk's GPT and sealed-store parser with the input as a whole disk image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sealvm_trust::helper_partition::fuzzing::helper_disk(data);
});
