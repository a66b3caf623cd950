//! Runs as the control API sees them: a small registry that starts or joins one run at a
//! time in the background and remembers how the last one ended, the `potluck1:` run invite
//! that `potluck invite` prints and `potluck join` reads, and the offline listing of the
//! ledgers under a data dir that `potluck checkpoints` prints.
//!
//! The registry only launches and watches: the round logic stays in
//! [`TrainService::coordinate`] and [`TrainService::join`], and progress comes from
//! [`TrainService::status`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use libp2p::{Multiaddr, PeerId};
use potluck_coordinator::failover::SignedRunManifest;
use potluck_coordinator::manifest::{RUN_FILE, SignedManifest};
use potluck_coordinator::verify::{VerifyError, check_link, check_manifest_against_run};
use potluck_proto::v1;
use prost::Message as _;
use serde::Serialize;

use super::checkpoint::{RUNS_DIR, ledger_dir};
use super::manifest::{ManifestError, RunManifest};
use super::session::{RoundTiming, RunSummary, TrainError, TrainService};

/// How long a joining replica keeps trying to reach a coordinator that is not ready yet (it
/// may still be loading its data).
const JOIN_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long `start` waits for a run that fails at once (a busy training service), so that
/// the caller sees the error instead of a run id.
const EARLY_FAILURE_WAIT: Duration = Duration::from_millis(300);
/// How long `run join` waits for the first attempt's answer (a refusal, or the welcome)
/// before it returns and the attempts go on in the background.
const FIRST_JOIN_WAIT: Duration = Duration::from_secs(20);
/// What a joining run does until a coordinator welcomes it.
const REACHING: &str = "reaching the coordinator";

/// Why the registry refused to start or join a run.
#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("run {run_id} is still active on this daemon ({state}); wait for it to finish")]
    Busy { run_id: String, state: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("resuming the run this daemon took part in: {0}")]
    Resume(String),
}

/// The file under `<data>/runs/` that names the run this daemon takes part in until it
/// ends, so that a restarted daemon (a crash, a reboot, systemd) goes on with it.
pub const ACTIVE_RUN_FILE: &str = "active-run.json";
/// An active-run file larger than this is damaged.
const ACTIVE_RUN_MAX: u64 = 1 << 20;

/// What a restarted daemon needs to take its part in a run up again.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct ActiveRun {
    role: Role,
    run_id: String,
    coordinator: String,
    out: Option<PathBuf>,
    /// The run's TOML, for the coordinator (it resolves to the same run id, or the run is
    /// not resumed).
    manifest: Option<String>,
    successors: Vec<String>,
    coordinate_only: bool,
}

/// How this daemon takes part in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Replica => "replica",
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    /// Launched; the string says what it is doing before the session reports (loading data,
    /// reaching the coordinator).
    Running(String),
    Finished {
        root: [u8; 32],
        checkpoint_root: Option<String>,
        eval_loss: f32,
        rounds: u64,
    },
    Failed(String),
}

#[derive(Debug, Clone)]
struct Record {
    /// The run id; all zeros while a started run is still pinning its data.
    run_id: [u8; 32],
    name: String,
    rounds: u64,
    role: Role,
    coordinator: PeerId,
    out: Option<PathBuf>,
    started: Instant,
    outcome: Outcome,
    /// Distinguishes launches, so a late finish of an old task never overwrites a new one.
    epoch: u64,
}

#[derive(Debug, Default)]
struct State {
    current: Option<Record>,
    next_epoch: u64,
}

/// Marks a reserved start as failed when dropped before the run was launched.
struct CancelGuard<'a> {
    runs: &'a Runs,
    epoch: u64,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.runs.update(self.epoch, |r| {
                if matches!(r.outcome, Outcome::Running(_)) {
                    r.outcome = Outcome::Failed("the start was cancelled".into());
                }
            });
        }
    }
}

/// A run the registry just launched.
#[derive(Debug, Clone)]
pub struct Started {
    pub run_id: [u8; 32],
    pub name: String,
    pub rounds: u64,
}

/// What `potluck run status` shows: the registry's record of the run with the session's
/// live figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunView {
    pub known: bool,
    pub active: bool,
    pub run_id: String,
    pub name: String,
    pub role: String,
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
    /// `(round, sent, received)` for the last rounds, newest first.
    pub round_bytes: Vec<(u64, u64, u64)>,
    /// Where the time of the last rounds went at this daemon, newest first.
    pub round_timings: Vec<RoundTiming>,
    pub rejected_updates: u64,
    pub reassigned_slices: u64,
    pub missing_slices: u64,
    pub disagreed_rounds: u64,
    pub error: String,
    pub out_dir: String,
    pub elapsed_secs: u64,
    pub checkpoint_root: String,
    /// Why training is paused here; empty when it is not.
    pub paused: String,
    /// What the run waits for, in words; empty when nothing.
    pub waiting: String,
    /// Updates refused, by reason.
    pub rejected_by_reason: Vec<(String, u64)>,
}

/// The runs of one daemon: at most one active at a time. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runs {
    train: TrainService,
    state: Arc<Mutex<State>>,
}

