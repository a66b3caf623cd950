//! What the daemon tells observers, as plain data: the JSON state behind `/api/state` and the
//! dashboard, and the [`Tracker`] that remembers what a snapshot alone cannot (the loss
//! curve, peers that went away, time spent per round phase). No I/O here: the web server
//! feeds the tracker run events, peer lists and round timings, with the time passed in, and
//! asks it for views; everything is bounded, whatever a peer or a run does.

use std::collections::{BTreeMap, HashMap, VecDeque};

use libp2p::PeerId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;

use crate::net::PeerSummary;
use crate::train::runs::LedgerReport;
use crate::train::session::{RoundTiming, RunEvent, RunStatus};
use potluck_proto::v1;

/// Rounds of one run kept for the loss curve and the checkpoint chain.
pub const MAX_HISTORY: usize = 4096;
/// Peers remembered, connected or gone; the oldest gone peers are forgotten first.
pub const MAX_REMEMBERED_PEERS: usize = 1024;
/// Distinct reasons a round went uncommitted that get their own metric label; more are
/// counted as `other`.
const MAX_REASONS: usize = 32;
/// Buckets of the round duration histogram, in seconds (0.25 s to about 17 min).
const ROUND_BUCKETS: (f64, f64, u16) = (0.25, 2.0, 13);

/// A peer's state as the dashboard shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// At least one connection that runs the full protocol set.
    Connected,
    /// Known from its capability record (gossip), never connected to us directly.
    Known,
    /// Was connected and no longer is.
    Gone,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connected => "connected",
            PeerState::Known => "known",
            PeerState::Gone => "gone",
        }
    }
}

/// A peer's self-reported capabilities, in plain numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CapsView {
    pub software_version: String,
    pub device_kind: String,
    pub device_name: String,
    pub memory_bytes: u64,
    pub cpu_count: u32,
    pub train_tokens_per_sec: f64,
    pub bandwidth_bytes_per_sec: f64,
}

impl From<&v1::Capabilities> for CapsView {
    fn from(c: &v1::Capabilities) -> Self {
        let kind = match v1::DeviceKind::try_from(c.device_kind) {
            Ok(k) => k
                .as_str_name()
                .trim_start_matches("DEVICE_KIND_")
                .to_lowercase(),
            Err(_) => "unknown".to_string(),
        };
        CapsView {
            software_version: c.software_version.clone(),
            device_kind: kind,
            device_name: c.device_name.clone(),
            memory_bytes: c.memory_bytes,
            cpu_count: c.cpu_count,
            train_tokens_per_sec: c.train_tokens_per_sec,
            bandwidth_bytes_per_sec: c.bandwidth_bytes_per_sec,
        }
    }
}

/// One peer in the JSON state.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerView {
    pub peer_id: String,
    pub state: PeerState,
    pub addrs: Vec<String>,
    pub capabilities: Option<CapsView>,
    /// Seconds since its capability record arrived.
    pub record_age_secs: Option<f64>,
    /// Whether it is a member of the round in progress here.
    pub in_run: bool,
    /// Data-plane bytes sent to it and received from it by this daemon.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Milliseconds since the Unix epoch when it was last seen connected.
    pub last_connected_ms: Option<u64>,
}

/// One round of the run in progress, as its events told it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundPoint {
    pub round: u64,
    pub committed: bool,
    /// Eval loss after the round (nats per byte), for a committed round.
    pub eval_loss: Option<f32>,
    /// The committed state's root (hex): the checkpoint this round added to the chain.
    pub root: Option<String>,
    pub agreeing: usize,
    pub members: usize,
    /// Why the round was not committed.
    pub reason: Option<String>,
    pub at_ms: u64,
}

/// This daemon, in the JSON state.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub peer_id: String,
    pub swarm: String,
    pub listen_addrs: Vec<String>,
    pub uptime_secs: f64,
    pub capabilities: CapsView,
    /// Resident memory of this process, when the OS tells it.
    pub resident_memory_bytes: Option<u64>,
    /// The data plane's upload and download caps, in that order.
    pub rate_caps: Vec<RateCapView>,
}

/// One direction of the data plane's rate cap and what went through it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RateCapView {
    /// `upload` or `download`.
    pub direction: String,
    /// Bytes per second; 0: no cap.
    pub cap_bytes_per_sec: u64,
    /// Bytes that went through the cap.
    pub bytes: u64,
    /// Time streams spent waiting for the cap, summed over streams.
    pub waited_secs: f64,
}

impl RateCapView {
    /// The upload and download views of a daemon's caps.
    pub fn of(rates: &crate::ratelimit::RateLimiter) -> Vec<RateCapView> {
        let (up, down) = rates.stats();
        [("upload", up), ("download", down)]
            .into_iter()
            .map(|(direction, s)| RateCapView {
                direction: direction.into(),
                cap_bytes_per_sec: s.cap.unwrap_or(0),
                bytes: s.bytes,
                waited_secs: s.waited_secs,
            })
            .collect()
    }
}

