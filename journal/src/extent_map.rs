//! One extent map for every reader of a journal: for each written range of sectors (an
//! extent, not a sector), where its newest data lies. The volume's index, `pit restore`,
//! image access and (next) backups all use it.
//!
//! [`ExtentMap`] is the map at one point: non-overlapping extents keyed by their first
//! sector, each naming a [`Source`]: data in a segment, or zeroes (a zero extent, which has
//! no data behind it). A sector that no extent covers reads from the base. An entry costs
//! 20 bytes plus the B-tree's overhead, well under 64 bytes per extent (the
//! `extent_memory` test measures it).
//!
//! [`Timeline`] holds the changes in seq order and moves a map between points in time at a
//! cost that follows the distance, not the history: forward it applies the changes
//! between the two points; backward it undoes them, putting back the pieces each change
//! covered when it was first applied. It also answers which extents changed between two
//! points ([`Timeline::changed_between`]).

use std::collections::BTreeMap;

/// Bytes per sector.
pub const SECTOR: u64 = 512;

/// Marks a zero extent in an entry's offset (data offsets are 8-aligned, never this).
const ZERO_OFFSET: u32 = u32::MAX;

/// Where an extent's data lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// In segment `segment` (a number the map's owner gives its segments), from byte
    /// `offset` on, one sector after another.
    Data {
        /// The owner's number for the segment.
        segment: u32,
        /// Byte offset of the extent's first sector in the segment.
        offset: u32,
    },
    /// Zeroes, written by a zero extent record of segment `segment`.
    Zero {
        /// The owner's number for the segment holding the record.
        segment: u32,
    },
}

impl Source {
    /// The segment the source's record lies in.
    pub fn segment(&self) -> u32 {
        match *self {
            Source::Data { segment, .. } | Source::Zero { segment } => segment,
        }
    }

    /// The source of the part that starts `sectors` sectors into this one.
    fn advanced(self, sectors: u64) -> Source {
        match self {
            Source::Data { segment, offset } => Source::Data {
                segment,
                // Data extents come from one record of at most 64 MiB in a segment of at
                // most 1 GiB, so the offset stays below 2^32.
                offset: (u64::from(offset) + sectors * SECTOR).min(u64::from(u32::MAX - 1)) as u32,
            },
            zero => zero,
        }
    }

    fn pack(self) -> (u32, u32) {
        match self {
            Source::Data { segment, offset } => (segment, offset),
            Source::Zero { segment } => (segment, ZERO_OFFSET),
        }
    }

    fn unpack(segment: u32, offset: u32) -> Source {
        if offset == ZERO_OFFSET {
            Source::Zero { segment }
        } else {
            Source::Data { segment, offset }
        }
    }
}

/// A range of sectors and where its data lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First sector.
    pub start: u64,
    /// Number of sectors.
    pub sectors: u64,
    /// Where the data of `start` lies (the rest follows it).
    pub source: Source,
}

impl Extent {
    /// One past the last sector.
    pub fn end(&self) -> u64 {
        self.start + self.sectors
    }
}

/// An entry: 12 bytes beside its 8-byte key.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sectors: u32,
    segment: u32,
    offset: u32,
}

impl Entry {
    fn extent(&self, start: u64) -> Extent {
        Extent {
            start,
            sectors: u64::from(self.sectors),
            source: Source::unpack(self.segment, self.offset),
        }
    }
}

/// Non-overlapping extents: where each written range's newest data lies.
#[derive(Debug, Clone, Default)]
pub struct ExtentMap {
    entries: BTreeMap<u64, Entry>,
}

impl ExtentMap {
    /// An empty map: everything reads from the base.
    pub fn new() -> Self {
        ExtentMap::default()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no extent is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every extent, in sector order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.entries
            .iter()
            .map(|(&start, entry)| entry.extent(start))
    }

    /// Maps `sectors` sectors from `start` to `source`, replacing what was there; calls
    /// `covered` with each piece it replaced (clipped to the range).
    pub fn insert_with(
        &mut self,
        start: u64,
        sectors: u64,
        source: Source,
        covered: &mut dyn FnMut(Extent),
    ) {
        self.remove_with(start, sectors, covered);
        let mut at = 0;
        while at < sectors {
            let n = (sectors - at).min(u64::from(u32::MAX));
            let (segment, offset) = source.advanced(at).pack();
            self.entries.insert(
                start + at,
                Entry {
                    sectors: n as u32,
                    segment,
                    offset,
                },
            );
            at += n;
        }
    }

