//! Redialling the configured bootstrap peers. A daemon whose bootstrap address was dialled
//! once, while the seed was down or refusing connections, stayed alone: Kademlia's periodic
//! bootstrap needs a peer to ask, and nothing else retried (issue 17). [`BootstrapDialer`]
//! dials every bootstrap address until it connects, with capped exponential backoff and
//! jitter (many daemons cut off by one seed's outage must not come back in lockstep), and
//! again when every connection to a bootstrap peer is lost. The backoff starts over only
//! after a connection that lasted: a seed that accepts and drops us at once is retried at
//! the growing pace, not in a tight loop.
//!
//! Pure: the event loop passes `now` and a random source, carries out the dials, and reports
//! what became of them by connection id.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;

/// Capped exponential backoff with jitter: attempt `n` waits a random time between half and
/// all of `min(initial * 2^n, max)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let full = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = full / 2;
        let spread = (full - half).as_millis() as u64;
        half + Duration::from_millis(rng.random_range(0..=spread))
    }
}

/// A connection must last this long before the backoff of its bootstrap peer starts over.
pub const STABLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To be dialled at this time.
    Due(Instant),
    /// A dial is in flight (its connection id once the caller reports it).
    Dialing(Option<ConnectionId>),
    Connected {
        since: Instant,
    },
}

#[derive(Debug)]
struct Entry {
    addr: Multiaddr,
    /// From the address's `/p2p/` suffix, or learnt from the first connection.
    peer: Option<PeerId>,
    state: State,
    /// Consecutive failures since the last stable connection.
    failures: u32,
}

/// A dial the event loop is to make now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub index: usize,
    pub addr: Multiaddr,
}

/// Keeps every bootstrap address dialled until connected. See the module docs.
#[derive(Debug)]
pub struct BootstrapDialer {
    entries: Vec<Entry>,
    backoff: Backoff,
}

impl BootstrapDialer {
    /// Every address is due at once.
    pub fn new(addrs: &[Multiaddr], backoff: Backoff, now: Instant) -> Self {
        let entries = addrs
            .iter()
            .map(|addr| Entry {
                addr: addr.clone(),
                peer: match addr.iter().last() {
                    Some(Protocol::P2p(p)) => Some(p),
                    _ => None,
                },
                state: State::Due(now),
                failures: 0,
            })
            .collect();
        Self { entries, backoff }
    }

    /// The next dial due at `now`, if any; the caller reports it with [`Self::dialing`] or
    /// [`Self::dial_refused`].
    pub fn poll_dial(&mut self, now: Instant) -> Option<Dial> {
        let (index, e) = self
            .entries
            .iter_mut()
            .enumerate()
            .find(|(_, e)| matches!(e.state, State::Due(at) if at <= now))?;
        e.state = State::Dialing(None);
        Some(Dial {
            index,
            addr: e.addr.clone(),
        })
    }

    /// The dial of entry `index` is in flight as connection `conn`.
    pub fn dialing(&mut self, index: usize, conn: ConnectionId) {
        if let Some(e) = self.entries.get_mut(index)
            && e.state == State::Dialing(None)
        {
            e.state = State::Dialing(Some(conn));
        }
    }

    /// The dial of entry `index` could not even start.
    pub fn dial_refused(&mut self, index: usize, now: Instant, rng: &mut impl Rng) {
        let backoff = self.backoff;
        if let Some(e) = self.entries.get_mut(index)
            && e.state == State::Dialing(None)
        {
            Self::retry_later(e, backoff, now, rng);
        }
    }

    /// The outgoing connection `conn` failed. When it was a bootstrap dial, returns its
    /// address and the wait before the next one.
    pub fn dial_failed(
        &mut self,
        conn: ConnectionId,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<(Multiaddr, Duration)> {
        let backoff = self.backoff;
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.state == State::Dialing(Some(conn)))?;
        let wait = Self::retry_later(e, backoff, now, rng);
        Some((e.addr.clone(), wait))
    }

    /// A connection to `peer` is established (ours as `conn`, or any other).
    pub fn connected(&mut self, peer: PeerId, conn: ConnectionId, now: Instant) {
        for e in &mut self.entries {
            if e.state == State::Dialing(Some(conn)) && e.peer.is_none() {
                e.peer = Some(peer);
            }
            if e.peer == Some(peer) && !matches!(e.state, State::Connected { .. }) {
                e.state = State::Connected { since: now };
            }
        }
    }

    /// A connection to `peer` closed, leaving `remaining` others.
    pub fn disconnected(&mut self, peer: PeerId, remaining: u32, now: Instant, rng: &mut impl Rng) {
        if remaining > 0 {
            return;
        }
        let backoff = self.backoff;
        for e in &mut self.entries {
            if e.peer != Some(peer) {
                continue;
            }
            if let State::Connected { since } = e.state {
                if now.saturating_duration_since(since) >= STABLE {
                    e.failures = 0;
                }
                Self::retry_later(e, backoff, now, rng);
            }
        }
    }

