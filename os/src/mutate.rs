//! Seeded byte mutations, for the mutation runs CI gives every decoder of untrusted bytes
//! (journal segments, the inflight region, vhost-user framing, the replication stream).
//!
//! A run takes one good input, damages copies of it in a few ways (flip a bit, cut the tail,
//! overwrite a run of bytes, splice in a piece of the good input elsewhere) and checks the
//! decoder's promises on each. The generator is a fixed-seed xorshift, so a failing input
//! comes back on every run.

/// What a [`Mutator`] may do to an input.
#[derive(Clone, Copy, Debug)]
pub struct Damage {
    /// At most this many damaging steps per input (at least one is taken).
    pub max_steps: u64,
    /// The byte an overwrite writes.
    pub fill: u8,
    /// How many bytes an overwrite covers at most.
    pub fill_len: usize,
    /// Whether a step may splice a piece of the good input in at a random place.
    pub splice: bool,
}

/// A seeded xorshift64 generator and the damage it does.
#[derive(Clone, Debug)]
pub struct Mutator {
    state: u64,
}

impl Mutator {
    /// A generator that starts from `seed` (a zero seed, which xorshift cannot leave, is
    /// replaced by a fixed non-zero one).
    pub fn new(seed: u64) -> Self {
        let state = if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        };
        Mutator { state }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A number in `0..bound`; `bound` must not be zero.
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    /// A copy of `good` with `damage` done to it.
    pub fn mutated(&mut self, good: &[u8], damage: Damage) -> Vec<u8> {
        let mut bytes = good.to_vec();
        let kinds = if damage.splice { 4 } else { 3 };
        let steps = self.next_u64() % damage.max_steps.max(1) + 1;
        for _ in 0..steps {
            if bytes.is_empty() {
                break;
            }
            let at = self.below(bytes.len());
            match self.below(kinds) {
                0 => bytes[at] ^= 1 << self.below(8),
                1 => bytes.truncate(at),
                2 => bytes[at..]
                    .iter_mut()
                    .take(damage.fill_len)
                    .for_each(|b| *b = damage.fill),
                _ => {
                    let from = self.below(good.len().max(1));
                    let len = self.below(200);
                    let piece = good.get(from..(from + len).min(good.len()));
                    bytes.splice(at..at, piece.unwrap_or_default().iter().copied());
                }
            }
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Damage = Damage {
        max_steps: 4,
        fill: 0,
        fill_len: 64,
        splice: true,
    };

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let good: Vec<u8> = (0..=255).collect();
        let mut a = Mutator::new(7);
        let mut b = Mutator::new(7);
        for _ in 0..100 {
            assert_eq!(a.mutated(&good, ALL), b.mutated(&good, ALL));
        }
    }

    #[test]
    fn every_input_is_damaged_and_empty_inputs_stay_empty() {
        let good: Vec<u8> = (0..=255).collect();
        let mut mutator = Mutator::new(0);
        let changed = (0..200)
            .filter(|_| mutator.mutated(&good, ALL) != good)
            .count();
        // A bit flip always changes the input; a cut at 0..len, an overwrite with bytes
        // already there or an empty splice may not, but most inputs must differ.
        assert!(changed > 150, "only {changed} of 200 inputs were damaged");
        assert!(mutator.mutated(&[], ALL).is_empty());
    }
}