impl Runs {
    /// The training service these runs go through (status, caps, pause and resume act on
    /// it).
    pub fn train(&self) -> &TrainService {
        &self.train
    }

    pub fn new(train: TrainService) -> Self {
        Self {
            train,
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn busy(st: &State) -> Result<(), RunsError> {
        if let Some(cur) = &st.current
            && let Outcome::Running(what) = &cur.outcome
        {
            return Err(RunsError::Busy {
                run_id: if cur.run_id == [0; 32] {
                    format!("'{}'", cur.name)
                } else {
                    hex::encode(cur.run_id)
                },
                state: what.clone(),
            });
        }
        Ok(())
    }

    /// Fails with [`RunsError::Busy`] while a run is active: lets a caller refuse before
    /// doing anything with side effects (joining a swarm) for a run it could not join.
    pub fn ensure_idle(&self) -> Result<(), RunsError> {
        Self::busy(&self.lock())
    }

    /// Reserves the registry for a new run, or says which run holds it.
    fn reserve(&self, rec: impl FnOnce(u64) -> Record) -> Result<u64, RunsError> {
        let mut st = self.lock();
        Self::busy(&st)?;
        st.next_epoch += 1;
        let epoch = st.next_epoch;
        st.current = Some(rec(epoch));
        Ok(epoch)
    }

    fn update(&self, epoch: u64, f: impl FnOnce(&mut Record)) {
        let mut st = self.lock();
        if let Some(cur) = st.current.as_mut()
            && cur.epoch == epoch
        {
            f(cur);
        }
    }

    fn finish(&self, epoch: u64, res: Result<RunSummary, TrainError>) {
        self.update(epoch, |r| {
            r.outcome = match res {
                Ok(s) => {
                    r.rounds = s.rounds.max(r.rounds);
                    Outcome::Finished {
                        root: s.root,
                        checkpoint_root: s.checkpoint_root,
                        eval_loss: s.eval_loss,
                        rounds: s.rounds,
                    }
                }
                Err(e) => Outcome::Failed(e.to_string()),
            };
        });
    }

    fn early_failure(&self, epoch: u64) -> Option<String> {
        let st = self.lock();
        match &st.current {
            Some(r) if r.epoch == epoch => match &r.outcome {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Starts the run of a TOML manifest with this daemon as its coordinator, in the
    /// background; returns once its id is known (the data is loaded and hashed first).
    pub async fn start(
        &self,
        toml: &str,
        out: Option<PathBuf>,
        successors: Vec<PeerId>,
        coordinate_only: bool,
    ) -> Result<Started, RunsError> {
        let run = RunManifest::parse(toml)?.resolve()?;
        let me = self.train.local_peer();
        let name = run.name.clone();
        let rounds = run.rounds;
        let epoch = self.reserve(|epoch| Record {
            run_id: [0; 32],
            name: name.clone(),
            rounds,
            role: Role::Coordinator,
            coordinator: me,
            out: out.clone(),
            started: Instant::now(),
            outcome: Outcome::Running("loading and hashing the run's data".into()),
            epoch,
        })?;
        // If the caller goes away while the data loads (the RPC is dropped), the
        // reservation must not stay behind as a run that never ends.
        let mut guard = CancelGuard {
            runs: self,
            epoch,
            armed: true,
        };
        // Loading the data can take a while on a big corpus: off the runtime's threads.
        let pinned = tokio::task::spawn_blocking(move || run.pin_data())
            .await
            .map_err(|_| RunsError::ShuttingDown)
            .and_then(|r| r.map_err(RunsError::from));
        let run = match pinned {
            Ok(r) => r,
            Err(e) => {
                self.update(epoch, |r| r.outcome = Outcome::Failed(e.to_string()));
                return Err(e);
            }
        };
        guard.armed = false;
        let run_id = run.id();
        // A finished run, or one this daemon was a replica of, is refused before anything
        // of it is written.
        if let Err(e) = self.train.check_startable(&run) {
            self.update(epoch, |r| r.outcome = Outcome::Failed(e.to_string()));
            return Err(e.into());
        }
        self.update(epoch, |r| {
            r.run_id = run_id;
            r.outcome = Outcome::Running("starting".into());
        });
        tracing::info!(run = %hex::encode(run_id), name = %name, rounds, "starting a run");
        self.remember(&ActiveRun {
            role: Role::Coordinator,
            run_id: hex::encode(run_id),
            coordinator: me.to_string(),
            out: out.clone(),
            manifest: Some(toml.to_string()),
            successors: successors.iter().map(|p| p.to_string()).collect(),
            coordinate_only,
        });
        let this = self.clone();
        let train = self.train.clone();
        tokio::spawn(async move {
            let res = if coordinate_only {
                train.coordinate_only(run, successors).await
            } else {
                train.coordinate_with(run, out, successors).await
            };
            if let Err(e) = &res {
                tracing::warn!(error = %e, "the run ended with an error");
            }
            this.forget(&res);
            this.finish(epoch, res);
        });
        self.fail_fast(epoch).await?;
        Ok(Started {
            run_id,
            name,
            rounds,
        })
    }

    async fn fail_fast(&self, epoch: u64) -> Result<(), RunsError> {
        self.fail_fast_until(epoch, EARLY_FAILURE_WAIT, || false)
            .await
    }

    /// Returns the launch's failure if it fails within `wait`, or Ok once `settled` says the
    /// launch got past its first step, or at the end of `wait`.
    async fn fail_fast_until(
        &self,
        epoch: u64,
        wait: Duration,
        settled: impl Fn() -> bool,
    ) -> Result<(), RunsError> {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if let Some(e) = self.early_failure(epoch) {
                return Err(RunsError::Train(TrainError::Other(e)));
            }
            if settled() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Joins the run `run_id` of `coordinator` as a replica, in the background. A
    /// coordinator that does not answer yet is retried for up to a minute.
    pub async fn join(
        &self,
        coordinator: PeerId,
        run_id: [u8; 32],
        out: Option<PathBuf>,
    ) -> Result<(), RunsError> {
        let epoch = self.reserve(|epoch| Record {
            run_id,
            name: String::new(),
            rounds: 0,
            role: Role::Replica,
            coordinator,
            out: out.clone(),
            started: Instant::now(),
            outcome: Outcome::Running(REACHING.into()),
            epoch,
        })?;
        tracing::info!(run = %hex::encode(run_id), %coordinator, "joining a run");
        self.remember(&ActiveRun {
            role: Role::Replica,
            run_id: hex::encode(run_id),
            coordinator: coordinator.to_string(),
            out: out.clone(),
            manifest: None,
            successors: Vec::new(),
            coordinate_only: false,
        });
        let this = self.clone();
        let train = self.train.clone();
        tokio::spawn(async move {
            let give_up = Instant::now() + JOIN_RETRY_FOR;
            let mut attempt = 0u32;
            let res = loop {
                attempt += 1;
                match train.join(coordinator, run_id, out.clone()).await {
                    Err(
                        e @ (TrainError::CoordinatorGone
                        | TrainError::Unreachable(..)
                        | TrainError::Other(_)),
                    ) if Instant::now() < give_up => {
                        tracing::debug!(error = %e, attempt, "joining failed; retrying");
                        this.update(epoch, |r| {
                            r.outcome =
                                Outcome::Running(format!("{REACHING} (attempt {attempt}: {e})"))
                        });
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    res => break res,
                }
            };
            if let Err(e) = &res {
                tracing::warn!(error = %e, "the run ended with an error");
            }
            this.forget(&res);
            this.finish(epoch, res);
        });
        // The first attempt's answer says whether this peer may take part at all (a private
        // swarm that has not admitted it refuses at once): wait for it, or for the welcome.
        let welcomed = hex::encode(run_id);
        let first_try = format!("{REACHING} (attempt 1");
        self.fail_fast_until(epoch, FIRST_JOIN_WAIT, || {
            self.train.status().run_id == welcomed
                || self.lock().current.as_ref().is_some_and(|r| {
                    r.epoch == epoch
                        && matches!(&r.outcome, Outcome::Running(s) if s.starts_with(&first_try))
                })
        })
        .await
    }

    fn active_file(&self) -> PathBuf {
        self.train.data_dir().join(RUNS_DIR).join(ACTIVE_RUN_FILE)
    }

    /// Records the run this daemon takes part in, for a restart.
    fn remember(&self, a: &ActiveRun) {
        let path = self.active_file();
        let res = serde_json::to_vec_pretty(a)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                std::fs::create_dir_all(self.train.data_dir().join(RUNS_DIR))?;
                crate::fsutil::write_atomic(&path, &bytes, 0o600)
            });
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "could not record the active run; a restart will not resume it");
        }
    }

    /// Drops the record once the run is over for this daemon; a daemon that is only shutting
    /// down keeps it, to go on after its restart.
    fn forget(&self, res: &Result<RunSummary, TrainError>) {
        if matches!(res, Err(TrainError::ShuttingDown)) {
            return;
        }
        match std::fs::remove_file(self.active_file()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "could not remove the active-run record"),
        }
    }

    /// Takes up the run this daemon took part in before it stopped, if it had not ended:
    /// a coordinator coordinates it again from its ledger, a replica rejoins it with its
    /// saved state. Called once at daemon start. A damaged record is reported and set aside.
    pub async fn resume(&self) -> Result<Option<[u8; 32]>, RunsError> {
        let path = self.active_file();
        let bytes = match crate::fsutil::read_limited(&path, ACTIVE_RUN_MAX) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RunsError::Resume(format!("{}: {e}", path.display())));
            }
        };
        let damaged = |why: String| {
            let aside = path.with_extension("json.damaged");
            let _ = std::fs::rename(&path, &aside);
            RunsError::Resume(format!(
                "{} is damaged ({why}); moved to {} and not resumed",
                path.display(),
                aside.display()
            ))
        };
        let a: ActiveRun = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        let run_id: [u8; 32] = hex::decode(&a.run_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| damaged("bad run id".into()))?;
        tracing::info!(run = %a.run_id, role = a.role.as_str(), "resuming the run this daemon took part in before it stopped");
        match a.role {
            Role::Coordinator => {
                let toml = a
                    .manifest
                    .ok_or_else(|| damaged("a coordinator's record without its manifest".into()))?;
                let successors = a
                    .successors
                    .iter()
                    .map(|p| p.parse::<PeerId>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| damaged(format!("bad successor: {e}")))?;
                // The manifest must still resolve to the run we coordinated (its data may
                // have changed): another run would fork the swarm.
                let check = RunManifest::parse(&toml)?.resolve()?;
                let now = tokio::task::spawn_blocking(move || check.pin_data())
                    .await
                    .map_err(|_| RunsError::ShuttingDown)??
                    .id();
                if now != run_id {
                    let _ = std::fs::remove_file(&path);
                    return Err(RunsError::Resume(format!(
                        "the recorded manifest now resolves to run {} instead of {}: has its \
                         data changed? the run was not resumed",
                        hex::encode(now),
                        a.run_id
                    )));
                }
                self.start(&toml, a.out, successors, a.coordinate_only)
                    .await?;
                Ok(Some(run_id))
            }
            Role::Replica => {
                let coordinator: PeerId = a
                    .coordinator
                    .parse()
                    .map_err(|e| damaged(format!("bad coordinator: {e}")))?;
                self.join(coordinator, run_id, a.out).await?;
                Ok(Some(run_id))
            }
        }
    }

    /// The run this daemon started or joined last, with the session's live figures.
    pub fn view(&self) -> RunView {
        let Some(rec) = self.lock().current.clone() else {
            return RunView {
                state: "no run started or joined since the daemon started".into(),
                // A run joined later starts paused: say so already.
                paused: self.train.status().paused,
                ..Default::default()
            };
        };
        let live = self.train.status();
        let id_hex = hex::encode(rec.run_id);
        // The session's figures belong to this run only once it has reported under its id.
        let same_run = rec.run_id != [0; 32] && live.run_id == id_hex;
        let mut v = RunView {
            known: true,
            active: matches!(rec.outcome, Outcome::Running(_)),
            run_id: if rec.run_id == [0; 32] {
                String::new()
            } else {
                id_hex
            },
            name: if same_run && !live.name.is_empty() {
                live.name.clone()
            } else {
                rec.name.clone()
            },
            role: rec.role.as_str().into(),
            coordinator: rec.coordinator.to_base58(),
            rounds: rec.rounds,
            out_dir: rec
                .out
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            elapsed_secs: rec.started.elapsed().as_secs(),
            train_loss: f32::NAN,
            eval_loss: f32::NAN,
            ..Default::default()
        };
        if same_run {
            v.round = live.round;
            // After a failover the session knows better than the record who coordinates.
            if !live.role.is_empty() {
                v.role = live.role.clone();
            }
            if !live.coordinator.is_empty() {
                v.coordinator = live.coordinator.clone();
            }
            if live.rounds > 0 {
                v.rounds = live.rounds;
            }
            v.committed_round = live.committed_round;
            v.committed_root = live.committed_root.clone();
            // The session reports zeros before its first round has trained anything.
            if live.round > 0 || live.committed_round > 0 {
                v.train_loss = live.train_loss;
                v.eval_loss = live.eval_loss;
            }
            v.peers = live.peers.clone();
            v.rejected_updates = live.rejected_updates;
            v.reassigned_slices = live.reassigned_slices;
            v.missing_slices = live.missing_slices;
            v.disagreed_rounds = live.disagreed_rounds;
            v.round_bytes = live.round_bytes.clone();
            v.round_timings = live.round_timings.iter().rev().cloned().collect();
            v.state = live.state.clone();
            v.waiting = live.waiting.clone();
            v.rejected_by_reason = live
                .rejected_by_reason
                .iter()
                .map(|(k, n)| (k.clone(), *n))
                .collect();
        }
        v.paused = live.paused.clone();
        // Bytes are the daemon's totals: they count from its start, across runs.
        v.bytes_sent = live.bytes_sent;
        v.bytes_received = live.bytes_received;
        match rec.outcome {
            Outcome::Running(what) => {
                if !same_run || v.state.is_empty() || v.state == "idle" {
                    // Before the session reports, the launch says what it waits for.
                    v.waiting = if live.paused.is_empty() {
                        what.clone()
                    } else {
                        format!("{what} ({})", live.paused)
                    };
                    v.state = what;
                }
            }
            Outcome::Finished {
                root,
                checkpoint_root,
                eval_loss,
                rounds,
            } => {
                v.state = "finished".into();
                v.waiting.clear();
                // The run's end is its last commit, whatever the session saw last.
                v.committed_round = v.committed_round.max(rounds);
                v.committed_root = hex::encode(root);
                if eval_loss.is_finite() {
                    v.eval_loss = eval_loss;
                }
                v.checkpoint_root = checkpoint_root.unwrap_or_default();
            }
            Outcome::Failed(e) => {
                v.state = "failed".into();
                v.waiting.clear();
                v.error = e;
            }
        }
        v
    }

    /// The run this daemon coordinates now, if any: (run id, state).
    pub fn coordinating(&self) -> Option<[u8; 32]> {
        let st = self.lock();
        match &st.current {
            Some(r)
                if r.role == Role::Coordinator
                    && r.run_id != [0; 32]
                    && matches!(r.outcome, Outcome::Running(_)) =>
            {
                Some(r.run_id)
            }
            _ => None,
        }
    }
}

