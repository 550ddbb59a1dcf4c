//! Fuzzes the bundle's headers: the LUKS1 phdr and the payload superblock.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sealvm_trust::bundle::luks1::fuzz_header(data);
    sealvm_trust::bundle::payload::fuzzing::superblock(data);
});
