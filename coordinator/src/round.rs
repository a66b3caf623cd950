//! The run state machine: admits peers, opens rounds, collects the replicas' reports and
//! commits the weight root that a quorum of the round's participants holds.
//!
//! It is pure: the daemon calls `handle_*` with the current time in milliseconds (any
//! monotonic epoch the daemon likes, as long as it survives restarts, e.g. Unix time) and
//! drains decisions with [`RunMachine::poll_action`]; [`RunMachine::poll_timeout`] says
//! when to call [`RunMachine::handle_timeout`] next.
//!
//! # Quorum
//! The participants of a round are the members at the moment it opens; that set never
//! changes while the round is open, so peers that leave do not lower the bar. A root is
//! committed when at least [`quorum`]`(n) = n / 2 + 1` of the `n` participants reported it: a
//! strict majority, so two different roots can never both reach quorum in one round.
//! For small swarms this means: 1 peer commits alone, 2 friends must both agree, 3 need 2.
//! When two friends disagree or one crashes, the round fails at its deadline, the silent
//! peer is dropped as a straggler, and the next round (with the survivor alone) can commit.
//!
//! # Naming every contribution
//! Reaching quorum decides the round's root, but the commit waits a little longer for the
//! participants still present that have not reported yet (at most `commit_grace_ms`, never
//! past the round's deadline; a participant that leaves is not waited for), so that the
//! checkpoint's provenance names every replica whose update went into the agreed state, not
//! only the first quorum to report. In the usual case every replica reports within
//! milliseconds of the others and the commit follows the last report at once.
//!
//! Round numbers strictly increase with every round opened, failed rounds included, so a
//! late report of an earlier attempt can never count for a later one. Commits therefore
//! may skip round numbers; each commit's parent is the previous commit.

use crate::{Hash32, PeerId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The smallest number of agreeing participants that commits a round of `participants`.
pub fn quorum(participants: usize) -> usize {
    participants / 2 + 1
}

/// Most data shards a run may have (the shard ring is rebuilt when a round opens).
pub const MAX_SHARDS: u32 = 1 << 20;

/// Settings of one run's coordinator. Plain data, validated by [`RunConfig::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The run's id (blake3 of its signed run manifest).
    pub run_id: Hash32,
    /// A round opens only when at least this many peers are members.
    pub min_participants: usize,
    /// Joins beyond this many members are refused.
    pub max_members: usize,
    /// How long a round stays open for reports, in milliseconds.
    pub round_duration_ms: u64,
    /// Number of data shards the data set is cut into.
    pub num_shards: u32,
    /// Reports claiming more tokens than this are refused.
    pub max_tokens_per_report: u64,
    /// How long a root that reached quorum waits for the reports of the participants still
    /// present before it is committed without them (see the module docs).
    #[serde(default = "default_commit_grace_ms")]
    pub commit_grace_ms: u64,
}

fn default_commit_grace_ms() -> u64 {
    2_000
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run_id: Hash32::default(),
            min_participants: 1,
            max_members: 100_000,
            round_duration_ms: 10 * 60 * 1000,
            num_shards: 4096,
            max_tokens_per_report: 1 << 40,
            commit_grace_ms: default_commit_grace_ms(),
        }
    }
}

/// Why a [`RunConfig`] is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("min_participants must be at least 1")]
    NoParticipants,
    #[error("max_members ({max}) must be at least min_participants ({min})")]
    MembersBelowMin { min: usize, max: usize },
    #[error("round_duration_ms must be positive")]
    ZeroDuration,
    #[error("num_shards must be between 1 and {MAX_SHARDS}")]
    NoShards,
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_participants == 0 {
            return Err(ConfigError::NoParticipants);
        }
        if self.max_members < self.min_participants {
            return Err(ConfigError::MembersBelowMin {
                min: self.min_participants,
                max: self.max_members,
            });
        }
        if self.round_duration_ms == 0 {
            return Err(ConfigError::ZeroDuration);
        }
        if self.num_shards == 0 || self.num_shards > MAX_SHARDS {
            return Err(ConfigError::NoShards);
        }
        Ok(())
    }
}

/// What a replica says at the end of a round: the work it did and the weights it now holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub peer: PeerId,
    pub round: u64,
    pub tokens: u64,
    /// blake3 of the update (pseudo-gradient) this peer contributed.
    pub update_hash: Hash32,
    /// Root of the weights this peer holds after applying the round's aggregated update.
    pub weight_root: Hash32,
}

/// One agreeing participant of a committed round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contributor {
    pub peer: PeerId,
    pub tokens: u64,
    pub update_hash: Hash32,
}