/// The prefix of a run invite; the digit is the invite format's version.
/// Successors a run may name (the signed run manifest holds them all).
pub const MAX_SUCCESSORS: usize = 16;

pub const RUN_INVITE_PREFIX: &str = "potluck1:";
/// The invite format this build writes and reads.
pub const RUN_INVITE_VERSION: u32 = 1;
/// Longest run invite text read; checked before decoding anything.
pub const MAX_RUN_INVITE_CHARS: usize = 8 * 1024;
/// Coordinator addresses an invite carries at most.
pub const MAX_INVITE_ADDRS: usize = 16;
const MAX_ADDR_BYTES: usize = 512;
const MAX_SWARM_INVITE_BYTES: usize = crate::membership::MEMBERSHIP_LIMIT;

/// Why a run invite was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("the invite is empty")]
    Empty,
    #[error(
        "the invite is {0} characters, more than the limit of {MAX_RUN_INVITE_CHARS}: it was not made by `potluck invite`"
    )]
    TooLong(usize),
    #[error(
        "this is a swarm membership invite, not a run invite: use `potluck swarm join` with it, or ask for the output of `potluck invite`"
    )]
    SwarmInvite,
    #[error(
        "not a run invite (it should start with `{RUN_INVITE_PREFIX}`): paste the whole line `potluck invite` printed"
    )]
    NotAnInvite,
    #[error(
        "the invite is of format version {0}, but this potluck reads version {RUN_INVITE_VERSION}: the older side should upgrade"
    )]
    Version(String),
    #[error("the invite is damaged ({0}): copy the whole line again")]
    Damaged(String),
    #[error("the invite's {field} is invalid: {reason}")]
    Field { field: &'static str, reason: String },
}

