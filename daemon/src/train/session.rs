//! Swarm training over libp2p streams: the coordinator loop, the replica loop, and the
//! tensor traffic between replicas.
//!
//! A run has one coordinator (the peer that started it) and any number of replicas (the
//! coordinator's own daemon is one of them). Each replica holds one control stream to the
//! coordinator (`/potluck/train-ctl/1`, length-prefixed `TrainControl`) and sends tensors as
//! signed frames on short-lived streams (`/potluck/tensor/2`, see [`crate::dataplane`]).
//!
//! A round: the coordinator opens it with the sorted member list; every member trains H
//! inner steps on its shard, compresses its pseudo-gradient with error feedback, and sends
//! slice `i` to member `i`; member `i` averages the contributions it got (weighted by tokens,
//! in peer-id order), and sends the averaged slice back to every member; every member
//! applies the same decoded bytes with the worker's deterministic outer step, hashes its
//! weights and outer state, and reports the root; the coordinator commits the root that a
//! quorum holds. A member whose root differs rolls back to the last committed state it
//! holds, or fetches it from a peer that agreed, before the next round. Nobody waits for the
//! slowest: of what is left of the round's deadline after training, contributions are
//! collected until 60%; a reduced slice still missing at 70% is reduced again by its backup
//! (the next member in order) from the contributions every member keeps until the exchange
//! ends; at 85% whatever is still missing is zero for that round.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{PeerId, StreamProtocol};
use potluck_coordinator::aggregate::Aggregation;
use potluck_coordinator::exchange::{
    Action as ExchangeAction, Admit, Deadlines, Exchange, ExchangeConfig, Invalid,
    Rejected as ExchangeRejected, Span,
};
use potluck_coordinator::failover::SignedRunManifest;
use potluck_coordinator::manifest::{CheckpointContent, SignedManifest};
use potluck_coordinator::rejections::{Rejections, legacy_lines};
use potluck_coordinator::round::{Action, Report, RunConfig, RunMachine};
use potluck_coordinator::store::Ledger;
use potluck_coordinator::succession::{Step, Succession};
use potluck_coordinator::{Hash32, PeerId as CPeerId};
use potluck_proto::v1::{
    FrameHeader, FrameKind, Lobby, MemberLeft, PauseNotice, RoundCommit, RoundOpen, RunFinished,
    RunJoin, RunRefused, RunWelcome, TrainControl, TrainReport, train_control::Msg,
};
use potluck_worker::compress::{self, Codec, ErrorFeedback};
use potluck_worker::{DeviceSpec, OuterOptimizer, Replica};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::checkpoint::{self, InnerState};
use super::manifest::{ManifestError, ResolvedRun, RunMode};
use super::pause::{PauseCause, PauseStep, PauseSwitch, PausedMembers, Schedule};
use super::plan::slice_ranges;
use super::reduce::{reduce_codec, reduce_slice};
use super::waiting::{self, Phase};
use super::wire::{MAX_CONTROL_BYTES, read_control, write_control};
use super::{basepack, datapack};
use crate::dataplane::{Frame, Limits, read_frame, seal_payload, signing_bytes, write_frame};
use crate::ratelimit::{Limited, RateLimiter};

mod data_parallel;
mod departures;

use departures::{Departures, UNTIL_WELCOMED};

/// A tensor stream: its bytes count against the daemon's rate caps.
type DataStream = Limited<libp2p::Stream>;

/// The control protocol of a run.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/train-ctl/1");
/// The tensor protocol: one frame per stream (a state request gets its answer on the same
/// stream, any other frame a one-byte acknowledgement). Version 2: the acknowledgement and the
/// signed `part` of a frame header; daemons of version 1 cannot exchange tensors with it.
pub const TENSOR_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/tensor/2");

/// Deadline to open a stream to a peer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How many states a replica keeps to serve: the committed one and the one after it, plus
/// what it held before it rejoined a run (a coordinator that died before announcing a
/// commit leaves the replicas holding the only copies of that state).
const SERVED_STATES: usize = 4;
/// How long, in 100 ms polls, a state request waits for the state to appear.
const STATE_WAIT_POLLS: usize = 50;
/// Attempts to open a stream before giving up on a peer.
const OPEN_ATTEMPTS: u32 = 6;
/// Tries at fetching a committed checkpoint before asking for the state instead.
const FETCH_ATTEMPTS: u32 = 8;
/// Peers a welcome names as sources of the run's data, at most.
const MAX_DATA_SOURCES: usize = 16;
/// Deadline for one frame to arrive once its stream is open.
const FRAME_TIMEOUT: Duration = Duration::from_secs(120);
/// The byte a receiver answers a frame it accepted with.
const FRAME_ACK: u8 = 0xac;
/// Deadline for writing that byte.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at delivering one frame.
const SEND_ATTEMPTS: u32 = 5;
/// Deadline for a joining replica to be welcomed.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many inbound tensor streams are served at once.
const MAX_INBOUND_STREAMS: usize = 64;
/// Frames waiting for the run loop; a full inbox slows the senders down.
const INBOX_CAPACITY: usize = 256;
/// Members a run admits at most.
const MAX_MEMBERS: usize = 1024;
/// How long a daemon that coordinates nothing waits for a join, and for each answer to it.
const ENDED_RUN_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The file in a run's directory that says its coordinator ended the run.
const ENDED_FILE: &str = "ended";
/// How long a coordinator waits for its own replica's state of a committed round before it
/// fetches that state from an agreeing peer.
const OWN_STATE_WAIT: Duration = Duration::from_secs(3);
/// The most ledger bytes one answer carries (about 500 rounds of a manifest of 128 KiB,
/// that is of a checkpoint of 4 GB at 1 MiB chunks); a longer ledger is not copied.
const MAX_LEDGER_BYTES: usize = 64 << 20;
/// How long a replica waits for the ledger entries it asked for.
const LEDGER_TIMEOUT: Duration = Duration::from_secs(30);
/// Held-out batches evaluated after each round.
const EVAL_BATCHES: usize = 4;
/// The pause between two passes over the succession while looking for a coordinator.
const FAILOVER_RETRY: Duration = Duration::from_millis(500);

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("worker: {0}")]
    Worker(#[from] potluck_worker::WorkerError),
    #[error("codec: {0}")]
    Codec(#[from] compress::CodecError),
    #[error("run manifest: {0}")]
    Manifest(#[from] ManifestError),
    #[error("the run's coordinator {0} could not be reached: {1}")]
    Unreachable(PeerId, String),
    #[error("the coordinator refused to admit this peer: {0}")]
    Refused(String),
    #[error(
        "{0} does not let this daemon take part in its runs: it runs a private swarm that has \
         not admitted this peer (ask its owner for an invite and use `potluck join` with the \
         whole invite line, or `potluck swarm join INVITE` first), or it is not a potluck \
         daemon"
    )]
    NotAdmitted(PeerId),
    #[error("the coordinator went away before the run finished")]
    CoordinatorGone,
    #[error(
        "run {run} already finished (its last commit is round {round}); to train again with \
         the same settings, start a new run: `potluck run start --fresh FILE`"
    )]
    RunFinished { run: String, round: u64 },
    #[error(
        "this daemon took part in run {0} as a replica, so it cannot start it as a new \
         coordinator; to train again with the same settings, start a new run: `potluck run \
         start --fresh FILE`"
    )]
    ReplicaOfRun(String),
    #[error("a run is already active on this daemon; wait for it to finish")]
    Busy,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The round's placement gave an exchange no members, or not this replica among them:
    /// a bug in the placement, not something a peer or the user can cause.
    #[error("setting up the round's exchange: {0} (a bug in potluck; please report it)")]
    Exchange(#[from] potluck_coordinator::exchange::ConfigError),
    #[error("{0}")]
    Other(String),
}

/// Bytes on the wire, per peer, per round and in total, both directions.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
    per_peer: Mutex<BTreeMap<PeerId, (u64, u64)>>,
    /// The round in progress here: bytes count towards it, whatever they carry.
    round: AtomicU64,
    per_round: Mutex<BTreeMap<u64, (u64, u64)>>,
}

/// Rounds whose byte counts are kept.
const ROUNDS_COUNTED: usize = 1024;

impl Traffic {
    fn add(&self, peer: PeerId, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
        if let Ok(mut m) = self.per_peer.lock() {
            let e = m.entry(peer).or_default();
            e.0 += sent;
            e.1 += received;
        }
        let round = self.round.load(Ordering::Relaxed);
        if let Ok(mut m) = self.per_round.lock() {
            let e = m.entry(round).or_default();
            e.0 += sent;
            e.1 += received;
            while m.len() > ROUNDS_COUNTED {
                m.pop_first();
            }
        }
    }

    /// Marks the start of `round`: later bytes count towards it.
    fn set_round(&self, round: u64) {
        self.round.store(round, Ordering::Relaxed);
    }

    /// Bytes sent and received during each round (round 0: before the first one), for the
    /// last 1024 rounds.
    pub fn per_round(&self) -> BTreeMap<u64, (u64, u64)> {
        self.per_round.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Total bytes sent and received.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Bytes sent to and received from each peer.
    pub fn per_peer(&self) -> BTreeMap<PeerId, (u64, u64)> {
        self.per_peer.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What `potluck run status` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunStatus {
    pub run_id: String,
    pub name: String,
    pub role: String,
    /// The peer id of the run's coordinator as this daemon knows it now (itself after a
    /// takeover).
    pub coordinator: String,
    pub state: String,
    pub round: u64,
    pub rounds: u64,
    pub committed_round: u64,
    pub committed_root: String,
    pub train_loss: f32,
    pub eval_loss: f32,
    pub peers: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Bytes sent and received in the last rounds: `(round, sent, received)`.
    pub round_bytes: Vec<(u64, u64, u64)>,
    pub rejected_updates: u64,
    /// Slices this replica reduced for a silent reducer.
    pub reassigned_slices: u64,
    /// Slices this replica applied as zero because nobody reduced them in time.
    pub missing_slices: u64,
    /// Rounds this replica ended on another root than the committed one (it then resyncs).
    pub disagreed_rounds: u64,
    /// Where the time of the last rounds went at this replica, oldest first.
    pub round_timings: Vec<RoundTiming>,
    pub error: String,
    /// What the session is doing, for [`waiting::explain`].
    pub phase: Phase,
    /// The coordinator's last word while no round was open: (members, needed, paused).
    pub lobby: Option<(u32, u32, u32)>,
    /// The exchange in progress: members whose word this replica has for its slice, of the
    /// round's members.
    pub collected: Option<(u32, u32)>,
    /// At the coordinator: reports in for the open round, of its participants.
    pub reports: Option<(u32, u32)>,
    /// Why training is paused here; empty when it is not.
    pub paused: String,
    /// What the run waits for, in words ([`waiting::explain`]); empty when nothing.
    pub waiting: String,
    /// Updates this daemon refused, by reason ([`RejectReason`]).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The committed round of the saved state this replica last rebuilt itself from (its
    /// inner optimizer and error feedback), after a restart or a pause.
    pub resumed_from: Option<u64>,
}

/// Why this daemon refused an update: the `reason` label of
/// `potluck_rejected_updates_total`, and of the refusals a round's report lists.
pub use potluck_coordinator::rejections::RejectReason;

/// Rounds whose timings a status keeps.
const ROUNDS_TIMED: usize = 8;

/// Where one round's wall time went at one replica: computing, waiting on the data plane,
/// or waiting for the coordinator (and through it for the other replicas' reports). Logged
/// once per round (`round timing`, target `potluck::timing`) and kept in [`RunStatus`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundTiming {
    pub round: u64,
    /// Whether the round's exchange overlapped its training (the run's `overlap`).
    pub overlap: bool,
    /// From the round's opening to the next opening (or the run's end), at this replica.
    pub wall_ms: u64,
    /// The H inner steps.
    pub train_ms: u64,
    /// Other local work: compressing, the outer step, the eval, hashing the new state.
    pub local_ms: u64,
    /// Keeping the committed checkpoint, the ledger entry and the local state on disk.
    pub persist_ms: u64,
    /// Waiting on the data plane: from the end of training (and compressing) until the
    /// exchange completed, any final flush exchange, and fetching a state to resync.
    pub network_wait_ms: u64,
    /// The rest: from the report until the next opening (the coordinator waits for a quorum
    /// of reports, commits, and opens the next round) but for persisting the commit, and
    /// before training began.
    pub coordination_ms: u64,
    /// `network_wait_ms / wall_ms`.
    pub network_wait_share: f64,
}

impl RoundTiming {
    /// Fills in the wall time and the shares, once the round's end is known.
    fn close(mut self, wall: Duration) -> Self {
        self.wall_ms = wall.as_millis() as u64;
        let busy = self.train_ms + self.local_ms + self.persist_ms + self.network_wait_ms;
        self.coordination_ms = self.wall_ms.saturating_sub(busy);
        self.network_wait_share = if self.wall_ms == 0 {
            0.0
        } else {
            self.network_wait_ms as f64 / self.wall_ms as f64
        };
        self
    }
}

/// An event for whoever watches a run (the demo's progress display).
#[derive(Clone, Debug)]
pub enum RunEvent {
    RoundOpened {
        round: u64,
        members: usize,
    },
    Committed {
        round: u64,
        root: [u8; 32],
        agreeing: usize,
        members: usize,
        eval_loss: f32,
    },
    NotCommitted {
        round: u64,
        reason: String,
    },
    Finished {
        rounds: u64,
        root: [u8; 32],
    },
}

/// The committed state a replica holds and serves to peers that join or resync. Its root is
/// the content root of the state's checkpoint files ([`checkpoint::state_files`]).
#[derive(Debug)]
struct Snapshot {
    round: u64,
    root: [u8; 32],
    params: Vec<f32>,
    velocity: Vec<f32>,
    /// The inner optimizer's state, shared in a data-parallel run only.
    inner: Option<InnerState>,
    content: CheckpointContent,
}

impl Snapshot {
    /// Names the state of `round` by the root of its checkpoint files. In a data-parallel
    /// run the state includes the inner optimizer's, taken from `rep`: call it when `rep`
    /// holds the state being named (or use [`Self::with_inner`]).
    fn new(
        rep: &Replica,
        run: &ResolvedRun,
        round: u64,
        params: Vec<f32>,
        velocity: Vec<f32>,
    ) -> Result<Self, TrainError> {
        let inner = match run.mode {
            RunMode::DataParallel => Some(InnerState::of(rep)?),
            RunMode::Diloco => None,
        };
        Self::with_inner(rep, run, round, (params, velocity), inner)
    }

    /// [`Self::new`] with the inner optimizer's state given (it came from a peer or a
    /// file); it must be present exactly in a data-parallel run.
    fn with_inner(
        rep: &Replica,
        run: &ResolvedRun,
        round: u64,
        (params, velocity): (Vec<f32>, Vec<f32>),
        inner: Option<InnerState>,
    ) -> Result<Self, TrainError> {
        if inner.is_some() != (run.mode == RunMode::DataParallel) {
            return Err(TrainError::Other(
                "the inner optimizer's state is part of a data-parallel run's state, and only of it"
                    .into(),
            ));
        }
        let files = checkpoint::state_files(rep, run, round, (&params, &velocity), inner.as_ref())?;
        let content = checkpoint::content_of(&files)?;
        Ok(Snapshot {
            round,
            root: content.root().0,
            params,
            velocity,
            inner,
            content,
        })
    }

    fn files(
        &self,
        rep: &Replica,
        run: &ResolvedRun,
    ) -> Result<Vec<(String, Vec<u8>)>, TrainError> {
        checkpoint::state_files(
            rep,
            run,
            self.round,
            (&self.params, &self.velocity),
            self.inner.as_ref(),
        )
    }
}

/// The result of a finished run at one replica.
#[derive(Debug)]
pub struct RunSummary {
    pub run_id: [u8; 32],
    pub rounds: u64,
    pub root: [u8; 32],
    pub eval_loss: f32,
    pub num_params: usize,
    pub total_steps: u64,
    /// Content root of the checkpoint written to the output dir, when one was asked for.
    pub checkpoint_root: Option<String>,
    /// The round of the local state this replica resumed from after a restart, if any.
    pub resumed_from: Option<u64>,
}

/// A frame that arrived, with the peer it came from.
struct Inbound {
    from: PeerId,
    frame: Frame,
}

/// Coordinator-side events from replicas' control streams.
enum CoordEvent {
    Connected {
        peer: PeerId,
        tx: mpsc::Sender<TrainControl>,
    },
    Msg {
        peer: PeerId,
        msg: Msg,
    },
    /// A control stream ended; `tx` is the sender it was connected with, so that the end
    /// of an old stream does not take a peer's newer stream down with it.
    Closed {
        peer: PeerId,
        tx: mpsc::Sender<TrainControl>,
    },
}

struct Inner {
    local: PeerId,
    keypair: Keypair,
    control: libp2p_stream::Control,
    traffic: Traffic,
    status: Mutex<RunStatus>,
    /// The last states this replica held (committed, and the one it just computed), served
    /// by root to peers that join or resync.
    served: Mutex<Vec<Arc<Snapshot>>>,
    cancel: tokio_util::sync::CancellationToken,
    inbox_tx: mpsc::Sender<Inbound>,
    inbox_rx: tokio::sync::Mutex<mpsc::Receiver<Inbound>>,
    /// Members known to be gone, and a counter bumped at each new departure.
    departures: Mutex<Departures>,
    departed: tokio::sync::watch::Sender<u64>,
    coord_tx: Mutex<Option<mpsc::Sender<CoordEvent>>>,
    events: broadcast::Sender<RunEvent>,
    limits: Limits,
    device: DeviceSpec,
    /// The daemon's data directory: runs keep their checkpoints, ledger and local state
    /// under `runs/<run id>/` in it.
    data_dir: PathBuf,
    /// What a replica knows of the run it is in, for finding the run's coordinator again
    /// when the one it followed goes away.
    context: Mutex<Option<RunContext>>,
    /// Where this daemon found the base of its adapter run (the run's id and the
    /// directory), once checked against the pinned root: hashing a base is slow.
    base_dir: Mutex<Option<([u8; 32], PathBuf)>>,
    /// Where a test makes the coordinator die.
    crash_at: Mutex<Option<CrashPoint>>,
    /// Where a fault test makes the whole process abort (`POTLUCK_CRASH_AT`).
    abort_at: Option<CrashPoint>,
    /// Committed checkpoints of a run kept on disk (the daemon's `keep_checkpoints`).
    keep_checkpoints: usize,
    /// Upload and download caps: every tensor stream and checkpoint fetch goes through them.
    rates: RateLimiter,
    resource_limits: ResourceLimits,
    /// The least time a replica looks for its coordinator after losing it.
    failover_min: Duration,
    /// `potluck pause` / `potluck resume` and the schedule.
    pause: Mutex<PauseSwitch>,
    /// Why training is paused now (`None`: it runs); the replica loop watches it.
    paused: tokio::sync::watch::Sender<Option<PauseCause>>,
}

/// A persistence point of the coordinator where a test can make the daemon's training stop
/// as if its process had died there (see `tests/tests/train_swarm.rs`).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after the opened round number was recorded.
    AfterRoundOpened(u64),
    /// After the state machine committed a round, before the ledger has it.
    BeforeLedgerAppend(u64),
    /// After the ledger has the round, before any replica was told.
    AfterLedgerAppend(u64),
    /// A reducer of this round that received its contributions, before it sent the mean.
    ReducerBeforeSending(u64),
}

impl CrashPoint {
    /// The environment variable that makes a daemon process abort at a crash point, for
    /// fault tests that kill real processes: `after-round-opened:3`,
    /// `before-ledger-append:2`, `after-ledger-append:2` or `reducer-before-sending:2`.
    pub const ENV: &'static str = "POTLUCK_CRASH_AT";

    /// Parses the `POTLUCK_CRASH_AT` form.
    pub fn parse(s: &str) -> Option<Self> {
        let (name, round) = s.trim().split_once(':')?;
        let round: u64 = round.parse().ok()?;
        Some(match name {
            "after-round-opened" => Self::AfterRoundOpened(round),
            "before-ledger-append" => Self::BeforeLedgerAppend(round),
            "after-ledger-append" => Self::AfterLedgerAppend(round),
            "reducer-before-sending" => Self::ReducerBeforeSending(round),
            _ => return None,
        })
    }

    fn from_env() -> Option<Self> {
        let v = std::env::var(Self::ENV).ok()?;
        let point = Self::parse(&v);
        match point {
            Some(p) => tracing::warn!(
                ?p,
                "this daemon will abort at a crash point ({})",
                Self::ENV
            ),
            None => tracing::warn!(value = %v, "{} not understood; ignored", Self::ENV),
        }
        point
    }
}

/// How a daemon takes part in runs (from its config).
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Committed checkpoints of a run kept on disk, the newest first.
    pub keep_checkpoints: usize,
    /// The least time a replica looks for its coordinator after losing it (the window is
    /// three round deadlines, and at least three times this).
    pub failover_min: Duration,
    /// The daemon's upload and download caps, shared with its checkpoint server.
    pub rates: RateLimiter,
    /// The memory cap of a training step and the CPU threads (applied at daemon start).
    pub limits: ResourceLimits,
    /// When training pauses on its own (the config's `pause_schedule`).
    pub pause_schedule: Schedule,
}

/// A daemon's caps on what its training takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// The memory one training step may take on the device, in MiB (`None`: no cap).
    pub memory_limit_mb: Option<u64>,
    /// Threads of the CPU math (`None`: one per core).
    pub cpu_threads: Option<usize>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            keep_checkpoints: 3,
            failover_min: Duration::from_secs(40),
            rates: RateLimiter::unlimited(),
            limits: ResourceLimits::default(),
            pause_schedule: Schedule::default(),
        }
    }
}

/// The file in the data dir whose presence says that `potluck pause` paused training, so
/// that a restarted daemon stays paused.
pub const PAUSED_FILE: &str = "paused";
/// How often the pause schedule is looked at.
const PAUSE_TICK: Duration = Duration::from_secs(5);

/// A replica's view of its run, kept for failover.
#[derive(Clone, Debug)]
struct RunContext {
    run: ResolvedRun,
    signed_run: SignedRunManifest,
    /// The highest round number this replica saw opened.
    highest_round: u64,
    /// Whether a coordinator welcomed this replica since the flag was last cleared.
    welcomed: bool,
}

/// The training service of one daemon. Cheap to clone.
#[derive(Clone)]
pub struct TrainService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TrainService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainService")
            .field("local", &self.inner.local)
            .finish()
    }
}

