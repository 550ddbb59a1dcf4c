//! One descriptor chain, start to finish: parse it, run it, answer a refusal. Both
//! transports (sealvm's virtio-mmio queue and sealvm-blk's vhost-user workers) pop chains
//! and publish used entries their own way and call [`serve_chain`] in between, so the two
//! cannot drift apart in how they treat a guest's request.

use crate::backend::BlockBackend;
use crate::request::{Limits, Rejected, Request, RequestError, Segment};
use std::time::Instant;
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