/// A decoded run invite: the run, its coordinator and how to reach it, and (for a private
/// swarm) the membership invite to redeem first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInvite {
    pub run_id: [u8; 32],
    pub coordinator: PeerId,
    pub addrs: Vec<Multiaddr>,
    /// An encoded [`v1::Invite`].
    pub swarm_invite: Option<Vec<u8>>,
}

impl RunInvite {
    /// The text form: [`RUN_INVITE_PREFIX`] then base64url (no padding) of a
    /// [`v1::RunInvite`]. Addresses beyond [`MAX_INVITE_ADDRS`] are left out.
    pub fn encode(&self) -> String {
        let msg = v1::RunInvite {
            version: RUN_INVITE_VERSION,
            run_id: self.run_id.to_vec(),
            coordinator_peer_id: self.coordinator.to_bytes(),
            coordinator_addrs: self
                .addrs
                .iter()
                .map(|a| a.to_vec())
                .filter(|a| a.len() <= MAX_ADDR_BYTES)
                .take(MAX_INVITE_ADDRS)
                .collect(),
            swarm_invite: self.swarm_invite.clone().unwrap_or_default(),
        };
        format!(
            "{RUN_INVITE_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(msg.encode_to_vec())
        )
    }

    /// Parses the text form, checking its size before decoding and every field after.
    pub fn parse(text: &str) -> Result<Self, InviteError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(InviteError::Empty);
        }
        if text.len() > MAX_RUN_INVITE_CHARS {
            return Err(InviteError::TooLong(text.len()));
        }
        let Some(body) = text.strip_prefix(RUN_INVITE_PREFIX) else {
            if let Some(rest) = text.strip_prefix("potluck")
                && let Some((version, _)) = rest.split_once(':')
                && !version.is_empty()
                && version.len() <= 10
                && version.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(InviteError::Version(version.to_string()));
            }
            if crate::membership::Invite::parse(text).is_ok() {
                return Err(InviteError::SwarmInvite);
            }
            return Err(InviteError::NotAnInvite);
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| InviteError::Damaged(format!("not base64url: {e}")))?;
        let msg = v1::RunInvite::decode(bytes.as_slice())
            .map_err(|e| InviteError::Damaged(format!("not a run invite message: {e}")))?;
        if msg.version != RUN_INVITE_VERSION {
            return Err(InviteError::Version(msg.version.to_string()));
        }
        let field = |field: &'static str, reason: String| InviteError::Field { field, reason };
        let run_id: [u8; 32] = msg
            .run_id
            .as_slice()
            .try_into()
            .map_err(|_| field("run id", format!("{} bytes, not 32", msg.run_id.len())))?;
        let coordinator = PeerId::from_bytes(&msg.coordinator_peer_id)
            .map_err(|e| field("coordinator peer id", e.to_string()))?;
        if msg.coordinator_addrs.len() > MAX_INVITE_ADDRS {
            return Err(field(
                "address list",
                format!(
                    "{} addresses, more than {MAX_INVITE_ADDRS}",
                    msg.coordinator_addrs.len()
                ),
            ));
        }
        let addrs = msg
            .coordinator_addrs
            .into_iter()
            .map(|b| Multiaddr::try_from(b).map_err(|e| field("address", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let swarm_invite = if msg.swarm_invite.is_empty() {
            None
        } else {
            if msg.swarm_invite.len() > MAX_SWARM_INVITE_BYTES {
                return Err(field(
                    "membership invite",
                    format!("{} bytes", msg.swarm_invite.len()),
                ));
            }
            let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&msg.swarm_invite);
            crate::membership::Invite::parse(&text)
                .map_err(|e| field("membership invite", e.to_string()))?;
            Some(msg.swarm_invite)
        };
        Ok(Self {
            run_id,
            coordinator,
            addrs,
            swarm_invite,
        })
    }

    /// The membership invite in the text form `potluck swarm join` and
    /// [`crate::net::Client::join`] take.
    pub fn swarm_invite_text(&self) -> Option<String> {
        self.swarm_invite
            .as_ref()
            .map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
    }

    /// The coordinator's addresses, each ending in its `/p2p/` id, ready to dial.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        self.addrs
            .iter()
            .map(|a| with_peer(a.clone(), self.coordinator))
            .collect()
    }
}