impl TrainService {
    /// Registers the run protocols on `control` and starts serving inbound streams.
    pub fn start(
        keypair: Keypair,
        mut control: libp2p_stream::Control,
        device: DeviceSpec,
        data_dir: PathBuf,
        settings: TrainSettings,
    ) -> Result<Self, TrainError> {
        let mut tensors = control
            .accept(TENSOR_PROTOCOL)
            .map_err(|e| TrainError::Other(format!("tensor protocol: {e}")))?;
        let mut controls = control
            .accept(CONTROL_PROTOCOL)
            .map_err(|e| TrainError::Other(format!("control protocol: {e}")))?;
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let (events, _) = broadcast::channel(64);
        let was_paused = data_dir.join(PAUSED_FILE).exists();
        let svc = TrainService {
            inner: Arc::new(Inner {
                local: keypair.public().to_peer_id(),
                keypair,
                control,
                traffic: Traffic::default(),
                status: Mutex::new(RunStatus {
                    state: "idle".into(),
                    ..Default::default()
                }),
                served: Mutex::new(Vec::new()),
                cancel: tokio_util::sync::CancellationToken::new(),
                inbox_tx,
                inbox_rx: tokio::sync::Mutex::new(inbox_rx),
                departures: Mutex::new(Departures::default()),
                departed: tokio::sync::watch::Sender::new(0),
                coord_tx: Mutex::new(None),
                events,
                limits: Limits::default(),
                device,
                data_dir,
                context: Mutex::new(None),
                base_dir: Mutex::new(None),
                crash_at: Mutex::new(None),
                abort_at: CrashPoint::from_env(),
                keep_checkpoints: settings.keep_checkpoints.max(1),
                failover_min: settings.failover_min,
                rates: settings.rates,
                resource_limits: settings.limits,
                pause: Mutex::new(PauseSwitch::new(settings.pause_schedule, was_paused)),
                paused: tokio::sync::watch::Sender::new(None),
            }),
        };
        svc.poll_pause();
        let s = svc.clone();
        tokio::spawn(async move {
            let cancel = s.inner.cancel.clone();
            while cancel
                .run_until_cancelled(tokio::time::sleep(PAUSE_TICK))
                .await
                .is_some()
            {
                s.poll_pause();
            }
        });
        let s = svc.clone();
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_STREAMS));
            while let Some((peer, stream)) = tensors.next().await {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many inbound tensor streams; dropping one");
                    continue;
                };
                let s = s.clone();
                let stream = s.inner.rates.wrap(stream);
                tokio::spawn(async move {
                    s.serve_tensor_stream(peer, stream).await;
                    drop(permit);
                });
            }
        });
        let s = svc.clone();
        tokio::spawn(async move {
            // One long-lived control stream per replica: at most as many as a run admits.
            let permits = Arc::new(tokio::sync::Semaphore::new(MAX_MEMBERS));
            while let Some((peer, stream)) = controls.next().await {
                let tx = s.inner.coord_tx.lock().ok().and_then(|g| g.clone());
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many control streams; dropping one");
                    continue;
                };
                match tx {
                    Some(tx) => attach_control_stream(&s, peer, stream, tx, permit),
                    None => {
                        // Not coordinating: a replica may come back for a run that ended
                        // while it was away; it learns the end and where the final state is.
                        let s = s.clone();
                        tokio::spawn(async move {
                            s.answer_after_run(peer, stream).await;
                            drop(permit);
                        });
                    }
                }
            }
        });
        Ok(svc)
    }

    /// Answers a control stream while this daemon coordinates nothing: a join for a run it
    /// coordinated to its end gets the welcome and the end of the run (its last commit, with
    /// its signed manifest), so that a replica that was away fetches the final state instead
    /// of looking for a coordinator that will never come back. Anything else is closed.
    async fn answer_after_run(&self, peer: PeerId, stream: libp2p::Stream) {
        let (mut rd, mut wr) = stream.split();
        let first = tokio::time::timeout(ENDED_RUN_ANSWER_TIMEOUT, read_control(&mut rd)).await;
        let Ok(Ok(Some((
            TrainControl {
                msg: Some(Msg::Join(j)),
                ..
            },
            _,
        )))) = first
        else {
            tracing::debug!(%peer, "control stream while not coordinating; closing");
            return;
        };
        let Ok(run_id) = <[u8; 32]>::try_from(j.run_id.as_slice()) else {
            return;
        };
        let (welcome, fin) = match ended_run(&self.inner.data_dir, &run_id) {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::debug!(%peer, "a join for a run not coordinated here now; closing");
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot tell a replica how its run ended");
                return;
            }
        };
        tracing::info!(%peer, run = %hex::encode(run_id), "telling a returning replica its run ended");
        for msg in [Msg::Welcome(welcome), Msg::Finished(fin)] {
            let m = TrainControl {
                protocol_version: 0,
                msg: Some(msg),
            };
            let sent =
                tokio::time::timeout(ENDED_RUN_ANSWER_TIMEOUT, write_control(&mut wr, m)).await;
            match sent {
                Ok(Ok(n)) => self.inner.traffic.add(peer, n, 0),
                _ => return,
            }
        }
        let _ = wr.close().await;
    }

    /// Makes this daemon's training stop dead at `point`, as a killed process would.
    #[doc(hidden)]
    pub fn crash_at(&self, point: Option<CrashPoint>) {
        if let Ok(mut g) = self.inner.crash_at.lock() {
            *g = point;
        }
    }

    /// Stops all training here if a test asked for a crash at `point`.
    fn crash_point(&self, point: CrashPoint) -> Result<(), TrainError> {
        if self.inner.abort_at == Some(point) {
            // As if the process were killed here: no unwinding, no cleanup, no flush.
            eprintln!("potluck: aborting at {point:?} ({})", CrashPoint::ENV);
            std::process::abort();
        }
        let hit = self
            .inner
            .crash_at
            .lock()
            .map(|g| *g == Some(point))
            .unwrap_or(false);
        if hit {
            tracing::warn!(?point, "crashing here, as a test asked");
            self.inner.cancel.cancel();
            return Err(TrainError::ShuttingDown);
        }
        Ok(())
    }

    /// Stops every run this daemon takes part in (the daemon is shutting down).
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }

    /// The daemon's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.data_dir
    }

    /// This daemon's peer id.
    pub fn local_peer(&self) -> PeerId {
        self.inner.local
    }

    /// Pauses training here (`potluck pause`) until [`Self::resume`]: the replica of the
    /// run in progress leaves its rounds, keeps its state and frees its device; a run joined
    /// later starts paused. Survives a restart of the daemon.
    pub fn pause(&self) -> Result<Option<PauseCause>, TrainError> {
        let path = self.inner.data_dir.join(PAUSED_FILE);
        crate::fsutil::write_atomic(&path, b"paused by `potluck pause`\n", 0o600).map_err(|e| {
            TrainError::Other(format!(
                "cannot record the pause in {}: {e}",
                path.display()
            ))
        })?;
        if let Ok(mut sw) = self.inner.pause.lock() {
            sw.pause();
        }
        Ok(self.poll_pause())
    }

    /// Resumes training (`potluck resume`): ends a pause by command and, inside a window of
    /// the pause schedule, skips the rest of that window. Returns why training is still
    /// paused, if it is.
    pub fn resume(&self) -> Result<Option<PauseCause>, TrainError> {
        let path = self.inner.data_dir.join(PAUSED_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(TrainError::Other(format!(
                    "cannot remove the pause record {}: {e}",
                    path.display()
                )));
            }
        }
        if let Ok(mut sw) = self.inner.pause.lock() {
            sw.resume(unix_ms() / 1000);
        }
        Ok(self.poll_pause())
    }

    /// Why training is paused here now, if it is.
    pub fn paused(&self) -> Option<PauseCause> {
        *self.inner.paused.borrow()
    }

    /// The config's pause schedule, as written.
    pub fn pause_schedule(&self) -> String {
        self.inner
            .pause
            .lock()
            .map(|sw| sw.schedule().to_string())
            .unwrap_or_default()
    }

    /// Looks at the pause switch now and tells the replica loop when the answer changed.
    fn poll_pause(&self) -> Option<PauseCause> {
        let now = self
            .inner
            .pause
            .lock()
            .ok()
            .and_then(|mut sw| sw.poll(unix_ms() / 1000));
        self.inner.paused.send_if_modified(|cur| {
            if *cur == now {
                return false;
            }
            tracing::info!(paused = ?now, "training pause switched");
            *cur = now;
            true
        });
        now
    }

    /// Counts an update refused for `reason`.
    fn reject(&self, reason: RejectReason) {
        self.set_status(|s| {
            s.rejected_updates += 1;
            *s.rejected_by_reason
                .entry(reason.as_str().to_string())
                .or_default() += 1;
        });
    }

    /// The current run's status.
    pub fn status(&self) -> RunStatus {
        let mut st = self
            .inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let paused = self.paused().map(PauseCause::as_str);
        st.paused = paused.unwrap_or_default().to_string();
        st.waiting = waiting::explain(&waiting::Facts {
            phase: st.phase,
            round: st.round,
            lobby: st.lobby,
            collected: st.collected,
            reports: st.reports,
            paused,
        });
        let (s, r) = self.inner.traffic.totals();
        st.bytes_sent = s;
        st.bytes_received = r;
        st.round_bytes = self
            .inner
            .traffic
            .per_round()
            .into_iter()
            .rev()
            .take(8)
            .map(|(round, (s, r))| (round, s, r))
            .collect();
        st
    }

    /// Bytes on the wire so far.
    /// The daemon's upload and download caps and what went through them.
    pub fn rates(&self) -> &RateLimiter {
        &self.inner.rates
    }

    /// The memory cap and CPU threads this daemon trains under.
    pub fn resource_limits(&self) -> ResourceLimits {
        self.inner.resource_limits
    }

    pub fn traffic(&self) -> &Traffic {
        &self.inner.traffic
    }

    /// Events of the runs this daemon takes part in.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe()
    }

    /// Logs a finished round's timing and keeps it in the status.
    fn record_timing(&self, t: RoundTiming) {
        tracing::info!(
            target: "potluck::timing",
            round = t.round,
            overlap = t.overlap,
            wall_ms = t.wall_ms,
            train_ms = t.train_ms,
            local_ms = t.local_ms,
            persist_ms = t.persist_ms,
            network_wait_ms = t.network_wait_ms,
            coordination_ms = t.coordination_ms,
            network_wait_share = t.network_wait_share,
            "round timing"
        );
        self.set_status(|s| {
            s.round_timings.push(t);
            let extra = s.round_timings.len().saturating_sub(ROUNDS_TIMED);
            s.round_timings.drain(..extra);
        });
    }

    fn set_status(&self, f: impl FnOnce(&mut RunStatus)) {
        if let Ok(mut s) = self.inner.status.lock() {
            f(&mut s);
        }
    }

    /// Records that `peer` is gone for `round` ([`UNTIL_WELCOMED`]: a lost coordinator) and
    /// wakes an exchange in progress.
    fn note_departure(&self, peer: PeerId, round: u64) {
        let news = self
            .inner
            .departures
            .lock()
            .map(|mut d| d.note(peer, round))
            .unwrap_or(false);
        if news {
            tracing::info!(%peer, round, "a member of the run is gone; not waiting for it");
            self.inner.departed.send_modify(|n| *n += 1);
        }
    }

    /// The members of an exchange known to be gone, by index.
    fn gone_in(&self, plan: &ExchangePlan<'_>) -> BTreeSet<usize> {
        self.inner
            .departures
            .lock()
            .map(|d| d.gone_in(plan.round, plan.members, plan.me))
            .unwrap_or_default()
    }

    async fn serve_tensor_stream(&self, peer: PeerId, mut stream: DataStream) {
        let frame =
            match tokio::time::timeout(FRAME_TIMEOUT, read_frame(&mut stream, &self.inner.limits))
                .await
            {
                Ok(Ok(Some(f))) => f,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "refused a tensor frame");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "tensor frame missed its deadline");
                    return;
                }
            };
        self.inner.traffic.add(peer, 0, frame.wire_bytes);
        if let Err(reason) = verify_sender(&frame.header, peer) {
            tracing::warn!(%peer, reason, "refused a tensor frame with a bad signature");
            self.reject(RejectReason::BadSignature);
            return;
        }
        if frame.kind() == FrameKind::StateRequest {
            let mut req = frame.header.clone();
            req.payload_hash = frame.payload.clone();
            self.answer_state_request(peer, &req, &mut stream).await;
            return;
        }
        if frame.kind() == FrameKind::LedgerRequest {
            self.answer_ledger_request(peer, &frame, &mut stream).await;
            return;
        }
        // A full inbox makes this await, which stops reading the stream: backpressure.
        if self
            .inner
            .inbox_tx
            .send(Inbound { from: peer, frame })
            .await
            .is_ok()
        {
            // Only now is the frame delivered; the sender waits for this byte.
            let _ = tokio::time::timeout(ACK_TIMEOUT, async {
                stream.write_all(&[FRAME_ACK]).await?;
                stream.close().await
            })
            .await;
        }
    }

    async fn answer_state_request(&self, peer: PeerId, req: &FrameHeader, stream: &mut DataStream) {
        // The requester names the root it needs; this replica may still be finishing the
        // round that produced it, so wait a little for it to appear.
        let wanted = req.payload_hash.clone();
        let mut snap = None;
        for _ in 0..STATE_WAIT_POLLS {
            snap = self.inner.served.lock().ok().and_then(|g| {
                g.iter()
                    .find(|s| s.root.as_slice() == wanted.as_slice())
                    .cloned()
            });
            if snap.is_some() || self.inner.cancel.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(snap) = snap else {
            tracing::info!(%peer, "state requested that this peer does not hold");
            let _ = stream.close().await;
            return;
        };
        let header = FrameHeader {
            run_id: req.run_id.clone(),
            round: snap.round,
            kind: FrameKind::State as i32,
            len: snap.params.len() as u64,
            ..Default::default()
        };
        let mut payload = f32_bytes(&snap.params);
        payload.extend_from_slice(&f32_bytes(&snap.velocity));
        if let Some(inner) = &snap.inner {
            payload.extend_from_slice(&inner.to_bytes());
        }
        self.answer(peer, stream, header, &payload).await;
    }

    /// Seals `payload` (zstd when it pays), signs `header` and sends the frame as the answer
    /// to a request on `stream`, then closes it.
    async fn answer(
        &self,
        peer: PeerId,
        stream: &mut DataStream,
        mut header: FrameHeader,
        payload: &[u8],
    ) {
        let kind = header.kind;
        let wire = seal_payload(&mut header, payload, Some(1));
        if let Err(e) = self.sign(&mut header) {
            tracing::warn!(error = %e, kind, "could not sign an answer");
            return;
        }
        match tokio::time::timeout(FRAME_TIMEOUT, write_frame(stream, &header, &wire)).await {
            Ok(Ok(n)) => {
                self.inner.traffic.add(peer, n, 0);
                let _ = stream.close().await;
            }
            _ => tracing::warn!(%peer, kind, "could not send an answer"),
        }
    }

    /// Sends a signed request frame of `kind` for `run_id` to `peer` and reads its answer
    /// (at most `max_payload` bytes, within `timeout`), checked to come from `peer` as a
    /// frame of kind `answer` for the same run. `Ok(None)`: the peer closed the stream
    /// without an answer (it does not hold what was asked for).
    async fn request(
        &self,
        peer: PeerId,
        (kind, run_id, payload): (FrameKind, &[u8], &[u8]),
        (answer, max_payload, timeout): (FrameKind, usize, Duration),
    ) -> Result<Option<Frame>, TrainError> {
        let fail = |what: String| TrainError::Other(format!("{kind:?} to {peer}: {what}"));
        let mut header = FrameHeader {
            run_id: run_id.to_vec(),
            kind: kind as i32,
            ..Default::default()
        };
        let wire = seal_payload(&mut header, payload, None);
        self.sign(&mut header)?;
        let mut stream = self
            .inner
            .rates
            .wrap(self.open(peer, TENSOR_PROTOCOL).await?);
        let n = write_frame(&mut stream, &header, &wire)
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.inner.traffic.add(peer, n, 0);
        let limits = Limits {
            max_header: self.inner.limits.max_header,
            max_payload,
        };
        let Some(frame) = tokio::time::timeout(timeout, read_frame(&mut stream, &limits))
            .await
            .map_err(|_| fail("no answer in time".into()))?
            .map_err(|e| fail(e.to_string()))?
        else {
            return Ok(None);
        };
        self.inner.traffic.add(peer, 0, frame.wire_bytes);
        verify_sender(&frame.header, peer).map_err(|e| fail(e.into()))?;
        if frame.kind() != answer || frame.header.run_id.as_slice() != run_id {
            return Err(fail("an answer of another kind or run".into()));
        }
        Ok(Some(frame))
    }

    /// Sends the ledger entries of the run named in `req` from the round it asks for: the
    /// coordinator's ledger, or this replica's copy of it. Closes the stream without an
    /// answer when this daemon holds none.
    async fn answer_ledger_request(&self, peer: PeerId, req: &Frame, stream: &mut DataStream) {
        let (Ok(run_id), Ok(from)) = (
            <[u8; 32]>::try_from(req.header.run_id.as_slice()),
            <[u8; 8]>::try_from(req.payload.as_slice()).map(u64::from_le_bytes),
        ) else {
            tracing::warn!(%peer, "malformed ledger request");
            let _ = stream.close().await;
            return;
        };
        let dir = checkpoint::ledger_dir(&checkpoint::run_dir(&self.inner.data_dir, &run_id));
        // Reading a long ledger is file I/O: off the runtime's threads.
        let read = tokio::task::spawn_blocking(move || Ledger::read_entries(&dir)).await;
        let entries = match read {
            Ok(Ok(e)) if !e.is_empty() => e,
            _ => {
                tracing::info!(%peer, "ledger requested of a run this daemon keeps none of");
                let _ = stream.close().await;
                return;
            }
        };
        let mut payload = Vec::new();
        let mut head = 0;
        for m in entries.iter().filter(|m| m.body().round >= from) {
            let bytes = m.encode();
            if payload.len() + 4 + bytes.len() > MAX_LEDGER_BYTES {
                tracing::warn!(%peer, "the ledger is too long to send; its copy stops short");
                break;
            }
            payload.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            payload.extend_from_slice(&bytes);
            head = m.body().round;
        }
        let header = FrameHeader {
            run_id: run_id.to_vec(),
            round: head,
            kind: FrameKind::Ledger as i32,
            ..Default::default()
        };
        self.answer(peer, stream, header, &payload).await;
    }

    /// Asks `peer` for the ledger entries of `run_id` from round `from` on, in round order
    /// (unverified: the caller appends them to its ledger, which checks every link).
    async fn fetch_ledger(
        &self,
        peer: PeerId,
        run_id: &[u8; 32],
        from: u64,
    ) -> Result<Vec<SignedManifest>, TrainError> {
        let request = (
            FrameKind::LedgerRequest,
            &run_id[..],
            &from.to_le_bytes()[..],
        );
        let frame = self
            .request(
                peer,
                request,
                (FrameKind::Ledger, MAX_LEDGER_BYTES, LEDGER_TIMEOUT),
            )
            .await?
            .ok_or_else(|| TrainError::Other(format!("{peer} keeps no ledger of this run")))?;
        ledger_entries(&frame.payload)
            .map_err(|e| TrainError::Other(format!("ledger from {peer}: {e}")))
    }

    fn sign(&self, header: &mut FrameHeader) -> Result<(), TrainError> {
        header.public_key = self.inner.keypair.public().encode_protobuf();
        header.signature = Vec::new();
        let sig = self
            .inner
            .keypair
            .sign(&signing_bytes(header))
            .map_err(|e| TrainError::Other(format!("signing failed: {e}")))?;
        header.signature = sig;
        Ok(())
    }

    /// Opens a stream to `peer`, dialing it if needed. A connection that is replaced while
    /// the stream is being set up (both sides dialing at once, a limit closing one) fails
    /// the attempt, so it is retried a few times within [`OPEN_TIMEOUT`].
    async fn open(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, TrainError> {
        let give_up = Instant::now() + OPEN_TIMEOUT;
        let mut attempt = 0u32;
        // A peer of a private swarm that has not admitted us refuses every gated protocol
        // (the gate's dummy handler) and then closes the connection; a newly admitted one
        // does so too until it reconnects. So a refusal is only final once every attempt
        // failed.
        let mut refused = false;
        loop {
            let mut control = self.inner.control.clone();
            let left = give_up.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, control.open_stream(peer, protocol.clone()))
                .await
            {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => {
                    refused |= matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
                    e.to_string()
                }
                Err(_) => "timed out".to_string(),
            };
            attempt += 1;
            if attempt >= OPEN_ATTEMPTS || Instant::now() >= give_up {
                if refused {
                    return Err(TrainError::NotAdmitted(peer));
                }
                return Err(TrainError::Other(format!(
                    "opening a stream to {peer} failed after {attempt} attempts: {err}"
                )));
            }
            tracing::debug!(%peer, attempt, error = %err, "stream open failed; retrying");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
    }

    /// Sends one frame to `peer` (to our own inbox when `peer` is us).
    /// Hashes, compresses (when it pays) and signs a frame once, for any number of peers:
    /// the signed header names no recipient.
    fn seal(&self, mut header: FrameHeader, payload: Arc<[u8]>) -> Result<Sealed, TrainError> {
        let wire: Arc<[u8]> = match seal_payload(&mut header, &payload, Some(1)) {
            Cow::Borrowed(_) => payload.clone(),
            Cow::Owned(w) => w.into(),
        };
        self.sign(&mut header)?;
        Ok(Sealed {
            header,
            wire,
            payload,
        })
    }

    /// Delivers a sealed frame to `peer` (to this daemon's own inbox when it is this
    /// daemon), sending it again until the receiver acknowledges it.
    async fn send_frame(&self, peer: PeerId, sealed: &Sealed) -> Result<(), TrainError> {
        if self.inner.cancel.is_cancelled() {
            return Err(TrainError::ShuttingDown);
        }
        let (header, wire) = (&sealed.header, &sealed.wire);
        if peer == self.inner.local {
            let frame = Frame {
                header: header.clone(),
                payload: sealed.payload.to_vec(),
                wire_bytes: 0,
            };
            let _ = self
                .inner
                .inbox_tx
                .send(Inbound { from: peer, frame })
                .await;
            return Ok(());
        }
        // A stream the receiver dropped unread (its daemon was busy, or died) gets no
        // acknowledgement: the frame is sent again on a new stream. Receivers ignore repeats.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.send_once(peer, header, wire).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= SEND_ATTEMPTS || self.inner.cancel.is_cancelled() => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(%peer, attempt, error = %e, "frame not acknowledged; sending again");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
    }

    /// One attempt at a frame: open, write, and wait for the receiver's acknowledgement.
    async fn send_once(
        &self,
        peer: PeerId,
        header: &FrameHeader,
        wire: &[u8],
    ) -> Result<(), TrainError> {
        let mut stream = self
            .inner
            .rates
            .wrap(self.open(peer, TENSOR_PROTOCOL).await?);
        let n = tokio::time::timeout(FRAME_TIMEOUT, write_frame(&mut stream, header, wire))
            .await
            .map_err(|_| TrainError::Other(format!("sending to {peer} timed out")))?
            .map_err(|e| TrainError::Other(format!("sending to {peer}: {e}")))?;
        self.inner.traffic.add(peer, n, 0);
        let mut ack = [0u8; 1];
        let got = tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut ack)).await;
        let _ = stream.close().await;
        match got {
            Ok(Ok(())) if ack[0] == FRAME_ACK => {
                self.inner.traffic.add(peer, 0, 1);
                Ok(())
            }
            Ok(Ok(())) => Err(TrainError::Other(format!(
                "{peer} answered a frame with garbage"
            ))),
            Ok(Err(e)) => Err(TrainError::Other(format!(
                "{peer} did not take the frame: {e}"
            ))),
            Err(_) => Err(TrainError::Other(format!(
                "{peer} did not acknowledge the frame in time"
            ))),
        }
    }

    /// Asks `peer` for its committed state of `run_id`: the round, weights, outer momentum
    /// and, with `with_inner` (a data-parallel run), the inner optimizer's state.
    async fn fetch_state(
        &self,
        peer: PeerId,
        (run_id, wanted): (&[u8], &[u8]),
        n_params: usize,
        with_inner: bool,
    ) -> Result<(u64, Vec<f32>, Vec<f32>, Option<InnerState>), TrainError> {
        let expected = n_params * 8 + if with_inner { 8 + n_params * 8 } else { 0 };
        // The payload is the root wanted; its hash travels in the header.
        let frame = self
            .request(
                peer,
                (FrameKind::StateRequest, run_id, wanted),
                (FrameKind::State, expected, FRAME_TIMEOUT),
            )
            .await?
            .ok_or_else(|| TrainError::Other(format!("{peer} holds no committed state")))?;
        if frame.payload.len() != expected {
            return Err(TrainError::Other(format!(
                "{peer} sent a state of the wrong size"
            )));
        }
        let params = bytes_f32(&frame.payload[..n_params * 4]);
        let velocity = bytes_f32(&frame.payload[n_params * 4..n_params * 8]);
        let inner = if with_inner {
            Some(InnerState::from_bytes(
                &frame.payload[n_params * 8..],
                n_params,
            )?)
        } else {
            None
        };
        Ok((frame.header.round, params, velocity, inner))
    }

    /// Starts a run with this daemon as its coordinator and one of its replicas, and drives
    /// it to the end. Other peers join with [`TrainService::join`], using the id of the run
    /// with its data pinned ([`ResolvedRun::pin_data`]). A run whose ledger this daemon
    /// already holds (it coordinated it before a restart) continues from its last commit.
    pub async fn coordinate(
        &self,
        run: ResolvedRun,
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        self.coordinate_with(run, out, Vec::new()).await
    }

    /// [`Self::coordinate`], naming `successors`: peers that take the run over, in this
    /// order, when this daemon disappears. They are part of the signed run manifest.
    pub async fn coordinate_with(
        &self,
        run: ResolvedRun,
        out: Option<PathBuf>,
        successors: Vec<PeerId>,
    ) -> Result<RunSummary, TrainError> {
        let (coord_tx, coord_rx) = self.claim_coordinator()?;
        let (run, ledger, machine) = self.prepare_run(run, &successors).await?;
        self.drive(run, ledger, machine, out, coord_tx, coord_rx)
            .await
    }

    /// Pins the run's data and opens its ledger for this daemon, which has claimed the
    /// coordinator's place; gives the place back when that fails.
    /// Whether this daemon can coordinate `run` (new, or its own run to continue): not a run
    /// that already ended here, nor one it took part in as a replica. Checked before
    /// anything of the run is written.
    pub fn check_startable(&self, run: &ResolvedRun) -> Result<(), TrainError> {
        let run_id = run.id();
        if let Some((_, finished)) = ended_run(&self.inner.data_dir, &run_id)? {
            return Err(TrainError::RunFinished {
                run: hex::encode(run_id),
                round: finished.rounds,
            });
        }
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &run_id);
        let copied = !Ledger::read_entries(&checkpoint::ledger_dir(&run_dir))
            .unwrap_or_default()
            .is_empty();
        if copied
            && !run_dir
                .join(potluck_coordinator::manifest::RUN_FILE)
                .exists()
        {
            return Err(TrainError::ReplicaOfRun(hex::encode(run_id)));
        }
        // A coordinator trains a replica of its own run: one that cannot train it under
        // this daemon's memory cap is refused now, not stuck waiting for its own replica.
        self.memory_plan(run)?;
        Ok(())
    }

    /// How this daemon's replica of `run` trains under its memory cap: `None` without a
    /// cap; an error when not even one sequence fits.
    fn memory_plan(
        &self,
        run: &ResolvedRun,
    ) -> Result<Option<potluck_worker::memory::BatchPlan>, TrainError> {
        let Some(mb) = self.inner.resource_limits.memory_limit_mb else {
            return Ok(None);
        };
        if run.is_adapter_run() {
            // The planner models the worker's own transformer; adapter steps on a base are
            // not planned yet and train their batch whole.
            tracing::warn!(
                "memory_limit_mb does not plan adapter runs yet; training batches whole"
            );
            return Ok(None);
        }
        let plan = potluck_worker::memory::plan_batch(&run.model, &run.inner, mb << 20)
            .map_err(potluck_worker::WorkerError::from)?;
        Ok(Some(plan))
    }

    /// Remembers that the base of `run` is at `dir` (checked against its root).
    fn remember_base(&self, run: &ResolvedRun, dir: PathBuf) {
        if let Ok(mut b) = self.inner.base_dir.lock() {
            *b = Some((run.id(), dir));
        }
    }

    /// The directory of the base of `run` on this daemon, without fetching: the run's
    /// base package when it is intact, else `[base] path` when its files have the pinned
    /// root (checked once per run, then remembered). `None` for a run of the worker's
    /// own model; an error when this daemon does not hold the base.
    fn local_base(&self, run: &ResolvedRun) -> Result<Option<PathBuf>, TrainError> {
        let (Some(root), Some(spec)) = (basepack::pinned_root(run)?, &run.base) else {
            return Ok(None);
        };
        let id = run.id();
        if let Ok(b) = self.inner.base_dir.lock()
            && let Some((rid, dir)) = b.as_ref()
            && *rid == id
        {
            return Ok(Some(dir.clone()));
        }
        let pack = checkpoint::run_dir(&self.inner.data_dir, &id).join(basepack::BASE_DIR);
        let dir = if datapack::holds(&pack, root) == Ok(true) {
            pack
        } else if basepack::own_copy_matches(spec, root).is_ok() {
            PathBuf::from(&spec.path)
        } else {
            return Err(no_base(run));
        };
        self.remember_base(run, dir.clone());
        Ok(Some(dir))
    }

    /// A fresh replica of `run` on `device`, on the base this daemon holds.
    fn new_replica(&self, run: &ResolvedRun, device: &DeviceSpec) -> Result<Replica, TrainError> {
        let base = self.local_base(run)?;
        new_replica(run, base.as_deref(), device)
    }

    /// The base of an adapter run for this replica: the package this daemon holds, else
    /// its own copy at `[base] path` when that has the pinned root, else the package
    /// fetched from `sources` (verified piece by piece against the root) and kept, so that
    /// this daemon serves it too. `None` for a run of the worker's own model.
    async fn run_base(
        &self,
        run: &ResolvedRun,
        run_dir: &std::path::Path,
        sources: &[PeerId],
    ) -> Result<Option<PathBuf>, TrainError> {
        let (Some(root), Some(spec)) = (basepack::pinned_root(run)?, run.base.clone()) else {
            return Ok(None);
        };
        let pack = run_dir.join(basepack::BASE_DIR);
        let found = {
            let (svc, run, pack) = (self.clone(), run.clone(), pack.clone());
            tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>, TrainError> {
                if let Err(reason) = datapack::holds(&pack, root) {
                    tracing::warn!(dir = %pack.display(), %reason, "removing a damaged base package");
                    std::fs::remove_dir_all(&pack)
                        .map_err(|e| TrainError::Other(format!("{}: {e}", pack.display())))?;
                }
                // Not held here (no package, no copy of that root): fetched below.
                Ok(svc.local_base(&run).ok().flatten())
            })
            .await
            .map_err(|_| TrainError::ShuttingDown)??
        };
        if let Some(dir) = found {
            return Ok(Some(dir));
        }
        tracing::info!(
            path = %spec.path,
            root = %root.short(),
            "the run's base is not here; fetching it from the swarm"
        );
        self.set_status(|s| {
            s.state = "fetching the run's base".into();
            s.phase = Phase::FetchingData;
        });
        let opts = crate::ckpt_transfer::FetchOptions {
            cancel: self.inner.cancel.child_token(),
            rates: self.inner.rates.clone(),
            ..Default::default()
        };
        let report = self
            .fetch_root_retrying(sources, root, &pack, &opts)
            .await
            .map_err(|e| {
                TrainError::Other(format!(
                    "the run's base is not at '{}' on this peer, and fetching its package {} \
                     from {} peer(s) failed: {e}",
                    spec.path,
                    root.short(),
                    sources.len()
                ))
            })?;
        tracing::info!(
            bytes = report.fetched_bytes,
            root = %root.short(),
            "fetched the run's base package"
        );
        self.remember_base(run, pack.clone());
        Ok(Some(pack))
    }

    async fn prepare_run(
        &self,
        run: ResolvedRun,
        successors: &[PeerId],
    ) -> Result<(ResolvedRun, Ledger, RunMachine), TrainError> {
        // Reading, hashing and copying the data can take a while on a big corpus: off the
        // runtime's threads.
        let (svc, successors) = (self.clone(), successors.to_vec());
        let opened = tokio::task::spawn_blocking(move || {
            // A run pinned by its caller (`potluck run start`, the demo) is not read and
            // hashed a second time: the package below is checked against its root, and every
            // replica checks the token hash of what it reads.
            let run = if run.is_pinned() {
                run
            } else {
                run.pin_data()?
            };
            svc.check_startable(&run)?;
            // What peers without the run's data fetch from this daemon, checked against the
            // pinned root before the run's ledger exists: a source changed since the run was
            // pinned leaves nothing behind.
            let run_dir = checkpoint::run_dir(&svc.inner.data_dir, &run.id());
            let package = run_dir.join(datapack::DATA_DIR);
            let source = datapack::check_package_source(&package, &run)?;
            // An adapter run's base likewise; the files just checked are the base the
            // genesis replica loads.
            let base_package = run_dir.join(basepack::BASE_DIR);
            let base_source = basepack::check_base_source(&base_package, &run)?;
            if let (Some(_), Some(base)) = (&base_source, &run.base) {
                svc.remember_base(&run, PathBuf::from(&base.path));
            }
            let (ledger, machine) = svc.open_ledger(&run, &successors)?;
            if let Some(source) = source {
                datapack::write_checked_package(
                    &package,
                    source,
                    ledger.run(),
                    &svc.inner.keypair,
                )?;
            }
            if let Some(source) = base_source {
                datapack::write_checked_package(
                    &base_package,
                    source,
                    ledger.run(),
                    &svc.inner.keypair,
                )?;
                // From now on the replica reads the checked copy, whatever happens to the
                // user's directory.
                svc.remember_base(&run, base_package.clone());
            }
            Ok(((ledger, machine), run))
        })
        .await
        .map_err(|_| TrainError::ShuttingDown)
        .and_then(|r| r);
        match opened {
            Ok(((ledger, machine), run)) => Ok((run, ledger, machine)),
            Err(e) => {
                self.release_coordinator();
                Err(e)
            }
        }
    }

    /// Coordinates a run without training in it: the standalone coordinator of a public
    /// swarm (`potluck coordinator`). Each commit's checkpoint content is hashed from the
    /// state fetched from an agreeing replica.
    pub async fn coordinate_only(
        &self,
        run: ResolvedRun,
        successors: Vec<PeerId>,
    ) -> Result<RunSummary, TrainError> {
        let (_coord_tx, coord_rx) = self.claim_coordinator()?;
        let (run, ledger, machine) = self.prepare_run(run, &successors).await?;
        self.set_status(|s| {
            s.run_id = hex::encode(run.id());
            s.name = run.name.clone();
            s.rounds = run.rounds;
            s.role = "coordinator (no replica)".into();
            s.coordinator = self.inner.local.to_base58();
            s.state = "waiting for replicas".into();
            s.phase = Phase::Lobby;
            s.lobby = None;
            s.reports = None;
        });
        let mut events = self.subscribe();
        let coord = tokio::spawn(run_coordinator(
            self.clone(),
            run.clone(),
            ledger,
            machine,
            coord_rx,
        ));
        let mut last_eval = f32::NAN;
        let mut finished = None;
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = self.inner.cancel.cancelled() => break,
            };
            match ev {
                Ok(RunEvent::Committed {
                    round,
                    root,
                    eval_loss,
                    ..
                }) => {
                    last_eval = eval_loss;
                    self.set_status(|s| {
                        s.phase = Phase::Lobby;
                        s.committed_round = round;
                        s.round = round;
                        s.committed_root = hex::encode(root);
                        s.eval_loss = eval_loss;
                    });
                }
                Ok(RunEvent::RoundOpened { round, .. }) => {
                    self.inner.traffic.set_round(round);
                    self.set_status(|s| {
                        s.round = round;
                        s.phase = Phase::AwaitingCommit;
                    });
                }
                Ok(RunEvent::Finished { rounds, root }) => {
                    finished = Some((rounds, root));
                    break;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        let res = coord.await;
        self.release_coordinator();
        match (res, finished) {
            (Ok(Ok(())), Some((rounds, root))) => {
                self.set_status(|s| {
                    s.state = "finished".into();
                    s.phase = Phase::Finished;
                });
                Ok(RunSummary {
                    run_id: run.id(),
                    rounds,
                    root,
                    eval_loss: last_eval,
                    num_params: if run.is_adapter_run() {
                        // The adapters' count needs the base's shapes.
                        self.new_replica(&run, &DeviceSpec::Cpu)
                            .map_or(0, |r| r.num_params())
                    } else {
                        run.model.num_params().unwrap_or(0) as usize
                    },
                    total_steps: checkpoint::swarm_step(&run, rounds),
                    checkpoint_root: None,
                    resumed_from: None,
                })
            }
            (Ok(Err(e)), _) => Err(e),
            _ => Err(TrainError::ShuttingDown),
        }
    }

    fn claim_coordinator(
        &self,
    ) -> Result<(mpsc::Sender<CoordEvent>, mpsc::Receiver<CoordEvent>), TrainError> {
        let (coord_tx, coord_rx) = mpsc::channel(1024);
        let mut g = self
            .inner
            .coord_tx
            .lock()
            .map_err(|_| TrainError::Other("poisoned".into()))?;
        if g.is_some() {
            return Err(TrainError::Busy);
        }
        *g = Some(coord_tx.clone());
        Ok((coord_tx, coord_rx))
    }

    fn release_coordinator(&self) {
        if let Ok(mut g) = self.inner.coord_tx.lock() {
            *g = None;
        }
    }

    /// Runs the coordinator loop on `machine` and this daemon's own replica until the run
    /// ends.
    async fn drive(
        &self,
        run: ResolvedRun,
        ledger: Ledger,
        machine: RunMachine,
        out: Option<PathBuf>,
        coord_tx: mpsc::Sender<CoordEvent>,
        coord_rx: mpsc::Receiver<CoordEvent>,
    ) -> Result<RunSummary, TrainError> {
        let run_id = run.id();
        // The local replica talks to the coordinator through channels instead of a stream.
        let (to_replica_tx, to_replica_rx) = mpsc::channel(64);
        let local = self.inner.local;
        if coord_tx
            .send(CoordEvent::Connected {
                peer: local,
                tx: to_replica_tx,
            })
            .await
            .is_err()
        {
            self.release_coordinator();
            return Err(TrainError::Other("coordinator stopped".into()));
        }
        let (from_replica_tx, mut from_replica_rx) = mpsc::channel::<Msg>(64);
        let fwd = coord_tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = from_replica_rx.recv().await {
                if fwd
                    .send(CoordEvent::Msg { peer: local, msg })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        self.set_status(|s| {
            s.lobby = None;
            s.reports = None;
        });
        let coord = tokio::spawn(run_coordinator(
            self.clone(),
            run.clone(),
            ledger,
            machine,
            coord_rx,
        ));
        let join = RunJoin {
            run_id: run_id.to_vec(),
            ..Default::default()
        };
        let res = self
            .replica(
                run_id,
                Some(run.clone()),
                (self.inner.local, from_replica_tx),
                to_replica_rx,
                join,
                out.clone(),
            )
            .await;
        if matches!(res, Err(TrainError::ShuttingDown)) {
            coord.abort();
        }
        let coord_res = coord.await;
        self.release_coordinator();
        match coord_res {
            // The replica finished, but the run ended early: say why.
            Ok(Err(e)) if res.is_ok() => Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "coordinator ended with an error");
                res
            }
            _ => res,
        }
    }

    /// Opens the ledger of a run this daemon coordinates. A new run's ledger starts with its
    /// genesis checkpoint (round 0); a run this daemon coordinated before a restart
    /// continues from its last commit, under the signed run manifest it started with.
    fn open_ledger(
        &self,
        run: &ResolvedRun,
        successors: &[PeerId],
    ) -> Result<(Ledger, RunMachine), TrainError> {
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &run.id());
        let dir = checkpoint::ledger_dir(&run_dir);
        let config = run_config(run);
        let run_file = run_dir.join(potluck_coordinator::manifest::RUN_FILE);
        let ledger_err = |e: &dyn std::fmt::Display| {
            TrainError::Other(format!("the run's ledger in {}: {e}", dir.display()))
        };
        if let Ok(bytes) = std::fs::read(&run_file)
            && !Ledger::read_entries(&dir).unwrap_or_default().is_empty()
        {
            let signed_run = SignedRunManifest::decode(&bytes).map_err(|e| ledger_err(&e))?;
            if signed_run.body().settings != run.canonical_bytes() {
                return Err(ledger_err(&"it belongs to other run settings"));
            }
            let ledger = Ledger::open(&dir, signed_run).map_err(|e| ledger_err(&e))?;
            let head = ledger
                .head()
                .ok_or_else(|| ledger_err(&"it is empty"))?
                .clone();
            let opened = read_opened_round(&run_dir);
            tracing::info!(
                round = head.body().round,
                "continuing the run from its ledger's last commit"
            );
            let machine = RunMachine::from_head(
                config,
                potluck_coordinator::failover::commit_of(&head),
                opened.max(head.body().round) + 1,
            )
            .map_err(|e| TrainError::Other(format!("run configuration: {e}")))?;
            return Ok((ledger, machine));
        }
        let rep = self.new_replica(run, &DeviceSpec::Cpu)?;
        let n = rep.num_params();
        let genesis = Snapshot::new(&rep, run, 0, rep.flat_params()?, vec![0.0; n])?;
        let mut keys = Vec::with_capacity(successors.len());
        for p in successors {
            keys.push(ed25519_key(p).ok_or_else(|| {
                TrainError::Other(format!("successor {p} has no ed25519 identity"))
            })?);
        }
        let signed_run =
            checkpoint::signed_run(run, Hash32(genesis.root), &self.inner.keypair, keys)?;
        std::fs::create_dir_all(&run_dir).map_err(|e| ledger_err(&e))?;
        potluck_coordinator::store::write_atomic(&run_file, &signed_run.encode())
            .map_err(|e| ledger_err(&e))?;
        let mut ledger = Ledger::open(&dir, signed_run.clone()).map_err(|e| ledger_err(&e))?;
        if ledger.head().is_none() {
            let m = checkpoint::sign_round(
                &signed_run,
                0,
                None,
                genesis.content.clone(),
                Vec::new(),
                &self.inner.keypair,
            )?;
            ledger.append(m).map_err(|e| ledger_err(&e))?;
        }
        let machine = RunMachine::new(config, Hash32(genesis.root))
            .map_err(|e| TrainError::Other(format!("run configuration: {e}")))?;
        Ok((ledger, machine))
    }

    /// Takes the run over as its next coordinator (its coordinator is gone and this daemon
    /// comes next in the signed succession), from this replica's copy of the ledger.
    async fn take_over_run(
        &self,
        ctx: RunContext,
        gone: &BTreeSet<PeerId>,
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &ctx.run.id());
        let ledger = Ledger::open(&checkpoint::ledger_dir(&run_dir), ctx.signed_run.clone())
            .map_err(|e| TrainError::Other(format!("this replica's ledger copy: {e}")))?;
        let head = ledger
            .head()
            .cloned()
            .ok_or_else(|| TrainError::Other("this replica holds no ledger copy".into()))?;
        let gone_keys: Vec<[u8; 32]> = gone.iter().filter_map(ed25519_key).collect();
        let my_key = ed25519_key(&self.inner.local)
            .ok_or_else(|| TrainError::Other("this daemon has no ed25519 identity".into()))?;
        let machine = potluck_coordinator::failover::take_over(
            &ctx.signed_run,
            &my_key,
            |k| !gone_keys.contains(k),
            &head,
            ctx.highest_round,
            run_config(&ctx.run),
        )
        .map_err(|e| TrainError::Other(format!("taking the run over: {e}")))?;
        potluck_coordinator::store::write_atomic(
            &run_dir.join(potluck_coordinator::manifest::RUN_FILE),
            &ctx.signed_run.encode(),
        )
        .map_err(|e| TrainError::Other(format!("saving the run manifest: {e}")))?;
        tracing::warn!(
            round = head.body().round,
            "the run's coordinator is gone; this daemon takes the run over"
        );
        let (tx, rx) = self.claim_coordinator()?;
        self.drive(ctx.run, ledger, machine, out, tx, rx).await
    }

    /// Joins the run `run_id` coordinated by `coordinator` and trains until it finishes.
    /// When the coordinator goes away mid-run, the replica finds the run's coordinator again
    /// in the order of the signed succession (the same coordinator restarted, or the next
    /// live successor, which may be this daemon), and rejoins it with its saved state.
    pub async fn join(
        &self,
        coordinator: PeerId,
        run_id: [u8; 32],
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        if let Ok(mut g) = self.inner.context.lock() {
            *g = None;
        }
        match self.join_once(coordinator, run_id, out.clone()).await {
            Err(TrainError::CoordinatorGone) => {}
            other => return other,
        }
        let Some(ctx) = self.context(&run_id) else {
            return Err(TrainError::CoordinatorGone);
        };
        self.find_coordinator(ctx, coordinator, out).await
    }

    fn context(&self, run_id: &[u8; 32]) -> Option<RunContext> {
        self.inner
            .context
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|c| c.run.id() == *run_id)
    }

    /// After the coordinator `lost` went away: walks the signed succession
    /// ([`Succession`]) until one coordinates the run again. Each loss gets its own window of
    /// three round deadlines (`failover_min` at least: a restarting daemon may take that
    /// long), a rejoin included: a replica that found its coordinator again and loses it
    /// later searches afresh. A candidate that cannot be reached is passed over; when this
    /// daemon is the first reachable one, it takes the run over.
    async fn find_coordinator(
        &self,
        ctx: RunContext,
        lost: PeerId,
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        let run_id = ctx.run.id();
        let order: Vec<[u8; 32]> = ctx.signed_run.body().coordinator_keys.clone();
        let window =
            Duration::from_secs(ctx.run.round_deadline_secs).max(self.inner.failover_min) * 3;
        let mut search = Succession::new(
            order,
            ed25519_key(&self.inner.local),
            window.as_millis() as u64,
            FAILOVER_RETRY.as_millis() as u64,
        );
        let start = Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        search.handle_lost(now_ms());
        let mut last = TrainError::CoordinatorGone;
        tracing::warn!(coordinator = %lost, "lost the run's coordinator; looking for it again");
        self.set_status(|s| {
            s.state = "looking for the run's coordinator".into();
            s.phase = Phase::LookingForCoordinator;
        });
        loop {
            if self.inner.cancel.is_cancelled() {
                return Err(TrainError::ShuttingDown);
            }
            let cand = match search.poll(now_ms()) {
                Step::Following => {
                    // Only a welcome leaves the search, and a welcome ends in a return.
                    return Err(last);
                }
                Step::GiveUp => return Err(last),
                Step::Wait(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = self.inner.cancel.cancelled() => return Err(TrainError::ShuttingDown),
                    }
                }
                Step::TakeOver(gone) => {
                    let gone: BTreeSet<PeerId> = gone.iter().filter_map(peer_of_key).collect();
                    let ctx = self.context(&run_id).unwrap_or_else(|| ctx.clone());
                    return self.take_over_run(ctx, &gone, out).await;
                }
                Step::Dial(key) => key,
            };
            let Some(peer) = peer_of_key(&cand) else {
                search.handle_unreachable(cand);
                continue;
            };
            if let Ok(mut g) = self.inner.context.lock()
                && let Some(c) = g.as_mut()
            {
                c.welcomed = false;
            }
            match self.join_once(peer, run_id, out.clone()).await {
                Ok(s) => return Ok(s),
                Err(TrainError::Unreachable(p, why)) => {
                    tracing::info!(peer = %p, why, "candidate coordinator unreachable");
                    search.handle_unreachable(cand);
                    last = TrainError::Unreachable(p, why);
                }
                Err(e @ (TrainError::ShuttingDown | TrainError::Worker(_))) => return Err(e),
                Err(e) => {
                    if self.context(&run_id).is_some_and(|c| c.welcomed) {
                        // It took us back and went away later: a new loss.
                        tracing::warn!(coordinator = %peer, error = %e, "lost the run's coordinator again; looking for it again");
                        search.handle_welcomed(cand);
                        search.handle_lost_after_welcome(cand, now_ms());
                    } else {
                        // Reached but not coordinating (yet).
                        tracing::info!(candidate = %peer, error = %e, "candidate coordinator did not take us back");
                        search.handle_not_coordinating(cand, now_ms());
                    }
                    last = e;
                }
            }
        }
    }

    async fn join_once(
        &self,
        coordinator: PeerId,
        run_id: [u8; 32],
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        let stream = self
            .open(coordinator, CONTROL_PROTOCOL)
            .await
            .map_err(|e| match e {
                e @ TrainError::NotAdmitted(_) => e,
                e => TrainError::Unreachable(coordinator, e.to_string()),
            })?;
        let (mut rd, mut wr) = stream.split();
        let (up_tx, mut up_rx) = mpsc::channel::<Msg>(64);
        let (down_tx, down_rx) = mpsc::channel::<TrainControl>(64);
        let svc = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = up_rx.recv().await {
                let m = TrainControl {
                    protocol_version: 0,
                    msg: Some(msg),
                };
                match write_control(&mut wr, m).await {
                    Ok(n) => svc.inner.traffic.add(coordinator, n, 0),
                    Err(_) => break,
                }
            }
            let _ = wr.close().await;
        });
        let svc = self.clone();
        tokio::spawn(async move {
            // No deadline here: the stream is long-lived, and the replica puts its own
            // deadlines on what it waits for.
            // Ends with the daemon too, so the stream (and its connection) is released.
            let cancel = svc.inner.cancel.clone();
            loop {
                let Some(read) = cancel.run_until_cancelled(read_control(&mut rd)).await else {
                    return;
                };
                let Ok(Some((msg, n))) = read else { break };
                svc.inner.traffic.add(coordinator, 0, n);
                // A departure is for the exchange in progress, which does not read this
                // channel until the round ends: it goes to the register at once.
                if let Some(Msg::Left(left)) = &msg.msg {
                    if left.run_id.as_slice() == run_id.as_slice()
                        && let Ok(peer) = PeerId::from_bytes(&left.peer)
                    {
                        svc.note_departure(peer, left.round);
                    }
                    continue;
                }
                if down_tx.send(msg).await.is_err() {
                    return;
                }
            }
            // The control stream ended: the coordinator is gone (a member of the round too,
            // when it trains).
            svc.note_departure(coordinator, UNTIL_WELCOMED);
        });
        let join = RunJoin {
            run_id: run_id.to_vec(),
            ..Default::default()
        };
        self.set_status(|s| s.phase = Phase::Reaching);
        self.replica(run_id, None, (coordinator, up_tx), down_rx, join, out)
            .await
    }

    /// The replica loop, shared by the coordinator's own replica and joined ones.
    async fn replica(
        &self,
        run_id: [u8; 32],
        known: Option<ResolvedRun>,
        (coordinator, up): (PeerId, mpsc::Sender<Msg>),
        mut down: mpsc::Receiver<TrainControl>,
        join: RunJoin,
        out: Option<PathBuf>,
    ) -> Result<RunSummary, TrainError> {
        let mut inbox = self
            .inner
            .inbox_rx
            .try_lock()
            .map_err(|_| TrainError::Busy)?;
        while inbox.try_recv().is_ok() {}
        up.send(Msg::Join(join))
            .await
            .map_err(|_| TrainError::CoordinatorGone)?;
        let welcome = loop {
            let m = tokio::time::timeout(WELCOME_TIMEOUT, down.recv())
                .await
                .map_err(|_| TrainError::Other("the coordinator did not answer the join".into()))?
                .ok_or(TrainError::CoordinatorGone)?;
            match m.msg {
                Some(Msg::Welcome(w)) => break w,
                Some(Msg::Refused(r)) => return Err(TrainError::Refused(r.reason)),
                _ => continue,
            }
        };
        // The coordinator's own replica leaves the ledger to the coordinator.
        let coordinating = known.is_some();
        let run = match known {
            Some(r) => r,
            None => ResolvedRun::from_canonical(&welcome.manifest, &run_id)?,
        };
        let signed_run = SignedRunManifest::decode(&welcome.signed_run).map_err(|e| {
            TrainError::Other(format!("the coordinator's signed run manifest: {e}"))
        })?;
        if signed_run.body().settings != run.canonical_bytes() {
            return Err(TrainError::Other(
                "the coordinator's signed run manifest is not the run it admitted us to".into(),
            ));
        }
        if let Ok(mut d) = self.inner.departures.lock() {
            d.welcomed();
        }
        if let Ok(mut g) = self.inner.context.lock() {
            let highest = g.as_ref().map(|c| c.highest_round).unwrap_or(0);
            *g = Some(RunContext {
                run: run.clone(),
                signed_run: signed_run.clone(),
                highest_round: highest.max(welcome.committed_round),
                welcomed: true,
            });
        }
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &run_id);
        let mut data_sources = vec![coordinator];
        for p in welcome.data_sources.iter().take(MAX_DATA_SOURCES) {
            if let Ok(p) = PeerId::from_bytes(p)
                && p != self.inner.local
                && !data_sources.contains(&p)
            {
                data_sources.push(p);
            }
        }
        let data = Arc::new(
            self.run_data(
                &run,
                &run_dir,
                &data_sources,
                (&welcome.data_manifest, &signed_run),
            )
            .await?,
        );
        let codec = run.codec();
        // Under a memory cap, the batch is checked (and split if need be) before the model
        // takes any memory.
        let plan = self.memory_plan(&run)?;
        let base = self.run_base(&run, &run_dir, &data_sources).await?;
        let mut rep = new_replica(&run, base.as_deref(), &self.inner.device)?;
        if let Some(plan) = plan.filter(|p| p.micro_batches > 1) {
            tracing::info!(
                batch = run.inner.batch_size,
                micro_batch = plan.micro_batch,
                estimate_mib = plan.estimate.total() >> 20,
                "the batch does not fit the memory cap at once: accumulating micro-batches"
            );
            rep.set_micro_batch(plan.micro_batch);
        }
        let n = rep.num_params();
        let mut outer = OuterOptimizer::new(run.outer.lr, run.outer.momentum, n);
        let mut ef = ErrorFeedback::new(n);
        let mut committed = Arc::new(Snapshot::new(
            &rep,
            &run,
            0,
            rep.flat_params()?,
            outer.velocity().to_vec(),
        )?);
        if committed.root != signed_run.body().genesis_root.0 {
            return Err(TrainError::Other(format!(
                "this replica computes another initial state ({}) than the coordinator ({}): \
                 are both daemons the same version?",
                hex::encode(&committed.root[..8]),
                signed_run.body().genesis_root.short()
            )));
        }
        self.publish(&committed);
        let mut ledger = if coordinating {
            None
        } else {
            self.replica_ledger(
                &run_dir,
                &signed_run,
                (&run_id, &welcome.head_manifest, coordinator),
            )
            .await
        };
        // A restarted replica resumes with its own inner optimizer and error feedback.
        let local_dir = run_dir.join(LOCAL_DIR);
        let mut resumed_from = None;
        match load_local(&local_dir, &run, base.as_deref(), &self.inner.device) {
            Ok(Some((r, e, snap))) => {
                tracing::info!(
                    round = snap.round,
                    "resuming from this replica's saved state"
                );
                rep = r;
                ef = e;
                resumed_from = Some(snap.round);
                self.set_status(|s| s.resumed_from = Some(snap.round));
                committed = Arc::new(snap);
                self.publish(&committed);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "this replica's saved state is unusable; starting afresh")
            }
        }
        let mut last_manifest: Option<SignedManifest> =
            SignedManifest::decode(&welcome.head_manifest).ok();
        let mut pending: Option<Arc<Snapshot>> = None;
        // The members of the last round opened: where the final state is, if needed.
        let mut last_members: Vec<Vec<u8>> = Vec::new();
        let mut last_eval = f32::NAN;
        self.set_status(|s| {
            s.run_id = hex::encode(run_id);
            s.name = run.name.clone();
            s.rounds = run.rounds;
            s.state = "waiting for the first round".into();
            s.phase = Phase::Lobby;
            // At a coordinator, its own loop has been telling the lobby since it started.
            if !coordinating {
                s.lobby = None;
                s.reports = None;
            }
            s.role = if coordinating {
                "coordinator"
            } else {
                "replica"
            }
            .into();
            s.coordinator = coordinator.to_base58();
        });
        // Frames that arrived for a round we have not reached yet.
        let mut early: Vec<Inbound> = Vec::new();
        // An overlapped run's update of the last round trained, exchanged in the next.
        let mut carried: Option<Carried> = None;
        // The round in progress here: when it opened, and where its time went so far.
        let mut timing: Option<(Instant, RoundTiming)> = None;
        let mut pause = self.inner.paused.subscribe();
        // A message the paused replica left for the main loop (the run's end).
        let mut after_pause: Option<TrainControl> = None;
        loop {
            if pause.borrow_and_update().is_some() {
                // Out of the rounds until resumed.
                carried = None;
                pending = None;
                timing = None;
                let (r, left) = self
                    .sit_out(
                        Some(rep),
                        (&run, &run_id, &local_dir),
                        (&committed, &ef),
                        (&up, &mut down),
                        (&mut ledger, &mut last_manifest),
                        &mut pause,
                    )
                    .await?;
                rep = r.0;
                if let Some(e) = r.1 {
                    ef = e;
                }
                after_pause = left;
            }
            let m = match after_pause.take() {
                Some(m) => Some(m),
                None => tokio::select! {
                    m = down.recv() => m,
                    Ok(()) = pause.changed() => continue,
                    _ = self.inner.cancel.cancelled() => return Err(TrainError::ShuttingDown),
                },
            };
            let Some(m) = m else {
                return Err(TrainError::CoordinatorGone);
            };
            match m.msg {
                Some(Msg::Lobby(l)) => {
                    self.set_status(|s| s.lobby = Some((l.members, l.needed, l.paused)));
                }
                Some(Msg::Open(open)) => {
                    let opened_at = Instant::now();
                    if let Some((at, t)) = timing.take() {
                        self.record_timing(t.close(opened_at.duration_since(at)));
                    }
                    let mut this_round = RoundTiming {
                        round: open.round,
                        overlap: run.overlap,
                        ..Default::default()
                    };
                    last_members = open.members.clone();
                    self.set_status(|s| s.lobby = None);
                    self.inner.traffic.set_round(open.round);
                    if let Ok(mut g) = self.inner.context.lock()
                        && let Some(c) = g.as_mut()
                    {
                        c.highest_round = c.highest_round.max(open.round);
                    }
                    // Roll back or fetch until we hold the round's base state.
                    if let Some(p) = pending.take()
                        && p.root.as_slice() == open.base_root.as_slice()
                    {
                        // Committed, though its commit never reached us (the coordinator
                        // restarted in between): saved for a restart as a commit would be.
                        committed = p;
                        self.publish(&committed);
                        if let Err(e) = save_local(&local_dir, &rep, &committed, &ef, &run) {
                            tracing::warn!(error = %e, "could not save this replica's state for a restart");
                        }
                    }
                    if committed.root.as_slice() != open.base_root.as_slice()
                        && let Some(s) = self.state_at_hand(&open.base_root, &run_dir, &rep, &run)
                    {
                        committed = s;
                    }
                    if committed.root.as_slice() != open.base_root.as_slice() {
                        let fetching = Instant::now();
                        self.set_status(|s| {
                            s.round = open.round;
                            s.phase = Phase::FetchingCheckpoint;
                        });
                        let fetched = self.resync(&open, &run_id, &rep, &run).await;
                        this_round.network_wait_ms += fetching.elapsed().as_millis() as u64;
                        match fetched {
                            Ok(s) => {
                                committed = Arc::new(s);
                                self.publish(&committed);
                            }
                            Err(e) => {
                                // Stay in the run: report, so the coordinator counts us as
                                // present (not a straggler) and we try again next round.
                                tracing::warn!(round = open.round, error = %e, "could not resync; sitting this round out");
                                let report = TrainReport {
                                    run_id: run_id.to_vec(),
                                    round: open.round,
                                    update_hash: vec![0; 32],
                                    // A root no other replica can hold, so that replicas
                                    // sitting out never form a quorum among themselves.
                                    root: sitting_out_root(&self.inner.local, open.round).to_vec(),
                                    ..Default::default()
                                };
                                up.send(Msg::Report(report))
                                    .await
                                    .map_err(|_| TrainError::CoordinatorGone)?;
                                timing = Some((opened_at, this_round));
                                continue;
                            }
                        }
                    }
                    rep.set_flat_params(&committed.params)?;
                    // A data-parallel swarm shares its inner optimizer's state too.
                    if let Some(inner) = &committed.inner {
                        rep.set_flat_optimizer_state(inner.steps, &inner.m, &inner.v)?;
                    }
                    outer = OuterOptimizer::with_velocity(
                        run.outer.lr,
                        run.outer.momentum,
                        committed.velocity.clone(),
                    );
                    let mut slot = Some(rep);
                    let round = async {
                        match run.mode {
                            RunMode::Diloco => {
                                self.round(
                                    &run,
                                    &run_id,
                                    &open,
                                    &data,
                                    codec,
                                    &mut slot,
                                    &mut outer,
                                    &mut ef,
                                    &mut inbox,
                                    &mut early,
                                    &opened_at,
                                    &mut carried,
                                    &mut this_round,
                                )
                                .await
                            }
                            RunMode::DataParallel => {
                                self.dp_round(
                                    &run, &run_id, &open, &data, &mut slot, &outer, &mut inbox,
                                    &mut early, &opened_at,
                                )
                                .await
                            }
                        }
                    };
                    // A pause stops the round where it is: the others stop waiting for
                    // this replica as soon as the coordinator hears of it.
                    let report = tokio::select! {
                        r = round => Some(r),
                        _ = pause.wait_for(Option::is_some) => None,
                    };
                    let Some(report) = report else {
                        tracing::info!(
                            round = open.round,
                            "paused mid-round; this round's work is dropped"
                        );
                        // The replica may still be training off the runtime: it is dropped
                        // when its steps end, and rebuilt from the saved state on resume.
                        drop(slot);
                        carried = None;
                        let (r, left) = self
                            .sit_out(
                                None,
                                (&run, &run_id, &local_dir),
                                (&committed, &ef),
                                (&up, &mut down),
                                (&mut ledger, &mut last_manifest),
                                &mut pause,
                            )
                            .await?;
                        rep = r.0;
                        if let Some(e) = r.1 {
                            ef = e;
                        }
                        after_pause = left;
                        continue;
                    };
                    timing = Some((opened_at, this_round));
                    rep = slot.ok_or_else(|| TrainError::Other("replica lost".into()))?;
                    let report = report?;
                    if let Some((report, snap)) = report {
                        last_eval = report.eval_loss;
                        let snap = Arc::new(snap);
                        self.publish(&snap);
                        pending = Some(snap);
                        up.send(Msg::Report(report))
                            .await
                            .map_err(|_| TrainError::CoordinatorGone)?;
                    }
                }
                Some(Msg::Commit(c)) => {
                    let persisting = Instant::now();
                    // The ledger copy takes every commit, held here or not.
                    let manifest = match commit_manifest_of(&c) {
                        Ok(m) => {
                            append_ledger(&mut ledger, &m);
                            Some(m)
                        }
                        Err(e) => {
                            tracing::warn!(round = c.round, error = %e, "commit without a usable manifest");
                            None
                        }
                    };
                    if let Some(p) = pending.take() {
                        if p.root.as_slice() == c.root.as_slice() {
                            committed = p;
                            self.publish(&committed);
                            if let Some(m) = manifest {
                                if let Err(e) = keep_checkpoint(
                                    &run,
                                    &rep,
                                    &committed,
                                    &m,
                                    &signed_run,
                                    (&run_dir, self.inner.keep_checkpoints),
                                ) {
                                    tracing::warn!(
                                        round = c.round,
                                        error = %e,
                                        "could not keep the committed checkpoint"
                                    );
                                }
                                last_manifest = Some(m);
                            }
                            if let Err(e) = save_local(&local_dir, &rep, &committed, &ef, &run) {
                                tracing::warn!(
                                    round = c.round,
                                    error = %e,
                                    "could not save this replica's state for a restart"
                                );
                            }
                        } else {
                            tracing::warn!(
                                round = c.round,
                                "our root differs from the committed one; will resync"
                            );
                            self.set_status(|s| s.disagreed_rounds += 1);
                        }
                    }
                    if let Some((_, t)) = timing.as_mut()
                        && t.round == c.round
                    {
                        t.persist_ms += persisting.elapsed().as_millis() as u64;
                    }
                    self.set_status(|s| {
                        s.committed_round = c.round;
                        s.committed_root = hex::encode(&c.root);
                        s.eval_loss = c.eval_loss;
                        s.phase = Phase::Lobby;
                    });
                }
                Some(Msg::Finished(f)) => {
                    if let Some((at, t)) = timing.take() {
                        self.record_timing(t.close(at.elapsed()));
                    }
                    if let Some(p) = pending.take()
                        && p.root.as_slice() == f.root.as_slice()
                    {
                        committed = p;
                    }
                    if committed.root.as_slice() != f.root.as_slice()
                        && let Some(s) = self.state_at_hand(&f.root, &run_dir, &rep, &run)
                    {
                        committed = s;
                    }
                    if committed.root.as_slice() != f.root.as_slice() {
                        // It joined or disagreed last, or came back after the last commit:
                        // fetch the final state like a resync. The coordinator kept the
                        // final checkpoint; the last round's members and the replicas that
                        // agreed on it hold it too.
                        let mut members = last_members.clone();
                        if let Ok(m) = SignedManifest::decode(&f.manifest) {
                            for c in &m.body().contributors {
                                if !members.contains(&c.peer.0) {
                                    members.push(c.peer.0.clone());
                                }
                            }
                        }
                        let last = RoundOpen {
                            run_id: run_id.to_vec(),
                            round: f.rounds,
                            members,
                            base_root: f.root.clone(),
                            state_source: coordinator.to_bytes(),
                            ..Default::default()
                        };
                        let snap = self.resync(&last, &run_id, &rep, &run).await.map_err(|e| {
                            TrainError::Other(format!(
                                "the run finished on a state this replica does not hold, \
                                 and fetching it failed: {e}"
                            ))
                        })?;
                        committed = Arc::new(snap);
                    }
                    rep.set_flat_params(&committed.params)?;
                    if let Ok(m) = SignedManifest::decode(&f.manifest) {
                        last_manifest = Some(m);
                    }
                    let checkpoint_root = match &out {
                        Some(dir) => {
                            let m = last_manifest
                                .as_ref()
                                .filter(|m| m.body().root.0 == committed.root)
                                .ok_or_else(|| {
                                    TrainError::Other(
                                        "the coordinator sent no signed manifest for the final \
                                         checkpoint; nothing was written"
                                            .into(),
                                    )
                                })?;
                            let files = committed.files(&rep, &run)?;
                            checkpoint::write_checkpoint(dir, &files, m, &signed_run)?;
                            Some(m.body().root.to_hex())
                        }
                        None => None,
                    };
                    let eval_loss = if last_eval.is_finite() {
                        last_eval
                    } else {
                        rep.eval_loss(&data, EVAL_BATCHES)?
                    };
                    self.set_status(|s| {
                        s.state = "finished".into();
                        s.phase = Phase::Finished;
                        s.committed_round = f.rounds;
                        s.committed_root = hex::encode(committed.root);
                    });
                    return Ok(RunSummary {
                        run_id,
                        rounds: f.rounds,
                        root: committed.root,
                        eval_loss,
                        num_params: n,
                        total_steps: rep.step(),
                        checkpoint_root,
                        resumed_from,
                    });
                }
                Some(Msg::Refused(r)) => return Err(TrainError::Refused(r.reason)),
                _ => {}
            }
        }
    }

    /// A paused replica: tells the coordinator it sits the rounds out, saves its state
    /// (`rep`, when a pause did not stop it mid-round; else the state saved at its last
    /// commit stands) and drops its model and optimizer, which frees the device. Until
    /// resumed it only follows the run: commits go into its ledger copy and status. On
    /// resume it rebuilds its replica from the saved state (inner optimizer and error
    /// feedback included) and tells the coordinator, which takes it into the next round;
    /// its weights come from the committed state at the next round's opening, as after a
    /// restart. Returns the replica, the saved error feedback, and the run's end when it
    /// came while paused (then the replica is rebuilt on the CPU, to write the final
    /// checkpoint without the device).
    #[allow(clippy::too_many_arguments)]
    async fn sit_out(
        &self,
        rep: Option<Replica>,
        (run, run_id, local_dir): (&ResolvedRun, &[u8; 32], &std::path::Path),
        (committed, ef): (&Snapshot, &ErrorFeedback),
        (up, down): (&mpsc::Sender<Msg>, &mut mpsc::Receiver<TrainControl>),
        (ledger, last_manifest): (&mut Option<Ledger>, &mut Option<SignedManifest>),
        pause: &mut tokio::sync::watch::Receiver<Option<PauseCause>>,
    ) -> Result<((Replica, Option<ErrorFeedback>), Option<TrainControl>), TrainError> {
        let notice = |paused| {
            Msg::Pause(PauseNotice {
                run_id: run_id.to_vec(),
                paused,
            })
        };
        up.send(notice(true))
            .await
            .map_err(|_| TrainError::CoordinatorGone)?;
        if let Some(rep) = rep {
            if let Err(e) = save_local(local_dir, &rep, committed, ef, run) {
                tracing::warn!(error = %e, "could not save this replica's state before pausing; it resumes from its last saved commit");
            }
            drop(rep);
        }
        tracing::info!(
            round = committed.round,
            "training paused: out of the run's rounds, model and optimizer freed"
        );
        self.set_status(|s| {
            s.state = "paused".into();
            s.phase = Phase::Paused;
            s.collected = None;
        });
        let rebuild =
            |device: &DeviceSpec| -> Result<(Replica, Option<ErrorFeedback>), TrainError> {
                let base = self.local_base(run)?;
                match load_local(local_dir, run, base.as_deref(), device) {
                    Ok(Some((r, e, snap))) => {
                        self.set_status(|s| s.resumed_from = Some(snap.round));
                        Ok((r, Some(e)))
                    }
                    Ok(None) => Ok((new_replica(run, base.as_deref(), device)?, None)),
                    Err(e) => {
                        tracing::warn!(error = %e, "this replica's saved state is unusable; resuming afresh");
                        Ok((new_replica(run, base.as_deref(), device)?, None))
                    }
                }
            };
        loop {
            let m = tokio::select! {
                m = down.recv() => m,
                r = pause.wait_for(Option::is_none) => {
                    if r.is_err() {
                        return Err(TrainError::ShuttingDown);
                    }
                    break;
                }
                _ = self.inner.cancel.cancelled() => return Err(TrainError::ShuttingDown),
            };
            let Some(m) = m else {
                return Err(TrainError::CoordinatorGone);
            };
            match m.msg {
                Some(Msg::Commit(c)) => {
                    // The ledger copy takes every commit, so the lineage stays whole.
                    match commit_manifest_of(&c) {
                        Ok(m) => {
                            append_ledger(ledger, &m);
                            *last_manifest = Some(m);
                        }
                        Err(e) => {
                            tracing::warn!(round = c.round, error = %e, "commit without a usable manifest")
                        }
                    }
                    self.set_status(|s| {
                        s.committed_round = c.round;
                        s.committed_root = hex::encode(&c.root);
                        s.eval_loss = c.eval_loss;
                    });
                }
                Some(Msg::Finished(_)) => {
                    tracing::info!("the run finished while paused");
                    let rep = rebuild(&DeviceSpec::Cpu)?;
                    return Ok((rep, Some(m)));
                }
                Some(Msg::Lobby(l)) => {
                    self.set_status(|s| s.lobby = Some((l.members, l.needed, l.paused)));
                }
                Some(Msg::Refused(r)) => return Err(TrainError::Refused(r.reason)),
                // A round opened before the coordinator heard of the pause: the pause
                // notice takes this replica out of it.
                Some(Msg::Open(o)) => {
                    tracing::debug!(
                        round = o.round,
                        "a round opened while paused; sitting it out"
                    )
                }
                _ => {}
            }
        }
        let rep = rebuild(&self.inner.device)?;
        up.send(notice(false))
            .await
            .map_err(|_| TrainError::CoordinatorGone)?;
        tracing::info!("training resumed: rejoining the run's rounds");
        self.set_status(|s| {
            s.state = "resumed; waiting for the next round".into();
            s.phase = Phase::Lobby;
        });
        Ok((rep, None))
    }

    /// Signs the manifest of a committed round, keeps its checkpoint in the run directory,
    /// and only then appends it to the coordinator's ledger. The state comes from this
    /// daemon's own replica when it holds it, else from an agreeing peer (fetched and
    /// hashed here).
    async fn commit_manifest(
        &self,
        run: &ResolvedRun,
        record: &potluck_coordinator::round::CommitRecord,
        agreeing: &[PeerId],
        ledger: &mut Ledger,
        hasher: &mut Option<Replica>,
    ) -> Result<SignedManifest, TrainError> {
        // A quorum of the other replicas can agree a moment before this daemon's own
        // replica finishes the round: wait briefly for it rather than fetch the whole state
        // from a peer (a full f32 copy of the weights and momentum on the wire).
        // A paused replica computes nothing to wait for.
        let own_replica = self.paused().is_none()
            && self
                .inner
                .context
                .lock()
                .ok()
                .is_some_and(|c| c.as_ref().is_some_and(|c| c.run.id() == run.id()));
        let mut held_now = self.held_state(&record.root.0);
        let give_up = Instant::now() + OWN_STATE_WAIT;
        while own_replica && held_now.is_none() && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(20)).await;
            held_now = self.held_state(&record.root.0);
        }
        if hasher.is_none() {
            *hasher = Some(self.new_replica(run, &DeviceSpec::Cpu)?);
        }
        let rep = hasher
            .as_ref()
            .ok_or_else(|| TrainError::Other("no replica to hash with".into()))?;
        let snap = match held_now {
            Some(s) => s,
            None => {
                // The root covers the round too (the step and file names in the files).
                let others: Vec<PeerId> = agreeing
                    .iter()
                    .copied()
                    .filter(|p| *p != self.inner.local)
                    .collect();
                let fetched = self
                    .state_from_any(&others, &run.id(), &record.root.0, rep, run)
                    .await
                    .map_err(|e| {
                        TrainError::Other(format!(
                            "no agreeing peer served the committed state: {e}"
                        ))
                    })?;
                Arc::new(fetched)
            }
        };
        let m = checkpoint::sign_round(
            ledger.run(),
            record.round,
            record.parent,
            snap.content.clone(),
            record.agreeing.clone(),
            &self.inner.keypair,
        )?;
        // The coordinator keeps every state its ledger names before the ledger names it:
        // a coordinator that dies right after this commit, before any replica heard of it,
        // still serves the state its restarted self (or a replica) continues from.
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &run.id());
        keep_checkpoint(
            run,
            rep,
            &snap,
            &m,
            ledger.run(),
            (&run_dir, self.inner.keep_checkpoints),
        )
        .map_err(|e| TrainError::Other(format!("keeping the committed checkpoint: {e}")))?;
        if let Err(e) = ledger.append(m.clone()) {
            // A checkpoint the ledger does not name is no commit: do not leave it behind.
            let _ = std::fs::remove_dir_all(checkpoint::checkpoint_dir(&run_dir, record.round));
            return Err(TrainError::Other(format!("appending to the ledger: {e}")));
        }
        Ok(m)
    }

    /// This replica's copy of the run's ledger, from the run's genesis to the coordinator's
    /// `head`. A replica that joins after round 0, or comes back after missing commits,
    /// fetches the entries it lacks from the coordinator (each link checked as it is
    /// appended); without them it keeps the committed checkpoints but no ledger copy, and
    /// cannot take the run over.
    async fn replica_ledger(
        &self,
        run_dir: &std::path::Path,
        signed_run: &SignedRunManifest,
        (run_id, head, coordinator): (&[u8; 32], &[u8], PeerId),
    ) -> Option<Ledger> {
        let dir = checkpoint::ledger_dir(run_dir);
        let mut ledger = match Ledger::open(&dir, signed_run.clone()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep a copy of the run's ledger");
                return None;
            }
        };
        let head = match SignedManifest::decode(head) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "the coordinator sent no usable ledger head");
                return None;
            }
        };
        let have = ledger.head().map(|m| m.body().round);
        if have.is_none_or(|r| r < head.body().round) {
            let from = have.map_or(0, |r| r + 1);
            let entries = if head.body().round == 0 {
                Ok(vec![head.clone()])
            } else {
                self.fetch_ledger(coordinator, run_id, from).await
            };
            let copied = entries.and_then(|entries| {
                for m in entries {
                    ledger
                        .append(m)
                        .map_err(|e| TrainError::Other(format!("an entry was refused: {e}")))?;
                }
                Ok(())
            });
            if let Err(e) = copied {
                tracing::warn!(
                    error = %e,
                    "no copy of the run's ledger: keeping checkpoints, not the ledger"
                );
                return None;
            }
        }
        // The copy must hold the head the coordinator welcomed us with.
        if !ledger.entries().iter().any(|m| m.encode() == head.encode()) {
            tracing::warn!("the ledger copy does not hold the coordinator's head; not kept");
            return None;
        }
        Some(ledger)
    }

    /// The state named `root` when this daemon has it without the network: in memory, or
    /// in a checkpoint kept on its disk (then served from memory too).
    fn state_at_hand(
        &self,
        root: &[u8],
        run_dir: &std::path::Path,
        rep: &Replica,
        run: &ResolvedRun,
    ) -> Option<Arc<Snapshot>> {
        if let Some(held) = self.held_state(root) {
            return Some(held);
        }
        let kept = Arc::new(kept_state(run_dir, root, rep, run)?);
        self.publish(&kept);
        Some(kept)
    }

    /// A state this daemon still holds, by root.
    fn held_state(&self, root: &[u8]) -> Option<Arc<Snapshot>> {
        self.inner
            .served
            .lock()
            .ok()
            .and_then(|g| g.iter().find(|s| s.root.as_slice() == root).cloned())
    }

    fn publish(&self, snap: &Arc<Snapshot>) {
        if let Ok(mut g) = self.inner.served.lock() {
            g.retain(|s| s.root != snap.root);
            g.push(snap.clone());
            let excess = g.len().saturating_sub(SERVED_STATES);
            g.drain(..excess);
        }
    }

    async fn resync(
        &self,
        open: &RoundOpen,
        run_id: &[u8; 32],
        rep: &Replica,
        run: &ResolvedRun,
    ) -> Result<Snapshot, TrainError> {
        // The named source first, then every other member of the round: any of them that
        // agreed holds the state, and the named one may have died since.
        let mut sources: Vec<PeerId> = PeerId::from_bytes(&open.state_source)
            .into_iter()
            .filter(|p| *p != self.inner.local)
            .collect();
        for m in &open.members {
            if let Ok(p) = PeerId::from_bytes(m)
                && p != self.inner.local
                && !sources.contains(&p)
            {
                sources.push(p);
            }
        }
        // The committed checkpoint, chunk by verified chunk from every source at once; the
        // state frame below is the fallback (a source still writing the checkpoint).
        match self.fetch_checkpoint_state(open, &sources, rep, run).await {
            Ok(snap) => return Ok(snap),
            Err(e) => {
                tracing::info!(error = %e, "checkpoint transfer failed; asking for the state")
            }
        }
        self.state_from_any(&sources, run_id, &open.base_root, rep, run)
            .await
    }

    /// Asks `sources` in turn for the state named `root` (a signed state frame) and
    /// returns the first one whose checkpoint files hash to it.
    async fn state_from_any(
        &self,
        sources: &[PeerId],
        run_id: &[u8; 32],
        root: &[u8],
        rep: &Replica,
        run: &ResolvedRun,
    ) -> Result<Snapshot, TrainError> {
        let n = rep.num_params();
        let mut last = TrainError::Other("no peer to fetch the state from".into());
        for &source in sources {
            let dp = run.mode == RunMode::DataParallel;
            let fetched = self.fetch_state(source, (run_id, root), n, dp).await;
            let (round, params, velocity, inner) = match fetched {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let snap = Snapshot::with_inner(rep, run, round, (params, velocity), inner)?;
            if snap.root.as_slice() != root {
                last = TrainError::Other(format!(
                    "state from {source} hashes to {} but {} was asked for",
                    hex::encode(snap.root),
                    hex::encode(root)
                ));
                continue;
            }
            tracing::info!(%source, round, "fetched the state");
            return Ok(snap);
        }
        Err(last)
    }

    /// The run's data for this replica. For a path source with a pinned package root: the
    /// package this daemon holds, else its own copy at the source path when that is the
    /// run's data (served too when the coordinator sent the package's signed manifest and
    /// the files can be hard-linked), else the package fetched from `sources` (verified
    /// piece by piece) and kept, so that this daemon serves it too. The token hash is
    /// checked either way.
    async fn run_data(
        &self,
        run: &ResolvedRun,
        run_dir: &std::path::Path,
        sources: &[PeerId],
        (data_manifest, signed_run): (&[u8], &SignedRunManifest),
    ) -> Result<potluck_worker::Dataset, TrainError> {
        let Some(root) = datapack::pinned_root(run)? else {
            let run = run.clone();
            return load_off_runtime(move || run.load_data()).await;
        };
        let pack = run_dir.join(datapack::DATA_DIR);
        let (held, own) = {
            let (pack, spec) = (pack.clone(), run.data.clone());
            tokio::task::spawn_blocking(move || {
                let held = datapack::holds(&pack, root);
                // Only hash this peer's own copy when no package is at hand.
                let own = match held {
                    Ok(true) => None,
                    _ => Some(datapack::package_root(&spec)),
                };
                (held, own)
            })
            .await
            .map_err(|_| TrainError::ShuttingDown)?
        };
        match held {
            Ok(true) => {
                let (run, pack) = (run.clone(), pack.clone());
                return load_off_runtime(move || run.load_data_from_package(&pack)).await;
            }
            Err(reason) => {
                tracing::warn!(dir = %pack.display(), %reason, "removing a damaged data package");
                std::fs::remove_dir_all(&pack)
                    .map_err(|e| TrainError::Other(format!("{}: {e}", pack.display())))?;
            }
            _ => {}
        }
        match own {
            Some(Ok(r)) if r == root => {
                let (run, pack) = (run.clone(), pack.clone());
                let (manifest, signed_run) = (data_manifest.to_vec(), signed_run.clone());
                return load_off_runtime(move || {
                    let loaded = run.load_data()?;
                    // Read and checked: now serve it too, if that costs no copy.
                    match datapack::link_package(&pack, &run, &manifest, &signed_run) {
                        Ok(true) => tracing::info!("serving this peer's copy of the run's data"),
                        Ok(false) => {}
                        Err(e) => tracing::info!(error = %e, "not serving the run's data"),
                    }
                    Ok(loaded)
                })
                .await;
            }
            Some(Ok(r)) => tracing::warn!(
                source = %run.data.source,
                root = %r.short(),
                expected = %root.short(),
                "this peer's copy of the run's data differs; fetching the run's data"
            ),
            Some(Err(e)) => tracing::info!(
                source = %run.data.source,
                reason = %e,
                "the run's data is not here; fetching it from the swarm"
            ),
            None => {}
        }
        self.set_status(|s| {
            s.state = "fetching the run's data".into();
            s.phase = Phase::FetchingData;
        });
        let (progress, mut seen) = tokio::sync::watch::channel(Default::default());
        let opts = crate::ckpt_transfer::FetchOptions {
            cancel: self.inner.cancel.child_token(),
            rates: self.inner.rates.clone(),
            progress: Some(progress),
            ..Default::default()
        };
        // `run status` shows how far the fetch is; the task ends with the fetch's sender.
        let svc = self.clone();
        tokio::spawn(async move {
            while seen.changed().await.is_ok() {
                let p: crate::ckpt_transfer::FetchProgress = *seen.borrow_and_update();
                svc.set_status(|s| {
                    s.state = format!(
                        "fetching the run's data: {:.1} of {:.1} MiB verified",
                        p.verified_bytes as f64 / (1 << 20) as f64,
                        p.total_bytes as f64 / (1 << 20) as f64
                    )
                });
            }
        });
        let report = self
            .fetch_root_retrying(sources, root, &pack, &opts)
            .await
            .map_err(|e| {
                TrainError::Other(format!(
                    "the run's data is not at '{}' on this peer, and fetching its package {} \
                     from {} peer(s) failed: {e}",
                    run.data.source,
                    root.short(),
                    sources.len()
                ))
            })?;
        tracing::info!(
            bytes = report.fetched_bytes,
            root = %root.short(),
            "fetched the run's data package"
        );
        let run = run.clone();
        load_off_runtime(move || run.load_data_from_package(&pack)).await
    }

    /// Fetches what `root` names (a checkpoint or a data package) from `sources` into
    /// `dest` with the verified multi-source transfer, trying again a few times while no
    /// source serves it yet, and counts what each source sent.
    async fn fetch_root_retrying(
        &self,
        sources: &[PeerId],
        root: Hash32,
        dest: &std::path::Path,
        opts: &crate::ckpt_transfer::FetchOptions,
    ) -> Result<crate::ckpt_transfer::FetchReport, crate::ckpt_transfer::FetchError> {
        let mut attempt = 0;
        let report = loop {
            match crate::ckpt_transfer::fetch_root(&self.inner.control, sources, root, dest, opts)
                .await
            {
                Ok(r) => break r,
                Err(e) if attempt >= FETCH_ATTEMPTS || self.inner.cancel.is_cancelled() => {
                    return Err(e);
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        };
        for s in &report.sources {
            self.inner.traffic.add(s.peer, 0, s.served_bytes);
        }
        Ok(report)
    }

    /// Fetches the checkpoint named by the round's base root from `sources` with the
    /// verified multi-source transfer, keeps it as this replica's checkpoint of its round,
    /// and reads the state out of it.
    async fn fetch_checkpoint_state(
        &self,
        open: &RoundOpen,
        sources: &[PeerId],
        rep: &Replica,
        run: &ResolvedRun,
    ) -> Result<Snapshot, TrainError> {
        let root = Hash32::from_slice("base root", &open.base_root)
            .map_err(|e| TrainError::Other(e.to_string()))?;
        let run_dir = checkpoint::run_dir(&self.inner.data_dir, &run.id());
        let dest = run_dir.join("fetched").join(root.to_hex());
        if dest.exists() {
            std::fs::remove_dir_all(&dest)
                .map_err(|e| TrainError::Other(format!("{}: {e}", dest.display())))?;
        }
        let opts = crate::ckpt_transfer::FetchOptions {
            cancel: self.inner.cancel.child_token(),
            rates: self.inner.rates.clone(),
            ..Default::default()
        };
        // The sources write the checkpoint when the commit reaches them, which can be a
        // moment after the round that starts from it opened: the fetch tries again briefly.
        let report = self
            .fetch_root_retrying(sources, root, &dest, &opts)
            .await
            .map_err(|e| TrainError::Other(format!("fetching checkpoint {}: {e}", root.short())))?;
        tracing::info!(
            bytes = report.fetched_bytes,
            "fetched the committed checkpoint"
        );
        let snap = read_checkpoint_state(&dest, rep, run)?;
        if snap.root != root.0 {
            return Err(TrainError::Other(
                "the fetched checkpoint holds another state than its root".into(),
            ));
        }
        // Keep it where committed checkpoints live, so this replica serves it too.
        let keep = checkpoint::checkpoint_dir(&run_dir, snap.round);
        if !keep.exists() {
            if let Some(parent) = keep.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::rename(&dest, &keep);
        }
        let _ = std::fs::remove_dir_all(&dest);
        Ok(snap)
    }

    /// One round at a replica. Returns `None` when this replica is not a member.
    #[allow(clippy::too_many_arguments)]
    async fn round(
        &self,
        run: &ResolvedRun,
        run_id: &[u8; 32],
        open: &RoundOpen,
        data: &Arc<potluck_worker::Dataset>,
        codec: Codec,
        rep: &mut Option<Replica>,
        outer: &mut OuterOptimizer,
        ef: &mut ErrorFeedback,
        inbox: &mut mpsc::Receiver<Inbound>,
        early: &mut Vec<Inbound>,
        opened_at: &Instant,
        carried: &mut Option<Carried>,
        timing: &mut RoundTiming,
    ) -> Result<Option<(TrainReport, Snapshot)>, TrainError> {
        // The round's deadline is the coordinator's; what is left of it (never more than the
        // run's round deadline, whatever the clocks say) splits into a phase for
        // contributions and one for reduced slices, leaving the rest for the report.
        let deadline = Duration::from_millis(
            open.deadline_unix_ms
                .saturating_sub(unix_ms())
                .min(run.round_deadline_secs * 1000),
        );
        let started = *opened_at;
        let left = |now: Instant| {
            let spent = now.saturating_duration_since(started);
            deadline.saturating_sub(spent.min(deadline))
        };
        let Some((members, me, shard)) = self.place_in_round(open, "training") else {
            return Ok(None);
        };
        let theta_start = rep
            .as_ref()
            .ok_or_else(|| TrainError::Other("replica missing".into()))?
            .flat_params()?;
        let ranges = slice_ranges(theta_start.len(), members.len());
        let plan = |part: u32, from: Instant, span: Duration| ExchangePlan {
            run_id,
            round: open.round,
            part,
            members: &members,
            me,
            len: theta_start.len(),
            ranges: ranges.clone(),
            codec,
            aggregation: run.aggregation(),
            deadlines: Deadlines::split(from, span),
        };
        let mut update_hasher = blake3::Hasher::new();
        // An overlapped run exchanges, while this round trains, the update of the previous
        // round, when this replica trained it from that round's agreed base; a replica that
        // has none (it joined, restarted, sat a round out) abstains, so reducers need not
        // wait for it. The last round also exchanges its own update after training (the
        // flush, part 1), so the run ends with every round's work applied: its first
        // exchange gets half the deadline.
        let flush = run.overlap && open.round >= run.rounds;
        // Where this round's training starts: the committed state, or (overlapped, with a
        // delta of our own in flight) an eager start.
        let mut train_from = None;
        let overlapped = if run.overlap {
            let prev = carried.take().filter(|c| c.round + 1 == open.round);
            let compressing = Instant::now();
            let mine = match &prev {
                Some(c) => Some(contribution(ef, codec, &c.delta, &ranges, c.tokens)?),
                None => None,
            };
            // Eager start: train from where the outer step would take theta_t if the mean
            // still in flight were this replica's own delta. Training from theta_t itself
            // would leave every delta one update behind, and the outer momentum amplifies
            // that lag (docs/ARCHITECTURE.md, "Overlap"). Only the local start differs
            // between replicas; the committed state is the same everywhere.
            if let Some(c) = &prev {
                let mut preview = OuterOptimizer::with_velocity(
                    run.outer.lr,
                    run.outer.momentum,
                    outer.velocity().to_vec(),
                );
                let start = preview.step(&theta_start, &c.delta)?;
                rep.as_mut()
                    .ok_or_else(|| TrainError::Other("replica missing".into()))?
                    .set_flat_params(&start)?;
                train_from = Some(start);
            }
            timing.local_ms += compressing.elapsed().as_millis() as u64;
            if let Some(c) = &mine {
                c.hash_into(&mut update_hasher);
            }
            let now = Instant::now();
            let span = if flush { left(now) / 2 } else { left(now) };
            Some((plan(0, now, span), mine))
        } else {
            None
        };
        let steps = run.inner_steps;
        let training = {
            // Training is CPU-heavy: run it off the async runtime, handing the replica over.
            let data = data.clone();
            let mut moved = rep
                .take()
                .ok_or_else(|| TrainError::Other("replica missing".into()))?;
            // Every replica's schedule follows the round, whenever it joined.
            moved.set_step(checkpoint::swarm_step(run, open.round.saturating_sub(1)));
            async move {
                let began = Instant::now();
                let r = tokio::task::spawn_blocking(move || {
                    let r = moved.train_steps(&data, shard, steps);
                    (moved, r)
                })
                .await;
                (r, began.elapsed(), Instant::now())
            }
        };
        let exchanging = async {
            match &overlapped {
                Some((plan, mine)) => {
                    let r = self.exchange(plan, mine.as_ref(), inbox, early).await;
                    Some((r, Instant::now()))
                }
                None => None,
            }
        };
        let ((trained, train_time, trained_at), exchanged) = tokio::join!(training, exchanging);
        let (back, stats) =
            trained.map_err(|e| TrainError::Other(format!("training task failed: {e}")))?;
        *rep = Some(back);
        let stats = stats?;
        timing.train_ms += train_time.as_millis() as u64;
        if let Some((_, done_at)) = &exchanged {
            timing.network_wait_ms +=
                done_at.saturating_duration_since(trained_at).as_millis() as u64;
        }
        let rep = rep
            .as_mut()
            .ok_or_else(|| TrainError::Other("replica missing".into()))?;
        let computing = Instant::now();
        let theta_now = rep.flat_params()?;
        let delta = potluck_worker::pseudo_gradient(
            train_from.as_deref().unwrap_or(&theta_start),
            &theta_now,
        )?;
        self.set_status(|s| {
            s.state = "exchanging updates".into();
            s.phase = Phase::Exchanging;
            s.collected = None;
            s.train_loss = stats.mean_loss;
        });
        let mut missing = Vec::new();
        let mut rejected = Rejections::new();
        let avg = match exchanged {
            Some((r, _)) => {
                let ex = r?;
                *carried = Some(Carried {
                    round: open.round,
                    delta,
                    tokens: stats.tokens,
                });
                missing.extend(ex.missing);
                rejected.merge(ex.rejected);
                ex.avg
            }
            None => {
                let mine = contribution(ef, codec, &delta, &ranges, stats.tokens)?;
                mine.hash_into(&mut update_hasher);
                timing.local_ms += computing.elapsed().as_millis() as u64;
                // What is left of the deadline: 60% for contributions, then reduced
                // slices; a slice still missing at 70% goes to its backup reducer; at 85%
                // the round ends.
                let now = Instant::now();
                let ex = self
                    .exchange(&plan(0, now, left(now)), Some(&mine), inbox, early)
                    .await?;
                timing.network_wait_ms += now.elapsed().as_millis() as u64;
                missing.extend(ex.missing);
                rejected.merge(ex.rejected);
                ex.avg
            }
        };
        let applying = Instant::now();
        let mut new_params = outer.step(&theta_start, &avg)?;
        if flush {
            // The last round of an overlapped run: exchange this round's update too, so no
            // replica's last H steps are lost.
            let mine = match carried.take() {
                Some(c) => Some(contribution(ef, codec, &c.delta, &ranges, c.tokens)?),
                None => None,
            };
            if let Some(c) = &mine {
                c.hash_into(&mut update_hasher);
            }
            timing.local_ms += applying.elapsed().as_millis() as u64;
            let now = Instant::now();
            let ex = self
                .exchange(&plan(1, now, left(now)), mine.as_ref(), inbox, early)
                .await?;
            timing.network_wait_ms += now.elapsed().as_millis() as u64;
            missing.extend(ex.missing);
            rejected.merge(ex.rejected);
            let applying = Instant::now();
            new_params = outer.step(&new_params, &ex.avg)?;
            timing.local_ms += applying.elapsed().as_millis() as u64;
        } else {
            timing.local_ms += applying.elapsed().as_millis() as u64;
        }
        self.set_status(|s| s.missing_slices += missing.len() as u64);
        let finishing = Instant::now();
        rep.set_flat_params(&new_params)?;
        let eval_loss = rep.eval_loss(data, EVAL_BATCHES)?;
        let snap = Snapshot::new(rep, run, open.round, new_params, outer.velocity().to_vec())?;
        timing.local_ms += finishing.elapsed().as_millis() as u64;
        let root = snap.root;
        let (sent, received) = self.inner.traffic.totals();
        let (rejections, rejections_dropped) = rejected.to_proto();
        let report = TrainReport {
            run_id: run_id.to_vec(),
            round: open.round,
            tokens: stats.tokens,
            mean_loss: stats.mean_loss,
            update_hash: update_hasher.finalize().as_bytes().to_vec(),
            root: root.to_vec(),
            missing_slices: missing,
            eval_loss,
            bytes_sent: sent,
            bytes_received: received,
            rejected: Vec::new(),
            rejections,
            rejections_dropped,
        };
        self.set_status(|s| {
            s.state = "waiting for the commit".into();
            s.phase = Phase::AwaitingCommit;
        });
        Ok(Some((report, snap)))
    }

    /// This replica's place in a round: the members, its index among them and its data
    /// shard, with the status updated to say what it does there; `None` when the round does
    /// not include it or names no shard for it (malformed: shards are the coordinator's
    /// decision, and we sit the round out).
    pub(super) fn place_in_round(
        &self,
        open: &RoundOpen,
        doing: &str,
    ) -> Option<(Vec<PeerId>, usize, u64)> {
        let members: Vec<PeerId> = open
            .members
            .iter()
            .filter_map(|b| PeerId::from_bytes(b).ok())
            .collect();
        let me = members.iter().position(|p| *p == self.inner.local)?;
        let Some(&shard) = open.shards.get(me) else {
            tracing::warn!(
                round = open.round,
                "round names no data shard for this replica"
            );
            return None;
        };
        self.set_status(|s| {
            s.round = open.round;
            s.state = format!("{doing} on shard {shard}");
            s.phase = Phase::Training;
            s.peers = members.iter().map(|p| p.to_string()).collect();
        });
        Some((members, me, shard))
    }

    /// One sharded exchange among `plan.members`, driven by the coordinator crate's
    /// [`Exchange`] machine (which decides who sends what to whom, when to reduce, when a
    /// backup takes a silent reducer's slice over and which frames count): this function
    /// decodes frames and feeds them in, carries out the machine's actions through the send
    /// paths below and the daemon's reduction, and waits for frames, departures and the
    /// machine's next timeout. Returns the averaged update; slices nobody could reduce are
    /// zero and listed missing.
    async fn exchange(
        &self,
        plan: &ExchangePlan<'_>,
        mine: Option<&Contributed>,
        inbox: &mut mpsc::Receiver<Inbound>,
        early: &mut Vec<Inbound>,
    ) -> Result<Exchanged, TrainError> {
        let mut m: Exchange<PeerId, (u64, Vec<f32>), Received> = Exchange::new(ExchangeConfig {
            round: plan.round,
            part: plan.part,
            members: plan.members.to_vec(),
            me: plan.me,
            len: plan.len,
            deadlines: plan.deadlines,
        })?;
        // Members known to be gone: nobody waits for what they have not sent yet, and their
        // slices go to their backups at once.
        let mut departed = self.inner.departed.subscribe();
        m.handle_gone(self.gone_in(plan));
        let mut rejected: Rejections<CPeerId> = Rejections::new();
        let mut pending_frames: Vec<Inbound> = std::mem::take(early);
        let mut shown: Option<(u32, u32)> = None;
        loop {
            let now = Instant::now();
            let (heard, of) = m.collected();
            let collected = Some((heard as u32, of as u32));
            if shown != collected {
                shown = collected;
                self.set_status(|s| s.collected = collected);
            }
            while let Some(action) = m.poll_action(now) {
                match action {
                    // Sent concurrently, in the background: a dead member must not hold up
                    // the round.
                    ExchangeAction::SendContribution { slice, to } => {
                        self.send_contribution(plan, mine, slice, to)
                    }
                    ExchangeAction::Reduce {
                        slice,
                        contributions,
                    } => {
                        if slice == plan.me {
                            self.crash_point(CrashPoint::ReducerBeforeSending(plan.round))?;
                        }
                        self.send_reduced(plan, slice, &contributions, &mut rejected, None);
                    }
                    ExchangeAction::Forward { slice, reduced, to } => {
                        self.send_reduced_bytes(plan, slice, reduced.bytes.clone(), to)
                    }
                    ExchangeAction::TookOver { slice } => {
                        tracing::info!(
                            round = plan.round,
                            slice,
                            "reducing a silent reducer's slice"
                        );
                        self.set_status(|s| s.reassigned_slices += 1);
                    }
                }
            }
            if m.is_complete(Instant::now()) {
                break;
            }
            let next = if let Some(f) = pending_frames.pop() {
                Some(f)
            } else {
                let now = Instant::now();
                let Some(wait_until) = m.poll_timeout(now) else {
                    break;
                };
                let wait =
                    tokio::time::timeout(wait_until.saturating_duration_since(now), inbox.recv());
                tokio::select! {
                    r = wait => match r {
                        Ok(Some(f)) => Some(f),
                        Ok(None) => return Err(TrainError::Other("inbox closed".into())),
                        Err(_) => None,
                    },
                    Ok(()) = departed.changed() => {
                        m.handle_gone(self.gone_in(plan));
                        None
                    }
                    _ = self.inner.cancel.cancelled() => return Err(TrainError::ShuttingDown),
                }
            };
            let Some(mut inb) = next else { continue };
            let h = &inb.frame.header;
            if h.run_id.as_slice() != plan.run_id.as_slice() {
                continue;
            }
            let from_peer = || early.iter().filter(|f| f.from == inb.from).count();
            match m.admit(h.round, h.part, early.len(), from_peer) {
                Admit::Current => {}
                Admit::Buffer => {
                    early.push(inb);
                    continue;
                }
                Admit::Full => continue,
                Admit::Stale => {
                    tracing::debug!(from = %inb.from, round = h.round, "stale frame ignored");
                    continue;
                }
            }
            let (slice, tokens) = (h.slice, h.tokens);
            let span = Span {
                offset: h.offset,
                len: h.len,
            };
            // The length a payload for this slice decodes to (the machine checks the span
            // before anything is decoded).
            let want = plan.ranges.get(slice as usize).map_or(0, |r| r.len());
            let kind = inb.frame.kind();
            let payload = std::mem::take(&mut inb.frame.payload);
            let from = inb.from;
            let heard = match kind {
                FrameKind::Contribution if payload.is_empty() => {
                    m.handle_abstention(Instant::now(), &from, slice, span)
                }
                FrameKind::Contribution => {
                    m.handle_contribution(Instant::now(), &from, slice, span, || {
                        compress::decode(&payload, want)
                            .map(|v| (tokens, v))
                            .map_err(|e| Invalid::Undecodable(e.to_string()))
                    })
                }
                FrameKind::Reduced => {
                    m.handle_reduced(&from, slice, span, || {
                        match compress::decode(&payload, want) {
                            Ok(v) if v.iter().all(|x| x.is_finite()) => {
                                Ok(Arc::new(ReducedSlice {
                                    values: v,
                                    bytes: payload.into(),
                                }))
                            }
                            Ok(_) => Err(Invalid::NonFinite),
                            Err(e) => Err(Invalid::Undecodable(e.to_string())),
                        }
                    })
                }
                _ if !m.is_member(&from) => Err(ExchangeRejected::NotAMember { round: plan.round }),
                _ => continue,
            };
            if let Err(why) = heard {
                if kind == FrameKind::Contribution
                    && matches!(why, ExchangeRejected::Invalid(Invalid::Undecodable(_)))
                {
                    tracing::warn!(from = %from, reason = %why, "contribution rejected");
                }
                let reason = RejectReason::from(&why);
                self.reject(reason);
                rejected.note(&CPeerId(from.to_bytes()), reason, plan.round, slice);
            }
        }
        // Frames taken from `early` but not looked at may belong to a later exchange.
        early.append(&mut pending_frames);
        // Assemble the averaged update; a slice nobody reduced in time is zero for every
        // replica that missed it.
        let out = m.finish();
        let missing = out.missing();
        let mut avg = vec![0f32; plan.len];
        for (r, got) in plan.ranges.iter().zip(&out.slices) {
            if let Some(got) = got {
                avg[r.clone()].copy_from_slice(&got.values);
            }
        }
        Ok(Exchanged {
            avg,
            missing,
            rejected,
        })
    }

    /// Sends this replica's contribution to slice `slice` to `to`, in the background; with
    /// no update, an empty one (an abstention).
    fn send_contribution(
        &self,
        plan: &ExchangePlan<'_>,
        c: Option<&Contributed>,
        slice: usize,
        to: PeerId,
    ) {
        let header = FrameHeader {
            tokens: c.map_or(0, |c| c.tokens),
            ..slice_header(plan, slice, FrameKind::Contribution)
        };
        let svc = self.clone();
        let bytes: Arc<[u8]> = match c {
            Some(c) => c.slices[slice].clone(),
            None => Arc::from(Vec::new()),
        };
        tokio::spawn(async move {
            let sent = match svc.seal(header, bytes) {
                Ok(sealed) => svc.send_frame(to, &sealed).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::warn!(peer = %to, error = %e, "contribution not delivered");
            }
        });
    }

    /// Validates and averages the contributions to `slice` and sends the mean to every
    /// member (or to `only`).
    fn send_reduced(
        &self,
        plan: &ExchangePlan<'_>,
        slice: usize,
        got: &BTreeMap<PeerId, (u64, Vec<f32>)>,
        rejected: &mut Rejections<CPeerId>,
        only: Option<PeerId>,
    ) {
        let mut refused = Vec::new();
        let (avg, contributors) = reduce_slice(
            got,
            plan.ranges[slice].len(),
            plan.aggregation,
            &mut refused,
        );
        for peer in &refused {
            self.reject(RejectReason::Invalid);
            rejected.note(
                &CPeerId(peer.to_bytes()),
                RejectReason::Invalid,
                plan.round,
                slice as u32,
            );
        }
        let bytes: Arc<[u8]> =
            compress::encode(reduce_codec(plan.codec, contributors.len()), &avg).into();
        let header = FrameHeader {
            tokens: got.values().map(|c| c.0).sum(),
            contributors: contributors.iter().map(|p| p.to_bytes()).collect(),
            ..slice_header(plan, slice, FrameKind::Reduced)
        };
        self.send_reduced_frame(plan, header, bytes, only);
    }

    /// Passes a reduced slice on exactly as it was received.
    fn send_reduced_bytes(
        &self,
        plan: &ExchangePlan<'_>,
        slice: usize,
        bytes: Arc<[u8]>,
        only: Option<PeerId>,
    ) {
        self.send_reduced_frame(
            plan,
            slice_header(plan, slice, FrameKind::Reduced),
            bytes,
            only,
        );
    }

    /// Sends a reduced slice to every member (or to `only`), in the background.
    fn send_reduced_frame(
        &self,
        plan: &ExchangePlan<'_>,
        header: FrameHeader,
        bytes: Arc<[u8]>,
        only: Option<PeerId>,
    ) {
        let targets: Vec<PeerId> = match only {
            Some(p) => vec![p],
            None => plan.members.to_vec(),
        };
        // Sealed once for every member (hashed, compressed and signed a single time), off
        // the exchange's own task.
        let svc = self.clone();
        tokio::spawn(async move {
            let sealed = match svc.seal(header, bytes) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "reduced slice not sealed; not sent");
                    return;
                }
            };
            for peer in targets {
                let svc = svc.clone();
                let sealed = sealed.clone();
                tokio::spawn(async move {
                    if let Err(e) = svc.send_frame(peer, &sealed).await {
                        tracing::warn!(%peer, error = %e, "reduced slice not delivered");
                    }
                });
            }
        });
    }
}

