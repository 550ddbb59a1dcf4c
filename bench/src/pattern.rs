//! The I/O patterns the block benchmarks drive, and where each puts its next request: one
//! list, so the same row means the same work whichever client drives it.

/// Bytes of the volume every block benchmark runs on.
pub const VOLUME_BYTES: u64 = 256 << 20;

/// One benchmarked I/O pattern.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// 4 KiB reads at random 4 KiB-aligned offsets, `depth` in flight.
    RandRead { depth: u16 },
    /// 4 KiB writes at random 4 KiB-aligned offsets, `depth` in flight.
    RandWrite { depth: u16 },
    /// 4 KiB random writes one at a time, a flush after every eighth.
    RandWriteFlush,
    /// 64 KiB writes one after the other, wrapping at the end of the volume.
    SeqWrite64k,
}

impl Pattern {
    /// The row's name.
    pub fn name(self) -> String {
        match self {
            Pattern::RandRead { depth } => format!("4K random read QD{depth}"),
            Pattern::RandWrite { depth } => format!("4K random write QD{depth}"),
            Pattern::RandWriteFlush => "4K random write QD1, flush every 8".into(),
            Pattern::SeqWrite64k => "64K sequential write QD1".into(),
        }
    }

    /// Requests kept in flight.
    pub fn depth(self) -> u16 {
        match self {
            Pattern::RandRead { depth } | Pattern::RandWrite { depth } => depth,
            Pattern::RandWriteFlush | Pattern::SeqWrite64k => 1,
        }
    }

    /// Bytes per request.
    pub fn request_bytes(self) -> usize {
        match self {
            Pattern::SeqWrite64k => 64 << 10,
            _ => 4096,
        }
    }
}

/// Where a pattern's next request goes: a fixed-seed random 4 KiB block, or the next 64 KiB.
pub struct Offsets {
    rng: sealvm_os::mutate::Mutator,
    sequential: u64,
}

impl Offsets {
    /// A fresh sequence (every run starts from the same seed, so backends see the same
    /// offsets).
    pub fn new() -> Offsets {
        Offsets {
            rng: sealvm_os::mutate::Mutator::new(0x9e37_79b9_7f4a_7c15),
            sequential: 0,
        }
    }

    /// The byte offset of `pattern`'s next request.
    pub fn next(&mut self, pattern: Pattern) -> u64 {
        match pattern {
            Pattern::SeqWrite64k => {
                let at = self.sequential;
                self.sequential = (self.sequential + (64 << 10)) % VOLUME_BYTES;
                at
            }
            _ => self.random_block(),
        }
    }

    /// A random 4 KiB-aligned byte offset in the volume.
    pub fn random_block(&mut self) -> u64 {
        (self.rng.next_u64() % (VOLUME_BYTES / 4096)) * 4096
    }
}
