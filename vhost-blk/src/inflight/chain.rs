//! Reads a descriptor chain from its head index, for requests served again after a restart:
//! they are not in the available ring's unread part any more, so virtio-queue's iterator
//! (which starts from the available ring) cannot produce them.

use super::InflightError;
use sealvm_virtio_blk::Segment;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes of one split descriptor.
const DESC_SIZE: u64 = 16;

/// The buffers of the chain that starts at `head` in the descriptor table at `desc_table`
/// of a queue of `queue_size` descriptors, following indirect tables, as the device's
/// parser wants them. Every index and address comes from the driver and is checked; a
/// chain longer than its table (a loop) is refused.
pub fn chain_segments<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Segment>, InflightError> {
    let mut segments = Vec::new();
    let mut table = desc_table;
    let mut table_len = u32::from(queue_size);
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if index >= table_len {
            return Err(InflightError::BadChain { head });
        }
        steps += 1;
        if steps > table_len {
            return Err(InflightError::BadChain { head });
        }
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(InflightError::BadChain { head })?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|_| InflightError::BadChain { head })?;
        if desc.refers_to_indirect_table() {
            // An indirect table is the only descriptor of a direct chain's step and may not
            // nest.
            let len = desc.len();
            if indirect || len == 0 || u64::from(len) % DESC_SIZE != 0 {
                return Err(InflightError::BadChain { head });
            }
            indirect = true;
            table = GuestAddress(desc.addr().0);
            table_len = len / DESC_SIZE as u32;
            index = 0;
            steps = 0;
            continue;
        }
        segments.push(Segment {
            addr: desc.addr().0,
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(segments);
        }
        index = u32::from(desc.next());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const TABLE: u64 = 0x1000;
    const INDIRECT: u64 = 0x2000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory")
    }

    fn put(mem: &GuestMemoryMmap, table: u64, index: u64, desc: Descriptor) {
        mem.write_obj(desc, GuestAddress(table + index * DESC_SIZE))
            .expect("write");
    }

    #[test]
    fn a_direct_chain_reads_in_order() {
        let mem = memory();
        put(&mem, TABLE, 3, Descriptor::new(0x4000, 16, 1, 5));
        put(&mem, TABLE, 5, Descriptor::new(0x5000, 512, 1 | 2, 0));
        put(&mem, TABLE, 0, Descriptor::new(0x6000, 1, 2, 0));
        let segments = chain_segments(&mem, GuestAddress(TABLE), 8, 3).expect("chain");
        let got: Vec<_> = segments
            .iter()
            .map(|s| (s.addr, s.len, s.writable))
            .collect();
        assert_eq!(
            got,
            vec![(0x4000, 16, false), (0x5000, 512, true), (0x6000, 1, true)]
        );
    }

    #[test]
    fn an_indirect_chain_is_followed() {
        let mem = memory();
        put(&mem, TABLE, 2, Descriptor::new(INDIRECT, 48, 4, 0));
        put(&mem, INDIRECT, 0, Descriptor::new(0x4000, 16, 1, 1));
        put(&mem, INDIRECT, 1, Descriptor::new(0x5000, 4096, 1 | 2, 2));
        put(&mem, INDIRECT, 2, Descriptor::new(0x6000, 1, 2, 0));
        let segments = chain_segments(&mem, GuestAddress(TABLE), 8, 2).expect("chain");
        assert_eq!(segments.len(), 3);
        assert_eq!(segments[1].len, 4096);
    }

    #[test]
    fn loops_and_out_of_range_indexes_are_refused() {
        let mem = memory();
        put(&mem, TABLE, 1, Descriptor::new(0x4000, 16, 1, 2));
        put(&mem, TABLE, 2, Descriptor::new(0x4000, 16, 1, 1));
        assert!(chain_segments(&mem, GuestAddress(TABLE), 8, 1).is_err());
        put(&mem, TABLE, 4, Descriptor::new(0x4000, 16, 1, 9));
        assert!(chain_segments(&mem, GuestAddress(TABLE), 8, 4).is_err());
        assert!(chain_segments(&mem, GuestAddress(TABLE), 8, 8).is_err());
        // A table outside guest memory.
        assert!(chain_segments(&mem, GuestAddress(0xffff_0000), 8, 0).is_err());
        // Nested and empty indirect tables.
        put(&mem, TABLE, 6, Descriptor::new(INDIRECT, 16, 4, 0));
        put(&mem, INDIRECT, 0, Descriptor::new(INDIRECT, 16, 4, 0));
        assert!(chain_segments(&mem, GuestAddress(TABLE), 8, 6).is_err());
        put(&mem, TABLE, 7, Descriptor::new(INDIRECT, 0, 4, 0));
        assert!(chain_segments(&mem, GuestAddress(TABLE), 8, 7).is_err());
    }
}
