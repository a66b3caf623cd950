//! A deterministic in-memory simulation of the sharded exchange: N peers, each driving its
//! own [`Exchange`] machine the way the daemon does (carry out every action, then a buffered
//! frame, else wait for the next frame or the machine's timeout), wired together by a
//! simulated network with per-frame latency, loss, duplication (late copies) and
//! partitions, and faults injected at a time or at any step of a peer (a reducer or its
//! backup dying before any one of its actions). Reductions use the real reducer
//! ([`crate::aggregate::reduce`]) on small f32 vectors.
//!
//! Boundary: no threads, no clock, no sockets. Time is a counter of simulated microseconds
//! laid over one `Instant` origin; events at the same time run in the order they were
//! scheduled; all randomness comes from the seed (ChaCha8). The same config gives the same
//! report.
//!
//! What it checks as it runs ([`SimReport::violations`]): no peer reduces or forwards a slice
//! to everyone twice in one exchange, what a peer applies for a slice is the first reduced
//! frame it accepted for it, no machine asks to be woken after its exchange's end, and every
//! exchange ends by its deadline. What holds across peers (agreement, where the faults allow
//! it) is for the caller to check on the report.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::PeerId;
use crate::aggregate::{Contribution, MAX_NORM_RATIO, ValidationLimits, reduce};
use crate::exchange::{Action, Admit, Deadlines, Exchange, ExchangeConfig, FINISH_BY, Heard, Span};

/// A vector of values shared between frames (a peer's whole update, or a reduced slice).
pub type Values = Arc<Vec<f32>>;

/// A contribution as a simulated peer holds it: the sender's tokens and its whole update
/// (the slice is cut out when it is reduced).
type Contributed = (u64, Values);
type Machine = Exchange<u32, Contributed, Values>;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub peers: usize,
    /// Values in each member's slice (the update has `peers * values_per_slice`).
    pub values_per_slice: usize,
    /// Consecutive exchanges each peer runs (parts of a round, or data-parallel steps): a
    /// peer starts the next as soon as it is done with one, so frames of a later part reach
    /// peers still in an earlier one.
    pub parts: u32,
    /// Each exchange's span (its phases are [`Deadlines::split`] of it).
    pub span: Duration,
    pub seed: u64,
    /// Each frame's latency is drawn uniformly from this range, per frame (so frames
    /// overtake each other).
    pub latency: (Duration, Duration),
    /// Chance that a frame is lost.
    pub loss: f64,
    /// Chance that a frame arrives a second time, up to one span later.
    pub duplicate: f64,
    /// Peers without an update: they abstain.
    pub abstaining: BTreeSet<usize>,
    pub faults: Vec<Fault>,
    /// How long after a peer dies the others hear it is gone (the coordinator's word);
    /// `None`: never, they find out by the deadline phases.
    pub gone_notice: Option<Duration>,
}

impl SimConfig {
    /// `peers` peers on a clean network: 1 to 2 ms of latency, exchanges of 10 s.
    pub fn clean(peers: usize, seed: u64) -> Self {
        SimConfig {
            peers,
            values_per_slice: 4,
            parts: 1,
            span: Duration::from_secs(10),
            seed,
            latency: (Duration::from_millis(1), Duration::from_millis(2)),
            loss: 0.0,
            duplicate: 0.0,
            abstaining: BTreeSet::new(),
            faults: Vec::new(),
            gone_notice: None,
        }
    }
}

/// A fault to inject.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// `peer` dies at `at` after the start.
    CrashAt { peer: usize, at: Duration },
    /// `peer` dies just before it carries out its action number `step`, counted over all its
    /// exchanges from 0 (its first send).
    CrashAtStep { peer: usize, step: usize },
    /// Frames between `side` and the other peers are lost from `from` to `until`.
    Partition {
        side: BTreeSet<usize>,
        from: Duration,
        until: Duration,
    },
}

/// What one peer did.
#[derive(Debug, Clone, Default)]
pub struct PeerReport {
    /// It did not die.
    pub alive: bool,
    /// Per exchange it finished: per slice, what it applied (`None`: zero, missing).
    pub applied: Vec<Vec<Option<Values>>>,
    /// When each of its exchanges started and ended.
    pub started: Vec<Duration>,
    pub finished: Vec<Duration>,
    /// Slices it took over as a backup.
    pub took_over: usize,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub peers: Vec<PeerReport>,
    /// Every reduction any peer sent to everyone, per (part, slice).
    pub produced: BTreeMap<(u32, usize), Vec<Values>>,
    /// Frames put on the simulated network, and of those lost.
    pub frames: u64,
    pub lost: u64,
    /// Frames the machines refused, or dropped as stale or beyond the early buffer.
    pub refused: u64,
    pub dropped: u64,
    /// Broken invariants (see the module doc); empty in a correct run.
    pub violations: Vec<String>,
    /// When the last peer finished its last exchange.
    pub end: Duration,
    /// The most events (frames in flight, timers) queued at once.
    pub peak_queued: usize,
}