/// A committed checkpoint of the run. Round 0 is the run's initial checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub round: u64,
    pub root: Hash32,
    /// The previous commit's root and round; `None` only for the initial checkpoint.
    pub parent: Option<(u64, Hash32)>,
    /// How many peers were participants of the round.
    pub participants: u32,
    /// The participants that reported `root`, sorted by peer id.
    pub agreeing: Vec<Contributor>,
}

/// What a newly opened round asks of its participants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub round: u64,
    /// The committed checkpoint every participant starts from.
    pub base_round: u64,
    pub base_root: Hash32,
    pub opened_at_ms: u64,
    pub deadline_ms: u64,
    /// Every participant with its data shard, sorted by peer id.
    pub assignment: Vec<(PeerId, u32)>,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    Full { max_members: usize },
}

/// Why a round ended without a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailReason {
    /// The deadline passed before any root had a quorum.
    Deadline { reported: u32, quorum: u32 },
    /// Every participant still present reported and no root can reach quorum any more.
    NoQuorumPossible { best: u32, quorum: u32 },
}

/// Why a member was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropReason {
    /// It did not report before the round's deadline.
    Straggler { round: u64 },
}

/// A decision for the daemon to carry out (announce, send, persist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Admitted(PeerId),
    Refused {
        peer: PeerId,
        reason: RefuseReason,
    },
    RoundOpened(RoundPlan),
    Committed(CommitRecord),
    RoundFailed {
        round: u64,
        reason: FailReason,
    },
    Dropped {
        peer: PeerId,
        reason: DropReason,
    },
    /// The peer reported a root other than the committed one: it must fetch `root`.
    Resync {
        peer: PeerId,
        round: u64,
        root: Hash32,
    },
}

/// A report that was not counted, and why. These are normal on a real network (late,
/// reordered, from peers that were dropped); the daemon logs them and may score the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRejected {
    #[error("{peer} is not a member of the run")]
    NotAMember { peer: PeerId },
    #[error("no round is open (report for round {round})")]
    NoOpenRound { round: u64 },
    #[error("report for round {got} but round {open} is open")]
    WrongRound { got: u64, open: u64 },
    #[error("{peer} is not a participant of round {round}")]
    NotAParticipant { peer: PeerId, round: u64 },
    #[error("{peer} already reported a different result for round {round}")]
    Conflicting { peer: PeerId, round: u64 },
    #[error("report claims {tokens} tokens, more than the limit of {limit}")]
    TooManyTokens { tokens: u64, limit: u64 },
}

/// A counted report, or a harmless repeat of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    Counted,
    Duplicate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenRound {
    plan: RoundPlan,
    participants: BTreeSet<PeerId>,
    reports: BTreeMap<PeerId, Report>,
    /// Kept as a list for serialisation; small (distinct roots reported).
    tally: Vec<(Hash32, u32)>,
    /// Participants that are still members and have not reported; kept up to date so
    /// that a report costs O(log n), not O(n).
    outstanding: usize,
    /// The root that reached quorum and when it is committed at the latest (the others'
    /// reports are awaited until then).
    settle: Option<(Hash32, u64)>,
}

impl OpenRound {
    fn count(&mut self, root: Hash32) -> u32 {
        if let Some(e) = self.tally.iter_mut().find(|(r, _)| *r == root) {
            e.1 += 1;
            e.1
        } else {
            self.tally.push((root, 1));
            1
        }
    }

    fn best(&self) -> Option<(Hash32, u32)> {
        self.tally.iter().copied().max_by_key(|(r, c)| (*c, *r))
    }
}

/// The coordinator of one run. See the module docs for the rules it follows.
#[derive(Debug, Clone)]
pub struct RunMachine {
    config: RunConfig,
    members: BTreeSet<PeerId>,
    next_round: u64,
    head: CommitRecord,
    open: Option<OpenRound>,
    actions: VecDeque<Action>,
}

/// Everything a [`RunMachine`] needs to continue after a restart. Serialised by [`crate::store`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSnapshot {
    pub config: RunConfig,
    pub members: Vec<PeerId>,
    pub next_round: u64,
    pub head: CommitRecord,
    open: Option<OpenRoundSnapshot>,
    pub pending_actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OpenRoundSnapshot {
    plan: RoundPlan,
    reports: Vec<Report>,
    /// When a root that reached quorum is committed at the latest.
    #[serde(default)]
    settle_at: Option<u64>,
}