/// A frame hashed, compressed and signed once, ready for any member.
struct Sealed {
    header: FrameHeader,
    /// What goes on the wire: the payload itself, or its zstd compression.
    wire: Arc<[u8]>,
    payload: Arc<[u8]>,
}

/// One sharded exchange: who takes part, which slice each reduces, and its deadlines.
struct ExchangePlan<'a> {
    run_id: &'a [u8; 32],
    round: u64,
    /// Which exchange of the round this is (frames carry it): 0, or 1 for an overlapped
    /// run's final flush.
    part: u32,
    /// The members in the coordinator's order; member `i` reduces slice `i`, and member
    /// `i + 1` (wrapping) is its backup.
    members: &'a [PeerId],
    me: usize,
    /// Length of the whole update.
    len: usize,
    ranges: Vec<std::ops::Range<usize>>,
    codec: Codec,
    /// The run's rule for combining a slice's contributions.
    aggregation: Aggregation,
    /// Its deadline phases.
    deadlines: Deadlines,
}

/// A reduced slice as decoded, and as received (forwarded unchanged by a backup).
struct ReducedSlice {
    values: Vec<f32>,
    bytes: Arc<[u8]>,
}

/// What the exchange machine holds of a reduced slice (cloned when forwarded).
type Received = Arc<ReducedSlice>;