/// Runs the simulation to its end (no event left) and reports.
pub fn run(cfg: &SimConfig) -> SimReport {
    let mut net = Net {
        cfg: cfg.clone(),
        origin: Instant::now(),
        now: 0,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        queue: BTreeMap::new(),
        queued: 0,
        report: SimReport::default(),
    };
    let mut peers: Vec<Peer> = (0..cfg.peers).map(|_| Peer::default()).collect();
    for f in &cfg.faults {
        if let Fault::CrashAt { peer, at } = f {
            net.schedule(micros(*at), Event::Crash { peer: *peer });
        }
    }
    for p in 0..cfg.peers {
        start_part(&mut net, &mut peers, p, 0);
    }
    for p in 0..cfg.peers {
        drive(&mut net, &mut peers, p);
    }
    while let Some((at, event)) = net.pop() {
        net.now = at;
        match event {
            Event::Deliver(frame) => {
                let to = frame.to as usize;
                if peers[to].alive && peers[to].machine.is_some() {
                    feed(&mut net, &mut peers[to], frame);
                    drive(&mut net, &mut peers, to);
                }
            }
            Event::Wake { peer, at } => {
                if peers[peer].wake == Some(at) {
                    peers[peer].wake = None;
                    drive(&mut net, &mut peers, peer);
                }
            }
            Event::Crash { peer } => die(&mut net, &mut peers, peer),
            Event::Gone { to, who } => {
                let peer = &mut peers[to];
                if peer.alive && peer.gone.insert(who) {
                    if let Some(m) = &mut peer.machine {
                        m.handle_gone(peer.gone.clone());
                    }
                    drive(&mut net, &mut peers, to);
                }
            }
        }
    }
    net.report.end = peers
        .iter()
        .flat_map(|p| p.report.finished.last().copied())
        .max()
        .unwrap_or_default();
    net.report.peers = peers.into_iter().map(|p| p.report).collect();
    net.report
}

#[derive(Debug, Default)]
struct Peer {
    alive: bool,
    machine: Option<Machine>,
    part: u32,
    /// This part's update (none: it abstains) and its tokens.
    update: Option<Values>,
    tokens: u64,
    /// Frames for later parts, and those taken from there when this part started.
    early: Vec<Frame>,
    pending: Vec<Frame>,
    /// The wake-up scheduled, if any.
    wake: Option<u64>,
    /// Actions carried out so far, over all parts.
    steps: usize,
    gone: BTreeSet<usize>,
    /// This part: the first reduced frame accepted per slice, and slices sent to everyone.
    first: BTreeMap<usize, Values>,
    sent_to_all: BTreeSet<usize>,
    report: PeerReport,
}

#[derive(Debug, Clone)]
struct Frame {
    from: u32,
    to: u32,
    part: u32,
    slice: u32,
    span: Span,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    Contribution { tokens: u64, update: Option<Values> },
    Reduced(Values),
}

#[derive(Debug)]
enum Event {
    Deliver(Frame),
    Wake { peer: usize, at: u64 },
    Crash { peer: usize },
    Gone { to: usize, who: usize },
}

/// The simulated network, clock and randomness.
struct Net {
    cfg: SimConfig,
    origin: Instant,
    now: u64,
    rng: ChaCha8Rng,
    /// Events by the time they happen, in the order they were scheduled: a calendar (few
    /// distinct times, many events each) stays small and cache-friendly where a heap of a
    /// million frames does not.
    queue: BTreeMap<u64, VecDeque<Event>>,
    queued: usize,
    report: SimReport,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Net {
    fn instant(&self, at: u64) -> Instant {
        self.origin + Duration::from_micros(at)
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.queue.entry(at).or_default().push_back(event);
        self.queued += 1;
        self.report.peak_queued = self.report.peak_queued.max(self.queued);
    }

    /// The next event and its time.
    fn pop(&mut self) -> Option<(u64, Event)> {
        let mut first = self.queue.first_entry()?;
        let at = *first.key();
        let event = first.get_mut().pop_front();
        if first.get().is_empty() {
            first.remove();
        }
        self.queued -= 1;
        event.map(|e| (at, e))
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.rng.random()
    }

    /// Uniform in [lo, hi]; `lo` when the range is empty.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        let now = Duration::from_micros(self.now);
        self.cfg.faults.iter().any(|f| match f {
            Fault::Partition { side, from, until } => {
                now >= *from && now < *until && side.contains(&a) != side.contains(&b)
            }
            _ => false,
        })
    }

