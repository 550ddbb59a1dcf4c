//! Converting a version-1 journal to version 2 (`sealvm-blk journal upgrade`).
