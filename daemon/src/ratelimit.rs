//! The data plane's upload and download caps (issue 22). [`TokenBucket`] is the pure
//! machine: the caller passes `now` and the bytes it is about to move and gets back how long
//! to wait first. The bucket may go into debt, so a frame larger than the burst still passes
//! (after its wait) and the long-run rate holds exactly: by any time `t` after the bucket was
//! made, the bytes released are at most `burst + rate * t`.
//!
//! [`RateLimiter`] holds one bucket per direction for a whole daemon, shared by every bulk
//! stream (tensor frames, checkpoint and data-package transfers); [`Limited`] wraps one such
//! stream. Before each read or write it waits (on tokio's timer, never spinning) until its
//! direction's bucket is out of debt, moves at most [`MAX_IO`] bytes, and charges what
//! actually moved. So a cap is exceeded by at most the burst plus one [`MAX_IO`] per stream
//! moving at that instant, and a read that waits for a peer holds no tokens while it waits.
//! Reads are capped where the application takes the bytes: the transport's flow-control
//! window (QUIC or yamux) then holds the sender back, so the link carries the capped rate
//! after the first window. Control messages (the run's control stream, libp2p's own
//! protocols) bypass the caps: they are small, and a capped round announcement would only
//! delay everyone.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite};

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

    /// How long until the bucket is out of debt, taking nothing.
    pub fn debt_wait(&mut self, now: Instant) -> Duration {
        self.take(0, now)
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

/// The most bytes one read or write of a [`Limited`] stream moves: what a cap can be
/// exceeded by, per stream moving at once, beyond the bucket's burst.
pub const MAX_IO: usize = 16 << 10;

/// The least burst of a bucket; above 640 KiB/s the burst is a tenth of a second of the rate.
pub const MIN_BURST: u64 = 64 << 10;

/// The upload and download caps of a daemon in bytes per second (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateCaps {
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

/// One direction of a [`RateLimiter`].
#[derive(Debug)]
struct Direction {
    rate: u64,
    bucket: Mutex<TokenBucket>,
    /// Bytes charged to the bucket so far.
    bytes: AtomicU64,
    /// Nanoseconds streams spent waiting for tokens, summed over streams.
    waited_ns: AtomicU64,
}

impl Direction {
    fn new(rate: u64, now: Instant) -> Result<Self, RateError> {
        let burst = (rate / 10).max(MIN_BURST);
        Ok(Direction {
            rate,
            bucket: Mutex::new(TokenBucket::new(rate, burst, now)?),
            bytes: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        })
    }

    fn debt_wait(&self) -> Duration {
        match self.bucket.lock() {
            Ok(mut b) => b.debt_wait(Instant::now()),
            // A poisoned bucket (a panic elsewhere) stops capping rather than the transfer.
            Err(_) => Duration::ZERO,
        }
    }

    fn charge(&self, bytes: usize) {
        if let Ok(mut b) = self.bucket.lock() {
            b.take(bytes as u64, Instant::now());
        }
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// What a direction of a [`RateLimiter`] has done since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DirectionStats {
    /// The cap in bytes per second; `None`: unlimited (and nothing is counted).
    pub cap: Option<u64>,
    /// Bytes that went through the cap.
    pub bytes: u64,
    /// Seconds streams spent waiting for the cap, summed over streams.
    pub waited_secs: f64,
}

/// A daemon's upload and download caps, shared by all its bulk streams. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    upload: Option<Arc<Direction>>,
    download: Option<Arc<Direction>>,
}

impl RateLimiter {
    /// Buckets for `caps`, full at `now`.
    pub fn new(caps: RateCaps) -> Result<Self, RateError> {
        let now = Instant::now();
        let make = |rate: Option<u64>| -> Result<Option<Arc<Direction>>, RateError> {
            rate.map(|r| Direction::new(r, now).map(Arc::new))
                .transpose()
        };
        Ok(RateLimiter {
            upload: make(caps.upload)?,
            download: make(caps.download)?,
        })
    }

    /// No caps: [`Limited`] streams pass everything through untouched.
    pub fn unlimited() -> Self {
        Self::default()
    }

    pub fn caps(&self) -> RateCaps {
        RateCaps {
            upload: self.upload.as_ref().map(|d| d.rate),
            download: self.download.as_ref().map(|d| d.rate),
        }
    }

    /// (upload, download) counters.
    pub fn stats(&self) -> (DirectionStats, DirectionStats) {
        let one = |d: &Option<Arc<Direction>>| {
            d.as_ref()
                .map(|d| DirectionStats {
                    cap: Some(d.rate),
                    bytes: d.bytes.load(Ordering::Relaxed),
                    waited_secs: d.waited_ns.load(Ordering::Relaxed) as f64 / 1e9,
                })
                .unwrap_or_default()
        };
        (one(&self.upload), one(&self.download))
    }

    /// `stream`, its reads charged to the download cap and its writes to the upload cap.
    pub fn wrap<S>(&self, stream: S) -> Limited<S> {
        Limited {
            inner: stream,
            limiter: self.clone(),
            read_wait: None,
            write_wait: None,
        }
    }
}

/// A pending wait for tokens and when it began (to count the time waited).
type Wait = (Pin<Box<tokio::time::Sleep>>, Instant);

/// A stream whose bytes go through a [`RateLimiter`]; see the module's doc.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    limiter: RateLimiter,
    read_wait: Option<Wait>,
    write_wait: Option<Wait>,
}