/// `addr` ending in `/p2p/peer` (added when missing).
pub fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(_)) => addr,
        _ => addr.with(libp2p::multiaddr::Protocol::P2p(peer)),
    }
}

/// Why the ledgers could not be listed at all (a single bad entry is reported inside the
/// listing instead).
#[derive(Debug, thiserror::Error)]
pub enum LedgerListError {
    #[error(
        "no runs under {0}: this data dir has not taken part in a run (or give the right --data-dir)"
    )]
    NoRuns(PathBuf),
    #[error("no run matching '{0}' under {1}")]
    NoSuchRun(String, PathBuf),
    #[error("'{0}' matches several runs; give more of the run id")]
    Ambiguous(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One committed round as the ledger records it.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerEntryView {
    pub round: u64,
    /// Hex of the checkpoint's root; empty when the entry could not be read.
    pub root: String,
    pub parent_round: Option<u64>,
    pub parent_root: Option<String>,
    pub contributors: usize,
    pub signatures: usize,
    pub coordinator_signed: bool,
    pub replica_signatures: usize,
    /// Whether `checkpoints/<round>` is still on disk (retention prunes old ones).
    pub checkpoint_present: bool,
    /// Why the entry could not be read, if it could not.
    pub error: Option<String>,
}

/// The verdict on a ledger's chain of parents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum ChainVerdict {
    /// Every link checked; `anchored` says whether the run manifest (`run.pb`: genesis root
    /// and allowed coordinator keys) was found and checked too.
    Ok {
        entries: usize,
        anchored: bool,
    },
    Empty,
    Broken {
        round: u64,
        reason: String,
    },
}

