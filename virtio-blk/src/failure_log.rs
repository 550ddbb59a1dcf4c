//! Failed requests, counted every time and logged at a bounded rate: a guest that sends a
//! flood of malformed requests (or a disk that fails every I/O) must neither flood the log
//! nor go unseen. Both transports (sealvm's virtio-mmio device and sealvm-blk's vhost-user
//! backend) log request failures through one [`FailureLog`] per device.
//!
//! It deliberately does not answer the request (the status byte is the parser's and
//! executor's job) and does not keep per-kind counters for an API (the devices do).

use crate::request::RequestError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a [`FailureLog::new`] log writes per [`DEFAULT_INTERVAL`] at the most.
pub const DEFAULT_LINES_PER_INTERVAL: u32 = 10;
/// The interval of [`FailureLog::new`]'s bound.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// Counts every failed request of one device and logs at most `lines` of them per
/// `interval`; the first line of each interval says how many were left unlogged before it.
#[derive(Debug)]
pub struct FailureLog {
    device: String,
    lines: u32,
    interval: Duration,
    guest_errors: AtomicU64,
    backend_errors: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl FailureLog {
    /// A log for the device named `device` (a disk name or image, for the log lines), with
    /// the default bound of [`DEFAULT_LINES_PER_INTERVAL`] lines per [`DEFAULT_INTERVAL`].
    pub fn new(device: impl Into<String>) -> Self {
        Self::with_rate(device, DEFAULT_LINES_PER_INTERVAL, DEFAULT_INTERVAL)
    }

    /// A log that writes at most `lines` lines per `interval`.
    pub fn with_rate(device: impl Into<String>, lines: u32, interval: Duration) -> Self {
        FailureLog {
            device: device.into(),
            lines,
            interval,
            guest_errors: AtomicU64::new(0),
            backend_errors: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
        }
    }

    /// Counts `error` and logs it unless this interval's lines are spent; returns whether
    /// it was logged.
    pub fn record(&self, error: &RequestError) -> bool {
        self.record_at(Instant::now(), error)
    }

    /// [`FailureLog::record`] at the time `now` (tests drive the clock).
    pub fn record_at(&self, now: Instant, error: &RequestError) -> bool {
        let guest_error = error.is_guest_error();
        let counter = if guest_error {
            &self.guest_errors
        } else {
            &self.backend_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // A poisoned lock only means another thread panicked while logging; the counts
        // above are kept either way.
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        let expired = window
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= self.interval);
        if expired {
            window.started = Some(now);
            window.logged = 0;
        }
        if window.logged >= self.lines {
            window.suppressed += 1;
            return false;
        }
        window.logged += 1;
        let suppressed = std::mem::take(&mut window.suppressed);
        drop(window);
        if guest_error {
            tracing::warn!(device = %self.device, %error, suppressed, "bad request from the guest");
        } else {
            tracing::warn!(device = %self.device, %error, suppressed, "request failed");
        }
        true
    }

    /// Failed requests the guest caused (malformed, out of range), logged or not.
    pub fn guest_errors(&self) -> u64 {
        self.guest_errors.load(Ordering::Relaxed)
    }

    /// Failed requests the host's storage caused, logged or not.
    pub fn backend_errors(&self) -> u64 {
        self.backend_errors.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_error() -> RequestError {
        RequestError::Unsupported(99)
    }

    #[test]
    fn logs_at_most_the_bound_per_interval_but_counts_every_failure() {
        let log = FailureLog::with_rate("vda", 3, Duration::from_secs(1));
        let start = Instant::now();
        let logged = (0..100)
            .filter(|i| log.record_at(start + Duration::from_millis(*i), &guest_error()))
            .count();
        assert_eq!(logged, 3);
        assert_eq!(log.guest_errors(), 100);
        let backend = RequestError::Backend(std::io::Error::other("EIO"));
        assert!(!log.record_at(start + Duration::from_millis(500), &backend));
        assert_eq!(log.backend_errors(), 1);
    }

    #[test]
    fn a_new_interval_logs_again() {
        let log = FailureLog::with_rate("vda", 2, Duration::from_secs(1));
        let start = Instant::now();
        let logged_at = |offset_ms: u64| {
            log.record_at(start + Duration::from_millis(offset_ms), &guest_error())
        };
        assert!(logged_at(0));
        assert!(logged_at(10));
        assert!(!logged_at(20));
        assert!(!logged_at(999));
        assert!(logged_at(1000), "the next interval did not log");
        assert!(logged_at(1001));
        assert!(!logged_at(1002));
        assert_eq!(log.guest_errors(), 7);
    }
}