    fn send(&mut self, frame: Frame) {
        self.report.frames += 1;
        if self.partitioned(frame.from as usize, frame.to as usize) || self.unit() < self.cfg.loss {
            self.report.lost += 1;
            return;
        }
        let (lo, hi) = (micros(self.cfg.latency.0), micros(self.cfg.latency.1));
        let at = self.now + self.between(lo, hi);
        if self.unit() < self.cfg.duplicate {
            let later = at + self.between(0, micros(self.cfg.span));
            self.schedule(later, Event::Deliver(frame.clone()));
        }
        self.schedule(at, Event::Deliver(frame));
    }
}

/// Starts exchange `part` at peer `p`, or ends its run after the last one.
fn start_part(net: &mut Net, peers: &mut [Peer], p: usize, part: u32) {
    let cfg = &net.cfg;
    let n = cfg.peers;
    let vps = cfg.values_per_slice;
    let peer = &mut peers[p];
    if part == 0 {
        peer.alive = true;
        peer.report.alive = true;
    }
    if part >= cfg.parts {
        peer.machine = None;
        return;
    }
    let deadlines = Deadlines::split(net.instant(net.now), cfg.span);
    let machine = Exchange::new(ExchangeConfig {
        round: 1,
        part,
        members: (0..n as u32).collect(),
        me: p,
        len: n * vps,
        deadlines,
    });
    let mut machine = match machine {
        Ok(m) => m,
        Err(e) => {
            net.report.violations.push(format!("peer {p}: {e}"));
            return;
        }
    };
    machine.handle_gone(peer.gone.clone());
    peer.machine = Some(machine);
    peer.part = part;
    peer.tokens = 1 + (p as u64 % 4);
    peer.update = if cfg.abstaining.contains(&p) {
        None
    } else {
        Some(Arc::new(update_of(cfg.seed, p, part, n * vps)))
    };
    peer.pending = std::mem::take(&mut peer.early);
    peer.first.clear();
    peer.sent_to_all.clear();
    peer.report.started.push(Duration::from_micros(net.now));
}

/// A peer's update for one part: values in [-1, 1) from the seed.
pub fn update_of(seed: u64, p: usize, part: u32, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((p as u64) << 20) ^ (u64::from(part) << 52));
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn die(net: &mut Net, peers: &mut [Peer], p: usize) {
    if !peers[p].alive {
        return;
    }
    peers[p].alive = false;
    peers[p].report.alive = false;
    if let Some(d) = net.cfg.gone_notice {
        let at = net.now + micros(d);
        for to in (0..peers.len()).filter(|q| *q != p) {
            net.schedule(at, Event::Gone { to, who: p });
        }
    }
}

/// The daemon's loop at one peer: actions, then a buffered frame, else sleep until the
/// machine's timeout (or the next frame).
fn drive(net: &mut Net, peers: &mut [Peer], p: usize) {
    loop {
        if !peers[p].alive {
            return;
        }
        let now = net.instant(net.now);
        let Some(mut m) = peers[p].machine.take() else {
            return;
        };
        while let Some(action) = m.poll_action(now) {
            let step = peers[p].steps;
            let dies = net.cfg.faults.iter().any(
                |f| matches!(f, Fault::CrashAtStep { peer, step: s } if *peer == p && *s == step),
            );
            if dies {
                peers[p].machine = Some(m);
                die(net, peers, p);
                return;
            }
            peers[p].steps += 1;
            carry(net, &mut peers[p], &m, p, action);
        }
        if m.is_complete(now) {
            end_part(net, peers, p, m);
            continue;
        }
        if let Some(f) = peers[p].pending.pop() {
            feed_machine(net, &mut peers[p], &mut m, f);
            peers[p].machine = Some(m);
            continue;
        }
        match m.poll_timeout(now) {
            None => {
                end_part(net, peers, p, m);
                continue;
            }
            Some(t) => {
                if t > m.deadlines().finish_by {
                    net.report.violations.push(format!(
                        "peer {p}: woken after the end of part {}",
                        m.part()
                    ));
                }
                let at = micros(t.saturating_duration_since(net.origin));
                let peer = &mut peers[p];
                peer.machine = Some(m);
                if peer.wake != Some(at) {
                    peer.wake = Some(at);
                    net.schedule(at.max(net.now), Event::Wake { peer: p, at });
                }
                return;
            }
        }
    }
}

fn end_part(net: &mut Net, peers: &mut [Peer], p: usize, m: Machine) {
    let finish_by = m.deadlines().finish_by;
    let part = m.part();
    let out = m.finish();
    let peer = &mut peers[p];
    for (slice, got) in out.slices.iter().enumerate() {
        if let Some(v) = got
            && !peer.first.get(&slice).is_some_and(|f| Arc::ptr_eq(f, v))
        {
            net.report.violations.push(format!(
                "peer {p}: part {part} slice {slice} applied other than its first word"
            ));
        }
    }
    if net.instant(net.now) > finish_by {
        net.report
            .violations
            .push(format!("peer {p}: part {part} ended after its deadline"));
    }
    peer.report.applied.push(out.slices);
    peer.report.finished.push(Duration::from_micros(net.now));
    start_part(net, peers, p, part + 1);
}