/// Why a snapshot cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid config in snapshot: {0}")]
    Config(#[from] ConfigError),
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(&'static str),
}

impl RunMachine {
    /// A new run whose initial checkpoint (round 0) has root `genesis_root`.
    pub fn new(config: RunConfig, genesis_root: Hash32) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(RunMachine {
            config,
            members: BTreeSet::new(),
            next_round: 1,
            head: CommitRecord {
                round: 0,
                root: genesis_root,
                parent: None,
                participants: 0,
                agreeing: Vec::new(),
            },
            open: None,
            actions: VecDeque::new(),
        })
    }

    /// A coordinator that continues a run from its last commit `head` (e.g. a successor
    /// resuming from the replicated ledger), with no members yet and round numbers from
    /// `next_round` on.
    pub fn from_head(
        config: RunConfig,
        head: CommitRecord,
        next_round: u64,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(RunMachine {
            config,
            members: BTreeSet::new(),
            next_round: next_round.max(head.round + 1),
            head,
            open: None,
            actions: VecDeque::new(),
        })
    }

    /// Continues a run from a snapshot. A commit is reported by a restart only after the
    /// daemon persisted it; an open round resumes with its reports and deadline.
    pub fn resume(s: RunSnapshot) -> Result<Self, RestoreError> {
        s.config.validate()?;
        if s.next_round <= s.head.round {
            return Err(RestoreError::Inconsistent(
                "next round not after the last commit",
            ));
        }
        let members: BTreeSet<PeerId> = s.members.into_iter().collect();
        if members.len() > s.config.max_members {
            return Err(RestoreError::Inconsistent("more members than allowed"));
        }
        let open = match s.open {
            None => None,
            Some(o) => {
                if o.plan.round + 1 != s.next_round || o.plan.base_round != s.head.round {
                    return Err(RestoreError::Inconsistent(
                        "open round does not follow the head",
                    ));
                }
                let participants: BTreeSet<PeerId> =
                    o.plan.assignment.iter().map(|(p, _)| p.clone()).collect();
                if participants.len() != o.plan.assignment.len() {
                    return Err(RestoreError::Inconsistent("participant listed twice"));
                }
                let mut round = OpenRound {
                    plan: o.plan,
                    participants,
                    reports: BTreeMap::new(),
                    tally: Vec::new(),
                    outstanding: 0,
                    settle: None,
                };
                for r in o.reports {
                    if r.round != round.plan.round || !round.participants.contains(&r.peer) {
                        return Err(RestoreError::Inconsistent("report outside its round"));
                    }
                    if round.reports.contains_key(&r.peer) {
                        return Err(RestoreError::Inconsistent("two reports by one peer"));
                    }
                    round.count(r.weight_root);
                    round.reports.insert(r.peer.clone(), r);
                }
                round.outstanding = round
                    .participants
                    .iter()
                    .filter(|p| members.contains(*p) && !round.reports.contains_key(*p))
                    .count();
                if let Some((root, c)) = round.best()
                    && c as usize >= quorum(round.participants.len())
                {
                    let Some(at) = o.settle_at else {
                        return Err(RestoreError::Inconsistent("open round already has quorum"));
                    };
                    round.settle = Some((root, at));
                }
                Some(round)
            }
        };
        Ok(RunMachine {
            config: s.config,
            members,
            next_round: s.next_round,
            head: s.head,
            open,
            actions: s.pending_actions.into(),
        })
    }

    /// The state to persist; pending actions included, so that a crash between persisting
    /// and announcing does not lose an announcement.
    pub fn snapshot(&self) -> RunSnapshot {
        RunSnapshot {
            config: self.config.clone(),
            members: self.members.iter().cloned().collect(),
            next_round: self.next_round,
            head: self.head.clone(),
            open: self.open.as_ref().map(|o| OpenRoundSnapshot {
                plan: o.plan.clone(),
                reports: o.reports.values().cloned().collect(),
                settle_at: o.settle.map(|(_, at)| at),
            }),
            pending_actions: self.actions.iter().cloned().collect(),
        }
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// The last committed checkpoint.
    pub fn head(&self) -> &CommitRecord {
        &self.head
    }

    pub fn members(&self) -> impl Iterator<Item = &PeerId> {
        self.members.iter()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The open round's plan, if a round is open.
    pub fn open_round(&self) -> Option<&RoundPlan> {
        self.open.as_ref().map(|o| &o.plan)
    }

    /// Admits a peer; a member that joins again is welcomed again (it reconnected). It takes
    /// part from the next round on.
    pub fn handle_join(&mut self, peer: PeerId, now_ms: u64) {
        self.check_deadline(now_ms);
        if !self.members.contains(&peer) {
            if self.members.len() >= self.config.max_members {
                self.actions.push_back(Action::Refused {
                    peer,
                    reason: RefuseReason::Full {
                        max_members: self.config.max_members,
                    },
                });
            } else {
                if let Some(open) = self.open.as_mut()
                    && open.participants.contains(&peer)
                    && !open.reports.contains_key(&peer)
                {
                    open.outstanding += 1;
                }
                self.members.insert(peer.clone());
                self.actions.push_back(Action::Admitted(peer));
            }
        } else {
            // A member that joins again reconnected (its daemon lost the old stream before
            // we noticed): it is welcomed again, and keeps its place in an open round.
            self.actions.push_back(Action::Admitted(peer));
        }
        self.maybe_open(now_ms);
    }

    /// A peer left (said goodbye, or the daemon saw its connections close).
    pub fn handle_leave(&mut self, peer: &PeerId, now_ms: u64) {
        self.check_deadline(now_ms);
        if self.members.remove(peer)
            && let Some(open) = self.open.as_mut()
            && open.participants.contains(peer)
            && !open.reports.contains_key(peer)
        {
            open.outstanding = open.outstanding.saturating_sub(1);
        }
        self.check_settled(now_ms);
        self.check_hopeless();
        self.maybe_open(now_ms);
    }

    /// A replica's end-of-round report.
    pub fn handle_report(
        &mut self,
        report: Report,
        now_ms: u64,
    ) -> Result<ReportOutcome, ReportRejected> {
        self.check_deadline(now_ms);
        let out = self.count_report(report, now_ms);
        self.check_settled(now_ms);
        self.maybe_open(now_ms);
        out
    }

    /// Closes an open round whose deadline passed and opens the next one when possible.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.check_deadline(now_ms);
        self.maybe_open(now_ms);
    }

    /// When the daemon must call [`RunMachine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.open.as_ref().map(|o| match o.settle {
            Some((_, at)) => at.min(o.plan.deadline_ms),
            None => o.plan.deadline_ms,
        })
    }

    /// The oldest pending decision, without taking it.
    pub fn peek_action(&self) -> Option<&Action> {
        self.actions.front()
    }

    /// The next decision to carry out, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn count_report(
        &mut self,
        report: Report,
        now_ms: u64,
    ) -> Result<ReportOutcome, ReportRejected> {
        if report.tokens > self.config.max_tokens_per_report {
            return Err(ReportRejected::TooManyTokens {
                tokens: report.tokens,
                limit: self.config.max_tokens_per_report,
            });
        }
        if !self.members.contains(&report.peer) {
            return Err(ReportRejected::NotAMember { peer: report.peer });
        }
        let Some(open) = self.open.as_mut() else {
            return Err(ReportRejected::NoOpenRound {
                round: report.round,
            });
        };
        if report.round != open.plan.round {
            return Err(ReportRejected::WrongRound {
                got: report.round,
                open: open.plan.round,
            });
        }
        if !open.participants.contains(&report.peer) {
            return Err(ReportRejected::NotAParticipant {
                peer: report.peer,
                round: report.round,
            });
        }
        if let Some(prev) = open.reports.get(&report.peer) {
            return if *prev == report {
                Ok(ReportOutcome::Duplicate)
            } else {
                Err(ReportRejected::Conflicting {
                    peer: report.peer,
                    round: report.round,
                })
            };
        }
        let root = report.weight_root;
        let votes = open.count(root);
        open.reports.insert(report.peer.clone(), report);
        open.outstanding = open.outstanding.saturating_sub(1);
        if open.settle.is_none() && votes as usize >= quorum(open.participants.len()) {
            // The root is decided; the reports still outstanding are awaited a little.
            let at = now_ms
                .saturating_add(self.config.commit_grace_ms)
                .min(open.plan.deadline_ms);
            open.settle = Some((root, at));
        } else {
            self.check_hopeless();
        }
        Ok(ReportOutcome::Counted)
    }

    /// Commits the root that reached quorum once every participant still present reported,
    /// or once its grace is over.
    fn check_settled(&mut self, now_ms: u64) {
        let Some(open) = self.open.as_ref() else {
            return;
        };
        if let Some((root, at)) = open.settle
            && (open.outstanding == 0 || now_ms >= at)
        {
            self.commit(root);
        }
    }

    fn commit(&mut self, root: Hash32) {
        let Some(open) = self.open.take() else {
            return;
        };
        let round = open.plan.round;
        let mut agreeing = Vec::new();
        let mut resync = Vec::new();
        for (peer, r) in &open.reports {
            if r.weight_root == root {
                agreeing.push(Contributor {
                    peer: peer.clone(),
                    tokens: r.tokens,
                    update_hash: r.update_hash,
                });
            } else {
                resync.push(Action::Resync {
                    peer: peer.clone(),
                    round,
                    root,
                });
            }
        }
        let record = CommitRecord {
            round,
            root,
            parent: Some((self.head.round, self.head.root)),
            participants: u32::try_from(open.participants.len()).unwrap_or(u32::MAX),
            agreeing,
        };
        self.head = record.clone();
        self.actions.push_back(Action::Committed(record));
        self.actions.extend(resync);
    }

    /// Fails the open round early when no root can reach quorum any more.
    fn check_hopeless(&mut self) {
        let Some(open) = self.open.as_ref() else {
            return;
        };
        if open.settle.is_some() {
            return;
        }
        let q = quorum(open.participants.len());
        let outstanding = open.outstanding;
        let best = open.best().map(|(_, c)| c as usize).unwrap_or(0);
        if best + outstanding < q {
            let round = open.plan.round;
            self.open = None;
            self.actions.push_back(Action::RoundFailed {
                round,
                reason: FailReason::NoQuorumPossible {
                    best: best as u32,
                    quorum: q as u32,
                },
            });
        }
    }

    fn check_deadline(&mut self, now_ms: u64) {
        // A root that reached quorum is committed, never failed at the deadline.
        self.check_settled(now_ms);
        let Some(open) = self.open.as_ref() else {
            return;
        };
        if now_ms < open.plan.deadline_ms {
            return;
        }
        let Some(open) = self.open.take() else {
            return;
        };
        let round = open.plan.round;
        let q = quorum(open.participants.len());
        self.actions.push_back(Action::RoundFailed {
            round,
            reason: FailReason::Deadline {
                reported: open.reports.len() as u32,
                quorum: q as u32,
            },
        });
        for p in &open.participants {
            if !open.reports.contains_key(p) && self.members.remove(p) {
                self.actions.push_back(Action::Dropped {
                    peer: p.clone(),
                    reason: DropReason::Straggler { round },
                });
            }
        }
    }

    fn maybe_open(&mut self, now_ms: u64) {
        if self.open.is_some() || self.members.len() < self.config.min_participants {
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        let assignment = assign_shards(&self.config.run_id, &self.members, self.config.num_shards);
        let plan = RoundPlan {
            round,
            base_round: self.head.round,
            base_root: self.head.root,
            opened_at_ms: now_ms,
            deadline_ms: now_ms.saturating_add(self.config.round_duration_ms),
            assignment,
        };
        self.actions.push_back(Action::RoundOpened(plan.clone()));
        self.open = Some(OpenRound {
            outstanding: self.members.len(),
            participants: self.members.clone(),
            plan,
            reports: BTreeMap::new(),
            tally: Vec::new(),
            settle: None,
        });
    }
}

