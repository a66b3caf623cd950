//! A token bucket for the data plane's upload and download caps (issue 22), as a pure
//! machine: the caller passes `now` and the bytes it is about to move and gets back how long
//! to wait first. The bucket may go into debt, so a frame larger than the burst still passes
//! (after its wait) and the long-run rate holds exactly: by any time `t` after the bucket was
//! made, the bytes released are at most `burst + rate * t`.
//!
//! Not wired yet: the data plane's streams are opened and read in `train/session.rs`, which
//! must call [`TokenBucket::take`] around its frame writes and reads (one bucket per direction
//! per daemon, shared by all streams) before caps can be configured.

use std::time::{Duration, Instant};

/// Why a bucket cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RateError {
    #[error("a rate cap must be at least 1 KiB/s (got {0} bytes/s)")]
    TooLow(u64),
    #[error("the burst must be at least 1 byte")]
    NoBurst,
}

/// Bytes allowed per second with a burst allowance; see the module's doc.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Negative while in debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` bytes refilled at `rate` bytes per second.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Result<Self, RateError> {
        if rate < 1024 {
            return Err(RateError::TooLow(rate));
        }
        if burst == 0 {
            return Err(RateError::NoBurst);
        }
        Ok(TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went backwards refills nothing.
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `bytes` at `now`; returns how long to wait before moving them.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sender_faster_than_the_cap_is_held_to_it() {
        let start = Instant::now();
        let rate = 10 << 20;
        let burst = 256 << 10;
        let mut b = TokenBucket::new(rate, burst, start).unwrap();
        let mut now = start;
        let total: u64 = 100 << 20;
        let mut sent = 0;
        while sent < total {
            // An infinitely fast link: the only waits are the bucket's.
            now += b.take(64 << 10, now);
            sent += 64 << 10;
        }
        let secs = (now - start).as_secs_f64();
        let expected = (total - burst) as f64 / rate as f64;
        assert!(
            (secs - expected).abs() < 1e-3 * expected,
            "{secs} vs {expected}"
        );
    }

    #[test]
    fn a_frame_larger_than_the_burst_waits_its_share() {
        let start = Instant::now();
        let mut b = TokenBucket::new(1 << 20, 1 << 10, start).unwrap();
        let wait = b.take(4 << 20, start);
        let want = ((4 << 20) - (1 << 10)) as f64 / (1 << 20) as f64;
        assert!((wait.as_secs_f64() - want).abs() < 1e-9);
        // The debt is paid before anything else passes.
        assert!(b.take(1, start + wait / 2) > Duration::ZERO);
        assert_eq!(
            TokenBucket::new(100, 1, start).unwrap_err(),
            RateError::TooLow(100)
        );
        assert_eq!(
            TokenBucket::new(1 << 20, 0, start).unwrap_err(),
            RateError::NoBurst
        );
    }

    proptest! {
        /// Whatever the pattern of requests, what has been released by any moment is at most
        /// the burst plus the rate times the time since the bucket was made.
        #[test]
        fn released_bytes_never_exceed_burst_plus_rate_times_time(
            reqs in proptest::collection::vec((1u64..1 << 22, 0u64..200_000), 1..200),
            rate in 1024u64..(100 << 20),
            burst in 1u64..(1 << 22),
        ) {
            let start = Instant::now();
            let mut b = TokenBucket::new(rate, burst, start).unwrap();
            let mut now = start;
            let mut released = 0u64;
            for (bytes, gap_us) in reqs {
                now += Duration::from_micros(gap_us);
                let at = now + b.take(bytes, now);
                released += bytes;
                let allowed = burst as f64 + rate as f64 * (at - start).as_secs_f64();
                prop_assert!(released as f64 <= allowed * (1.0 + 1e-9) + 1.0,
                    "{released} released by {:?}, {allowed} allowed", at - start);
                // The sender moves its bytes before its next request.
                now = at;
            }
        }
    }
}