/// This replica's update for an exchange: one encoded payload per slice, kept until the
/// exchange ends so that it can be sent again to a backup reducer.
struct Contributed {
    slices: Vec<Arc<[u8]>>,
    tokens: u64,
}

impl Contributed {
    /// Feeds the encoded slices to the hash of this replica's update (its report's).
    fn hash_into(&self, h: &mut blake3::Hasher) {
        for s in &self.slices {
            h.update(s);
        }
    }
}

/// Compresses `delta` per slice with error feedback into a contribution of `tokens`.
fn contribution(
    ef: &mut ErrorFeedback,
    codec: Codec,
    delta: &[f32],
    ranges: &[std::ops::Range<usize>],
    tokens: u64,
) -> Result<Contributed, TrainError> {
    let encoded = ef.compress_slices(codec, delta, ranges)?;
    Ok(Contributed {
        slices: encoded.into_iter().map(Arc::from).collect(),
        tokens,
    })
}

/// An overlapped run's pseudo-gradient of one round, exchanged during the next one. It is
/// not saved: a replica that restarts loses it (one round of its work), and abstains.
struct Carried {
    /// The round it was trained in, from that round's agreed base.
    round: u64,
    delta: Vec<f32>,
    tokens: u64,
}

/// What an exchange produced.
struct Exchanged {
    /// The averaged update, zero where a slice is missing.
    avg: Vec<f32>,
    missing: Vec<u32>,
    /// The updates it refused, capped.
    rejected: Rejections<CPeerId>,
}