    /// When the next dial is due, if one is scheduled.
    pub fn next_due(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|e| match e.state {
                State::Due(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// Whether every bootstrap address has a connection.
    pub fn all_connected(&self) -> bool {
        self.entries
            .iter()
            .all(|e| matches!(e.state, State::Connected { .. }))
    }

    fn retry_later(e: &mut Entry, backoff: Backoff, now: Instant, rng: &mut impl Rng) -> Duration {
        let wait = backoff.delay(e.failures, rng);
        e.failures = e.failures.saturating_add(1);
        e.state = State::Due(now + wait);
        wait
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        let mut r = rng();
        for attempt in 0..40 {
            let full = Duration::from_secs(1 << attempt.min(5)).min(b.max);
            for _ in 0..50 {
                let d = b.delay(attempt, &mut r);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
        // The jitter spreads the waits: not all equal.
        let waits: Vec<_> = (0..20).map(|_| b.delay(3, &mut r)).collect();
        assert!(waits.iter().any(|w| *w != waits[0]));
    }

    fn peer_addr(peer: &PeerId) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/9/quic-v1/p2p/{peer}")
            .parse()
            .unwrap()
    }

    #[test]
    fn a_failed_bootstrap_dial_is_retried_with_growing_waits() {
        let seed = PeerId::random();
        let t0 = Instant::now();
        let mut d = BootstrapDialer::new(&[peer_addr(&seed)], Backoff::default(), t0);
        let mut r = rng();
        let mut now = t0;
        let mut waits = Vec::new();
        for i in 0..8usize {
            let dial = d.poll_dial(now).expect("a dial is due");
            assert_eq!(dial.index, 0);
            // Nothing more is due while the dial is in flight.
            assert_eq!(d.next_due(), None);
            assert_eq!(d.poll_dial(now + Duration::from_secs(3600)), None);
            let conn = ConnectionId::new_unchecked(i);
            d.dialing(0, conn);
            assert!(d.dial_failed(conn, now, &mut r).is_some());
            let due = d.next_due().expect("a retry is scheduled");
            let wait = due - now;
            assert_eq!(d.poll_dial(due - Duration::from_millis(1)), None);
            waits.push(wait);
            now = due;
        }
        // Half a second, then doubling (within the jitter) up to the 30 s cap.
        assert!(waits[0] >= Duration::from_millis(500) && waits[0] <= Duration::from_secs(1));
        assert!(waits[4] >= Duration::from_secs(8), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(30)),
            "{waits:?}"
        );
        assert!(waits[7] >= Duration::from_secs(15), "{waits:?}");
        // A dial that could not start is retried the same way.
        d.poll_dial(now).unwrap();
        d.dial_refused(0, now, &mut r);
        assert!(d.next_due().is_some_and(|t| t > now));
    }

    #[test]
    fn connected_then_lost_is_redialled_and_stable_connections_reset_the_backoff() {
        let seed = PeerId::random();
        let other = PeerId::random();
        let t0 = Instant::now();
        let mut d = BootstrapDialer::new(&[peer_addr(&seed)], Backoff::default(), t0);
        let mut r = rng();
        // Three failures grow the backoff.
        let mut now = t0;
        for i in 0..3 {
            d.poll_dial(now).unwrap();
            d.dialing(0, ConnectionId::new_unchecked(i));
            d.dial_failed(ConnectionId::new_unchecked(i), now, &mut r);
            now += Duration::from_secs(10);
        }
        d.poll_dial(now).unwrap();
        d.dialing(0, ConnectionId::new_unchecked(10));
        d.connected(seed, ConnectionId::new_unchecked(10), now);
        assert!(d.all_connected());
        // Another peer's loss, or losing one of two connections, changes nothing.
        d.disconnected(other, 0, now, &mut r);
        d.disconnected(seed, 1, now, &mut r);
        assert!(d.all_connected());
        // A short-lived connection keeps the grown backoff: the retry waits at least 4 s.
        d.disconnected(seed, 0, now + Duration::from_secs(1), &mut r);
        assert!(!d.all_connected());
        assert_eq!(d.poll_dial(now + Duration::from_secs(4)), None);
        let at = now + Duration::from_secs(9);
        d.poll_dial(at).unwrap();
        // The peer dials us meanwhile: connected without our dial.
        d.connected(seed, ConnectionId::new_unchecked(11), at);
        // A late failure of our own dial does not undo that.
        assert_eq!(
            d.dial_failed(ConnectionId::new_unchecked(10), at, &mut r),
            None
        );
        assert!(d.all_connected());
        // After a stable connection the first retry comes within a second.
        let lost = at + STABLE;
        d.disconnected(seed, 0, lost, &mut r);
        assert!(d.poll_dial(lost + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn an_address_without_a_peer_id_learns_it_from_its_connection() {
        let t0 = Instant::now();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().unwrap();
        let mut d = BootstrapDialer::new(&[addr], Backoff::default(), t0);
        let mut r = rng();
        d.poll_dial(t0).unwrap();
        let seed = PeerId::random();
        // An unrelated connection does not count for it.
        d.connected(PeerId::random(), ConnectionId::new_unchecked(1), t0);
        assert!(!d.all_connected());
        d.dialing(0, ConnectionId::new_unchecked(2));
        d.connected(seed, ConnectionId::new_unchecked(2), t0);
        assert!(d.all_connected());
        d.disconnected(seed, 0, t0, &mut r);
        assert!(d.poll_dial(t0 + Duration::from_secs(1)).is_some());
    }
}
