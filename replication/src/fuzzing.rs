//! The receiver's decoding and checks on arbitrary bytes: what the cargo-fuzz target
//! `wire_stream` (replication/fuzz) runs, in an ordinary module so a crash found once is
//! replayed here as a unit test.

use crate::decoder::Decoder;
use crate::stream::{Accepted, StreamState};
use crate::wire::ShippedRecord;

/// What a receiver would do with `bytes` arriving on a connection, in pieces of
/// `piece` bytes: the records it would apply, in order. Never panics; stops at the first
/// refusal, as a receiver closes the connection there.
pub fn receive_bytes(bytes: &[u8], piece: usize) -> Vec<ShippedRecord> {
    let mut decoder = Decoder::new();
    let mut state = StreamState::new(None, 0, None);
    let mut applied = Vec::new();
    for chunk in bytes.chunks(piece.max(1)) {
        decoder.feed(chunk);
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => match state.accept(&message) {
                    Ok(Accepted::Record(record)) => applied.push(record.clone()),
                    Ok(_) => {}
                    Err(_) => return applied,
                },
                Ok(None) => break,
                Err(_) => return applied,
            }
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Hello, Message, Mode, ShippedRecord};
    use sealvm_journal::{RecordKind, Uuid};
    use sealvm_os::mutate::{Damage, Mutator};

    fn good_stream() -> (Vec<ShippedRecord>, Vec<u8>) {
        let mut messages = vec![Message::Hello(Hello {
            journal: Uuid([1; 16]),
            volume: Uuid([2; 16]),
            volume_bytes: 1 << 20,
            sector_bytes: 512,
            mode: Mode::Synchronous,
            name: "vol".into(),
        })];
        for seq in 1..=4 {
            messages.push(Message::Record(ShippedRecord {
                kind: RecordKind::Write,
                seq,
                time_ns: seq,
                offset: seq * 4096,
                payload: vec![seq as u8; 1024],
            }));
        }
        messages.push(Message::Record(ShippedRecord {
            kind: RecordKind::Bookmark,
            seq: 5,
            time_ns: 5,
            offset: 0,
            payload: b"before-upgrade".to_vec(),
        }));
        messages.push(Message::Commit { seq: 5 });
        let records = messages
            .iter()
            .filter_map(|m| match m {
                Message::Record(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        (records, messages.iter().flat_map(Message::encode).collect())
    }

    /// A seeded mutation run, as CI runs it: flip, cut, zero and splice bytes of a valid
    /// stream; the receiver never panics and never applies a record that was damaged.
    #[test]
    fn mutated_streams_never_break_the_receivers_promises() {
        let (records, good) = good_stream();
        assert_eq!(receive_bytes(&good, 7), records);
        let mut mutator = Mutator::new(0x2545_f491_4f6c_dd1d);
        let damage = Damage {
            max_steps: 4,
            fill: 0,
            fill_len: 64,
            splice: true,
        };
        for _ in 0..4000 {
            let bytes = mutator.mutated(&good, damage);
            let piece = mutator.below(300) + 1;
            // Whatever the damage, what is applied is a prefix of the good records, each
            // byte-identical: a damaged record fails its CRC, a spliced copy of an earlier
            // one is a replay, a skipped one leaves a gap.
            let applied = receive_bytes(&bytes, piece);
            assert_eq!(
                applied,
                records[..applied.len()],
                "a damaged stream applied a wrong record"
            );
        }
    }

    #[test]
    fn replayed_inputs_are_refused_cleanly() {
        for input in [
            &b""[..],
            b"SVRP",
            b"SVRP\x01\x00\x03\x00\xff\xff\xff\xff",
            &[0u8; 64],
        ] {
            assert!(receive_bytes(input, 3).is_empty());
        }
    }
}