/// The ledger of one run directory.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerReport {
    /// The run directory's name (hex of the run id).
    pub run: String,
    pub run_dir: PathBuf,
    /// Where the signed run manifest was found, if anywhere.
    pub run_manifest: Option<PathBuf>,
    pub entries: Vec<LedgerEntryView>,
    /// Files in the ledger directory that are not entries (left alone).
    pub ignored: Vec<String>,
    pub chain: ChainVerdict,
}

fn lio(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerListError + '_ {
    move |source| LedgerListError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Lists the ledgers of the runs under `data_dir/runs/`, or only of the run whose id starts
/// with `run` (hex).
pub fn list_ledgers(
    data_dir: &Path,
    run: Option<&str>,
) -> Result<Vec<LedgerReport>, LedgerListError> {
    let runs = data_dir.join(RUNS_DIR);
    let rd = match std::fs::read_dir(&runs) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LedgerListError::NoRuns(data_dir.to_path_buf()));
        }
        Err(e) => return Err(lio(&runs)(e)),
    };
    let mut dirs = Vec::new();
    for e in rd {
        let e = e.map_err(lio(&runs))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.file_type().map_err(lio(&e.path()))?.is_dir() {
            continue;
        }
        dirs.push((name, e.path()));
    }
    dirs.sort();
    if let Some(want) = run {
        let want = want.trim().to_ascii_lowercase();
        dirs.retain(|(name, _)| name.starts_with(&want));
        match dirs.len() {
            0 => return Err(LedgerListError::NoSuchRun(want, runs)),
            1 => {}
            _ if dirs.iter().any(|(n, _)| *n == want) => dirs.retain(|(n, _)| *n == want),
            _ => return Err(LedgerListError::Ambiguous(want)),
        }
    }
    if dirs.is_empty() {
        return Err(LedgerListError::NoRuns(data_dir.to_path_buf()));
    }
    dirs.into_iter()
        .map(|(name, dir)| read_ledger(&name, &dir))
        .collect()
}

/// Finds the signed run manifest of a run directory: `run.pb` in it, else in the newest
/// checkpoint that has one.
fn find_run_manifest(run_dir: &Path) -> Option<(PathBuf, SignedRunManifest)> {
    let read = |p: &Path| {
        let bytes =
            crate::fsutil::read_limited(p, super::manifest::MAX_MANIFEST_BYTES as u64 * 2).ok()?;
        SignedRunManifest::decode(&bytes).ok()
    };
    let top = run_dir.join(RUN_FILE);
    if let Some(m) = read(&top) {
        return Some((top, m));
    }
    let ck = run_dir.join(potluck_coordinator::store::CHECKPOINTS_DIR);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&ck)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    names.into_iter().rev().find_map(|d| {
        let p = d.join(RUN_FILE);
        read(&p).map(|m| (p, m))
    })
}