/// The header of a frame of `kind` for one slice of an exchange, without tokens or
/// contributors.
fn slice_header(plan: &ExchangePlan<'_>, slice: usize, kind: FrameKind) -> FrameHeader {
    FrameHeader {
        run_id: plan.run_id.to_vec(),
        round: plan.round,
        part: plan.part,
        kind: kind as i32,
        slice: slice as u32,
        offset: plan.ranges[slice].start as u64,
        len: plan.ranges[slice].len() as u64,
        ..Default::default()
    }
}

/// Logs the updates a replica says it refused, no more of them than the report's cap
/// ([`Rejections::from_proto`]): the list is the peer's word, and may be a flood itself.
fn log_rejections(reporter: &PeerId, r: &TrainReport) {
    let refused = Rejections::from_proto(&r.rejections, r.rejections_dropped);
    for e in refused.iter() {
        let from = PeerId::from_bytes(&e.peer.0)
            .map(|p| p.to_string())
            .unwrap_or_else(|_| hex::encode(&e.peer.0));
        tracing::warn!(
            reducer = %reporter,
            round = e.round,
            from,
            reason = %e.reason,
            slice = e.slice,
            count = e.count,
            "updates rejected by a replica"
        );
    }
    if refused.dropped() > 0 {
        tracing::warn!(
            reducer = %reporter,
            round = r.round,
            unlisted = refused.dropped(),
            "more updates rejected by a replica than its report lists"
        );
    }
    for why in legacy_lines(&r.rejected) {
        tracing::warn!(reducer = %reporter, round = r.round, why, "update rejected by a reducer");
    }
}

