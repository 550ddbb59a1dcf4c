//! The virtio-blk feature bits and configuration space (virtio 1.2, section 5.2.4).
//!
//! Layout of the configuration space, little-endian, byte offsets:
//! `0` capacity u64 (sectors) · `8` size_max u32 · `12` seg_max u32 · `16` geometry
//! (cylinders u16, heads u8, sectors u8) · `20` blk_size u32 · `24` physical_block_exp u8 ·
//! `25` alignment_offset u8 · `26` min_io_size u16 · `28` opt_io_size u32 · `32` writeback u8
//! · `33` unused u8 · `34` num_queues u16 · `36` max_discard_sectors u32 · `40`
//! max_discard_seg u32 · `44` discard_sector_alignment u32 · `48` max_write_zeroes_sectors
//! u32 · `52` max_write_zeroes_seg u32 · `56` write_zeroes_may_unmap u8 · `57..60` unused.

use crate::request::Limits;
use crate::SECTOR_SIZE;

/// virtio-blk and transport feature bits.
pub struct Features;

impl Features {
    /// Maximum size of any single segment is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// Device exports information on optimal I/O alignment.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// Device can toggle its cache between writeback and writethrough modes.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// Device supports multiqueue.
    pub const MQ: u64 = 1 << 12;
    /// Device can support discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Device can support write zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
    /// Used/available event index (transport feature).
    pub const EVENT_IDX: u64 = 1 << 29;
    /// Indirect descriptors (transport feature).
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// Virtio 1.x device (transport feature).
    pub const VERSION_1: u64 = 1 << 32;

    /// The features every sealvm virtio-blk device offers for `limits`, whatever its
    /// transport: virtio 1, event index, flush, block size, segment limits, topology, and
    /// read-only or discard and write-zeroes. A transport adds its own (indirect
    /// descriptors, a writable cache mode, multiqueue, vhost-user bits).
    pub fn for_limits(limits: &Limits) -> u64 {
        let common = Self::VERSION_1
            | Self::EVENT_IDX
            | Self::FLUSH
            | Self::BLK_SIZE
            | Self::SEG_MAX
            | Self::SIZE_MAX
            | Self::TOPOLOGY;
        if limits.read_only {
            common | Self::RO
        } else {
            common | Self::DISCARD | Self::WRITE_ZEROES
        }
    }
}

/// Size in bytes of the configuration space this crate lays out.
pub const CONFIG_SPACE_LEN: usize = 60;

/// The values a device presents in its configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest segment in bytes.
    pub size_max: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// Write-back cache enabled (1) or write-through (0).
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most discard segments in one request.
    pub max_discard_seg: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments in one request.
    pub max_write_zeroes_seg: u32,
}

impl ConfigSpace {
    /// The configuration space of a device with `limits` and `num_queues` request queues,
    /// its cache in write-back (`writeback`) or write-through mode. Every limit the driver
    /// reads comes from `limits`, the same values the request parser enforces: `size_max`
    /// is the most data in one request (a larger segment could not be served anyway),
    /// `seg_max` the data segments (the chain less header and status).
    pub fn from_limits(limits: &Limits, num_queues: u16, writeback: bool) -> Self {
        ConfigSpace {
            capacity_sectors: limits.capacity_sectors,
            size_max: u32::try_from(limits.max_data_bytes).unwrap_or(u32::MAX),
            seg_max: u32::try_from(limits.max_segments.saturating_sub(2)).unwrap_or(u32::MAX),
            blk_size: SECTOR_SIZE as u32,
            writeback: u8::from(writeback),
            num_queues,
            max_discard_sectors: limits.max_discard_sectors,
            max_discard_seg: limits.max_discard_segments,
            max_write_zeroes_sectors: limits.max_discard_sectors,
            max_write_zeroes_seg: limits.max_discard_segments,
        }
    }

    /// The configuration space as the driver reads it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // Topology: one logical block per physical block, no offset, 4 KiB I/O hints.
        b[26..28].copy_from_slice(&((4096 / self.blk_size.max(1)) as u16).to_le_bytes());
        b[28..32].copy_from_slice(&(4096 / self.blk_size.max(1)).to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&1u32.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = 1;
        b
    }

    /// Applies a driver write to the configuration space; only `writeback` is writable.
    /// Returns true when the write changed the cache mode.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        if offset == 32 && data.len() == 1 && data[0] <= 1 && data[0] != self.writeback {
            self.writeback = data[0];
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn config_bytes_come_from_the_limits_the_parser_enforces() {
        let limits = Limits::for_capacity(2048, false);
        let bytes = ConfigSpace::from_limits(&limits, 4, true).to_bytes();
        assert_eq!(u64::from_le_bytes(bytes[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32_at(&bytes, 8), 4 << 20, "size_max");
        assert_eq!(u64::from(u32_at(&bytes, 8)), limits.max_data_bytes);
        assert_eq!(u32_at(&bytes, 12), 128, "seg_max");
        assert_eq!(u32_at(&bytes, 20), 512, "blk_size");
        assert_eq!(bytes[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes([bytes[34], bytes[35]]), 4, "num_queues");
        assert_eq!(u32_at(&bytes, 36), limits.max_discard_sectors);
        assert_eq!(u32_at(&bytes, 40), 32, "max_discard_seg");
        assert_eq!(u32_at(&bytes, 48), limits.max_discard_sectors);
        assert_eq!(u32_at(&bytes, 52), 32, "max_write_zeroes_seg");
        let write_through = ConfigSpace::from_limits(&limits, 1, false).to_bytes();
        assert_eq!(write_through[32], 0);
    }

    #[test]
    fn read_only_devices_offer_no_discard_or_write_zeroes() {
        let read_only = Features::for_limits(&Limits::for_capacity(8, true));
        assert_ne!(read_only & Features::RO, 0);
        assert_eq!(read_only & (Features::DISCARD | Features::WRITE_ZEROES), 0);
        let writable = Features::for_limits(&Limits::for_capacity(8, false));
        assert_eq!(writable & Features::RO, 0);
        assert_ne!(writable & Features::DISCARD, 0);
        assert_ne!(writable & Features::WRITE_ZEROES, 0);
    }
}
