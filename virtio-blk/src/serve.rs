//! One descriptor chain, start to finish: turn it into segments, parse it, run it, answer
//! a refusal. Both transports (sealvm's virtio-mmio queue and sealvm-blk's vhost-user
//! workers) pop chains and publish used entries their own way and call
//! [`serve_descriptor_chain`] in between, so the two cannot drift apart in how they treat a
//! guest's request.

use crate::backend::BlockBackend;
use crate::request::{Limits, Rejected, Request, RequestError, Segment};
use std::ops::Deref;
use std::time::Instant;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// What became of a chain, for the caller's counters and logs.
pub enum Served<'a> {
    /// It parsed and ran (since `started`); `error` is set when it failed.
    Ran {
        /// The request.
        request: &'a Request,
        /// Why it failed, if it did (its status byte says so already).
        error: Option<RequestError>,
        /// When it started running.
        started: Instant,
    },
    /// It was refused before it ran; its status byte was answered where possible.
    Rejected(&'a Rejected),
}

/// The buffers of `chain` as [`Segment`]s, at most one more than `limits` allows (enough
/// for the parser to refuse the chain without collecting all of a huge one). A chain
/// whose descriptors cannot be read ends where reading stopped; the parser refuses what
/// is missing (no status byte, a short header).
pub fn chain_segments<M>(chain: &DescriptorChain<M>, limits: &Limits) -> Vec<Segment>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    chain
        .clone()
        .take(limits.max_segments.saturating_add(1))
        .map(|descriptor| Segment {
            addr: descriptor.addr().0,
            len: descriptor.len(),
            writable: descriptor.is_write_only(),
        })
        .collect()
}

/// [`serve_chain`] for a descriptor chain popped from a queue: its segments are
/// [`chain_segments`]. Returns the used length for the used ring.
pub fn serve_descriptor_chain<M, C, B>(
    mem: &M,
    chain: &DescriptorChain<C>,
    backend: &B,
    limits: &Limits,
    observe: impl FnOnce(Served<'_>),
) -> u32
where
    M: GuestMemory,
    C: Clone + Deref,
    C::Target: GuestMemory,
    B: BlockBackend + ?Sized,
{
    serve_chain(
        mem,
        &chain_segments(chain, limits),
        backend,
        limits,
        observe,
    )
}

/// Parses the chain made of `segments` against `limits`, runs it against `backend` and
/// returns the used length for the used ring. `observe` sees the outcome before the caller
/// publishes it, so it can count it or (write-through) make it durable first.
pub fn serve_chain<M: GuestMemory, B: BlockBackend + ?Sized>(
    mem: &M,
    segments: &[Segment],
    backend: &B,
    limits: &Limits,
    observe: impl FnOnce(Served<'_>),
) -> u32 {
    match Request::parse(mem, segments, limits) {
        Ok(request) => {
            let started = Instant::now();
            let (used, error) = request.execute(mem, backend, limits);
            observe(Served::Ran {
                request: &request,
                error,
                started,
            });
            used
        }
        Err(rejected) => {
            let used = rejected.answer(mem);
            observe(Served::Rejected(&rejected));
            used
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// `VRING_DESC_F_WRITE`: the device writes the buffer.
    const WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn descriptor(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn a_chain_becomes_segments_in_order_with_their_direction() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue
            .build_desc_chain(&[
                descriptor(0x10_0000, 16, 0),
                descriptor(0x20_0000, 4096, WRITE),
                descriptor(0x30_0000, 1, WRITE),
            ])
            .unwrap();
        let limits = Limits::for_capacity(64, false);
        assert_eq!(
            chain_segments(&chain, &limits),
            [
                Segment {
                    addr: 0x10_0000,
                    len: 16,
                    writable: false
                },
                Segment {
                    addr: 0x20_0000,
                    len: 4096,
                    writable: true
                },
                Segment {
                    addr: 0x30_0000,
                    len: 1,
                    writable: true
                },
            ]
        );
    }

    #[test]
    fn a_chain_longer_than_the_limits_is_cut_one_past_them() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, 256);
        let descriptors: Vec<_> = (0..200u64)
            .map(|i| descriptor(0x10_0000 + i * 0x1000, 512, WRITE))
            .collect();
        let chain = queue.build_desc_chain(&descriptors).unwrap();
        let limits = Limits::for_capacity(64, false);
        assert_eq!(
            chain_segments(&chain, &limits).len(),
            limits.max_segments + 1
        );
    }
}