    /// Maps `sectors` sectors from `start` to `source`, replacing what was there.
    pub fn insert(&mut self, start: u64, sectors: u64, source: Source) {
        self.insert_with(start, sectors, source, &mut |_| {});
    }

    /// Unmaps `sectors` sectors from `start` (they read from the base again); calls
    /// `covered` with each piece removed.
    pub fn remove_with(&mut self, start: u64, sectors: u64, covered: &mut dyn FnMut(Extent)) {
        let end = start.saturating_add(sectors);
        if sectors == 0 {
            return;
        }
        // An extent that starts before the range and reaches into it: keep its head.
        if let Some((&key, &entry)) = self.entries.range(..start).next_back() {
            let extent = entry.extent(key);
            if extent.end() > start {
                self.entries.get_mut(&key).expect("just found").sectors = (start - key) as u32;
                covered(clip(extent, start, end));
                if extent.end() > end {
                    self.put(tail(extent, end));
                }
            }
        }
        // Extents that start inside the range: drop them, keeping a tail past its end.
        let inside: Vec<u64> = self.entries.range(start..end).map(|(&k, _)| k).collect();
        for key in inside {
            let Some(entry) = self.entries.remove(&key) else {
                continue;
            };
            let extent = entry.extent(key);
            covered(clip(extent, start, end));
            if extent.end() > end {
                self.put(tail(extent, end));
            }
        }
    }

    fn put(&mut self, extent: Extent) {
        let (segment, offset) = extent.source.pack();
        self.entries.insert(
            extent.start,
            Entry {
                sectors: extent.sectors as u32,
                segment,
                offset,
            },
        );
    }

    /// The extents that overlap `sectors` sectors from `start`, clipped to that range, in
    /// order; sectors between them read from the base.
    pub fn overlapping(&self, start: u64, sectors: u64) -> impl Iterator<Item = Extent> + '_ {
        let end = start.saturating_add(sectors);
        let head = self
            .entries
            .range(..start)
            .next_back()
            .map(|(&k, e)| e.extent(k))
            .filter(|e| e.end() > start);
        head.into_iter()
            .chain(self.entries.range(start..end).map(|(&k, e)| e.extent(k)))
            .map(move |e| clip(e, start, end))
    }

    /// Keeps only the extents for which `keep` is true (folding drops the extents whose
    /// data moved into the folded base).
    pub fn retain(&mut self, mut keep: impl FnMut(&Extent) -> bool) {
        self.entries
            .retain(|&start, entry| keep(&entry.extent(start)));
    }
}

/// The part of `extent` inside [start, end).
fn clip(extent: Extent, start: u64, end: u64) -> Extent {
    let from = extent.start.max(start);
    let to = extent.end().min(end);
    Extent {
        start: from,
        sectors: to.saturating_sub(from),
        source: extent.source.advanced(from - extent.start),
    }
}

/// The part of `extent` from `at` on.
fn tail(extent: Extent, at: u64) -> Extent {
    clip(extent, at, extent.end())
}

/// One change to the volume: a write or a zero extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The record's seq.
    pub seq: u64,
    /// What it maps.
    pub extent: Extent,
}

/// The changes of a journal in seq order, and a map that moves between points in time.
#[derive(Debug, Default)]
pub struct Timeline {
    changes: Vec<Change>,
    /// What each change covered when first applied: `undo[undo_start[i]..undo_start[i+1]]`
    /// for change i; known for the first `undo_start.len() - 1` changes.
    undo: Vec<Extent>,
    undo_start: Vec<usize>,
    /// Changes `[..applied]` are in `map`.
    applied: usize,
    map: ExtentMap,
    /// The point the map shows.
    seq: u64,
}

impl Timeline {
    /// A timeline with no changes; its map shows the base.
    pub fn new() -> Self {
        Timeline {
            undo_start: vec![0],
            ..Timeline::default()
        }
    }

    /// Appends a change; its seq must follow every change before it.
    pub fn push(&mut self, change: Change) {
        debug_assert!(self.changes.last().is_none_or(|c| c.seq < change.seq));
        self.changes.push(change);
    }

