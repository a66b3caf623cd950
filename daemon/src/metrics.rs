//! Prometheus metrics: turns one [`State`] snapshot and the [`Tracker`]'s counters into the
//! OpenMetrics text that `/metrics` serves. Pure: the web server gathers the snapshot, this
//! module only names and encodes it, so every name and label is tested without a socket.
//!
//! Names follow Prometheus' conventions: a `potluck_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters (added by the encoder), and labels only where
//! their values stay few: `direction`, `phase`, `state`, `reason` (an enum variant's name), and
//! `peer` for the data-plane bytes of at most [`MAX_PEER_SERIES`] peers (the busiest; the rest
//! are summed under `peer="other"`), so a swarm of strangers cannot blow up the series count.
//! A value that a snapshot holds as a running total (bytes, rejected updates) is exported as
//! a counter that restarts with the daemon or the run, which Prometheus reads as a reset.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::net::{BehaviourEvent, InnerEvent};
use crate::web::state::{PeerState, State, Tracker};

/// Reasons of refused updates with their own series (the session has six).
const MAX_REJECT_REASONS: usize = 16;

/// Peers with their own data-plane byte series.
pub const MAX_PEER_SERIES: usize = 64;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn gauge_f64(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

fn gauge_i64(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// Records a swarm event, and the protocol events `libp2p-metrics` understands, into
/// libp2p's own metrics (`libp2p_swarm_*`, `libp2p_identify_*`, `libp2p_kad_*`,
/// `libp2p_ping_*`, `libp2p_gossipsub_*`, `libp2p_dcutr_*`, `libp2p_relay_*`).
pub fn record_swarm(m: &libp2p::metrics::Metrics, ev: &libp2p::swarm::SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    m.record(ev);
    if let libp2p::swarm::SwarmEvent::Behaviour(BehaviourEvent::Gate(inner)) = ev {
        match inner {
            InnerEvent::Identify(e) => m.record(e),
            InnerEvent::Ping(e) => m.record(e),
            InnerEvent::Kad(e) => m.record(e),
            InnerEvent::Gossipsub(e) => m.record(e),
            InnerEvent::Dcutr(e) => m.record(e),
            InnerEvent::RelayServer(e) => m.record(e),
            _ => {}
        }
    }
}

/// The OpenMetrics text of one scrape: this daemon's metrics, then libp2p's (`swarm`).
pub fn render(state: &State, tracker: &Tracker, swarm: Option<&Registry>) -> String {
    let mut reg = Registry::with_prefix("potluck");
    let node = &state.node;
    let run = &state.run;

    reg.register(
        "build",
        "This daemon: its peer id and software version",
        Info::new(labels(&[
            ("peer_id", &node.peer_id),
            ("version", crate::capability::SOFTWARE_VERSION),
        ])),
    );
    reg.register_with_unit(
        "uptime",
        "Time since the daemon started",
        Unit::Seconds,
        gauge_f64(node.uptime_secs),
    );
    if let Some(rss) = node.resident_memory_bytes {
        reg.register_with_unit(
            "process_resident_memory",
            "Resident memory of the daemon's process",
            Unit::Bytes,
            gauge_i64(rss),
        );
    }
    let device = Family::<Labels, Gauge>::default();
    device
        .get_or_create(&labels(&[
            ("kind", &node.capabilities.device_kind),
            ("device", &node.capabilities.device_name),
        ]))
        .set(i64::try_from(node.capabilities.memory_bytes).unwrap_or(i64::MAX));
    reg.register_with_unit(
        "device_memory",
        "Memory of the device this daemon trains on (system memory for the CPU)",
        Unit::Bytes,
        device,
    );
    reg.register(
        "train_tokens_per_second",
        "Training throughput of the reference step on this daemon's device (0: not measured)",
        gauge_f64(node.capabilities.train_tokens_per_sec),
    );

    let peers = Family::<Labels, Gauge>::default();
    for s in [PeerState::Connected, PeerState::Known, PeerState::Gone] {
        let n = state.peers.iter().filter(|p| p.state == s).count();
        peers
            .get_or_create(&labels(&[("state", s.as_str())]))
            .set(n as i64);
    }
    reg.register(
        "peers",
        "Peers this daemon knows, by state (gone: was connected, is no longer)",
        peers,
    );

    // The run in progress (or the last one).
    reg.register(
        "run",
        "The run this daemon takes part in",
        Info::new(labels(&[
            ("run_id", &run.run_id),
            ("name", &run.name),
            ("role", &run.role),
        ])),
    );
    reg.register("run_round", "The round in progress", gauge_i64(run.round));
    reg.register(
        "run_rounds",
        "The rounds the run is planned for",
        gauge_i64(run.rounds),
    );
    reg.register(
        "run_committed_round",
        "The last committed round",
        gauge_i64(run.committed_round),
    );
    reg.register(
        "run_members",
        "Members of the round in progress",
        gauge_i64(run.peers.len() as u64),
    );
    reg.register(
        "train_loss",
        "Training loss of this replica's last round, in nats per byte (token)",
        gauge_f64(f64::from(run.train_loss)),
    );
    reg.register(
        "eval_loss",
        "Held-out loss after the last committed round, in nats per byte (token)",
        gauge_f64(f64::from(run.eval_loss)),
    );
    // By reason; the reasons are the session's fixed names, and a total with no reason
    // recorded (a status from before they were counted) goes under `other`.
    let rejected = Family::<Labels, Counter>::default();
    let mut named = 0;
    for (reason, n) in run.rejected_by_reason.iter().take(MAX_REJECT_REASONS) {
        rejected
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(*n);
        named += n;
    }
    if run.rejected_updates > named {
        rejected
            .get_or_create(&labels(&[("reason", "other")]))
            .inc_by(run.rejected_updates - named);
    }
    reg.register(
        "rejected_updates",
        "Updates from peers this daemon refused, by reason (bad_signature, not_a_member, \
         wrong_slice, undecodable, non_finite, late, invalid)",
        rejected,
    );
    reg.register(
        "paused",
        "1 while training is paused here (potluck pause, or the pause schedule)",
        gauge_i64(u64::from(!run.paused.is_empty())),
    );
    reg.register(
        "reassigned_slices",
        "Slices this replica reduced for a reducer that went silent",
        counter(run.reassigned_slices),
    );
    reg.register(
        "missing_slices",
        "Slices this replica applied as zero because nobody reduced them in time",
        counter(run.missing_slices),
    );
    reg.register(
        "disagreed_rounds",
        "Rounds this replica ended on another root than the committed one",
        counter(run.disagreed_rounds),
    );
    if let Some(t) = run.round_timings.last() {
        let last = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (phase, ms) in [
            ("train", t.train_ms),
            ("local", t.local_ms),
            ("persist", t.persist_ms),
            ("network_wait", t.network_wait_ms),
            ("coordination", t.coordination_ms),
        ] {
            last.get_or_create(&labels(&[("phase", phase)]))
                .set(ms as f64 / 1000.0);
        }
        reg.register_with_unit(
            "last_round_phase",
            "Where the last finished round's time went at this replica",
            Unit::Seconds,
            last,
        );
    }

    // Data plane.
    let bytes = Family::<Labels, Counter>::default();
    bytes
        .get_or_create(&labels(&[("direction", "sent")]))
        .inc_by(run.bytes_sent);
    bytes
        .get_or_create(&labels(&[("direction", "received")]))
        .inc_by(run.bytes_received);
    reg.register_with_unit(
        "dataplane",
        "Bytes of tensor frames this daemon sent and received",
        Unit::Bytes,
        bytes,
    );
    let per_peer = Family::<Labels, Counter>::default();
    let mut busiest: Vec<&crate::web::state::PeerView> = state
        .peers
        .iter()
        .filter(|p| p.bytes_sent + p.bytes_received > 0)
        .collect();
    busiest.sort_by_key(|p| std::cmp::Reverse(p.bytes_sent + p.bytes_received));
    for (i, p) in busiest.iter().enumerate() {
        let peer = if i < MAX_PEER_SERIES {
            p.peer_id.as_str()
        } else {
            "other"
        };
        per_peer
            .get_or_create(&labels(&[("peer", peer), ("direction", "sent")]))
            .inc_by(p.bytes_sent);
        per_peer
            .get_or_create(&labels(&[("peer", peer), ("direction", "received")]))
            .inc_by(p.bytes_received);
    }
    reg.register_with_unit(
        "peer_dataplane",
        "Bytes of tensor frames exchanged with each peer",
        Unit::Bytes,
        per_peer,
    );

    // What the tracker counted from events and timings.
    reg.register(
        "rounds_committed",
        "Rounds this daemon saw committed",
        tracker.rounds_committed.clone(),
    );
    reg.register(
        "rounds_not_committed",
        "Rounds that ended without a commit, by reason",
        tracker.rounds_not_committed.clone(),
    );
    reg.register_with_unit(
        "round_phase",
        "Time this replica spent in each phase of its rounds",
        Unit::Seconds,
        tracker.phase_seconds.clone(),
    );
    reg.register_with_unit(
        "round_duration",
        "Wall time of each round at this replica, from its opening to the next",
        Unit::Seconds,
        tracker.round_duration.clone(),
    );

    register_rate_caps(&mut reg, &node.rate_caps);

    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut out, &reg);
    if let Some(swarm) = swarm {
        let _ = encode_registry(&mut out, swarm);
    }
    let _ = encode_eof(&mut out);
    out
}

/// The data plane's caps: the cap itself (0: none) and, for a capped direction, the bytes
/// that went through it and the time streams waited for it.
fn register_rate_caps(reg: &mut Registry, caps: &[crate::web::state::RateCapView]) {
    let cap = Family::<Labels, Gauge>::default();
    let bytes = Family::<Labels, Counter>::default();
    let waited = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for c in caps {
        let l = labels(&[("direction", &c.direction)]);
        cap.get_or_create(&l)
            .set(i64::try_from(c.cap_bytes_per_sec).unwrap_or(i64::MAX));
        if c.cap_bytes_per_sec > 0 {
            bytes.get_or_create(&l).inc_by(c.bytes);
            waited.get_or_create(&l).inc_by(c.waited_secs);
        }
    }
    reg.register(
        "rate_cap_bytes_per_second",
        "The data plane's rate cap by direction (0: no cap)",
        cap,
    );
    reg.register_with_unit(
        "rate_capped",
        "Bytes that went through the data plane's rate cap",
        Unit::Bytes,
        bytes,
    );
    reg.register_with_unit(
        "rate_cap_wait",
        "Time data-plane streams spent waiting for the rate cap, summed over streams",
        Unit::Seconds,
        waited,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::session::{RoundTiming, RunEvent, RunStatus};
    use crate::web::state::{CapsView, NodeView, PeerView};

    fn state(peers: Vec<PeerView>) -> State {
        State {
            generated_at_ms: 1,
            node: NodeView {
                peer_id: "12D3KooWtest".into(),
                swarm: "public".into(),
                listen_addrs: vec![],
                uptime_secs: 12.5,
                capabilities: CapsView {
                    device_kind: "cpu".into(),
                    device_name: "Some \"quoted\" CPU".into(),
                    memory_bytes: 1 << 30,
                    ..Default::default()
                },
                resident_memory_bytes: Some(1234),
                rate_caps: vec![
                    crate::web::state::RateCapView {
                        direction: "upload".into(),
                        cap_bytes_per_sec: 1_000_000,
                        bytes: 5_000_000,
                        waited_secs: 2.5,
                    },
                    crate::web::state::RateCapView {
                        direction: "download".into(),
                        ..Default::default()
                    },
                ],
            },
            peers,
            run: RunStatus {
                run_id: "abc".into(),
                round: 4,
                rounds: 12,
                eval_loss: 1.5,
                bytes_sent: 100,
                bytes_received: 200,
                rejected_updates: 3,
                rejected_by_reason: [("bad_signature".to_string(), 2)].into(),
                paused: "paused by `potluck pause` (until `potluck resume`)".into(),
                round_timings: vec![RoundTiming {
                    round: 3,
                    train_ms: 1500,
                    wall_ms: 2000,
                    ..Default::default()
                }],
                ..Default::default()
            },
            history: vec![],
            round_bytes: vec![],
            ledger: None,
        }
    }

    fn peer(i: usize, state: PeerState, bytes: u64) -> PeerView {
        PeerView {
            peer_id: format!("peer{i}"),
            state,
            addrs: vec![],
            capabilities: None,
            record_age_secs: None,
            in_run: false,
            bytes_sent: bytes,
            bytes_received: bytes,
            last_connected_ms: None,
        }
    }

    /// The value of the sample `line_start` (name and labels as written).
    fn sample(text: &str, line_start: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {line_start} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn snapshot_and_tracker_become_named_samples() {
        let mut tracker = Tracker::default();
        tracker.handle_event(
            "abc",
            &RunEvent::NotCommitted {
                round: 1,
                reason: "Deadline".into(),
            },
            0,
        );
        tracker.handle_timings("abc", &state(vec![]).run.round_timings);
        let text = render(
            &state(vec![
                peer(0, PeerState::Connected, 10),
                peer(1, PeerState::Gone, 0),
            ]),
            &tracker,
            None,
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(sample(&text, "potluck_uptime_seconds"), 12.5);
        assert_eq!(sample(&text, "potluck_peers{state=\"connected\"}"), 1.0);
        assert_eq!(sample(&text, "potluck_peers{state=\"gone\"}"), 1.0);
        assert_eq!(sample(&text, "potluck_run_round"), 4.0);
        assert_eq!(sample(&text, "potluck_eval_loss"), 1.5);
        assert_eq!(
            sample(
                &text,
                "potluck_rejected_updates_total{reason=\"bad_signature\"}"
            ),
            2.0
        );
        assert_eq!(
            sample(&text, "potluck_rejected_updates_total{reason=\"other\"}"),
            1.0,
            "a total without a reason recorded"
        );
        assert_eq!(sample(&text, "potluck_paused"), 1.0);
        assert_eq!(
            sample(
                &text,
                "potluck_dataplane_bytes_total{direction=\"received\"}"
            ),
            200.0
        );
        assert_eq!(
            sample(
                &text,
                "potluck_peer_dataplane_bytes_total{peer=\"peer0\",direction=\"sent\"}"
            ),
            10.0
        );
        assert_eq!(
            sample(
                &text,
                "potluck_rounds_not_committed_total{reason=\"Deadline\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "potluck_round_phase_seconds_total{phase=\"train\"}"),
            1.5
        );
        assert_eq!(
            sample(&text, "potluck_last_round_phase_seconds{phase=\"train\"}"),
            1.5
        );
        assert_eq!(sample(&text, "potluck_round_duration_seconds_count"), 1.0);
        assert_eq!(
            sample(&text, "potluck_process_resident_memory_bytes"),
            1234.0
        );
        // A quote in a label value is escaped.
        assert!(text.contains(r#"device="Some \"quoted\" CPU""#), "{text}");
        assert!(text.contains("# TYPE potluck_rounds_committed counter"));
    }

    #[test]
    fn rate_caps_are_gauges_and_counters_by_direction() {
        let text = render(&state(vec![]), &Tracker::default(), None);
        assert_eq!(
            sample(
                &text,
                "potluck_rate_cap_bytes_per_second{direction=\"upload\"}"
            ),
            1e6
        );
        assert_eq!(
            sample(
                &text,
                "potluck_rate_cap_bytes_per_second{direction=\"download\"}"
            ),
            0.0
        );
        assert_eq!(
            sample(
                &text,
                "potluck_rate_capped_bytes_total{direction=\"upload\"}"
            ),
            5e6
        );
        assert_eq!(
            sample(
                &text,
                "potluck_rate_cap_wait_seconds_total{direction=\"upload\"}"
            ),
            2.5
        );
        // An uncapped direction counts nothing.
        assert!(!text.contains("potluck_rate_capped_bytes_total{direction=\"download\"}"));
    }

    #[test]
    fn peer_series_are_capped() {
        let peers: Vec<PeerView> = (0..MAX_PEER_SERIES + 10)
            .map(|i| peer(i, PeerState::Connected, 1000 - i as u64))
            .collect();
        let text = render(&state(peers), &Tracker::default(), None);
        let series = text
            .lines()
            .filter(|l| l.starts_with("potluck_peer_dataplane_bytes_total{"))
            .count();
        assert_eq!(series, 2 * (MAX_PEER_SERIES + 1));
        // The 10 quietest peers are summed as `other`.
        let other: u64 = (MAX_PEER_SERIES..MAX_PEER_SERIES + 10)
            .map(|i| 1000 - i as u64)
            .sum();
        assert_eq!(
            sample(
                &text,
                "potluck_peer_dataplane_bytes_total{peer=\"other\",direction=\"sent\"}"
            ),
            other as f64
        );
    }
}