fn chain_error(round: u64, e: VerifyError) -> ChainVerdict {
    match e {
        VerifyError::Chain { round, reason } => ChainVerdict::Broken { round, reason },
        other => ChainVerdict::Broken {
            round,
            reason: other.to_string(),
        },
    }
}

/// Reads one run directory's ledger entry by entry, holding at most two manifests at once,
/// and checks the chain the way the coordinator crate's `verify_chain` does.
fn read_ledger(name: &str, run_dir: &Path) -> Result<LedgerReport, LedgerListError> {
    let ldir = ledger_dir(run_dir);
    let run_manifest = find_run_manifest(run_dir);
    let mut report = LedgerReport {
        run: name.to_string(),
        run_dir: run_dir.to_path_buf(),
        run_manifest: run_manifest.as_ref().map(|(p, _)| p.clone()),
        entries: Vec::new(),
        ignored: Vec::new(),
        chain: ChainVerdict::Empty,
    };
    let rd = match std::fs::read_dir(&ldir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(lio(&ldir)(e)),
    };
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(lio(&ldir))?;
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with('.') {
            continue;
        }
        match fname
            .strip_suffix(".pb")
            .filter(|r| r.len() == 20)
            .and_then(|r| r.parse::<u64>().ok())
        {
            Some(round) => files.push((round, e.path())),
            None => report.ignored.push(fname),
        }
    }
    files.sort();
    report.ignored.sort();
    let mut broken: Option<ChainVerdict> = None;
    let mut prev: Option<SignedManifest> = None;
    let ck = run_dir.join(potluck_coordinator::store::CHECKPOINTS_DIR);
    for (i, (round, path)) in files.iter().enumerate() {
        let checkpoint_present = ck.join(format!("{round:020}")).is_dir();
        let decoded = crate::fsutil::read_limited(
            path,
            potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
        )
        .map_err(|e| e.to_string())
        .and_then(|b| SignedManifest::decode(&b).map_err(|e| e.to_string()))
        .and_then(|m| {
            if m.body().round == *round {
                Ok(m)
            } else {
                Err(format!(
                    "the file of round {round} holds round {}",
                    m.body().round
                ))
            }
        });
        let m = match decoded {
            Ok(m) => m,
            Err(e) => {
                broken.get_or_insert(ChainVerdict::Broken {
                    round: *round,
                    reason: format!("entry {} cannot be read: {e}", path.display()),
                });
                report.entries.push(LedgerEntryView {
                    round: *round,
                    root: String::new(),
                    parent_round: None,
                    parent_root: None,
                    contributors: 0,
                    signatures: 0,
                    coordinator_signed: false,
                    replica_signatures: 0,
                    checkpoint_present,
                    error: Some(e),
                });
                prev = None;
                continue;
            }
        };
        let b = m.body();
        report.entries.push(LedgerEntryView {
            round: b.round,
            root: b.root.to_hex(),
            parent_round: b.parent.map(|(r, _)| r),
            parent_root: b.parent.map(|(_, h)| h.to_hex()),
            contributors: b.contributors.len(),
            signatures: m.signatures().len(),
            coordinator_signed: m.coordinator_signed(),
            replica_signatures: m.replica_signers().count(),
            checkpoint_present,
            error: None,
        });
        if broken.is_some() {
            continue;
        }
        if i == 0 {
            let genesis_ok = b.round == 0
                && b.parent.is_none()
                && run_manifest
                    .as_ref()
                    .is_none_or(|(_, run)| b.root == run.body().genesis_root);
            if !genesis_ok {
                broken = Some(ChainVerdict::Broken {
                    round: b.round,
                    reason: "first entry is not the run's genesis checkpoint (round 0, no parent, the run's genesis root)".into(),
                });
                continue;
            }
        }
        let signed = match &run_manifest {
            Some((_, run)) => check_manifest_against_run(run, &m),
            None if m.coordinator_signed() => Ok(()),
            None => Err(VerifyError::NotCoordinatorSigned),
        };
        if let Err(e) = signed {
            broken = Some(ChainVerdict::Broken {
                round: b.round,
                reason: e.to_string(),
            });
            continue;
        }
        if let Some(p) = &prev
            && let Err(e) = check_link(p, &m)
        {
            broken = Some(chain_error(b.round, e));
            continue;
        }
        prev = Some(m);
    }
    report.chain = match broken {
        Some(v) => v,
        None if files.is_empty() => ChainVerdict::Empty,
        None => ChainVerdict::Ok {
            entries: files.len(),
            anchored: run_manifest.is_some(),
        },
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunInvite {
        RunInvite {
            run_id: [7; 32],
            coordinator: PeerId::random(),
            addrs: vec![
                "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap(),
                "/ip6/::1/tcp/4001".parse().unwrap(),
            ],
            swarm_invite: None,
        }
    }

    #[test]
    fn invite_round_trips_and_adds_the_peer_to_addresses() {
        let inv = sample();
        let text = inv.encode();
        assert!(text.starts_with(RUN_INVITE_PREFIX));
        assert!(text.len() < 400, "{} chars", text.len());
        assert_eq!(RunInvite::parse(&format!("  {text}\n")).unwrap(), inv);
        for a in inv.dial_addrs() {
            assert_eq!(
                a.iter().last(),
                Some(libp2p::multiaddr::Protocol::P2p(inv.coordinator))
            );
        }
    }

    #[test]
    fn hostile_invites_get_clear_errors() {
        assert_eq!(RunInvite::parse("  "), Err(InviteError::Empty));
        let huge = format!("{RUN_INVITE_PREFIX}{}", "A".repeat(1 << 20));
        assert!(matches!(
            RunInvite::parse(&huge),
            Err(InviteError::TooLong(_))
        ));
        assert_eq!(
            RunInvite::parse("hello world"),
            Err(InviteError::NotAnInvite)
        );
        assert_eq!(
            RunInvite::parse("potluck7:AAAA"),
            Err(InviteError::Version("7".into()))
        );
        assert!(matches!(
            RunInvite::parse("potluck1:!!!!"),
            Err(InviteError::Damaged(_))
        ));
        assert!(matches!(
            RunInvite::parse("potluck1:_____________"),
            Err(InviteError::Damaged(_))
        ));
        // A well-formed message of a future version inside a v1 prefix.
        let b64 = |m: v1::RunInvite| {
            format!(
                "{RUN_INVITE_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(m.encode_to_vec())
            )
        };
        let good = v1::RunInvite {
            version: 1,
            run_id: vec![1; 32],
            coordinator_peer_id: PeerId::random().to_bytes(),
            coordinator_addrs: vec![],
            swarm_invite: vec![],
        };
        assert!(RunInvite::parse(&b64(good.clone())).is_ok());
        assert_eq!(
            RunInvite::parse(&b64(v1::RunInvite {
                version: 2,
                ..good.clone()
            })),
            Err(InviteError::Version("2".into()))
        );
        let field_err = |m: v1::RunInvite| match RunInvite::parse(&b64(m)) {
            Err(InviteError::Field { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field_err(v1::RunInvite {
                run_id: vec![1; 31],
                ..good.clone()
            }),
            "run id"
        );
        assert_eq!(
            field_err(v1::RunInvite {
                coordinator_peer_id: vec![0xff; 10],
                ..good.clone()
            }),
            "coordinator peer id"
        );
        assert_eq!(
            field_err(v1::RunInvite {
                coordinator_addrs: vec![vec![0xff, 0xff, 0xff]],
                ..good.clone()
            }),
            "address"
        );
        assert_eq!(
            field_err(v1::RunInvite {
                coordinator_addrs: vec![
                    "/ip4/1.2.3.4/tcp/1".parse::<Multiaddr>().unwrap().to_vec();
                    MAX_INVITE_ADDRS + 1
                ],
                ..good.clone()
            }),
            "address list"
        );
        assert_eq!(
            field_err(v1::RunInvite {
                swarm_invite: vec![1, 2, 3],
                ..good.clone()
            }),
            "membership invite"
        );
    }

    #[test]
    fn swarm_invite_is_told_apart() {
        let owner = libp2p::identity::Keypair::generate_ed25519();
        let mut st = crate::membership::SwarmState::default();
        let (text, _, _) = st.create_invite(
            &owner,
            &["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
            1,
            60_000,
            &mut rand::rng(),
        );
        assert_eq!(RunInvite::parse(&text), Err(InviteError::SwarmInvite));
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&text)
            .unwrap();
        let inv = RunInvite {
            swarm_invite: Some(bytes),
            ..sample()
        };
        let back = RunInvite::parse(&inv.encode()).unwrap();
        assert_eq!(back.swarm_invite_text().as_deref(), Some(text.as_str()));
    }

    proptest::proptest! {
        #[test]
        fn random_text_never_panics(s in ".{0,600}") {
            let _ = RunInvite::parse(&s);
            let _ = RunInvite::parse(&format!("{RUN_INVITE_PREFIX}{s}"));
        }

        #[test]
        fn any_invite_round_trips(
            id in proptest::array::uniform32(proptest::num::u8::ANY),
            ports in proptest::collection::vec(1u16.., 0..=MAX_INVITE_ADDRS),
        ) {
            let inv = RunInvite {
                run_id: id,
                coordinator: PeerId::random(),
                addrs: ports
                    .iter()
                    .map(|p| format!("/ip4/10.0.0.1/udp/{p}/quic-v1").parse().unwrap())
                    .collect(),
                swarm_invite: None,
            };
            let text = inv.encode();
            proptest::prop_assert!(text.len() <= MAX_RUN_INVITE_CHARS);
            proptest::prop_assert_eq!(RunInvite::parse(&text).unwrap(), inv);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let text = format!(
                "{RUN_INVITE_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b)
            );
            let _ = RunInvite::parse(&text);
        }
    }
}
