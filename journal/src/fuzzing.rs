//! The segment scanner on arbitrary bytes: what the cargo-fuzz target `segment_scan` runs
//! (vhost-blk/fuzz), and what a replication receiver will run on bytes from the network.
//! A crash found once is replayed by adding its input to the tests below.

use crate::format;
use crate::segment::{SegmentError, SegmentScanner};

/// Scans `bytes` as one segment: as version 2 from byte 64 when they start with a segment
/// header, as version 1 from byte 0 otherwise. Checks the scanner's own promises (records
/// in order and inside the bytes, the torn tail adding up) and panics only if one breaks.
pub fn scan_segment_bytes(bytes: &[u8]) -> Result<u64, SegmentError> {
    let (version, start, last_seq) = match format::decode_segment_header(bytes) {
        Ok(header) => (
            2,
            format::SEGMENT_HEADER_LEN as u64,
            header.first_seq.saturating_sub(1),
        ),
        Err(_) => (1, 0, 0),
    };
    let mut scanner = SegmentScanner::new(bytes, version, start, last_seq);
    let mut previous_end = start;
    let mut records = 0;
    while let Some((header, at)) = scanner.next_record()? {
        assert_eq!(at, previous_end, "records are contiguous");
        previous_end = at + format::record_len(header.len);
        assert!(
            previous_end <= bytes.len() as u64,
            "a record beyond the bytes"
        );
        assert_eq!(scanner.payload().len(), header.len as usize);
        records += 1;
    }
    let summary = scanner.summary();
    assert_eq!(summary.valid_len, previous_end);
    assert_eq!(summary.valid_len + summary.dropped_len, bytes.len() as u64);
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{NewRecord, RecordKind, SegmentHeader};
    use sealvm_os::mutate::{Damage, Mutator};

    fn segment() -> Vec<u8> {
        let identity = format::Identity {
            journal: format::Uuid([1; 16]),
            volume: format::Uuid([2; 16]),
            volume_bytes: 1 << 20,
            sector_bytes: 512,
        };
        let mut bytes = format::encode_segment_header(&SegmentHeader {
            identity,
            first_seq: 1,
        })
        .to_vec();
        for seq in 1..=4u64 {
            let kind = if seq == 3 {
                RecordKind::ZeroExtent
            } else {
                RecordKind::Write
            };
            let payload = if kind == RecordKind::ZeroExtent {
                4096u64.to_le_bytes().to_vec()
            } else {
                vec![seq as u8; 512]
            };
            let record = NewRecord {
                kind,
                seq,
                time_ns: seq,
                offset: 512 * seq,
                flags: 0,
            };
            bytes.extend(format::encode(&record, &payload));
            if seq == 2 {
                let end = bytes.len() as u64;
                let sync = NewRecord {
                    kind: RecordKind::Sync,
                    ..record
                };
                bytes.extend(format::encode(&sync, &end.to_le_bytes()));
            }
        }
        bytes
    }

    /// A seeded mutation run, as CI runs it: flip, cut and splice bytes of a valid segment
    /// and check the scanner keeps its promises on every input.
    #[test]
    fn mutated_segments_never_break_the_scanners_promises() {
        let good = segment();
        assert_eq!(scan_segment_bytes(&good).unwrap(), 5);
        let mut mutator = Mutator::new(0x9e37_79b9_7f4a_7c15);
        let damage = Damage {
            max_steps: 4,
            fill: 0,
            fill_len: 64,
            splice: false,
        };
        for _ in 0..3000 {
            let _ = scan_segment_bytes(&mutator.mutated(&good, damage));
        }
    }

    #[test]
    fn replayed_inputs_scan_cleanly() {
        for input in [&b""[..], b"SVJR\x02\x00\x01\x00", b"SVJH", &[0u8; 200]] {
            let _ = scan_segment_bytes(input);
        }
    }
}