/// The signed manifest a commit carries, checked to describe that commit's checkpoint.
fn commit_manifest_of(c: &RoundCommit) -> Result<SignedManifest, TrainError> {
    if c.manifest.is_empty() {
        return Err(TrainError::Other(
            "the coordinator sent no manifest with this commit".into(),
        ));
    }
    let m = SignedManifest::decode(&c.manifest)
        .map_err(|e| TrainError::Other(format!("the commit's manifest: {e}")))?;
    if m.body().round != c.round || m.body().root.0.as_slice() != c.root.as_slice() {
        return Err(TrainError::Other(
            "the commit's manifest describes another checkpoint".into(),
        ));
    }
    Ok(m)
}

/// Appends a commit's manifest to this replica's ledger copy; a copy that cannot take it
/// (it missed a link) stops there.
fn append_ledger(ledger: &mut Option<Ledger>, m: &SignedManifest) {
    // A commit the copy already holds (fetched with the ledger when this replica joined).
    if ledger
        .as_ref()
        .is_some_and(|l| l.entries().iter().any(|e| e.encode() == m.encode()))
    {
        return;
    }
    if let Some(l) = ledger
        && let Err(e) = l.append(m.clone())
    {
        tracing::warn!(error = %e, "the ledger copy stops here");
        *ledger = None;
    }
}

/// Parses a ledger answer: entries of a 4-byte little-endian length and a signed
/// manifest's bytes, each length checked against what is left before anything is kept.
fn ledger_entries(payload: &[u8]) -> Result<Vec<SignedManifest>, String> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("an entry's length is cut short")?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > potluck_coordinator::manifest::MAX_MANIFEST_BYTES || len > tail.len() {
            return Err(format!("an entry of {len} bytes does not fit"));
        }
        let (bytes, tail) = tail.split_at(len);
        out.push(SignedManifest::decode(bytes).map_err(|e| format!("an entry: {e}"))?);
        rest = tail;
    }
    Ok(out)
}

/// Reads (tokenizes, hashes) a run's data on a blocking thread: a corpus can take a while.
async fn load_off_runtime(
    load: impl FnOnce() -> Result<(potluck_worker::Dataset, String), ManifestError> + Send + 'static,
) -> Result<potluck_worker::Dataset, TrainError> {
    tokio::task::spawn_blocking(load)
        .await
        .map_err(|_| TrainError::ShuttingDown)?
        .map(|(data, _)| data)
        .map_err(TrainError::from)
}

/// Writes the committed checkpoint this replica holds, with the coordinator's signed
/// manifest, under the run directory, and prunes old checkpoints down to the newest `keep`
/// (never this one).
fn keep_checkpoint(
    run: &ResolvedRun,
    rep: &Replica,
    committed: &Snapshot,
    m: &SignedManifest,
    signed_run: &SignedRunManifest,
    (run_dir, keep): (&std::path::Path, usize),
) -> Result<(), TrainError> {
    let dir = checkpoint::checkpoint_dir(run_dir, committed.round);
    // The coordinator of this daemon kept it already (the directory is replaced whole, so
    // one with this manifest is complete).
    let manifest = dir.join(potluck_coordinator::manifest::MANIFEST_FILE);
    if std::fs::read(&manifest).is_ok_and(|b| b == m.encode()) {
        return Ok(());
    }
    let files = committed.files(rep, run)?;
    // write_checkpoint refuses a manifest the run's coordinator did not sign.
    checkpoint::write_checkpoint(&dir, &files, m, signed_run)?;
    potluck_coordinator::store::prune_checkpoints(
        &run_dir.join(potluck_coordinator::store::CHECKPOINTS_DIR),
        keep,
        committed.round,
    )
    .map_err(|e| TrainError::Other(format!("pruning old checkpoints: {e}")))?;
    Ok(())
}

