//! Request counters one device keeps for the API: requests by kind, bytes moved, errors and
//! a log2 histogram of service times. Counting only; the API decides how to show them.

use sealvm_virtio_blk::RequestKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets in the latency histogram. Bucket 0 counts requests served in under 2 µs, bucket
/// `i` those that took `2^i` to `2^(i+1) - 1` µs; the last bucket (from 2^23 µs, about
/// 8.4 s) takes everything longer.
pub const LATENCY_BUCKETS: usize = 24;

/// Per-device request counters. Every field only grows.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests completed (answered), whatever their status.
    pub requests: AtomicU64,
    /// Reads parsed.
    pub reads: AtomicU64,
    /// Writes parsed.
    pub writes: AtomicU64,
    /// Flushes parsed.
    pub flushes: AtomicU64,
    /// Device-id requests parsed.
    pub get_ids: AtomicU64,
    /// Discards parsed.
    pub discards: AtomicU64,
    /// Write-zeroes requests parsed.
    pub write_zeroes: AtomicU64,
    /// Chains the parser refused (malformed chain, unknown type, sectors out of range, a
    /// write to a read-only device); they are not counted by kind.
    pub rejected: AtomicU64,
    /// Bytes read by reads that succeeded.
    pub bytes_read: AtomicU64,
    /// Bytes written by writes that succeeded.
    pub bytes_written: AtomicU64,
    /// Requests that failed because the guest sent something malformed.
    pub guest_errors: AtomicU64,
    /// Requests that failed in the storage.
    pub io_errors: AtomicU64,
    /// Requests a previous sealvm-blk took from the ring and did not complete, served again
    /// from the frontend's inflight region (INFLIGHT_SHMFD).
    pub inflight_resubmitted: AtomicU64,
    /// Service time of parsed requests, microseconds, in log2 buckets (see
    /// [`LATENCY_BUCKETS`]).
    pub latency_us_log2: [AtomicU64; LATENCY_BUCKETS],
}

/// The histogram bucket for a service time of `took`.
pub fn latency_bucket(took: Duration) -> usize {
    let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    (63 - (us | 1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

impl DeviceCounters {
    /// Counts a request that parsed as `kind` and moved `data_len` bytes, served in `took`;
    /// `ok` says whether it succeeded (errors are counted by [`Self::count_error`]).
    pub fn count_request(&self, kind: RequestKind, data_len: u64, took: Duration, ok: bool) {
        let by_kind = match kind {
            RequestKind::In => &self.reads,
            RequestKind::Out => &self.writes,
            RequestKind::Flush => &self.flushes,
            RequestKind::GetId => &self.get_ids,
            RequestKind::Discard => &self.discards,
            RequestKind::WriteZeroes => &self.write_zeroes,
        };
        by_kind.fetch_add(1, Ordering::Relaxed);
        if ok {
            match kind {
                RequestKind::In => self.bytes_read.fetch_add(data_len, Ordering::Relaxed),
                RequestKind::Out => self.bytes_written.fetch_add(data_len, Ordering::Relaxed),
                _ => 0,
            };
        }
        self.latency_us_log2[latency_bucket(took)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed request: a guest error or a storage error.
    pub fn count_error(&self, guest_error: bool) {
        let counter = if guest_error {
            &self.guest_errors
        } else {
            &self.io_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The histogram as (lower bound in µs, count) for the buckets that have counts; the
    /// bucket from 1 µs also holds requests under 1 µs.
    pub fn latency_histogram(&self) -> Vec<(u64, u64)> {
        self.latency_us_log2
            .iter()
            .enumerate()
            .map(|(i, c)| (1u64 << i, c.load(Ordering::Relaxed)))
            .filter(|&(_, count)| count > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_log2_microseconds() {
        let us = Duration::from_micros;
        assert_eq!(latency_bucket(us(0)), 0);
        assert_eq!(latency_bucket(us(1)), 0);
        assert_eq!(latency_bucket(us(2)), 1);
        assert_eq!(latency_bucket(us(3)), 1);
        assert_eq!(latency_bucket(us(4)), 2);
        assert_eq!(latency_bucket(us(1023)), 9);
        assert_eq!(latency_bucket(us(1024)), 10);
        assert_eq!(
            latency_bucket(Duration::from_secs(3600)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn bytes_count_only_for_successful_reads_and_writes() {
        let counters = DeviceCounters::default();
        let t = Duration::from_micros(5);
        counters.count_request(RequestKind::Out, 4096, t, true);
        counters.count_request(RequestKind::Out, 512, t, false);
        counters.count_request(RequestKind::In, 1024, t, true);
        counters.count_request(RequestKind::Flush, 0, t, true);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&counters.writes), 2);
        assert_eq!(load(&counters.reads), 1);
        assert_eq!(load(&counters.flushes), 1);
        assert_eq!(load(&counters.bytes_written), 4096);
        assert_eq!(load(&counters.bytes_read), 1024);
        assert_eq!(counters.latency_histogram(), vec![(4, 4)]);
    }
}