    /// The newest seq of a change, 0 when there is none.
    pub fn last_seq(&self) -> u64 {
        self.changes.last().map_or(0, |c| c.seq)
    }

    /// The point in time the map shows.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The map as of [`Timeline::seq`].
    pub fn map(&self) -> &ExtentMap {
        &self.map
    }

    /// Moves the map to the point after record `seq`; returns the number of changes it
    /// applied or undid.
    pub fn seek(&mut self, seq: u64) -> usize {
        let target = self.changes.partition_point(|c| c.seq <= seq);
        let visited = target.abs_diff(self.applied);
        while self.applied < target {
            let i = self.applied;
            let change = self.changes[i];
            let extent = change.extent;
            if i + 1 == self.undo_start.len() {
                let undo = &mut self.undo;
                self.map
                    .insert_with(extent.start, extent.sectors, extent.source, &mut |piece| {
                        undo.push(piece)
                    });
                self.undo_start.push(self.undo.len());
            } else {
                self.map.insert(extent.start, extent.sectors, extent.source);
            }
            self.applied += 1;
        }
        while self.applied > target {
            self.applied -= 1;
            let extent = self.changes[self.applied].extent;
            self.map
                .remove_with(extent.start, extent.sectors, &mut |_| {});
            let (from, to) = (
                self.undo_start[self.applied],
                self.undo_start[self.applied + 1],
            );
            for piece in &self.undo[from..to] {
                self.map.insert(piece.start, piece.sectors, piece.source);
            }
        }
        self.seq = seq;
        visited
    }

    /// The ranges (first sector, sectors) changed by records after `from` up to and
    /// including `to`, merged and in order: what a backup between two points copies.
    pub fn changed_between(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let (low, high) = (from.min(to), from.max(to));
        let start = self.changes.partition_point(|c| c.seq <= low);
        let end = self.changes.partition_point(|c| c.seq <= high);
        let mut ranges: Vec<(u64, u64)> = self.changes[start..end]
            .iter()
            .map(|c| (c.extent.start, c.extent.end()))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged.into_iter().map(|(s, e)| (s, e - s)).collect()
    }

    /// The number of changes held.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// True when no change is held.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECTORS: u64 = 64;