/// A committed state kept in this daemon's run directory, found by its root. The
/// coordinator keeps each commit's checkpoint before its ledger names it, so a daemon that
/// restarted finds there the state that no peer may hold any more.
fn kept_state(
    run_dir: &std::path::Path,
    root: &[u8],
    rep: &Replica,
    run: &ResolvedRun,
) -> Option<Snapshot> {
    let dirs = std::fs::read_dir(run_dir.join(potluck_coordinator::store::CHECKPOINTS_DIR)).ok()?;
    for dir in dirs.flatten().map(|e| e.path()) {
        // Skip what a checkpoint being written leaves beside the others.
        if dir
            .file_name()
            .is_none_or(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let Ok(bytes) = read_bounded(
            &dir.join(potluck_coordinator::manifest::MANIFEST_FILE),
            potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
        ) else {
            continue;
        };
        if SignedManifest::decode(&bytes).map_or(true, |m| m.body().root.0.as_slice() != root) {
            continue;
        }
        // The files are hashed again: a damaged checkpoint is no source.
        match read_checkpoint_state(&dir, rep, run) {
            Ok(snap) if snap.root.as_slice() == root => {
                tracing::info!(round = snap.round, "took the state from a kept checkpoint");
                return Some(snap);
            }
            Ok(_) => {
                tracing::warn!(dir = %dir.display(), "a kept checkpoint does not hold the state its manifest names")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "a kept checkpoint is unreadable")
            }
        }
    }
    None
}

/// Reads the replica state out of a verified checkpoint directory: the weights from its
/// safetensors file, the outer momentum from `outer.bin`, the round from its manifest.
fn read_checkpoint_state(
    dir: &std::path::Path,
    rep: &Replica,
    run: &ResolvedRun,
) -> Result<Snapshot, TrainError> {
    let other = |e: &dyn std::fmt::Display| TrainError::Other(format!("{}: {e}", dir.display()));
    let manifest = SignedManifest::decode(&read_bounded(
        &dir.join(potluck_coordinator::manifest::MANIFEST_FILE),
        potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
    )?)
    .map_err(|e| other(&e))?;
    let weights = manifest
        .body()
        .content
        .files
        .iter()
        .find(|f| f.path.ends_with(".safetensors"))
        .ok_or_else(|| other(&"no weights file"))?;
    let layout = rep.param_layout();
    let params: Vec<f32> =
        potluck_worker::checkpoint::read_f32_tensors(&dir.join(&weights.path), &layout)?
            .into_iter()
            .flatten()
            .collect();
    let n = params.len();
    let outer = OuterOptimizer::from_bytes(
        &read_bounded(
            &dir.join(checkpoint::OUTER_FILE),
            (n as u64) * 8 + (1 << 20),
        )?,
        n,
    )?;
    let inner = match run.mode {
        RunMode::DataParallel => Some(InnerState::from_bytes(
            &read_bounded(&dir.join(checkpoint::INNER_FILE), 8 + (n as u64) * 8)?,
            n,
        )?),
        RunMode::Diloco => None,
    };
    Snapshot::with_inner(
        rep,
        run,
        manifest.body().round,
        (params, outer.velocity().to_vec()),
        inner,
    )
}

/// The folder of a run directory with this replica's own state.
const LOCAL_DIR: &str = "local";
const LOCAL_REPLICA: &str = "replica";
const LOCAL_EF: &str = "error-feedback.bin";

/// Saves what a replica needs to resume after a restart, at a commit it holds: its worker
/// checkpoint with the inner optimizer's moments, its error feedback, and the committed
/// outer momentum. Each save is a new directory `local/<round>` renamed into place, then the
/// older ones are removed, so a crash leaves the previous save intact.
fn save_local(
    dir: &std::path::Path,
    rep: &Replica,
    committed: &Snapshot,
    ef: &ErrorFeedback,
    run: &ResolvedRun,
) -> Result<(), TrainError> {
    let name = format!("{:020}", committed.round);
    checkpoint::replace_dir(&dir.join(&name), |tmp| {
        rep.save_checkpoint(&tmp.join(LOCAL_REPLICA), true)?;
        let store = |f: &str, b: &[u8]| {
            potluck_coordinator::store::write_atomic(&tmp.join(f), b)
                .map_err(|e| TrainError::Other(format!("saving local state: {e}")))
        };
        store(LOCAL_EF, &ef.to_bytes())?;
        store(
            checkpoint::OUTER_FILE,
            &checkpoint::outer_bytes(run, &committed.velocity),
        )
    })?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| TrainError::Other(format!("{}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n != name && !n.starts_with('.') {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// Reads a whole file of at most `limit` bytes.
fn read_bounded(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, TrainError> {
    crate::fsutil::read_limited(path, limit)
        .map_err(|e| TrainError::Other(format!("{}: {e}", path.display())))
}

/// Loads the newest save of [`save_local`], if there is one for this run's settings.
/// Returns the replica (weights, inner optimizer, step), its error feedback, and the state
/// it held, named by its root.
/// A fresh replica of `run`: the worker's own model, or adapters on the run's base, found
/// at `base` (checked against the pinned root by the caller).
fn new_replica(
    run: &ResolvedRun,
    base: Option<&std::path::Path>,
    device: &DeviceSpec,
) -> Result<Replica, TrainError> {
    match (&run.base, &run.adapters, base) {
        (None, _, _) => Ok(Replica::new(&run.model, &run.inner, device)?),
        (Some(spec), Some(adapters), Some(dir)) => Ok(Replica::new_adapters(
            dir, &spec.root, adapters, &run.inner, device,
        )?),
        (Some(_), None, _) => Err(TrainError::Other(
            "the run names a base but no adapters".into(),
        )),
        (Some(_), Some(_), None) => Err(no_base(run)),
    }
}

/// The error for an adapter run whose base this daemon does not hold.
fn no_base(run: &ResolvedRun) -> TrainError {
    let (path, root) = run
        .base
        .as_ref()
        .map(|b| (b.path.as_str(), b.root.as_str()))
        .unwrap_or_default();
    TrainError::Other(format!(
        "the run's base (root {root}) is not on this daemon: neither its package nor '{path}' \
         holds it; join the run as a replica to fetch it from the swarm, or copy the base there"
    ))
}

fn load_local(
    dir: &std::path::Path,
    run: &ResolvedRun,
    base: Option<&std::path::Path>,
    device: &DeviceSpec,
) -> Result<Option<(Replica, ErrorFeedback, Snapshot)>, TrainError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let newest = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let round = n.parse::<u64>().ok().filter(|_| n.len() == 20)?;
            Some((round, e.path()))
        })
        .max();
    let Some((round, path)) = newest else {
        return Ok(None);
    };
    let rep = match (&run.base, base) {
        (None, _) => Replica::load_checkpoint(&path.join(LOCAL_REPLICA), device)?,
        (Some(spec), Some(dir)) => {
            let rep = Replica::load_adapter_checkpoint(
                &path.join(LOCAL_REPLICA),
                dir,
                &spec.root,
                device,
            )?;
            if rep.adapter_model().map(|a| a.config()) != run.adapters.as_ref() {
                return Err(TrainError::Other(format!(
                    "{} was saved with other adapter settings",
                    path.display()
                )));
            }
            rep
        }
        (Some(_), None) => return Err(no_base(run)),
    };
    if (run.base.is_none() && rep.model_config() != Some(&run.model))
        || rep.train_config() != &run.inner
    {
        return Err(TrainError::Other(format!(
            "{} was saved with other model or training settings",
            path.display()
        )));
    }
    let n = rep.num_params();
    let limit = (n as u64) * 16 + (1 << 20);
    let ef = ErrorFeedback::from_bytes(&read_bounded(&path.join(LOCAL_EF), limit)?, n)?;
    let outer =
        OuterOptimizer::from_bytes(&read_bounded(&path.join(checkpoint::OUTER_FILE), limit)?, n)?;
    let snap = Snapshot::new(
        &rep,
        run,
        round,
        rep.flat_params()?,
        outer.velocity().to_vec(),
    )?;
    Ok(Some((rep, ef, snap)))
}

/// Hooks a coordinator up to an inbound control stream.
fn attach_control_stream(
    svc: &TrainService,
    peer: PeerId,
    stream: libp2p::Stream,
    coord: mpsc::Sender<CoordEvent>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (mut rd, mut wr) = stream.split();
    let (tx, mut rx) = mpsc::channel::<TrainControl>(64);
    let s = svc.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match write_control(&mut wr, m).await {
                Ok(n) => s.inner.traffic.add(peer, n, 0),
                Err(_) => break,
            }
        }
        let _ = wr.close().await;
    });
    let s = svc.clone();
    tokio::spawn(async move {
        if coord
            .send(CoordEvent::Connected {
                peer,
                tx: tx.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        let cancel = s.inner.cancel.clone();
        loop {
            let Some(read) = cancel.run_until_cancelled(read_control(&mut rd)).await else {
                break;
            };
            match read {
                Ok(Some((m, n))) => {
                    s.inner.traffic.add(peer, 0, n);
                    if let Some(msg) = m.msg
                        && coord.send(CoordEvent::Msg { peer, msg }).await.is_err()
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad control message; closing the stream");
                    break;
                }
            }
        }
        let _ = coord.send(CoordEvent::Closed { peer, tx }).await;
        drop(permit);
    });
}

/// The coordinator: drives the coordinator crate's [`RunMachine`] with the replicas' control
/// messages and the clock, and carries out its actions (welcome, open, commit, finish).
async fn run_coordinator(
    svc: TrainService,
    run: ResolvedRun,
    mut ledger: Ledger,
    mut machine: RunMachine,
    mut events: mpsc::Receiver<CoordEvent>,
) -> Result<(), TrainError> {
    let run_id = run.id();
    let run_dir = checkpoint::run_dir(&svc.inner.data_dir, &run_id);
    let signed_run_bytes = ledger.run().encode();
    let data_manifest = datapack::welcome_manifest(&run_dir.join(datapack::DATA_DIR));
    // A CPU replica that lays out the checkpoint files of each commit (and hashes a state
    // fetched from a peer), made at the first commit.
    let mut hasher: Option<Replica> = None;
    let manifest = run.canonical_bytes();
    let mut links: BTreeMap<PeerId, mpsc::Sender<TrainControl>> = BTreeMap::new();
    let mut source: PeerId = svc.inner.local;
    let mut reports: BTreeMap<PeerId, TrainReport> = BTreeMap::new();
    let mut started = false;
    // Members that paused (out of the member set, still linked, expected back), and
    // resumed ones waiting for the open round to end.
    let mut paused: PausedMembers<PeerId> = PausedMembers::default();
    // The last lobby word sent (members, needed, paused), while no round is open.
    let mut lobby_sent: Option<(u32, u32, u32)> = None;
    // Whether `p` is a participant of the open round that has not reported.
    let pending = |machine: &RunMachine, reports: &BTreeMap<PeerId, TrainReport>, p: &PeerId| {
        let cp = CPeerId(p.to_bytes());
        machine
            .open_round()
            .is_some_and(|o| o.assignment.iter().any(|(q, _)| *q == cp))
            && !reports.contains_key(p)
    };
    loop {
        for p in paused.poll_rejoin(|p| pending(&machine, &reports, p)) {
            tracing::info!(peer = %p, "a resumed replica rejoins the rounds");
            machine.handle_join(CPeerId(p.to_bytes()), unix_ms());
        }
        // Carry out every decision the state machine has made.
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Admitted(p) => {
                    let Some(peer) = to_libp2p(&p) else { continue };
                    tracing::info!(%peer, "replica admitted");
                    let head = machine.head();
                    let mut welcome = RunWelcome {
                        run_id: run_id.to_vec(),
                        manifest: manifest.clone(),
                        committed_round: head.round,
                        committed_root: head.root.0.to_vec(),
                        signed_run: signed_run_bytes.clone(),
                        head_manifest: ledger.head().map(|m| m.encode()).unwrap_or_default(),
                        data_sources: links
                            .keys()
                            .filter(|p| **p != peer)
                            .take(MAX_DATA_SOURCES)
                            .map(|p| p.to_bytes())
                            .collect(),
                        data_manifest: data_manifest.clone(),
                    };
                    // The data manifest is a convenience: it never pushes a welcome (whose
                    // ledger head grows with the model) past the control channel's limit.
                    if prost::Message::encoded_len(&welcome) + 4096 > MAX_CONTROL_BYTES {
                        welcome.data_manifest.clear();
                    }
                    send_ctl(&links, &peer, Msg::Welcome(welcome));
                }
                Action::Refused { peer, reason } => {
                    if let Some(peer) = to_libp2p(&peer) {
                        let refused = Msg::Refused(RunRefused {
                            run_id: run_id.to_vec(),
                            reason: format!("{reason:?}"),
                        });
                        send_ctl(&links, &peer, refused);
                    }
                }
                Action::RoundOpened(plan) => {
                    if plan.round > run.rounds {
                        return finish(&svc, &run_id, &links, &ledger);
                    }
                    reports.clear();
                    started = true;
                    lobby_sent = None;
                    let participants = plan.assignment.len() as u32;
                    svc.set_status(|s| s.reports = Some((0, participants)));
                    if let Err(e) = potluck_coordinator::store::write_atomic(
                        &run_dir.join(OPENED_ROUND_FILE),
                        plan.round.to_string().as_bytes(),
                    ) {
                        tracing::warn!(error = %e, "could not record the opened round");
                    }
                    svc.crash_point(CrashPoint::AfterRoundOpened(plan.round))?;
                    let members: Vec<PeerId> = plan
                        .assignment
                        .iter()
                        .filter_map(|(p, _)| to_libp2p(p))
                        .collect();
                    let open = RoundOpen {
                        run_id: run_id.to_vec(),
                        round: plan.round,
                        members: plan.assignment.iter().map(|(p, _)| p.0.clone()).collect(),
                        shards: plan.assignment.iter().map(|(_, s)| u64::from(*s)).collect(),
                        base_root: plan.base_root.0.to_vec(),
                        deadline_unix_ms: plan.deadline_ms,
                        state_source: source.to_bytes(),
                    };
                    let _ = svc.inner.events.send(RunEvent::RoundOpened {
                        round: plan.round,
                        members: members.len(),
                    });
                    for p in &members {
                        send_ctl(&links, p, Msg::Open(open.clone()));
                    }
                }
                Action::Committed(record) => {
                    let agreeing: Vec<PeerId> = record
                        .agreeing
                        .iter()
                        .filter_map(|c| to_libp2p(&c.peer))
                        .collect();
                    let evals: Vec<f32> = agreeing
                        .iter()
                        .filter_map(|p| reports.get(p).map(|r| r.eval_loss))
                        .collect();
                    let eval_loss = evals.iter().sum::<f32>() / evals.len().max(1) as f32;
                    // Joiners and resyncing replicas fetch state from an agreeing peer that is
                    // still connected: the coordinator's own replica when it agreed, since it
                    // is the peer the others already depend on.
                    if let Some(p) = agreeing
                        .iter()
                        .find(|p| **p == svc.inner.local)
                        .or_else(|| agreeing.iter().find(|p| links.contains_key(*p)))
                    {
                        source = *p;
                    }
                    // Sign the committed checkpoint into the ledger; the replicas keep it.
                    svc.crash_point(CrashPoint::BeforeLedgerAppend(record.round))?;
                    let manifest = match svc
                        .commit_manifest(&run, &record, &agreeing, &mut ledger, &mut hasher)
                        .await
                    {
                        Ok(m) => m.encode(),
                        Err(e) => {
                            // Going on would leave rounds out of the ledger's chain: the run
                            // ends on the last commit the ledger holds.
                            let kept = ledger.head().map(|m| m.body().round).unwrap_or(0);
                            tracing::error!(round = record.round, error = %e, kept, "the commit could not be written to the ledger; ending the run");
                            finish(&svc, &run_id, &links, &ledger)?;
                            return Err(TrainError::Other(format!(
                                "round {} could not be written to the run's ledger ({e}); the run \
                                 ended at round {kept}, its last recorded commit",
                                record.round
                            )));
                        }
                    };
                    svc.crash_point(CrashPoint::AfterLedgerAppend(record.round))?;
                    let commit = RoundCommit {
                        run_id: run_id.to_vec(),
                        round: record.round,
                        root: record.root.0.to_vec(),
                        agreeing: agreeing.iter().map(|p| p.to_bytes()).collect(),
                        eval_loss,
                        manifest,
                    };
                    for p in links.keys() {
                        send_ctl(&links, p, Msg::Commit(commit.clone()));
                    }
                    let _ = svc.inner.events.send(RunEvent::Committed {
                        round: record.round,
                        root: record.root.0,
                        agreeing: agreeing.len(),
                        members: record.participants as usize,
                        eval_loss,
                    });
                    if record.round >= run.rounds {
                        return finish(&svc, &run_id, &links, &ledger);
                    }
                }
                Action::RoundFailed { round, reason } => {
                    tracing::warn!(round, ?reason, "round not committed");
                    let _ = svc.inner.events.send(RunEvent::NotCommitted {
                        round,
                        reason: format!("{reason:?}"),
                    });
                    if round >= run.rounds {
                        return finish(&svc, &run_id, &links, &ledger);
                    }
                }
                Action::Dropped { peer, reason } => {
                    tracing::warn!(peer = ?to_libp2p(&peer), ?reason, "replica dropped from the run");
                }
                Action::Resync { peer, round, .. } => {
                    tracing::info!(peer = ?to_libp2p(&peer), round, "replica disagreed; it resyncs before the next round");
                }
            }
        }
        // While no round is open, every replica hears whom the coordinator waits for.
        if machine.open_round().is_none() && !paused.has_deferred() {
            let lobby = (
                machine.member_count() as u32,
                machine.config().min_participants as u32,
                paused.paused() as u32,
            );
            if lobby_sent != Some(lobby) {
                lobby_sent = Some(lobby);
                svc.set_status(|s| s.lobby = Some(lobby));
                let word = Msg::Lobby(Lobby {
                    run_id: run_id.to_vec(),
                    members: lobby.0,
                    needed: lobby.1,
                    paused: lobby.2,
                });
                for p in links.keys() {
                    if *p != svc.inner.local {
                        send_ctl(&links, p, word.clone());
                    }
                }
            }
        }
        // Wait for the next event or the state machine's next deadline. Once the run has
        // started, too few members for a whole round deadline ends it on its last commit
        // rather than waiting forever (but for paused members, who are expected back).
        let idle_limit = if started {
            Duration::from_secs(run.round_deadline_secs)
        } else {
            Duration::from_secs(24 * 3600)
        };
        let timeout = machine
            .poll_timeout()
            .map(|t| Duration::from_millis(t.saturating_sub(unix_ms())))
            .unwrap_or(idle_limit);
        let next = tokio::select! {
            r = tokio::time::timeout(timeout, events.recv()) => r,
            _ = svc.inner.cancel.cancelled() => return Err(TrainError::ShuttingDown),
        };
        let ev = match next {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ok(()),
            Err(_) => {
                if machine.open_round().is_none()
                    && started
                    && super::pause::wait_for_paused(
                        machine.member_count(),
                        paused.paused(),
                        machine.config().min_participants,
                    )
                {
                    tracing::info!(
                        members = machine.member_count(),
                        paused = paused.paused(),
                        "too few replicas for a round while some are paused; waiting for them"
                    );
                    continue;
                }
                if machine.open_round().is_none() && started {
                    tracing::warn!(
                        members = machine.member_count(),
                        needed = run.min_peers,
                        "too few replicas to open another round; finishing the run"
                    );
                    return finish(&svc, &run_id, &links, &ledger);
                }
                machine.handle_timeout(unix_ms());
                continue;
            }
        };
        match ev {
            CoordEvent::Connected { peer, tx } => {
                links.insert(peer, tx);
            }
            CoordEvent::Closed { peer, tx } => {
                // A replica that reconnected already replaced this stream: it is still here.
                if !links.get(&peer).is_some_and(|cur| cur.same_channel(&tx)) {
                    tracing::debug!(%peer, "an older control stream of a replica ended");
                    continue;
                }
                links.remove(&peer);
                paused.handle_closed(&peer);
                tracing::info!(%peer, "replica left the run");
                // The open round's other members stop waiting for it at once.
                announce_departure(&svc, &links, &machine, peer);
                let cpeer = CPeerId(peer.to_bytes());
                machine.handle_leave(&cpeer, unix_ms());
            }
            CoordEvent::Msg { peer, msg } => match msg {
                Msg::Join(j) if j.run_id.as_slice() == run_id.as_slice() => {
                    // A participant of the open round that joins again before reporting has
                    // restarted (or lost its stream): its work of this round is gone, and it
                    // waits for the next round. Often its old connection is not even known
                    // to be dead yet (a killed process): the others must not wait for it.
                    if !reports.contains_key(&peer) {
                        announce_departure(&svc, &links, &machine, peer);
                    }
                    machine.handle_join(CPeerId(peer.to_bytes()), unix_ms());
                }
                Msg::Join(j) => {
                    let refused = Msg::Refused(RunRefused {
                        run_id: j.run_id,
                        reason: "this coordinator runs another run".into(),
                    });
                    send_ctl(&links, &peer, refused);
                }
                Msg::Report(mut r) => {
                    let (Ok(update_hash), Ok(weight_root)) = (
                        Hash32::from_slice("update hash", &r.update_hash),
                        Hash32::from_slice("weight root", &r.root),
                    ) else {
                        tracing::warn!(%peer, "malformed report ignored");
                        continue;
                    };
                    let report = Report {
                        peer: CPeerId(peer.to_bytes()),
                        round: r.round,
                        tokens: r.tokens,
                        update_hash,
                        weight_root,
                    };
                    log_rejections(&peer, &r);
                    // Only its eval loss is read later: the lists need not be kept.
                    r.rejected = Vec::new();
                    r.rejections = Vec::new();
                    reports.insert(peer, r);
                    if let Err(e) = machine.handle_report(report, unix_ms()) {
                        tracing::debug!(%peer, error = %e, "report not counted");
                    }
                    if let Some(o) = machine.open_round() {
                        let counted = (reports.len() as u32, o.assignment.len() as u32);
                        svc.set_status(|s| s.reports = Some(counted));
                    }
                }
                Msg::Pause(p) if p.run_id.as_slice() == run_id.as_slice() => {
                    let waited_for = pending(&machine, &reports, &peer);
                    match paused.handle_notice(peer, p.paused, waited_for) {
                        PauseStep::Leave { announce } => {
                            tracing::info!(%peer, "replica paused; the rounds go on without it");
                            // Like a departure: the open round's members stop waiting.
                            if announce {
                                announce_departure(&svc, &links, &machine, peer);
                            }
                            machine.handle_leave(&CPeerId(peer.to_bytes()), unix_ms());
                        }
                        PauseStep::Rejoin => {
                            tracing::info!(%peer, "replica resumed; it rejoins the rounds");
                            machine.handle_join(CPeerId(peer.to_bytes()), unix_ms());
                        }
                        PauseStep::Nothing => {}
                    }
                }
                _ => tracing::debug!(%peer, "unexpected control message ignored"),
            },
        }
    }
}