fn feed(net: &mut Net, peer: &mut Peer, frame: Frame) {
    let Some(mut m) = peer.machine.take() else {
        return;
    };
    feed_machine(net, peer, &mut m, frame);
    peer.machine = Some(m);
}

fn feed_machine(net: &mut Net, peer: &mut Peer, m: &mut Machine, frame: Frame) {
    let from_peer = || peer.early.iter().filter(|f| f.from == frame.from).count();
    match m.admit(1, frame.part, peer.early.len(), from_peer) {
        Admit::Current => {}
        Admit::Buffer => {
            peer.early.push(frame);
            return;
        }
        Admit::Full | Admit::Stale => {
            net.report.dropped += 1;
            return;
        }
    }
    let now = net.instant(net.now);
    let heard = match frame.body {
        Body::Contribution { update: None, .. } => {
            m.handle_abstention(now, &frame.from, frame.slice, frame.span)
        }
        Body::Contribution {
            tokens,
            update: Some(u),
        } => m.handle_contribution(now, &frame.from, frame.slice, frame.span, || {
            Ok((tokens, u))
        }),
        Body::Reduced(v) => {
            let h = m.handle_reduced(&frame.from, frame.slice, frame.span, || Ok(v.clone()));
            if h == Ok(Heard::Reduced) {
                peer.first.insert(frame.slice as usize, v);
            }
            h
        }
    };
    if heard.is_err() {
        net.report.refused += 1;
    }
}

fn carry(
    net: &mut Net,
    peer: &mut Peer,
    m: &Machine,
    p: usize,
    action: Action<u32, Contributed, Values>,
) {
    let span_of = |slice: usize| {
        let r = &m.ranges()[slice];
        Span {
            offset: r.start as u64,
            len: r.len() as u64,
        }
    };
    let n = m.members().len() as u32;
    let part = m.part();
    // A reduced slice goes to one member, or to every member (this peer included).
    let send_reduced = |net: &mut Net, slice: usize, to: Option<u32>, values: &Values| {
        for to in to.map_or(0..n, |q| q..q + 1) {
            net.send(Frame {
                from: p as u32,
                to,
                part,
                slice: slice as u32,
                span: span_of(slice),
                body: Body::Reduced(values.clone()),
            });
        }
    };
    match action {
        Action::SendContribution { slice, to } => net.send(Frame {
            from: p as u32,
            to,
            part,
            slice: slice as u32,
            span: span_of(slice),
            body: Body::Contribution {
                tokens: peer.tokens,
                update: peer.update.clone(),
            },
        }),
        Action::Reduce {
            slice,
            contributions,
        } => {
            let mean = Arc::new(reduce_slice(&contributions, m.ranges()[slice].clone()));
            net.report
                .produced
                .entry((part, slice))
                .or_default()
                .push(mean.clone());
            if !peer.sent_to_all.insert(slice) {
                net.report
                    .violations
                    .push(format!("peer {p}: part {part} slice {slice} reduced twice"));
            }
            send_reduced(net, slice, None, &mean);
        }
        Action::Forward { slice, reduced, to } => {
            if to.is_none() && !peer.sent_to_all.insert(slice) {
                net.report.violations.push(format!(
                    "peer {p}: part {part} slice {slice} forwarded twice"
                ));
            }
            send_reduced(net, slice, to, &reduced);
        }
        Action::TookOver { .. } => peer.report.took_over += 1,
    }
}

/// The reducer's work, as the daemon does it: nothing heard is a zero slice; otherwise the
/// coordinator crate's validation and mean, zero when nothing is acceptable.
fn reduce_slice(
    contributions: &BTreeMap<u32, Contributed>,
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    let len = range.len();
    if contributions.is_empty() {
        return vec![0.0; len];
    }
    let ids: Vec<PeerId> = contributions
        .keys()
        .map(|p| PeerId(p.to_be_bytes().to_vec()))
        .collect();
    let all: Vec<Contribution<'_>> = ids
        .iter()
        .zip(contributions.values())
        .map(|(peer, (tokens, update))| Contribution {
            peer,
            tokens: *tokens,
            values: update.get(range.clone()).unwrap_or(&[]),
        })
        .collect();
    let limits = ValidationLimits {
        expected_len: len,
        max_norm_ratio: MAX_NORM_RATIO,
    };
    reduce(&all, limits).mean.unwrap_or_else(|_| vec![0.0; len])
}

/// The span an exchange may take before it must have ended: [`FINISH_BY`] of `span`.
pub fn exchange_limit(span: Duration) -> Duration {
    span.mul_f64(FINISH_BY)
}