impl<S> Limited<S> {
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Waits until `dir`'s bucket is out of debt. `Ready` once it is (at once when there is
/// no cap); otherwise the timer will wake the task.
fn poll_tokens(dir: Option<&Direction>, wait: &mut Option<Wait>, cx: &mut Context<'_>) -> Poll<()> {
    let Some(dir) = dir else {
        return Poll::Ready(());
    };
    loop {
        if let Some((sleep, since)) = wait.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            let waited = since.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            dir.waited_ns.fetch_add(waited, Ordering::Relaxed);
            *wait = None;
        }
        // Other streams may have drawn on the bucket meanwhile: look again. Waits below a
        // microsecond are rounding, not debt (the timer's resolution is a millisecond).
        let d = dir.debt_wait();
        if d < Duration::from_micros(1) {
            return Poll::Ready(());
        }
        let now = Instant::now();
        *wait = Some((Box::pin(tokio::time::sleep(d)), now));
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let dir = this.limiter.download.as_deref();
        let Some(d) = dir else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        ready!(poll_tokens(Some(d), &mut this.read_wait, cx));
        let max = buf.len().min(MAX_IO);
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf[..max]))?;
        d.charge(n);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let dir = this.limiter.upload.as_deref();
        let Some(d) = dir else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        ready!(poll_tokens(Some(d), &mut this.write_wait, cx));
        let max = buf.len().min(MAX_IO);
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..max]))?;
        d.charge(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
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

    /// Copies `total` bytes through a pipe whose writer is capped at `up` and whose reader
    /// is capped at `down`, returning the limiter and the elapsed time.
    async fn pipe(caps: RateCaps, total: usize) -> (RateLimiter, Duration) {
        use futures::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let limiter = RateLimiter::new(caps).unwrap();
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = limiter.wrap(a.compat());
        let mut r = limiter.wrap(b.compat());
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            let data = vec![7u8; total];
            w.write_all(&data).await.unwrap();
            w.close().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got.iter().all(|b| *b == 7));
        (limiter, start.elapsed())
    }

    /// The cap is a floor on the time a transfer takes (the timer never wakes early), so
    /// this cannot pass by luck; the accuracy of the cap on a real link is measured by the
    /// netns test (`daemon/tests/ratecap.rs`).
    #[tokio::test]
    async fn a_capped_stream_takes_at_least_its_share_of_time() {
        let rate = 1 << 20;
        let total = 3 << 19;
        for caps in [
            RateCaps {
                upload: Some(rate),
                download: None,
            },
            RateCaps {
                upload: None,
                download: Some(rate),
            },
        ] {
            let (limiter, took) = pipe(caps, total).await;
            let burst = (rate / 10).max(MIN_BURST);
            let floor = (total as u64 - burst - MAX_IO as u64) as f64 / rate as f64;
            assert!(
                took.as_secs_f64() >= floor,
                "{took:?} < {floor} s for {caps:?}"
            );
            let (up, down) = limiter.stats();
            let capped = if caps.upload.is_some() { up } else { down };
            let free = if caps.upload.is_some() { down } else { up };
            assert_eq!(capped.cap, Some(rate));
            assert_eq!(capped.bytes, total as u64);
            assert!(capped.waited_secs > 0.0);
            assert_eq!(free, DirectionStats::default());
        }
    }

    #[tokio::test]
    async fn without_caps_bytes_pass_untouched_and_uncounted() {
        let (limiter, _) = pipe(RateCaps::default(), 5 << 20).await;
        assert_eq!(limiter.caps(), RateCaps::default());
        assert_eq!(
            limiter.stats(),
            (DirectionStats::default(), DirectionStats::default())
        );
        assert_eq!(
            RateLimiter::new(RateCaps {
                upload: Some(10),
                download: None
            })
            .unwrap_err(),
            RateError::TooLow(10)
        );
    }

    /// Two streams share one direction's bucket: together they are held to the cap.
    #[tokio::test]
    async fn streams_share_one_bucket_per_direction() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let rate = 1 << 20;
        let limiter = RateLimiter::new(RateCaps {
            upload: Some(rate),
            download: None,
        })
        .unwrap();
        let each = 3 << 18;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (a, b) = tokio::io::duplex(1 << 20);
            let mut w = limiter.wrap(a.compat());
            let mut r = b.compat();
            tasks.push(tokio::spawn(async move {
                w.write_all(&vec![1u8; each]).await.unwrap();
                w.close().await.unwrap();
            }));
            tasks.push(tokio::spawn(async move {
                let mut sink = Vec::new();
                r.read_to_end(&mut sink).await.unwrap();
                assert_eq!(sink.len(), each);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let burst = (rate / 10).max(MIN_BURST);
        let floor = (2 * each as u64 - burst - 2 * MAX_IO as u64) as f64 / rate as f64;
        let took = start.elapsed().as_secs_f64();
        assert!(took >= floor, "{took} < {floor}");
        assert_eq!(limiter.stats().0.bytes, 2 * each as u64);
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