/// Tells the open round's other participants (and this daemon's own replica) that `peer` is
/// gone for the round, when it is one of its participants.
fn announce_departure(
    svc: &TrainService,
    links: &BTreeMap<PeerId, mpsc::Sender<TrainControl>>,
    machine: &RunMachine,
    peer: PeerId,
) {
    let cpeer = CPeerId(peer.to_bytes());
    let Some(plan) = machine
        .open_round()
        .filter(|plan| plan.assignment.iter().any(|(p, _)| *p == cpeer))
    else {
        return;
    };
    let left = MemberLeft {
        run_id: machine.config().run_id.0.to_vec(),
        round: plan.round,
        peer: peer.to_bytes(),
    };
    svc.note_departure(peer, plan.round);
    for p in plan.assignment.iter().filter_map(|(p, _)| to_libp2p(p)) {
        if p != svc.inner.local && p != peer {
            send_ctl(links, &p, Msg::Left(left.clone()));
        }
    }
}

/// Queues a control message for one replica; a replica whose queue is full misses it, as a
/// slow or dead replica would, and the round's deadline takes care of the rest.
fn send_ctl(links: &BTreeMap<PeerId, mpsc::Sender<TrainControl>>, peer: &PeerId, msg: Msg) {
    if let Some(tx) = links.get(peer) {
        let m = TrainControl {
            protocol_version: 0,
            msg: Some(msg),
        };
        if tx.try_send(m).is_err() {
            tracing::warn!(%peer, "control link full or closed; message dropped");
        }
    }
}

/// Tells every replica the run is over, on the ledger's last commit, with its manifest.
fn finish(
    svc: &TrainService,
    run_id: &[u8; 32],
    links: &BTreeMap<PeerId, mpsc::Sender<TrainControl>>,
    ledger: &Ledger,
) -> Result<(), TrainError> {
    let head = ledger
        .head()
        .map(potluck_coordinator::failover::commit_of)
        .ok_or_else(|| TrainError::Other("the run's ledger is empty".into()))?;
    let fin = RunFinished {
        run_id: run_id.to_vec(),
        rounds: head.round,
        root: head.root.0.to_vec(),
        manifest: ledger.head().map(|m| m.encode()).unwrap_or_default(),
    };
    // Recorded with the last commit's signed manifest, so that replicas that come back later
    // are told the run ended even when the ledger itself can no longer be read.
    let marker = checkpoint::run_dir(&svc.inner.data_dir, run_id).join(ENDED_FILE);
    if let Err(e) = potluck_coordinator::store::write_atomic(&marker, &fin.manifest) {
        tracing::warn!(error = %e, "could not record the end of the run");
    }
    for p in links.keys() {
        send_ctl(links, p, Msg::Finished(fin.clone()));
    }
    let _ = svc.inner.events.send(RunEvent::Finished {
        rounds: head.round,
        root: head.root.0,
    });
    Ok(())
}

/// The welcome and end of a run this daemon coordinated to its end, from its run directory:
/// `None` when the run did not end here.
fn ended_run(
    data_dir: &std::path::Path,
    run_id: &[u8; 32],
) -> Result<Option<(RunWelcome, RunFinished)>, TrainError> {
    let run_dir = checkpoint::run_dir(data_dir, run_id);
    let marker = run_dir.join(ENDED_FILE);
    if !marker.exists() {
        return Ok(None);
    }
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        TrainError::Other(format!(
            "the ended run in {}: {what}: {e}",
            run_dir.display()
        ))
    };
    let run_bytes = read_bounded(
        &run_dir.join(potluck_coordinator::manifest::RUN_FILE),
        potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
    )?;
    let signed_run = SignedRunManifest::decode(&run_bytes).map_err(|e| bad("run manifest", &e))?;
    // The marker holds the last commit's signed manifest; a marker written before it did
    // (a round number) leaves the ledger to say where the run ended.
    let recorded = read_bounded(
        &marker,
        potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
    )?;
    let head = match SignedManifest::decode(&recorded) {
        Ok(m) => {
            potluck_coordinator::verify::check_manifest_against_run(&signed_run, &m)
                .map_err(|e| bad("last commit", &e))?;
            m
        }
        Err(_) => {
            let mut entries = Ledger::read_entries(&checkpoint::ledger_dir(&run_dir))
                .map_err(|e| bad("ledger", &e))?;
            potluck_coordinator::verify::verify_chain(&signed_run, &entries)
                .map_err(|e| bad("ledger", &e))?;
            match entries.pop() {
                Some(head) => head,
                None => return Ok(None),
            }
        }
    };
    let commit = potluck_coordinator::failover::commit_of(&head);
    let welcome = RunWelcome {
        run_id: run_id.to_vec(),
        manifest: signed_run.body().settings.clone(),
        committed_round: commit.round,
        committed_root: commit.root.0.to_vec(),
        signed_run: run_bytes,
        head_manifest: head.encode(),
        data_sources: Vec::new(),
        data_manifest: Vec::new(),
    };
    let fin = RunFinished {
        run_id: run_id.to_vec(),
        rounds: commit.round,
        root: commit.root.0.to_vec(),
        manifest: head.encode(),
    };
    Ok(Some((welcome, fin)))
}

/// The coordinator crate's settings of a run.
fn run_config(run: &ResolvedRun) -> RunConfig {
    RunConfig {
        run_id: Hash32(run.id()),
        min_participants: run.min_peers,
        max_members: MAX_MEMBERS,
        round_duration_ms: run.round_deadline_secs * 1000,
        num_shards: u32::try_from(run.data.shards).unwrap_or(u32::MAX),
        max_tokens_per_report: 1 << 40,
        // A twentieth of the round, between half a second and ten seconds: the honest
        // replicas' reports come within moments of each other.
        commit_grace_ms: (run.round_deadline_secs * 50).clamp(500, 10_000),
    }
}

/// The file in a run directory with the highest round its coordinator opened, so that a
/// restarted coordinator never reuses a round number.
const OPENED_ROUND_FILE: &str = "opened-round";

fn read_opened_round(run_dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(run_dir.join(OPENED_ROUND_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The raw ed25519 key of a peer id (ed25519 peer ids embed their public key).
fn ed25519_key(p: &PeerId) -> Option<[u8; 32]> {
    let mh: &libp2p::multihash::Multihash<64> = p.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    Some(pk.try_into_ed25519().ok()?.to_bytes())
}

/// The peer id of a raw ed25519 key.
fn peer_of_key(k: &[u8; 32]) -> Option<PeerId> {
    let pk = libp2p::identity::ed25519::PublicKey::try_from_bytes(k).ok()?;
    Some(PublicKey::from(pk).to_peer_id())
}

fn to_libp2p(p: &CPeerId) -> Option<PeerId> {
    PeerId::from_bytes(&p.0).ok()
}

/// The root a replica reports for a round it sat out: unique to the peer and round.
fn sitting_out_root(peer: &PeerId, round: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"potluck-sitting-out-v1");
    h.update(&peer.to_bytes());
    h.update(&round.to_le_bytes());
    *h.finalize().as_bytes()
}

fn verify_sender(h: &FrameHeader, from: PeerId) -> Result<(), &'static str> {
    let pk = PublicKey::try_decode_protobuf(&h.public_key).map_err(|_| "malformed public key")?;
    if pk.to_peer_id() != from {
        return Err("frame signed by another peer than the one that sent it");
    }
    if !pk.verify(&signing_bytes(h), &h.signature) {
        return Err("signature does not verify");
    }
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::wire::ControlError;
    use potluck_coordinator::rejections::MAX_REJECTIONS;

    fn signed_header(kp: &Keypair) -> FrameHeader {
        let mut h = FrameHeader {
            run_id: vec![1; 32],
            round: 4,
            kind: FrameKind::Contribution as i32,
            len: 3,
            tokens: 10,
            ..Default::default()
        };
        seal_payload(&mut h, b"payload", None);
        h.public_key = kp.public().encode_protobuf();
        h.signature = kp.sign(&signing_bytes(&h)).unwrap();
        h
    }

    #[test]
    fn signatures_bind_the_sender_and_the_header() {
        let kp = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let h = signed_header(&kp);
        assert!(verify_sender(&h, kp.public().to_peer_id()).is_ok());
        // Relayed by another peer than the signer.
        assert!(verify_sender(&h, other.public().to_peer_id()).is_err());
        // A replay into another round, or more tokens claimed, breaks the signature.
        let mut replay = h.clone();
        replay.round = 5;
        assert!(verify_sender(&replay, kp.public().to_peer_id()).is_err());
        let mut inflated = h.clone();
        inflated.tokens = 1_000_000;
        assert!(verify_sender(&inflated, kp.public().to_peer_id()).is_err());
        let mut garbage = h;
        garbage.public_key = vec![0xff; 7];
        assert!(verify_sender(&garbage, kp.public().to_peer_id()).is_err());
    }

    #[test]
    fn reducer_refuses_bad_updates_and_averages_the_rest() {
        let peers: Vec<PeerId> = (0..4)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let mut c = BTreeMap::new();
        c.insert(peers[0], (100, vec![1.0, 1.0, 1.0]));
        c.insert(peers[1], (300, vec![2.0, 2.0, 2.0]));
        c.insert(peers[2], (100, vec![f32::NAN, 0.0, 0.0]));
        c.insert(peers[3], (100, vec![1e6, 1e6, 1e6]));
        let mut rejected = Vec::new();
        let (avg, used) = reduce_slice(&c, 3, Aggregation::Mean, &mut rejected);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(used.len(), 2);
        assert!(!used.contains(&peers[2]) && !used.contains(&peers[3]));
        // Token-weighted: (100 * 1 + 300 * 2) / 400.
        assert!(avg.iter().all(|v| (v - 1.75).abs() < 1e-6), "{avg:?}");
        // Nothing acceptable: the slice's update is zero, not garbage.
        let mut only_bad = BTreeMap::new();
        only_bad.insert(peers[2], (100, vec![f32::INFINITY, 0.0, 0.0]));
        let (avg, used) = reduce_slice(&only_bad, 3, Aggregation::Mean, &mut Vec::new());
        assert_eq!(avg, vec![0.0; 3]);
        assert!(used.is_empty());
    }

    #[test]
    fn local_state_round_trips_and_refuses_damage() {
        use super::super::manifest::{DEMO_MANIFEST, RunManifest};
        let run = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(LOCAL_DIR);
        assert!(
            load_local(&dir, &run, None, &DeviceSpec::Cpu)
                .unwrap()
                .is_none()
        );
        let mut rep = Replica::new(&run.model, &run.inner, &DeviceSpec::Cpu).unwrap();
        rep.set_step(checkpoint::swarm_step(&run, 2));
        let n = rep.num_params();
        let velocity: Vec<f32> = (0..n).map(|i| i as f32 * 1e-6).collect();
        let snap = Snapshot::new(&rep, &run, 2, rep.flat_params().unwrap(), velocity).unwrap();
        let mut ef = ErrorFeedback::new(n);
        let delta: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) * 1e-3).collect();
        ef.compress(Codec::INT8, &delta).unwrap();
        save_local(&dir, &rep, &snap, &ef, &run).unwrap();
        // A later save replaces the earlier one.
        save_local(&dir, &rep, &snap, &ef, &run).unwrap();
        let (back, back_ef, back_snap) = load_local(&dir, &run, None, &DeviceSpec::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(back_snap.root, snap.root);
        assert_eq!(back_snap.round, 2);
        assert_eq!(back.step(), rep.step());
        assert_eq!(back_ef.to_bytes(), ef.to_bytes());
        // A damaged file is an error, never a panic or a silently fresh state.
        let ef_file = dir.join(format!("{:020}", 2)).join(LOCAL_EF);
        std::fs::write(&ef_file, b"garbage").unwrap();
        assert!(load_local(&dir, &run, None, &DeviceSpec::Cpu).is_err());
        // State saved under other settings is refused.
        save_local(&dir, &rep, &snap, &ef, &run).unwrap();
        let mut other = run.clone();
        other.inner.lr *= 2.0;
        assert!(load_local(&dir, &other, None, &DeviceSpec::Cpu).is_err());
    }

    #[test]
    fn an_adapter_replicas_local_state_reloads_on_its_base_only() {
        use super::super::manifest::RunManifest;
        use potluck_worker::adapters::{LlamaShape, write_random_llama};
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        let shape = LlamaShape {
            vocab: 256,
            hidden: 16,
            intermediate: 32,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            max_positions: 64,
        };
        write_random_llama(&base, &shape, 1).unwrap();
        let text = t.path().join("text.txt");
        std::fs::write(&text, "local state of adapters ".repeat(50)).unwrap();
        let toml = format!(
            "name = \"a\"\n[data]\nsource = {:?}\ntrain_bytes = 0\neval_bytes = 0\nshards = 2\n\
             eval_fraction = 0.1\n[inner]\nseq_len = 16\n[base]\npath = {:?}\n[adapters]\n\
             rank = 2\nalpha = 4.0\ndropout = 0.0\ntarget_modules = [\"q_proj\"]\n",
            text.display().to_string(),
            base.display().to_string()
        );
        let run = RunManifest::parse(&toml)
            .unwrap()
            .resolve()
            .unwrap()
            .pin_data()
            .unwrap();
        let dir = t.path().join(LOCAL_DIR);
        let rep = new_replica(&run, Some(&base), &DeviceSpec::Cpu).unwrap();
        let n = rep.num_params();
        assert_eq!(n, 2 * 16 + 16 * 2, "q_proj's adapter only");
        let snap = Snapshot::new(&rep, &run, 1, rep.flat_params().unwrap(), vec![0.0; n]).unwrap();
        save_local(&dir, &rep, &snap, &ErrorFeedback::new(n), &run).unwrap();
        let (back, _, back_snap) = load_local(&dir, &run, Some(&base), &DeviceSpec::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(back_snap.root, snap.root);
        assert_eq!(back.flat_params().unwrap(), rep.flat_params().unwrap());
        // Without the base, or with other adapter settings, it is refused with a reason.
        let err = load_local(&dir, &run, None, &DeviceSpec::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not on this daemon"), "{err}");
        let mut other = run.clone();
        other.adapters.as_mut().unwrap().alpha = 8.0;
        let err = load_local(&dir, &other, Some(&base), &DeviceSpec::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter settings"), "{err}");
    }

    /// The demo's run and a fresh CPU replica of its model.
    fn demo_run() -> (ResolvedRun, Replica) {
        use super::super::manifest::{DEMO_MANIFEST, RunManifest};
        let run = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        let rep = Replica::new(&run.model, &run.inner, &DeviceSpec::Cpu).unwrap();
        (run, rep)
    }

    #[test]
    fn snapshot_root_covers_weights_momentum_and_round() {
        let (run, rep) = demo_run();
        let p = rep.flat_params().unwrap();
        let n = p.len();
        let snap = |round, p: &[f32], v: &[f32]| {
            Snapshot::new(&rep, &run, round, p.to_vec(), v.to_vec()).unwrap()
        };
        let zeros = vec![0.0; n];
        let a = snap(1, &p, &zeros);
        assert_eq!(a.root, snap(1, &p, &zeros).root);
        let mut p2 = p.clone();
        p2[7] += 1e-3;
        assert_ne!(a.root, snap(1, &p2, &zeros).root);
        let mut v = zeros.clone();
        v[n - 1] = 1e-9;
        assert_ne!(a.root, snap(1, &p, &v).root);
        assert_ne!(a.root, snap(2, &p, &zeros).root);
        // The root is the content root of the checkpoint files `potluck verify` checks.
        let files = a.files(&rep, &run).unwrap();
        assert_eq!(checkpoint::content_of(&files).unwrap().root().0, a.root);
        // In a data-parallel run it covers the inner optimizer's state too, which must be
        // there (and nowhere else).
        let mut dp = run.clone();
        dp.mode = RunMode::DataParallel;
        let inner = InnerState::of(&rep).unwrap();
        let with = |i: &InnerState| {
            Snapshot::with_inner(&rep, &dp, 1, (p.clone(), zeros.clone()), Some(i.clone()))
                .unwrap()
                .root
        };
        let mut moved = inner.clone();
        moved.v[n / 3] = 1e-12;
        assert_ne!(with(&inner), with(&moved));
        assert_ne!(with(&inner), a.root);
        assert_eq!(
            Snapshot::new(&rep, &dp, 1, p.clone(), zeros.clone())
                .unwrap()
                .root,
            with(&inner)
        );
        assert!(Snapshot::with_inner(&rep, &dp, 1, (p.clone(), zeros.clone()), None).is_err());
        assert!(
            Snapshot::with_inner(&rep, &run, 1, (p.clone(), zeros.clone()), Some(inner)).is_err()
        );
    }

    #[test]
    fn ledger_answers_parse_and_refuse_damage() {
        let (run, rep) = demo_run();
        let p = rep.flat_params().unwrap();
        let genesis = Snapshot::new(&rep, &run, 0, p.clone(), vec![0.0; p.len()]).unwrap();
        let kp = Keypair::generate_ed25519();
        let signed_run =
            checkpoint::signed_run(&run, Hash32(genesis.root), &kp, Vec::new()).unwrap();
        let m = checkpoint::sign_round(
            &signed_run,
            0,
            None,
            genesis.content.clone(),
            Vec::new(),
            &kp,
        )
        .unwrap();
        let bytes = m.encode();
        let mut answer = Vec::new();
        for _ in 0..2 {
            answer.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            answer.extend_from_slice(&bytes);
        }
        let parsed = ledger_entries(&answer).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(parsed.iter().all(|e| e.encode() == bytes));
        assert!(ledger_entries(&[]).unwrap().is_empty());
        // Cut anywhere inside an entry, or a length beyond what is left or allowed: refused.
        for cut in [1, 3, 4, 10, answer.len() / 2 + 2, answer.len() - 1] {
            assert!(ledger_entries(&answer[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = answer.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ledger_entries(&huge).is_err());
        // A flipped byte inside an entry's manifest is refused when it is decoded.
        let mut flipped = answer.clone();
        flipped[4 + bytes.len() / 2] ^= 0x40;
        let ok_or_changed = ledger_entries(&flipped)
            .map(|v| v.iter().all(|e| e.encode() == bytes))
            .unwrap_or(false);
        assert!(!ok_or_changed, "a damaged entry passed as the original");
    }

    /// Runs one exchange at a fresh replica whose only other member stays silent (so the
    /// exchange runs to its end), with one frame for the open round from each of `from`
    /// (none of them members) waiting in its inbox. Returns the refusals it counted and its
    /// report as the coordinator reads it back from the control stream.
    async fn report_after_flood(from: &[PeerId]) -> (u64, Result<TrainReport, ControlError>) {
        let dir = tempfile::tempdir().unwrap();
        let svc = TrainService::start(
            Keypair::generate_ed25519(),
            libp2p_stream::Behaviour::new().new_control(),
            DeviceSpec::Cpu,
            dir.path().to_path_buf(),
            TrainSettings::default(),
        )
        .unwrap();
        let members = vec![svc.inner.local, PeerId::random()];
        let run_id = [7u8; 32];
        let len = 8;
        let plan = ExchangePlan {
            run_id: &run_id,
            round: 3,
            part: 0,
            members: &members,
            me: 0,
            len,
            ranges: slice_ranges(len, members.len()),
            codec: Codec::INT8,
            aggregation: Aggregation::Mean,
            deadlines: Deadlines::split(Instant::now(), Duration::from_secs(4)),
        };
        let (tx, mut inbox) = mpsc::channel(from.len().max(1));
        for peer in from {
            let frame = Frame {
                header: FrameHeader {
                    run_id: run_id.to_vec(),
                    round: 3,
                    kind: FrameKind::Contribution as i32,
                    slice: 0,
                    offset: 0,
                    len: 4,
                    ..Default::default()
                },
                payload: Vec::new(),
                wire_bytes: 0,
            };
            tx.try_send(Inbound { from: *peer, frame }).unwrap();
        }
        let ex = svc
            .exchange(&plan, None, &mut inbox, &mut Vec::new())
            .await
            .unwrap();
        let (rejections, rejections_dropped) = ex.rejected.to_proto();
        let report = TrainControl {
            protocol_version: 0,
            msg: Some(Msg::Report(TrainReport {
                run_id: run_id.to_vec(),
                round: 3,
                rejections,
                rejections_dropped,
                ..Default::default()
            })),
        };
        let mut wire = Vec::new();
        write_control(&mut wire, report).await.unwrap();
        let back = read_control(&mut futures::io::Cursor::new(wire))
            .await
            .map(|m| match m.and_then(|(m, _)| m.msg) {
                Some(Msg::Report(r)) => r,
                other => panic!("not a report: {other:?}"),
            });
        (svc.status().rejected_updates, back)
    }

    /// Enough refusals to pass the control limit many times over if each were listed.
    const FLOOD: usize = 20_000;

    /// A peer outside the round floods an honest replica's exchange with frames for the
    /// open round. Each is refused, and the refusals go into the replica's report; the
    /// report must still fit a control message, or the coordinator refuses it and closes
    /// the replica's control stream (issue 18).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_refused_frames_leaves_the_report_under_the_control_limit() {
        let stranger = PeerId::random();
        let (counted, report) = report_after_flood(&vec![stranger; FLOOD]).await;
        assert_eq!(counted, FLOOD as u64);
        let report = report.expect("the coordinator reads the report");
        // One entry names the stranger, with every refusal counted.
        let read = Rejections::from_proto(&report.rejections, report.rejections_dropped);
        let listed: Vec<_> = read
            .iter()
            .map(|e| (e.peer.clone(), e.reason, e.round, e.count))
            .collect();
        assert_eq!(
            listed,
            vec![(
                CPeerId(stranger.to_bytes()),
                RejectReason::NotAMember,
                3,
                FLOOD as u64
            )]
        );
    }

    /// The same flood from as many made-up identities (they cost nothing to make): the
    /// report lists as many as it holds and counts the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_from_many_identities_is_capped_in_the_report() {
        let strangers: Vec<PeerId> = (0..FLOOD).map(|_| PeerId::random()).collect();
        let (counted, report) = report_after_flood(&strangers).await;
        assert_eq!(counted, FLOOD as u64);
        let report = report.expect("the coordinator reads the report");
        let read = Rejections::from_proto(&report.rejections, report.rejections_dropped);
        assert_eq!(read.len(), MAX_REJECTIONS);
        assert_eq!(read.total(), FLOOD as u64);
    }

    #[test]
    fn reduced_top_k_keeps_the_union_of_supports() {
        let c = Codec::TopK {
            chunk: 100,
            k: 10,
            bits: 4,
        };
        assert_eq!(
            reduce_codec(c, 3),
            Codec::TopK {
                chunk: 100,
                k: 30,
                bits: 8
            }
        );
        assert_eq!(
            reduce_codec(c, 50),
            Codec::TopK {
                chunk: 100,
                k: 100,
                bits: 8
            }
        );
        assert_eq!(reduce_codec(Codec::INT8, 3), Codec::INT8);
        assert_eq!(reduce_codec(Codec::SIGN, 3), Codec::SIGN);
    }
}