/// Bytes of one round at this daemon.
#[derive(Clone, Debug, Serialize)]
pub struct RoundBytes {
    pub round: u64,
    pub sent: u64,
    pub received: u64,
}

/// Everything `/api/state` returns.
#[derive(Clone, Debug, Serialize)]
pub struct State {
    pub generated_at_ms: u64,
    pub node: NodeView,
    pub peers: Vec<PeerView>,
    pub run: RunStatus,
    /// The run's rounds as their events came, oldest first (at most [`MAX_HISTORY`]).
    pub history: Vec<RoundPoint>,
    /// Bytes per round at this daemon, oldest first (the last 64 rounds).
    pub round_bytes: Vec<RoundBytes>,
    /// This daemon's copy of the run's ledger, every link and signature checked (as
    /// `potluck checkpoints` does), as of the last committed round; absent without a run.
    pub ledger: Option<LedgerReport>,
}

#[derive(Debug)]
struct Remembered {
    view: PeerView,
    /// When it was last listed by the network (connected or with a fresh record).
    listed_ms: u64,
}

/// What a snapshot cannot tell: history, departed peers and per-phase totals. Its counters
/// are Prometheus metrics (shared atomics) so that `/metrics` can register them as they are.
#[derive(Debug)]
pub struct Tracker {
    run_id: String,
    history: VecDeque<RoundPoint>,
    peers: HashMap<PeerId, Remembered>,
    /// The last round whose timing was counted, per run.
    timed_through: Option<(String, u64)>,
    pub(crate) rounds_committed: Counter,
    pub(crate) rounds_not_committed: Family<Vec<(String, String)>, Counter>,
    /// The reason labels in use (at most [`MAX_REASONS`] and `other`).
    reasons: std::collections::BTreeSet<String>,
    pub(crate) phase_seconds: Family<Vec<(String, String)>, Counter<f64>>,
    pub(crate) round_duration: Histogram,
    /// Rounds observed in `round_duration`.
    pub(crate) timed_rounds: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        let (start, factor, n) = ROUND_BUCKETS;
        Tracker {
            run_id: String::new(),
            history: VecDeque::new(),
            peers: HashMap::new(),
            timed_through: None,
            rounds_committed: Counter::default(),
            rounds_not_committed: Family::default(),
            reasons: Default::default(),
            phase_seconds: Family::default(),
            timed_rounds: 0,
            round_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(start, factor, n),
            ),
        }
    }
}

/// The label value of a reason: the leading identifier of a `Debug` string (an enum
/// variant's name), so that the label set stays small whatever the details say.
pub fn reason_label(reason: &str) -> String {
    let head: String = reason
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(48)
        .collect();
    if head.is_empty() {
        "other".to_string()
    } else {
        head
    }
}

impl Tracker {
    /// A run event, seen while `run_id` was the run in progress here.
    pub fn handle_event(&mut self, run_id: &str, ev: &RunEvent, now_ms: u64) {
        if run_id != self.run_id {
            self.run_id = run_id.to_string();
            self.history.clear();
        }
        let point = match ev {
            RunEvent::Committed {
                round,
                root,
                agreeing,
                members,
                eval_loss,
            } => {
                self.rounds_committed.inc();
                RoundPoint {
                    round: *round,
                    committed: true,
                    eval_loss: eval_loss.is_finite().then_some(*eval_loss),
                    root: Some(hex::encode(root)),
                    agreeing: *agreeing,
                    members: *members,
                    reason: None,
                    at_ms: now_ms,
                }
            }
            RunEvent::NotCommitted { round, reason } => {
                let mut label = reason_label(reason);
                if !self.reasons.contains(&label) {
                    if self.reasons.len() >= MAX_REASONS {
                        label = "other".to_string();
                    }
                    self.reasons.insert(label.clone());
                }
                self.rounds_not_committed
                    .get_or_create(&vec![("reason".to_string(), label)])
                    .inc();
                let mut reason = reason.clone();
                reason.truncate(reason.floor_char_boundary(256));
                RoundPoint {
                    round: *round,
                    committed: false,
                    eval_loss: None,
                    root: None,
                    agreeing: 0,
                    members: 0,
                    reason: Some(reason),
                    at_ms: now_ms,
                }
            }
            RunEvent::RoundOpened { .. } | RunEvent::Finished { .. } => return,
        };
        // A round reported twice (a resync) replaces its earlier point.
        if let Some(last) = self.history.back_mut()
            && last.round == point.round
        {
            *last = point;
            return;
        }
        self.history.push_back(point);
        while self.history.len() > MAX_HISTORY {
            self.history.pop_front();
        }
    }