    /// A sector's expected content in the naive model: base, zero from seq, or data of seq
    /// at its `index`-th sector.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Cell {
        Base,
        Zero(u64),
        Data(u64, u64),
    }

    #[derive(Debug, Clone, Copy)]
    struct Op {
        start: u64,
        sectors: u64,
        zero: bool,
    }

    fn op() -> impl Strategy<Value = Op> {
        (0..SECTORS, 1..24u64, prop::bool::weighted(0.25)).prop_map(|(start, len, zero)| Op {
            start,
            sectors: len.min(SECTORS - start),
            zero,
        })
    }

    /// The change seq `seq` makes: its data lies in "segment" seq, sector i at i * 512.
    fn change(seq: u64, op: &Op) -> Change {
        let source = if op.zero {
            Source::Zero {
                segment: seq as u32,
            }
        } else {
            Source::Data {
                segment: seq as u32,
                offset: 0,
            }
        };
        Change {
            seq,
            extent: Extent {
                start: op.start,
                sectors: op.sectors,
                source,
            },
        }
    }

    fn model(ops: &[Op], through: u64) -> Vec<Cell> {
        let mut cells = vec![Cell::Base; SECTORS as usize];
        for (i, op) in ops.iter().enumerate().take(through as usize) {
            let seq = i as u64 + 1;
            for s in op.start..op.start + op.sectors {
                cells[s as usize] = if op.zero {
                    Cell::Zero(seq)
                } else {
                    Cell::Data(seq, s - op.start)
                };
            }
        }
        cells
    }

    fn read(map: &ExtentMap) -> Vec<Cell> {
        let mut cells = vec![Cell::Base; SECTORS as usize];
        let mut last_end = 0;
        for extent in map.overlapping(0, SECTORS) {
            assert!(extent.start >= last_end, "extents overlap");
            last_end = extent.end();
            for i in 0..extent.sectors {
                cells[(extent.start + i) as usize] = match extent.source {
                    Source::Zero { segment } => Cell::Zero(u64::from(segment)),
                    Source::Data { segment, offset } => {
                        Cell::Data(u64::from(segment), u64::from(offset) / SECTOR + i)
                    }
                };
            }
        }
        cells
    }

    proptest! {
        #[test]
        fn the_map_reads_like_a_per_sector_model(ops in prop::collection::vec(op(), 0..60)) {
            let mut map = ExtentMap::new();
            for (i, op) in ops.iter().enumerate() {
                let c = change(i as u64 + 1, op);
                map.insert(c.extent.start, c.extent.sectors, c.extent.source);
            }
            prop_assert_eq!(read(&map), model(&ops, ops.len() as u64));
            prop_assert!(map.len() <= 2 * ops.len() + 1);
            // A read of any window sees the same as the whole.
            let whole = read(&map);
            for start in [0, 7, 31] {
                for extent in map.overlapping(start, 9) {
                    prop_assert!(extent.start >= start && extent.end() <= start + 9);
                    let cell = whole[extent.start as usize];
                    let expected = match extent.source {
                        Source::Zero { segment } => Cell::Zero(u64::from(segment)),
                        Source::Data { segment, offset } => {
                            Cell::Data(u64::from(segment), u64::from(offset) / SECTOR)
                        }
                    };
                    prop_assert_eq!(cell, expected);
                }
            }
        }

        #[test]
        fn the_map_at_any_seq_and_the_changes_between_match_the_model(
            ops in prop::collection::vec(op(), 0..50),
            seeks in prop::collection::vec(0..55u64, 1..12),
        ) {
            let mut timeline = Timeline::new();
            for (i, op) in ops.iter().enumerate() {
                timeline.push(change(i as u64 + 1, op));
            }
            let mut previous = 0;
            for &seq in &seeks {
                let visited = timeline.seek(seq);
                let last = ops.len() as u64;
                prop_assert_eq!(visited as u64, seq.min(last).abs_diff(previous.min(last)));
                prop_assert_eq!(read(timeline.map()), model(&ops, seq));
                // Changed between: exactly the sectors some record in (previous, seq] wrote.
                let (low, high) = (previous.min(seq), previous.max(seq));
                let mut expected = vec![false; SECTORS as usize];
                for (i, op) in ops.iter().enumerate() {
                    let s = i as u64 + 1;
                    if s > low && s <= high {
                        for x in op.start..op.start + op.sectors {
                            expected[x as usize] = true;
                        }
                    }
                }
                let mut found = vec![false; SECTORS as usize];
                let ranges = timeline.changed_between(previous, seq);
                for pair in ranges.windows(2) {
                    prop_assert!(pair[0].0 + pair[0].1 < pair[1].0, "ranges not merged");
                }
                for (start, n) in ranges {
                    for x in start..start + n {
                        found[x as usize] = true;
                    }
                }
                prop_assert_eq!(found, expected);
                previous = seq;
            }
        }

        #[test]
        fn folding_drops_extents_whose_data_moved_into_the_base(
            ops in prop::collection::vec(op(), 0..50),
            fold in 0..50u64,
        ) {
            let mut map = ExtentMap::new();
            for (i, op) in ops.iter().enumerate() {
                let c = change(i as u64 + 1, op);
                map.insert(c.extent.start, c.extent.sectors, c.extent.source);
            }
            // Records up to `fold` go into the base; the map forgets them.
            map.retain(|e| u64::from(e.source.segment()) > fold);
            let base = model(&ops, fold);
            let read_through: Vec<Cell> = read(&map)
                .into_iter()
                .zip(base)
                .map(|(mapped, base)| if mapped == Cell::Base { base } else { mapped })
                .collect();
            prop_assert_eq!(read_through, model(&ops, ops.len() as u64));
        }
    }

    #[test]
    fn a_whole_device_zero_extent_is_one_entry() {
        let mut map = ExtentMap::new();
        for i in 0..1000 {
            map.insert(
                i * 8,
                8,
                Source::Data {
                    segment: 0,
                    offset: (i * 4096) as u32,
                },
            );
        }
        let tib_sectors = (1u64 << 40) / SECTOR;
        map.insert(0, tib_sectors, Source::Zero { segment: 1 });
        assert_eq!(map.len(), 1);
        assert_eq!(map.iter().next().unwrap().sectors, tib_sectors);
    }
}
