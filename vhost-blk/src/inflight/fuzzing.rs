//! The inflight region's checks and the connection's message framing on arbitrary bytes:
//! what the cargo-fuzz targets `inflight_region` and `vhost_user_framing` run
//! (vhost-blk/fuzz). A frontend writes both, so every byte is untrusted. A crash found once
//! is replayed by adding its input to the tests below.

use super::connection::{read_message, MAX_PAYLOAD};
use super::region::{memfd, queue_area_size};
use super::{InflightError, InflightRegion, QueueInflight};
use std::io::Write;
use std::num::Wrapping;

/// Reads `bytes` as: the queue count and queue size the frontend claims (u16 each), the
/// guest's used index (u16), then the region's contents. Maps them, starts every queue
/// and serves and completes what it would serve again. Panics only if a promise breaks:
/// heads served again are distinct and inside the queue, and the next available index
/// counts them.
pub fn start_on_region_bytes(bytes: &[u8]) -> Result<usize, InflightError> {
    let field = |at: usize| {
        bytes
            .get(at..at + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    let (num_queues, queue_size, used_idx) = (field(0) % 4, field(2) % 512, field(4));
    let contents = bytes.get(6..).unwrap_or_default();
    let mut file = memfd("sealvm-blk-fuzz").map_err(InflightError::Create)?;
    file.write_all(contents).map_err(InflightError::Create)?;
    let needed = usize::from(num_queues) * queue_area_size(queue_size.max(1));
    if contents.len() < needed {
        file.set_len(needed as u64).map_err(InflightError::Create)?;
    }
    let len = file.metadata().map_err(InflightError::Create)?.len();
    let region = InflightRegion::open(file, 0, len, num_queues, queue_size, 4, 512)?;
    let mut served = 0;
    for queue in 0..num_queues {
        let mut tracking = QueueInflight::new(region.clone(), queue)?;
        let next_avail = match tracking.start(queue_size, Wrapping(used_idx)) {
            Ok(next_avail) => next_avail,
            Err(_) => continue,
        };
        let heads: Vec<u16> = tracking.pending_resubmit().collect();
        assert_eq!(
            (next_avail - Wrapping(used_idx)).0 as usize,
            heads.len(),
            "the next available index counts the heads served again"
        );
        let mut seen = std::collections::HashSet::new();
        let mut used = Wrapping(used_idx);
        while let Some(head) = tracking.next_resubmit() {
            assert!(head < queue_size, "head {head} outside the queue");
            assert!(seen.insert(head), "head {head} served twice");
            tracking.completing(head)?;
            used += Wrapping(1);
            tracking.completed(head, used)?;
            served += 1;
        }
    }
    Ok(served)
}

/// Reads `bytes`, as a frontend would send them, as vhost-user messages until they end or
/// one is malformed; returns how many were whole. Panics only if a promise breaks: no
/// payload beyond the limit, and every byte is accounted for by the messages read.
pub fn frame_messages(bytes: &[u8]) -> Result<usize, InflightError> {
    let (reader, writer) =
        std::os::unix::net::UnixStream::pair().map_err(|source| InflightError::Connection {
            what: "socket pair",
            source,
        })?;
    let input = bytes.to_vec();
    let sender = std::thread::spawn(move || {
        let mut writer = writer;
        let _ = writer.write_all(&input);
    });
    let mut count = 0;
    let mut consumed = 0usize;
    let result = loop {
        match read_message(&reader) {
            Ok(Some(message)) => {
                assert!(message.payload.len() <= MAX_PAYLOAD);
                consumed += 12 + message.payload.len();
                assert!(consumed <= bytes.len(), "read more than was sent");
                let _ = message.request();
                count += 1;
            }
            Ok(None) => {
                assert_eq!(consumed, bytes.len(), "bytes left unread at a clean end");
                break Ok(count);
            }
            Err(error) => break Err(error),
        }
    };
    // Drain what is left so the sender finishes (closing the reader instead could raise
    // SIGPIPE in a fuzzing harness that does not ignore it).
    let _ = std::io::copy(&mut &reader, &mut std::io::sink());
    let _ = sender.join();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealvm_os::mutate::{Damage, Mutator};

    /// A region with heads 3 and 5 of an 8-descriptor queue in flight.
    fn region_bytes() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(1u16.to_le_bytes());
        bytes.extend(8u16.to_le_bytes());
        bytes.extend(10u16.to_le_bytes());
        let mut area = vec![0u8; queue_area_size(8)];
        area[8..10].copy_from_slice(&1u16.to_le_bytes());
        area[10..12].copy_from_slice(&8u16.to_le_bytes());
        area[14..16].copy_from_slice(&10u16.to_le_bytes());
        for (head, counter) in [(3usize, 4u64), (5, 2)] {
            let at = 16 + head * 16;
            area[at] = 1;
            area[at + 8..at + 16].copy_from_slice(&counter.to_le_bytes());
        }
        bytes.extend(area);
        bytes
    }

    /// A seeded mutation run, as CI runs it: flip, cut and zero bytes of a valid region
    /// and check the promises hold on every input.
    #[test]
    fn mutated_regions_never_break_the_promises() {
        let good = region_bytes();
        assert_eq!(start_on_region_bytes(&good).expect("good region"), 2);
        let mut mutator = Mutator::new(0x2545_f491_4f6c_dd1d);
        let damage = Damage {
            max_steps: 4,
            fill: 0xff,
            fill_len: 16,
            splice: false,
        };
        for _ in 0..2000 {
            let _ = start_on_region_bytes(&mutator.mutated(&good, damage));
        }
    }

    /// Seeded mutations of two well-formed messages through the framing.
    #[test]
    fn mutated_message_streams_never_break_the_framing() {
        let mut good = Vec::new();
        for (request, payload) in [(1u32, &[][..]), (32, &[7u8; 24][..])] {
            good.extend(request.to_le_bytes());
            good.extend(1u32.to_le_bytes());
            good.extend((payload.len() as u32).to_le_bytes());
            good.extend(payload);
        }
        assert_eq!(frame_messages(&good).expect("good stream"), 2);
        let mut mutator = Mutator::new(0x853c_49e6_748f_ea9b);
        let damage = Damage {
            max_steps: 1,
            fill: 0xff,
            fill_len: 4,
            splice: false,
        };
        for _ in 0..300 {
            let _ = frame_messages(&mutator.mutated(&good, damage));
        }
    }

    #[test]
    fn replayed_inputs_start_cleanly() {
        for input in [
            &b""[..],
            &[0xff; 6],
            &[1, 0, 0, 0, 0, 0],
            &[3, 0, 255, 1, 9, 9],
        ] {
            let _ = start_on_region_bytes(input);
        }
    }
}