    /// The round timings of a status (oldest first); each round is counted once.
    pub fn handle_timings(&mut self, run_id: &str, timings: &[RoundTiming]) {
        let after = match &self.timed_through {
            Some((run, round)) if run == run_id => Some(*round),
            _ => None,
        };
        for t in timings {
            if after.is_some_and(|a| t.round <= a) {
                continue;
            }
            for (phase, ms) in [
                ("train", t.train_ms),
                ("local", t.local_ms),
                ("persist", t.persist_ms),
                ("network_wait", t.network_wait_ms),
                ("coordination", t.coordination_ms),
            ] {
                self.phase_seconds
                    .get_or_create(&vec![("phase".to_string(), phase.to_string())])
                    .inc_by(ms as f64 / 1000.0);
            }
            self.round_duration.observe(t.wall_ms as f64 / 1000.0);
            self.timed_rounds += 1;
            self.timed_through = Some((run_id.to_string(), t.round));
        }
    }

    /// The network's current peer list. `members` are the peer ids (as strings) of the round
    /// in progress; `traffic` the data-plane bytes per peer.
    pub fn handle_peers(
        &mut self,
        listed: &[PeerSummary],
        members: &[String],
        traffic: &BTreeMap<PeerId, (u64, u64)>,
        now_ms: u64,
    ) {
        for p in listed {
            let id = p.peer_id.to_string();
            let state = if p.connected {
                PeerState::Connected
            } else {
                match self.peers.get(&p.peer_id) {
                    Some(r) if r.view.last_connected_ms.is_some() => PeerState::Gone,
                    _ => PeerState::Known,
                }
            };
            let last_connected_ms = if p.connected {
                Some(now_ms)
            } else {
                self.peers
                    .get(&p.peer_id)
                    .and_then(|r| r.view.last_connected_ms)
            };
            let (sent, received) = traffic.get(&p.peer_id).copied().unwrap_or_default();
            let view = PeerView {
                in_run: members.contains(&id),
                peer_id: id,
                state,
                addrs: p.addrs.iter().take(8).map(|a| a.to_string()).collect(),
                capabilities: p.record.as_ref().map(|r| CapsView::from(&r.capabilities)),
                record_age_secs: p.record_age.map(|d| d.as_secs_f64()),
                bytes_sent: sent,
                bytes_received: received,
                last_connected_ms,
            };
            self.peers.insert(
                p.peer_id,
                Remembered {
                    view,
                    listed_ms: now_ms,
                },
            );
        }
        // Peers the network no longer lists: gone if they were ever connected, forgotten
        // otherwise (a record that aged out says nothing about a departure).
        let listed_now: std::collections::HashSet<PeerId> =
            listed.iter().map(|p| p.peer_id).collect();
        self.peers.retain(|id, r| {
            if listed_now.contains(id) {
                return true;
            }
            r.view.in_run = false;
            if r.view.last_connected_ms.is_some() {
                r.view.state = PeerState::Gone;
                true
            } else {
                false
            }
        });
        if self.peers.len() > MAX_REMEMBERED_PEERS {
            let mut gone: Vec<(u64, PeerId)> = self
                .peers
                .iter()
                .filter(|(_, r)| r.view.state == PeerState::Gone)
                .map(|(id, r)| (r.listed_ms.min(r.view.last_connected_ms.unwrap_or(0)), *id))
                .collect();
            gone.sort();
            let excess = self.peers.len() - MAX_REMEMBERED_PEERS;
            for (_, id) in gone.into_iter().take(excess) {
                self.peers.remove(&id);
            }
        }
    }