fn ring_point(tag: &[u8], run_id: &Hash32, item: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"potluck/shard-ring/v1");
    h.update(tag);
    h.update(&run_id.0);
    h.update(item);
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

/// Gives each peer one data shard. Shards and peers sit on a hash ring; a peer takes the
/// first free shard clockwise from its own point. A peer's shard therefore depends only on
/// itself and on the peers just before it on the ring, so a join or leave moves few
/// assignments; shards are distinct while there are fewer peers than shards (then reused).
/// Returned sorted by peer id.
pub fn assign_shards(
    run_id: &Hash32,
    peers: &BTreeSet<PeerId>,
    num_shards: u32,
) -> Vec<(PeerId, u32)> {
    let mut ring: Vec<(u64, u32)> = (0..num_shards.max(1))
        .map(|s| (ring_point(b"shard", run_id, &s.to_be_bytes()), s))
        .collect();
    ring.sort_unstable();
    let mut by_point: Vec<(u64, &PeerId)> = peers
        .iter()
        .map(|p| (ring_point(b"peer", run_id, &p.0), p))
        .collect();
    by_point.sort_unstable();
    let all: BTreeSet<usize> = (0..ring.len()).collect();
    let mut free = all.clone();
    let mut out = Vec::with_capacity(peers.len());
    for (point, peer) in by_point {
        if free.is_empty() {
            free = all.clone();
        }
        let start = ring.partition_point(|(p, _)| *p < point);
        let slot = free
            .range(start..)
            .next()
            .or_else(|| free.iter().next())
            .copied()
            .unwrap_or(0);
        free.remove(&slot);
        out.push((peer.clone(), ring[slot].1));
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn pid(i: usize) -> PeerId {
        PeerId(format!("peer-{i:05}").into_bytes())
    }

    fn root(i: u8) -> Hash32 {
        Hash32([i; 32])
    }

    fn drain(m: &mut RunMachine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn cfg(min: usize) -> RunConfig {
        RunConfig {
            min_participants: min,
            round_duration_ms: 1000,
            ..RunConfig::default()
        }
    }

    fn report(peer: PeerId, round: u64, r: u8) -> Report {
        Report {
            peer,
            round,
            tokens: 10,
            update_hash: root(100),
            weight_root: root(r),
        }
    }

    #[test]
    fn quorum_for_small_swarms() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(2), 2);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(
            RunMachine::new(cfg(0), root(0)).unwrap_err(),
            ConfigError::NoParticipants
        );
        let mut c = cfg(1);
        c.num_shards = 0;
        assert_eq!(c.validate(), Err(ConfigError::NoShards));
        c.num_shards = u32::MAX;
        assert_eq!(c.validate(), Err(ConfigError::NoShards));
    }

    #[test]
    fn two_friends_must_agree_and_a_crash_fails_then_survivor_continues() {
        let mut m = RunMachine::new(cfg(2), root(0)).unwrap();
        m.handle_join(pid(1), 0);
        assert!(
            m.open_round().is_none(),
            "one peer is below min_participants"
        );
        m.handle_join(pid(2), 0);
        let plan = m.open_round().unwrap().clone();
        assert_eq!(plan.round, 1);
        assert_eq!(plan.assignment.len(), 2);
        assert_ne!(
            plan.assignment[0].1, plan.assignment[1].1,
            "distinct shards"
        );
        m.handle_report(report(pid(1), 1, 7), 10).unwrap();
        assert!(m.open_round().is_some(), "one of two is not a quorum");
        // pid(2) crashed: the deadline drops it and fails the round.
        m.handle_timeout(plan.deadline_ms);
        let acts = drain(&mut m);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::RoundFailed { round: 1, .. }))
        );
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Dropped { peer, .. } if *peer == pid(2)))
        );
        // min_participants is 2, so the survivor waits for a friend.
        assert!(m.open_round().is_none());
        m.handle_join(pid(3), plan.deadline_ms + 1);
        let r2 = m.open_round().unwrap().round;
        assert_eq!(r2, 2);
        m.handle_report(report(pid(1), 2, 7), plan.deadline_ms + 2)
            .unwrap();
        m.handle_report(report(pid(3), 2, 7), plan.deadline_ms + 3)
            .unwrap();
        let acts = drain(&mut m);
        let c = acts
            .iter()
            .find_map(|a| match a {
                Action::Committed(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (c.round, c.root, c.parent),
            (2, root(7), Some((0, root(0))))
        );
        assert_eq!(c.agreeing.len(), 2);
    }

    #[test]
    fn dissenter_is_told_to_resync_and_bad_reports_are_refused() {
        let mut m = RunMachine::new(cfg(3), root(0)).unwrap();
        for i in 0..3 {
            m.handle_join(pid(i), 0);
        }
        assert_eq!(
            m.handle_report(report(pid(9), 1, 1), 1),
            Err(ReportRejected::NotAMember { peer: pid(9) })
        );
        assert_eq!(
            m.handle_report(report(pid(0), 2, 1), 1),
            Err(ReportRejected::WrongRound { got: 2, open: 1 })
        );
        m.handle_report(report(pid(0), 1, 5), 1).unwrap();
        assert_eq!(
            m.handle_report(report(pid(0), 1, 5), 1),
            Ok(ReportOutcome::Duplicate)
        );
        assert_eq!(
            m.handle_report(report(pid(0), 1, 6), 1),
            Err(ReportRejected::Conflicting {
                peer: pid(0),
                round: 1
            })
        );
        let mut big = report(pid(1), 1, 1);
        big.tokens = u64::MAX;
        assert!(matches!(
            m.handle_report(big, 1),
            Err(ReportRejected::TooManyTokens { .. })
        ));
        m.handle_report(report(pid(1), 1, 1), 2).unwrap();
        m.handle_report(report(pid(2), 1, 1), 3).unwrap();
        let acts = drain(&mut m);
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Committed(c) if c.root == root(1)))
        );
        assert!(acts.iter().any(
            |a| matches!(a, Action::Resync { peer, root: r, .. } if *peer == pid(0) && *r == root(1))
        ));
        // Round 2 opened right after; a late report of round 1 is refused.
        assert_eq!(
            m.handle_report(report(pid(0), 1, 1), 4),
            Err(ReportRejected::WrongRound { got: 1, open: 2 })
        );
    }

    #[test]
    fn a_member_that_joins_again_is_welcomed_again_and_keeps_its_place() {
        let mut m = RunMachine::new(cfg(2), root(0)).unwrap();
        m.handle_join(pid(1), 0);
        m.handle_join(pid(2), 0);
        let first = drain(&mut m);
        assert!(first.contains(&Action::Admitted(pid(2))));
        assert!(m.open_round().is_some());
        m.handle_join(pid(2), 1);
        assert_eq!(drain(&mut m), vec![Action::Admitted(pid(2))]);
        assert_eq!(m.member_count(), 2);
        // Still a participant of the open round: its report counts toward the commit.
        m.handle_report(report(pid(1), 1, 1), 2).unwrap();
        m.handle_report(report(pid(2), 1, 1), 2).unwrap();
        assert!(
            drain(&mut m)
                .iter()
                .any(|a| matches!(a, Action::Committed(r) if r.round == 1))
        );
    }

    #[test]
    fn round_fails_early_when_quorum_is_out_of_reach() {
        let mut m = RunMachine::new(cfg(3), root(0)).unwrap();
        for i in 0..3 {
            m.handle_join(pid(i), 0);
        }
        m.handle_report(report(pid(0), 1, 1), 1).unwrap();
        m.handle_report(report(pid(1), 1, 2), 1).unwrap();
        m.handle_leave(&pid(2), 2);
        let acts = drain(&mut m);
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::RoundFailed {
                round: 1,
                reason: FailReason::NoQuorumPossible { .. }
            }
        )));
    }

    fn committed(acts: &[Action]) -> Option<CommitRecord> {
        acts.iter().find_map(|a| match a {
            Action::Committed(c) => Some(c.clone()),
            _ => None,
        })
    }

    fn five_in_round_1() -> (RunMachine, RoundPlan) {
        let mut c = cfg(5);
        c.round_duration_ms = 60_000;
        c.commit_grace_ms = 2_000;
        let mut m = RunMachine::new(c, root(0)).unwrap();
        for i in 0..5 {
            m.handle_join(pid(i), 0);
        }
        let plan = m.open_round().unwrap().clone();
        drain(&mut m);
        (m, plan)
    }

    /// Issue 17, finding 4: the ledger named only the first quorum of five agreeing replicas.
    #[test]
    fn a_commit_names_every_agreeing_replica_not_only_the_first_quorum() {
        let (mut m, plan) = five_in_round_1();
        for i in 0..5 {
            m.handle_report(report(pid(i), plan.round, 1), 100 + i as u64)
                .unwrap();
            if i < 4 {
                assert!(committed(&drain(&mut m)).is_none(), "waits for the fifth");
            }
        }
        let c = committed(&drain(&mut m)).expect("committed at the last report");
        assert_eq!(c.agreeing.len(), 5);
    }

    #[test]
    fn a_decided_root_waits_for_present_replicas_only_and_only_for_its_grace() {
        let (mut m, plan) = five_in_round_1();
        for i in 0..3 {
            m.handle_report(report(pid(i), plan.round, 1), 1_000)
                .unwrap();
        }
        assert_eq!(
            m.poll_timeout(),
            Some(3_000),
            "the grace, not the round deadline"
        );
        // One of the two silent replicas leaves: it is not waited for.
        m.handle_leave(&pid(4), 1_500);
        assert!(committed(&drain(&mut m)).is_none());
        m.handle_report(report(pid(3), plan.round, 1), 1_600)
            .unwrap();
        let c = committed(&drain(&mut m)).expect("every present participant reported");
        assert_eq!(c.agreeing.len(), 4);

        // A slow replica is waited for until the grace is over, then left out.
        let (mut m, plan) = five_in_round_1();
        for i in 0..4 {
            m.handle_report(report(pid(i), plan.round, 1), 1_000)
                .unwrap();
        }
        m.handle_timeout(2_999);
        assert!(committed(&drain(&mut m)).is_none());
        m.handle_timeout(3_000);
        let c = committed(&drain(&mut m)).expect("committed when the grace is over");
        assert_eq!(c.agreeing.len(), 4);
        assert!(m.open_round().is_some(), "the next round opened");
    }

    #[test]
    fn a_decided_root_survives_a_restart() {
        let (mut m, plan) = five_in_round_1();
        for i in 0..3 {
            m.handle_report(report(pid(i), plan.round, 1), 1_000)
                .unwrap();
        }
        let json = serde_json::to_vec(&m.snapshot()).unwrap();
        let mut m = RunMachine::resume(serde_json::from_slice(&json).unwrap()).unwrap();
        m.handle_report(report(pid(3), plan.round, 2), 1_100)
            .unwrap();
        m.handle_timeout(3_000);
        let acts = drain(&mut m);
        let c = committed(&acts).expect("committed after the restart");
        assert_eq!((c.root, c.agreeing.len()), (root(1), 3));
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::Resync { peer, .. } if *peer == pid(3)))
        );
    }

    #[test]
    fn ten_thousand_peers_one_round() {
        let n = 10_000;
        let mut c = cfg(n);
        c.num_shards = 16_384;
        let mut m = RunMachine::new(c, root(0)).unwrap();
        for i in 0..n {
            m.handle_join(pid(i), 0);
        }
        let plan = m.open_round().unwrap().clone();
        assert_eq!(plan.assignment.len(), n);
        let shards: BTreeSet<u32> = plan.assignment.iter().map(|(_, s)| *s).collect();
        assert_eq!(shards.len(), n, "fewer peers than shards: all distinct");
        for i in 0..n {
            let r = if i % 10 == 0 { 2 } else { 1 };
            let _ = m.handle_report(report(pid(i), plan.round, r), 5);
        }
        let acts = drain(&mut m);
        let c = acts
            .iter()
            .find_map(|a| match a {
                Action::Committed(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(c.root, root(1));
        assert_eq!(
            c.agreeing.len(),
            n - n / 10,
            "every agreeing report is named once all have reported"
        );
    }

    #[test]
    fn shard_assignment_is_stable_when_a_peer_joins() {
        let run = Hash32([3; 32]);
        let mut peers: BTreeSet<PeerId> = (0..50).map(pid).collect();
        let a: HashMap<PeerId, u32> = assign_shards(&run, &peers, 4096).into_iter().collect();
        peers.insert(pid(999));
        let b: HashMap<PeerId, u32> = assign_shards(&run, &peers, 4096).into_iter().collect();
        let moved = a.iter().filter(|(p, s)| b[*p] != **s).count();
        assert!(moved <= 1, "{moved} peers moved");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Join(usize),
        Leave(usize),
        /// peer, round offset from the open round (-2..=1), root choice, tokens
        Report(usize, i64, u8, u64),
        RepeatLast,
        Advance(u64),
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..8usize).prop_map(Op::Join),
            1 => (0..8usize).prop_map(Op::Leave),
            8 => (0..8usize, -2i64..=1, prop_oneof![4 => Just(1u8), 1 => 2u8..4], 0u64..1000)
                .prop_map(|(p, o, r, t)| Op::Report(p, o, r, t)),
            1 => Just(Op::RepeatLast),
            2 => (0u64..1500).prop_map(Op::Advance),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn rounds_keep_their_invariants(min in 1usize..4, ops in proptest::collection::vec(op(), 1..200)) {
            let mut m = RunMachine::new(cfg(min), root(0)).unwrap();
            let mut now = 0u64;
            let mut last: Option<Report> = None;
            let mut plans: HashMap<u64, RoundPlan> = HashMap::new();
            let mut counted: HashMap<(u64, PeerId), Hash32> = HashMap::new();
            let mut commits: BTreeMap<u64, CommitRecord> = BTreeMap::new();
            let mut prev = (0u64, root(0));
            for op in ops {
                match op {
                    Op::Join(p) => m.handle_join(pid(p), now),
                    Op::Leave(p) => m.handle_leave(&pid(p), now),
                    Op::Report(p, off, r, tokens) => {
                        let open = m.open_round().map(|o| o.round).unwrap_or(m.head().round + 1);
                        let round = (open as i64 + off).max(0) as u64;
                        // Reports of round r are honest about r's root mostly: root(r*?) varies by choice.
                        let rep = Report { peer: pid(p), round, tokens, update_hash: root(50), weight_root: root(r) };
                        last = Some(rep.clone());
                        if let Ok(ReportOutcome::Counted) = m.handle_report(rep.clone(), now) {
                            prop_assert!(counted.insert((round, pid(p)), rep.weight_root).is_none());
                        }
                    }
                    Op::RepeatLast => {
                        if let Some(rep) = last.clone() {
                            let before = counted.len();
                            if let Ok(ReportOutcome::Counted) = m.handle_report(rep.clone(), now) {
                                prop_assert!(counted.insert((rep.round, rep.peer.clone()), rep.weight_root).is_none());
                            }
                            prop_assert!(counted.len() <= before + 1);
                        }
                    }
                    Op::Advance(dt) => { now += dt; m.handle_timeout(now); }
                    Op::Restart => {
                        let json = serde_json::to_vec(&m.snapshot()).unwrap();
                        let snap: RunSnapshot = serde_json::from_slice(&json).unwrap();
                        m = RunMachine::resume(snap).unwrap();
                    }
                }
                while let Some(a) = m.poll_action() {
                    match a {
                        Action::RoundOpened(p) => {
                            prop_assert_eq!(p.base_root, prev.1);
                            prop_assert!(plans.insert(p.round, p).is_none(), "round opened twice");
                        }
                        Action::Committed(c) => {
                            let plan = &plans[&c.round];
                            prop_assert_eq!(c.participants as usize, plan.assignment.len());
                            prop_assert!(c.agreeing.len() >= quorum(plan.assignment.len()), "commit without quorum");
                            for a in &c.agreeing {
                                prop_assert_eq!(counted.get(&(c.round, a.peer.clone())), Some(&c.root));
                            }
                            prop_assert_eq!(c.parent, Some(prev), "parent is the previous commit");
                            prop_assert!(c.round > prev.0);
                            prev = (c.round, c.root);
                            prop_assert!(commits.insert(c.round, c).is_none(), "two commits for one round");
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