    /// The peers, connected first, then known, then gone; by id within each.
    pub fn peers(&self) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self.peers.values().map(|r| r.view.clone()).collect();
        let rank = |s: PeerState| match s {
            PeerState::Connected => 0,
            PeerState::Known => 1,
            PeerState::Gone => 2,
        };
        v.sort_by(|a, b| {
            rank(a.state)
                .cmp(&rank(b.state))
                .then(a.peer_id.cmp(&b.peer_id))
        });
        v
    }

    /// The run's rounds, oldest first.
    pub fn history(&self) -> Vec<RoundPoint> {
        self.history.iter().cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listed(peer: PeerId, connected: bool) -> PeerSummary {
        PeerSummary {
            peer_id: peer,
            addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap()],
            connected,
            record: None,
            record_age: Some(Duration::from_secs(2)),
        }
    }

    fn committed(round: u64, loss: f32) -> RunEvent {
        RunEvent::Committed {
            round,
            root: [round as u8; 32],
            agreeing: 2,
            members: 3,
            eval_loss: loss,
        }
    }

    #[test]
    fn a_peer_that_was_connected_and_left_is_gone() {
        let mut t = Tracker::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let none = BTreeMap::new();
        t.handle_peers(&[listed(a, true), listed(b, false)], &[], &none, 1);
        let states: HashMap<String, PeerState> = t
            .peers()
            .into_iter()
            .map(|p| (p.peer_id, p.state))
            .collect();
        assert_eq!(states[&a.to_string()], PeerState::Connected);
        assert_eq!(states[&b.to_string()], PeerState::Known);
        // a disconnects but is still listed (its record is fresh); b's record ages out.
        t.handle_peers(&[listed(a, false)], &[], &none, 2);
        let v = t.peers();
        assert_eq!(v.len(), 1, "a peer never connected is forgotten: {v:?}");
        assert_eq!(v[0].state, PeerState::Gone);
        assert_eq!(v[0].last_connected_ms, Some(1));
        // The network forgets a as well: it stays gone here.
        t.handle_peers(&[], &[], &none, 3);
        assert_eq!(t.peers()[0].state, PeerState::Gone);
        // And comes back.
        t.handle_peers(&[listed(a, true)], &[a.to_string()], &none, 4);
        assert_eq!(t.peers()[0].state, PeerState::Connected);
        assert!(t.peers()[0].in_run);
    }

    #[test]
    fn remembered_peers_are_bounded() {
        let mut t = Tracker::default();
        let none = BTreeMap::new();
        let many: Vec<PeerSummary> = (0..MAX_REMEMBERED_PEERS + 50)
            .map(|_| listed(PeerId::random(), true))
            .collect();
        t.handle_peers(&many, &[], &none, 1);
        // All of them leave; a new crowd arrives.
        let fresh: Vec<PeerSummary> = (0..100).map(|_| listed(PeerId::random(), true)).collect();
        t.handle_peers(&fresh, &[], &none, 2);
        let v = t.peers();
        assert_eq!(v.len(), MAX_REMEMBERED_PEERS);
        assert_eq!(
            v.iter().filter(|p| p.state == PeerState::Connected).count(),
            100
        );
    }

    #[test]
    fn history_follows_one_run_and_is_bounded() {
        let mut t = Tracker::default();
        t.handle_event("r1", &committed(1, 2.0), 10);
        t.handle_event(
            "r1",
            &RunEvent::NotCommitted {
                round: 2,
                reason: "NoQuorum { agreeing: 1 }".into(),
            },
            20,
        );
        t.handle_event("r1", &committed(2, f32::NAN), 30);
        let h = t.history();
        assert_eq!(h.len(), 2, "round 2's later commit replaces its failure");
        assert_eq!(h[0].eval_loss, Some(2.0));
        assert_eq!(h[1].eval_loss, None, "NaN is not a loss");
        assert_eq!(t.rounds_committed.get(), 2);
        assert_eq!(
            t.rounds_not_committed
                .get_or_create(&vec![("reason".into(), "NoQuorum".into())])
                .get(),
            1
        );
        // Another run starts over.
        t.handle_event("r2", &committed(1, 3.0), 40);
        assert_eq!(t.history().len(), 1);
        for r in 2..(MAX_HISTORY as u64 + 10) {
            t.handle_event("r2", &committed(r, 1.0), r);
        }
        assert_eq!(t.history().len(), MAX_HISTORY);
        assert_eq!(t.history().last().unwrap().round, MAX_HISTORY as u64 + 9);
    }

    #[test]
    fn many_reasons_share_one_label() {
        let mut t = Tracker::default();
        for i in 0..(MAX_REASONS + 5) {
            t.handle_event(
                "r",
                &RunEvent::NotCommitted {
                    round: i as u64,
                    reason: format!("Reason{i} {{ x: 1 }}"),
                },
                0,
            );
        }
        assert_eq!(t.reasons.len(), MAX_REASONS + 1);
        assert_eq!(reason_label("  (weird"), "other");
    }

    #[test]
    fn each_round_timing_is_counted_once() {
        let mut t = Tracker::default();
        let timing = |round, train_ms| RoundTiming {
            round,
            train_ms,
            wall_ms: 2 * train_ms,
            ..Default::default()
        };
        t.handle_timings("r", &[timing(1, 1000), timing(2, 500)]);
        t.handle_timings("r", &[timing(1, 1000), timing(2, 500), timing(3, 250)]);
        let train = t
            .phase_seconds
            .get_or_create(&vec![("phase".into(), "train".into())])
            .get();
        assert!((train - 1.75).abs() < 1e-9, "{train}");
        assert_eq!(t.timed_rounds, 3);
        // A new run's round 1 counts again.
        t.handle_timings("s", &[timing(1, 1000)]);
        assert_eq!(t.timed_rounds, 4);
    }
}
