//! The sharded exchange of one round (or one part of a round) as a pure state machine: who
//! sends which slice to whom, when a reducer reduces, when a backup takes a silent
//! reducer's slice over, which frames count, and what the replica applies in the end. The
//! daemon decodes frames, feeds them through `handle_*`, carries out what
//! [`Exchange::poll_action`] asks (sends, reductions, forwards) and waits until
//! [`Exchange::poll_timeout`]; nothing here reads a clock, opens a socket or spawns a task.
//!
//! The scheme: the members are in the coordinator's order; member `i` reduces slice `i`
//! ([`slice_ranges`]) and member `i + 1` (wrapping) is its backup. Every member sends its
//! contribution to slice `i` to member `i` (or an empty one, an abstention, that tells the
//! reducer not to wait for it). A reducer reduces once every member that can still speak
//! has spoken, or at [`Deadlines::reduce_by`] with what it has, and sends the mean to every
//! member, itself included. A slice whose reduction has not arrived by
//! [`Deadlines::reassign_at`] (at once when its reducer is known to be gone) is handed to the
//! backup: every member sends the backup its contribution to that slice again, and the
//! backup reduces it (halfway to the end, or once all live members spoke, but for a gone
//! reducer not before [`GONE_GRACE`] has passed: the news of a death can overtake the dead
//! reducer's last frames); a backup that holds the original reduction forwards it unchanged
//! instead, so replicas agree whenever the backup got the original. At [`Deadlines::finish_by`] the exchange ends; a
//! slice still missing is applied as zero and listed missing.
//!
//! Invariants: a member's first word for a slice is the one that counts (a second
//! contribution, abstention or reduced slice for the same slice never replaces it); each
//! slice is reduced (or forwarded) at most once by this replica; contributions are held only
//! for the replica's own slice and the one it backs, one per member, so memory is bounded by
//! the member count; nothing is waited for past `finish_by` ([`Exchange::poll_timeout`]
//! returns `None` from then on).
//!
//! Parameter groups: one machine exchanges one group (a range of the parameter vector and
//! its own members). Syncing pipeline stages or experts among the peers that serve them is
//! one machine per group, each with its member list; nothing in here assumes the group is
//! the whole model.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

/// Share of an exchange's time after which a reducer reduces whatever it has.
pub const REDUCE_BY: f64 = 0.6;
/// Share of an exchange's time after which a slice still missing goes to its backup.
pub const REASSIGN_AT: f64 = 0.7;
/// Share of an exchange's time after which it ends, whatever is missing; the rest of the
/// time is left for the round's report.
pub const FINISH_BY: f64 = 0.85;
/// Share of an exchange's time a backup waits, after taking over the slice of a reducer
/// known to be gone, before it reduces the slice anew: the news of a death can overtake the
/// dead reducer's last frames, and a backup that reduced before the original reached it
/// would leave the replicas that got the original applying other bytes.
pub const GONE_GRACE: f64 = 0.1;

/// Frames for a later exchange kept at most per peer, whoever sends them: one peer cannot
/// crowd the others' early frames out of the buffer.
pub const EARLY_PER_PEER: usize = 16;

/// Frames for a later exchange kept at most in all, for `members` members.
pub fn early_cap(members: usize) -> usize {
    4 * members + 16
}

/// Contiguous near-equal slices of `len` values for `members` reducers.
pub fn slice_ranges(len: usize, members: usize) -> Vec<Range<usize>> {
    let n = members.max(1);
    (0..n).map(|i| (i * len / n)..((i + 1) * len / n)).collect()
}

/// The deadline phases of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A reducer reduces what it has by then.
    pub reduce_by: Instant,
    /// Slices still missing then are taken over by their backups.
    pub reassign_at: Instant,
    /// The exchange ends then, whatever is missing.
    pub finish_by: Instant,
    /// How long a backup waits for a gone reducer's frames in flight ([`GONE_GRACE`]).
    pub grace: Duration,
}

impl Deadlines {
    /// The phases of an exchange that starts at `from` and may take `span`: 60% for
    /// contributions, backups at 70%, the end at 85%.
    pub fn split(from: Instant, span: Duration) -> Self {
        Deadlines {
            reduce_by: from + span.mul_f64(REDUCE_BY),
            reassign_at: from + span.mul_f64(REASSIGN_AT),
            finish_by: from + span.mul_f64(FINISH_BY),
            grace: span.mul_f64(GONE_GRACE),
        }
    }

    /// When a backup that takes a slice over at `now` reduces it: at the latest halfway
    /// from the reassignment time (or now, if later) to the end; before that once every
    /// live member spoke, but for a slice whose reducer may have died with frames in flight
    /// (`gone`) not before the grace has passed (nor after the latest time).
    fn backing(&self, now: Instant, gone: bool) -> Backing {
        let due = self.reassign_at.max(now)
            + self.finish_by.saturating_duration_since(self.reassign_at) / 2;
        let from = if gone && now < self.reassign_at {
            (now + self.grace).min(due)
        } else {
            now
        };
        Backing { from, due }
    }
}

/// What an exchange is: its place in the run, its members and this replica among them.
#[derive(Debug, Clone)]
pub struct ExchangeConfig<P> {
    pub round: u64,
    /// Which exchange of the round this is (frames carry it).
    pub part: u32,
    /// The members in the coordinator's order; member `i` reduces slice `i`.
    pub members: Vec<P>,
    /// This replica's index in `members`.
    pub me: usize,
    /// Values in the whole update (of this parameter group).
    pub len: usize,
    pub deadlines: Deadlines,
}

/// Why an exchange could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("an exchange needs at least one member")]
    NoMembers,
    #[error("this replica ({me}) is not among the {members} members")]
    NotAMember { me: usize, members: usize },
}

/// Where a frame for `(round, part)` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// For this exchange: feed it to `handle_*`.
    Current,
    /// For a later exchange: keep it for then.
    Buffer,
    /// For a later exchange, but the buffer (or this peer's share of it) is full: drop it.
    Full,
    /// For an earlier exchange: too late, drop it.
    Stale,
}

/// The slice a frame says it carries: offset and length in the whole update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

/// Why a payload could not be used (the daemon's decoder says).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Undecodable(String),
    #[error("non-finite reduced slice")]
    NonFinite,
}

/// Why a frame was refused. Each is a fault of its sender, or a member that is late; the
/// daemon counts and reports it under a fixed [`crate::rejections::RejectReason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a member of round {round}")]
    NotAMember { round: u64 },
    /// A contribution to this replica's own slice after it reduced it.
    #[error("contribution for the wrong slice or too late")]
    Late,
    /// A contribution to a slice this replica neither reduces nor backs, or whose span is
    /// not that slice's.
    #[error("contribution for the wrong slice or too late")]
    WrongSlice,
    /// A reduced slice from a member that neither reduces nor backs it, or with a wrong span.
    #[error("reduced slice it does not own")]
    NotTheReducer,
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

/// What became of a frame that was not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A contribution, kept for the reduction.
    Contribution,
    /// An abstention: the member has no update and is not waited for.
    Abstention,
    /// The member already spoke for this slice; its first word counts.
    Duplicate,
    /// A contribution to a slice this replica backs and already reduced or forwarded.
    AlreadyReduced,
    /// A member asked (by contributing) for a slice this replica backs and holds: the
    /// reduction is forwarded to it alone ([`Action::Forward`]).
    Answered,
    /// A reduced slice, the first for its slice: it is what this replica applies.
    Reduced,
    /// A reduced slice for a slice already held: the first one counts.
    ReducedAgain,
}

/// What the machine asks the daemon to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<P, C, R> {
    /// Send this replica's contribution to `slice` (an abstention when it has none) to `to`.
    SendContribution { slice: usize, to: P },
    /// Reduce `slice` from `contributions` now and send the mean to every member.
    Reduce {
        slice: usize,
        contributions: BTreeMap<P, C>,
    },
    /// Pass a reduced slice on unchanged, to every member (`to: None`) or to one.
    Forward {
        slice: usize,
        reduced: R,
        to: Option<P>,
    },
    /// This replica took over a silent reducer's slice as its backup (for status and logs).
    TookOver { slice: usize },
}

/// What an exchange produced: per slice, the reduction this replica applies, or `None`
/// (applied as zero and reported missing).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<R> {
    pub slices: Vec<Option<R>>,
}

impl<R> Outcome<R> {
    /// The slices nobody reduced in time for this replica.
    pub fn missing(&self) -> Vec<u32> {
        self.slices
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// One sharded exchange at one replica. `P` names a peer, `C` is a decoded contribution
/// and `R` a decoded reduced slice (cloned when forwarded: make it cheap to clone).
#[derive(Debug)]
pub struct Exchange<P, C, R> {
    round: u64,
    part: u32,
    members: Vec<P>,
    member_set: BTreeSet<P>,
    me: usize,
    ranges: Vec<Range<usize>>,
    deadlines: Deadlines,
    /// Contributions per slice: the own slice, and slices backed.
    contributions: BTreeMap<usize, BTreeMap<P, C>>,
    /// Members that said they have no update, per slice.
    abstained: BTreeMap<usize, BTreeSet<P>>,
    /// Members known to be gone (by index, never `me`).
    gone: BTreeSet<usize>,
    /// Slices that can no longer come: their reducer and its backup are gone.
    lost: BTreeSet<usize>,
    /// When each lost slice was first seen lost: it is still taken if it arrives within the
    /// grace (the frames of the dead may be in flight), and waited for until then.
    lost_since: BTreeMap<usize, Instant>,
    /// Slices handed to their backups.
    handed: BTreeSet<usize>,
    /// Gone members whose slices have not been looked at since they went.
    unswept: BTreeSet<usize>,
    /// Every silent slice was handed over at `reassign_at`; none can become silent later.
    swept_all: bool,
    /// Reduced slices as received: the first for each slice.
    reduced: BTreeMap<usize, R>,
    /// Slices this replica reduced or forwarded (its own, and those it took over).
    reduced_sent: BTreeSet<usize>,
    /// Slices taken over as backup, with when they may and must be reduced.
    backing: BTreeMap<usize, Backing>,
    actions: VecDeque<Action<P, C, R>>,
}

/// When a backup reduces a slice it took over.
#[derive(Debug, Clone, Copy)]
struct Backing {
    /// Not before then, even when every live member spoke: a reducer known to be gone may
    /// have frames in flight ([`GONE_GRACE`]).
    from: Instant,
    /// At the latest.
    due: Instant,
}

impl<P: Ord + Clone, C, R: Clone> Exchange<P, C, R> {
    /// Sets up the exchange and queues this replica's contributions to every member.
    pub fn new(config: ExchangeConfig<P>) -> Result<Self, ConfigError> {
        let n = config.members.len();
        if n == 0 {
            return Err(ConfigError::NoMembers);
        }
        if config.me >= n {
            return Err(ConfigError::NotAMember {
                me: config.me,
                members: n,
            });
        }
        let actions = config
            .members
            .iter()
            .enumerate()
            .map(|(slice, to)| Action::SendContribution {
                slice,
                to: to.clone(),
            })
            .collect();
        Ok(Exchange {
            round: config.round,
            part: config.part,
            member_set: config.members.iter().cloned().collect(),
            ranges: slice_ranges(config.len, n),
            members: config.members,
            me: config.me,
            deadlines: config.deadlines,
            contributions: BTreeMap::new(),
            abstained: BTreeMap::new(),
            gone: BTreeSet::new(),
            lost: BTreeSet::new(),
            lost_since: BTreeMap::new(),
            handed: BTreeSet::new(),
            unswept: BTreeSet::new(),
            swept_all: false,
            reduced: BTreeMap::new(),
            reduced_sent: BTreeSet::new(),
            backing: BTreeMap::new(),
            actions,
        })
    }

    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn part(&self) -> u32 {
        self.part
    }

    pub fn members(&self) -> &[P] {
        &self.members
    }

    pub fn me(&self) -> usize {
        self.me
    }

    /// The slice each member reduces, by member index.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    /// The member that reduces `slice` when its reducer is silent.
    pub fn backup_of(&self, slice: usize) -> usize {
        (slice + 1) % self.members.len()
    }

    /// Contributions (abstentions included) heard for this replica's own slice, and how
    /// many it waits for; all of them once it has reduced.
    pub fn collected(&self) -> (usize, usize) {
        let n = self.members.len();
        if self.reduced_sent.contains(&self.me) {
            (n, n)
        } else {
            (self.heard(self.me), n)
        }
    }

    /// Whether `peer` is a member of this exchange.
    pub fn is_member(&self, peer: &P) -> bool {
        self.member_set.contains(peer)
    }

    /// Whether this replica holds the reduction of `slice`.
    pub fn has_reduced(&self, slice: usize) -> bool {
        self.reduced.contains_key(&slice)
    }

    /// Where a frame of `(round, part)` goes, given how many frames for later exchanges
    /// are buffered already: in all, and from its sender (counted only for a frame of a
    /// later exchange, so a current frame costs no look through the buffer).
    pub fn admit(
        &self,
        round: u64,
        part: u32,
        buffered: usize,
        buffered_from_peer: impl FnOnce() -> usize,
    ) -> Admit {
        match (round, part).cmp(&(self.round, self.part)) {
            std::cmp::Ordering::Equal => Admit::Current,
            std::cmp::Ordering::Less => Admit::Stale,
            std::cmp::Ordering::Greater => {
                if buffered < early_cap(self.members.len()) && buffered_from_peer() < EARLY_PER_PEER
                {
                    Admit::Buffer
                } else {
                    Admit::Full
                }
            }
        }
    }

    /// The members now known to be gone, by index (replacing what was known before).
    /// Nobody waits for what they have not sent, and their slices go to their backups at
    /// once. This replica itself is never gone to itself.
    pub fn handle_gone(&mut self, gone: BTreeSet<usize>) {
        let n = self.members.len();
        let gone: BTreeSet<usize> = gone
            .into_iter()
            .filter(|i| *i < n && *i != self.me)
            .collect();
        self.unswept.extend(gone.difference(&self.gone).copied());
        self.lost = gone
            .iter()
            .copied()
            .filter(|i| {
                let b = self.backup_of(*i);
                b == *i || gone.contains(&b)
            })
            .collect();
        self.lost_since.retain(|i, _| self.lost.contains(i));
        self.gone = gone;
    }

    /// A contribution from `from` to `slice`; `decode` is called only if it counts.
    pub fn handle_contribution(
        &mut self,
        now: Instant,
        from: &P,
        slice: u32,
        span: Span,
        decode: impl FnOnce() -> Result<C, Invalid>,
    ) -> Result<Heard, Rejected> {
        let slice = self.contribution_slice(now, from, slice, span)?;
        if let Some(heard) = slice.1 {
            return Ok(heard);
        }
        let slice = slice.0;
        let value = decode()?;
        self.contributions
            .entry(slice)
            .or_default()
            .insert(from.clone(), value);
        Ok(Heard::Contribution)
    }

    /// An empty contribution from `from` to `slice`: it has no update.
    pub fn handle_abstention(
        &mut self,
        now: Instant,
        from: &P,
        slice: u32,
        span: Span,
    ) -> Result<Heard, Rejected> {
        let slice = self.contribution_slice(now, from, slice, span)?;
        if let Some(heard) = slice.1 {
            return Ok(heard);
        }
        self.abstained
            .entry(slice.0)
            .or_default()
            .insert(from.clone());
        Ok(Heard::Abstention)
    }

    /// The checks a contribution or abstention passes before it counts: the slice it is for,
    /// and what became of it when it does not count.
    fn contribution_slice(
        &mut self,
        now: Instant,
        from: &P,
        slice: u32,
        span: Span,
    ) -> Result<(usize, Option<Heard>), Rejected> {
        if !self.member_set.contains(from) {
            return Err(Rejected::NotAMember { round: self.round });
        }
        let slice = slice as usize;
        let owns = self.owns(slice, span);
        let me = self.me;
        let ours = slice == me && !self.reduced_sent.contains(&me);
        let backed = slice < self.members.len() && self.backup_of(slice) == me && slice != me;
        if !owns || !(ours || backed) {
            return Err(if owns && slice == me {
                Rejected::Late
            } else {
                Rejected::WrongSlice
            });
        }
        if backed && let Some(r) = self.reduced.get(&slice) {
            // A member misses a slice we hold (the original, or our own reduction): answer
            // it alone with what everyone else got.
            self.actions.push_back(Action::Forward {
                slice,
                reduced: r.clone(),
                to: Some(from.clone()),
            });
            return Ok((slice, Some(Heard::Answered)));
        }
        if backed && self.reduced_sent.contains(&slice) {
            return Ok((slice, Some(Heard::AlreadyReduced)));
        }
        if backed && !self.backing.contains_key(&slice) {
            // Another member misses this slice before we noticed: its reducer may have
            // died with frames in flight, so wait as for a gone one.
            self.backing
                .insert(slice, self.deadlines.backing(now, true));
        }
        if self.spoke(slice, from) {
            return Ok((slice, Some(Heard::Duplicate)));
        }
        Ok((slice, None))
    }

    /// A reduced slice from `from`; `decode` is always called (a bad frame is refused even
    /// when the slice is already held), and the first good one for a slice counts.
    pub fn handle_reduced(
        &mut self,
        from: &P,
        slice: u32,
        span: Span,
        decode: impl FnOnce() -> Result<R, Invalid>,
    ) -> Result<Heard, Rejected> {
        if !self.member_set.contains(from) {
            return Err(Rejected::NotAMember { round: self.round });
        }
        let slice = slice as usize;
        let n = self.members.len();
        let from_reducer = slice < n
            && (self.members[slice] == *from || self.members[self.backup_of(slice)] == *from);
        if !self.owns(slice, span) || !from_reducer {
            return Err(Rejected::NotTheReducer);
        }
        let value = decode()?;
        if self.reduced.contains_key(&slice) {
            return Ok(Heard::ReducedAgain);
        }
        self.reduced.insert(slice, value);
        Ok(Heard::Reduced)
    }

    /// The next thing to do at `now`, if any. Call until `None` after every input and
    /// timeout.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action<P, C, R>> {
        if self.actions.is_empty() {
            self.advance(now);
        }
        self.actions.pop_front()
    }

    /// When to call [`Self::poll_action`] again if no frame comes first; `None` once the
    /// exchange is over (`finish_by` has come).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let d = &self.deadlines;
        if now >= d.finish_by {
            return None;
        }
        [
            Some(d.finish_by),
            (!self.reduced_sent.contains(&self.me)).then_some(d.reduce_by),
            (now < d.reassign_at).then_some(d.reassign_at),
            self.backing
                .iter()
                .filter(|(i, _)| !self.reduced_sent.contains(i))
                .map(|(_, b)| if now < b.from { b.from } else { b.due })
                .min(),
            self.lost_since
                .iter()
                .filter(|(i, _)| !self.reduced.contains_key(i))
                .map(|(_, at)| *at + d.grace)
                .filter(|at| *at > now)
                .min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether nothing is left to wait for at `now`: this replica reduced its slice, and
    /// every slice is here or can no longer come (lost for longer than the grace: frames
    /// the dead sent may still be in flight before that).
    pub fn is_complete(&self, now: Instant) -> bool {
        let grace = self.deadlines.grace;
        let given_up = self
            .lost_since
            .iter()
            .filter(|(i, at)| !self.has_reduced(**i) && now >= **at + grace)
            .count();
        self.reduced_sent.contains(&self.me) && self.reduced.len() + given_up == self.members.len()
    }

    /// What the exchange produced: the reduction of every slice held, `None` elsewhere.
    pub fn finish(mut self) -> Outcome<R> {
        Outcome {
            slices: (0..self.members.len())
                .map(|i| self.reduced.remove(&i))
                .collect(),
        }
    }

    /// Takes the decisions `now` calls for; each is taken once, so calling it again with
    /// nothing new queues nothing.
    fn advance(&mut self, now: Instant) {
        for i in &self.lost {
            self.lost_since.entry(*i).or_insert(now);
        }
        let me = self.me;
        let n = self.members.len();
        let d = self.deadlines;
        if !self.reduced_sent.contains(&me)
            && (self.heard(me) >= self.expected(me, None) || now >= d.reduce_by)
        {
            self.reduced_sent.insert(me);
            let contributions = self.contributions.remove(&me).unwrap_or_default();
            self.actions.push_back(Action::Reduce {
                slice: me,
                contributions,
            });
        }
        // Take over the slices of reducers not heard from, or known to be gone: the gone
        // ones at once, every missing one at `reassign_at`.
        let silent: Vec<usize> = if n < 2 {
            Vec::new()
        } else if now >= d.reassign_at && !self.swept_all {
            self.swept_all = true;
            self.unswept.clear();
            (0..n).collect()
        } else {
            std::mem::take(&mut self.unswept).into_iter().collect()
        };
        for i in silent {
            if i == me || self.reduced.contains_key(&i) || !self.handed.insert(i) {
                continue;
            }
            let backup = self.backup_of(i);
            if backup == me && !self.backing.contains_key(&i) {
                let backing = d.backing(now, self.gone.contains(&i));
                self.backing.insert(i, backing);
                self.actions.push_back(Action::TookOver { slice: i });
            }
            if self.members[backup] != self.members[i] && !self.gone.contains(&backup) {
                self.actions.push_back(Action::SendContribution {
                    slice: i,
                    to: self.members[backup].clone(),
                });
            }
        }
        // A backup passes the original on as soon as it holds it; it reduces anew once every
        // live member spoke (after the grace, for a gone reducer), or at its deadline.
        let due: Vec<usize> = self
            .backing
            .iter()
            .filter(|(i, b)| {
                !self.reduced_sent.contains(i)
                    && (now >= b.due
                        || self.reduced.contains_key(i)
                        || (now >= b.from && self.heard(**i) >= self.expected(**i, Some(**i))))
            })
            .map(|(i, _)| *i)
            .collect();
        for i in due {
            self.reduced_sent.insert(i);
            match self.reduced.get(&i) {
                // The original arrived after all: pass it on unchanged.
                Some(r) => self.actions.push_back(Action::Forward {
                    slice: i,
                    reduced: r.clone(),
                    to: None,
                }),
                None => {
                    let contributions = self.contributions.remove(&i).unwrap_or_default();
                    self.actions.push_back(Action::Reduce {
                        slice: i,
                        contributions,
                    });
                }
            }
        }
    }

    fn owns(&self, slice: usize, span: Span) -> bool {
        self.ranges
            .get(slice)
            .is_some_and(|r| span.offset == r.start as u64 && span.len == r.len() as u64)
    }

    fn spoke(&self, slice: usize, who: &P) -> bool {
        self.contributions
            .get(&slice)
            .is_some_and(|c| c.contains_key(who))
            || self.abstained.get(&slice).is_some_and(|a| a.contains(who))
    }

    /// Contributions and abstentions heard for `slice`.
    fn heard(&self, slice: usize) -> usize {
        self.contributions.get(&slice).map_or(0, |c| c.len())
            + self.abstained.get(&slice).map_or(0, |a| a.len())
    }

    /// How many contributions to `slice` can still come: every member's, less those of the
    /// gone members (and of `also`, a silent reducer) that have not spoken.
    fn expected(&self, slice: usize, also: Option<usize>) -> usize {
        let silent = self
            .gone
            .iter()
            .copied()
            .chain(also.filter(|j| !self.gone.contains(j)))
            .filter(|j| !self.spoke(slice, &self.members[*j]))
            .count();
        self.members.len().saturating_sub(silent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers are small numbers; a contribution is a number, a reduction a string.
    type Ex = Exchange<u32, u32, &'static str>;
    type Act = Action<u32, u32, &'static str>;

    const SPAN: Duration = Duration::from_secs(100);

    fn t0() -> Instant {
        // One fixed origin per process: the tests only ever add to it.
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn at(secs: u64) -> Instant {
        t0() + Duration::from_secs(secs)
    }

    /// An exchange of `n` members (peers `0..n`, 10 values each) at member `me`.
    fn ex(n: u32, me: usize) -> Ex {
        Exchange::new(ExchangeConfig {
            round: 5,
            part: 0,
            members: (0..n).collect(),
            me,
            len: 10 * n as usize,
            deadlines: Deadlines::split(t0(), SPAN),
        })
        .unwrap()
    }

    fn span(e: &Ex, slice: usize) -> Span {
        let r = &e.ranges()[slice];
        Span {
            offset: r.start as u64,
            len: r.len() as u64,
        }
    }

    fn drain(e: &mut Ex, now: Instant) -> Vec<Act> {
        std::iter::from_fn(|| e.poll_action(now)).collect()
    }

    fn contribute(
        e: &mut Ex,
        now: Instant,
        from: u32,
        slice: usize,
        v: u32,
    ) -> Result<Heard, Rejected> {
        let s = span(e, slice);
        e.handle_contribution(now, &from, slice as u32, s, || Ok(v))
    }

    fn reduced(e: &mut Ex, from: u32, slice: usize, r: &'static str) -> Result<Heard, Rejected> {
        let s = span(e, slice);
        e.handle_reduced(&from, slice as u32, s, || Ok(r))
    }

    fn reduce(slice: usize, c: &[(u32, u32)]) -> Act {
        Action::Reduce {
            slice,
            contributions: c.iter().copied().collect(),
        }
    }

    fn send(slice: usize, to: u32) -> Act {
        Action::SendContribution { slice, to }
    }

    #[test]
    fn the_phases_are_60_70_85_percent_of_the_span() {
        let d = Deadlines::split(at(0), SPAN);
        assert_eq!(d.reduce_by, at(60));
        assert_eq!(d.reassign_at, at(70));
        assert_eq!(d.finish_by, at(85));
        assert_eq!(d.grace, Duration::from_secs(10));
        let b = d.backing(at(0), false);
        assert_eq!(
            (b.from, b.due),
            (at(0), at(77) + Duration::from_millis(500))
        );
        assert_eq!(
            d.backing(at(80), false).due,
            at(87) + Duration::from_millis(500)
        );
        // A gone reducer's slice waits out the grace, never past the latest time.
        assert_eq!(d.backing(at(5), true).from, at(15));
        assert_eq!(
            d.backing(at(69), true).from,
            at(77) + Duration::from_millis(500)
        );
        assert_eq!(d.backing(at(71), true).from, at(71));
    }

    #[test]
    fn slices_tile_the_update() {
        let r = slice_ranges(10, 3);
        assert_eq!(r, vec![0..3, 3..6, 6..10]);
        assert_eq!(slice_ranges(5, 0), vec![0..5]);
    }

    #[test]
    fn a_bad_config_is_refused() {
        let e = Exchange::<u32, u32, u32>::new(ExchangeConfig {
            round: 1,
            part: 0,
            members: vec![],
            me: 0,
            len: 4,
            deadlines: Deadlines::split(t0(), SPAN),
        });
        assert_eq!(e.err(), Some(ConfigError::NoMembers));
        let e = Exchange::<u32, u32, u32>::new(ExchangeConfig {
            round: 1,
            part: 0,
            members: vec![1, 2],
            me: 2,
            len: 4,
            deadlines: Deadlines::split(t0(), SPAN),
        });
        assert!(matches!(e, Err(ConfigError::NotAMember { .. })));
    }

    #[test]
    fn every_member_gets_its_slice_first_this_replica_included() {
        let mut e = ex(3, 1);
        let acts = drain(&mut e, at(0));
        assert_eq!(acts, vec![send(0, 0), send(1, 1), send(2, 2)]);
        assert_eq!(e.poll_timeout(at(0)), Some(at(60)));
    }

    #[test]
    fn the_reducer_reduces_once_every_member_spoke_abstentions_included() {
        let mut e = ex(3, 1);
        drain(&mut e, at(0));
        assert_eq!(contribute(&mut e, at(1), 0, 1, 10), Ok(Heard::Contribution));
        assert_eq!(e.collected(), (1, 3));
        assert!(drain(&mut e, at(1)).is_empty());
        let s = span(&e, 1);
        assert_eq!(e.handle_abstention(at(2), &2, 1, s), Ok(Heard::Abstention));
        assert!(drain(&mut e, at(2)).is_empty());
        assert_eq!(contribute(&mut e, at(3), 1, 1, 11), Ok(Heard::Contribution));
        assert_eq!(drain(&mut e, at(3)), vec![reduce(1, &[(0, 10), (1, 11)])]);
        assert_eq!(e.collected(), (3, 3));
        // Once reduced, its own deadline is no longer waited for.
        assert_eq!(e.poll_timeout(at(3)), Some(at(70)));
    }

    #[test]
    fn the_reducer_reduces_what_it_has_at_reduce_by() {
        let mut e = ex(3, 0);
        drain(&mut e, at(0));
        contribute(&mut e, at(1), 2, 0, 7).unwrap();
        assert!(drain(&mut e, at(59)).is_empty());
        assert_eq!(drain(&mut e, at(60)), vec![reduce(0, &[(2, 7)])]);
        // Later contributions to its slice are late.
        assert_eq!(contribute(&mut e, at(61), 1, 0, 8), Err(Rejected::Late));
    }

    #[test]
    fn a_gone_member_is_not_waited_for_unless_it_already_spoke() {
        let mut e = ex(4, 0);
        drain(&mut e, at(0));
        contribute(&mut e, at(1), 0, 0, 1).unwrap();
        contribute(&mut e, at(1), 3, 0, 4).unwrap();
        // Member 3 spoke and then went; member 2 went silent.
        e.handle_gone(BTreeSet::from([2, 3]));
        let acts = drain(&mut e, at(2));
        assert!(!acts.iter().any(|a| matches!(a, Action::Reduce { .. })));
        contribute(&mut e, at(3), 1, 0, 2).unwrap();
        let acts = drain(&mut e, at(3));
        assert_eq!(acts[0], reduce(0, &[(0, 1), (1, 2), (3, 4)]));
    }

    #[test]
    fn frames_from_strangers_for_wrong_slices_or_spans_are_refused() {
        let mut e = ex(3, 1);
        drain(&mut e, at(0));
        assert_eq!(
            contribute(&mut e, at(1), 9, 1, 1),
            Err(Rejected::NotAMember { round: 5 })
        );
        // Slice 2 is reduced by 2 and backed by 0: not ours.
        assert_eq!(
            contribute(&mut e, at(1), 0, 2, 1),
            Err(Rejected::WrongSlice)
        );
        let beyond = Span {
            offset: 70,
            len: 10,
        };
        assert_eq!(
            e.handle_contribution(at(1), &0, 7, beyond, || Ok(1)),
            Err(Rejected::WrongSlice)
        );
        let bad = Span { offset: 0, len: 10 };
        assert_eq!(
            e.handle_contribution(at(1), &0, 1, bad, || Ok(1)),
            Err(Rejected::WrongSlice)
        );
        let s = span(&e, 2);
        // Slice 2 is reduced by 2 and backed by 0; member 1 is neither.
        assert_eq!(
            e.handle_reduced(&1, 2, s, || Ok("x")),
            Err(Rejected::NotTheReducer)
        );
        assert_eq!(
            e.handle_reduced(&2, 2, bad, || Ok("x")),
            Err(Rejected::NotTheReducer)
        );
        assert_eq!(
            e.handle_reduced(&9, 2, s, || Ok("x")),
            Err(Rejected::NotAMember { round: 5 })
        );
        assert_eq!(e.collected(), (0, 3));
    }

    #[test]
    fn a_members_first_word_counts_and_a_duplicate_is_not_decoded() {
        let mut e = ex(3, 0);
        drain(&mut e, at(0));
        contribute(&mut e, at(1), 1, 0, 5).unwrap();
        let s = span(&e, 0);
        let dup = e.handle_contribution(at(1), &1, 0, s, || panic!("decoded a duplicate"));
        assert_eq!(dup, Ok(Heard::Duplicate));
        assert_eq!(e.handle_abstention(at(1), &1, 0, s), Ok(Heard::Duplicate));
        e.handle_abstention(at(1), &2, 0, s).unwrap();
        assert_eq!(contribute(&mut e, at(1), 2, 0, 9), Ok(Heard::Duplicate));
        contribute(&mut e, at(2), 0, 0, 1).unwrap();
        assert_eq!(drain(&mut e, at(2)), vec![reduce(0, &[(0, 1), (1, 5)])]);
    }

    #[test]
    fn an_undecodable_contribution_is_refused_and_does_not_count() {
        let mut e = ex(2, 0);
        drain(&mut e, at(0));
        let s = span(&e, 0);
        let bad = e.handle_contribution(at(1), &1, 0, s, || {
            Err(Invalid::Undecodable("short".into()))
        });
        assert_eq!(
            bad,
            Err(Rejected::Invalid(Invalid::Undecodable("short".into())))
        );
        assert_eq!(bad.unwrap_err().to_string(), "short");
        assert_eq!(contribute(&mut e, at(1), 1, 0, 3), Ok(Heard::Contribution));
    }

    #[test]
    fn the_first_good_reduced_slice_counts_from_reducer_or_backup() {
        let mut e = ex(3, 0);
        drain(&mut e, at(0));
        let s = span(&e, 1);
        assert_eq!(
            e.handle_reduced(&1, 1, s, || Err(Invalid::NonFinite)),
            Err(Rejected::Invalid(Invalid::NonFinite))
        );
        assert!(!e.has_reduced(1));
        // The backup of slice 1 is member 2.
        assert_eq!(reduced(&mut e, 2, 1, "backup"), Ok(Heard::Reduced));
        assert_eq!(reduced(&mut e, 1, 1, "original"), Ok(Heard::ReducedAgain));
        // A bad frame is refused even for a slice already held.
        assert_eq!(
            e.handle_reduced(&1, 1, s, || Err(Invalid::Undecodable("bad".into()))),
            Err(Rejected::Invalid(Invalid::Undecodable("bad".into())))
        );
        let out = e.finish();
        assert_eq!(out.slices, vec![None, Some("backup"), None]);
        assert_eq!(out.missing(), vec![0, 2]);
    }

    #[test]
    fn the_exchange_is_complete_when_its_slice_went_out_and_every_slice_is_here() {
        let mut e = ex(3, 0);
        drain(&mut e, at(0));
        reduced(&mut e, 1, 1, "b").unwrap();
        reduced(&mut e, 2, 2, "c").unwrap();
        assert!(!e.is_complete(at(0)), "its own slice is not reduced yet");
        drain(&mut e, at(60));
        assert!(
            !e.is_complete(at(60)),
            "its own reduction has not come back"
        );
        reduced(&mut e, 0, 0, "a").unwrap();
        assert!(e.is_complete(at(60)));
        assert_eq!(e.finish().slices, vec![Some("a"), Some("b"), Some("c")]);
    }

    #[test]
    fn a_slice_whose_reducer_and_backup_are_gone_is_not_waited_for() {
        let mut e = ex(4, 0);
        drain(&mut e, at(0));
        e.handle_gone(BTreeSet::from([1, 2]));
        drain(&mut e, at(1));
        reduced(&mut e, 0, 0, "a").unwrap();
        reduced(&mut e, 3, 3, "d").unwrap();
        assert!(
            !e.is_complete(at(1)),
            "slice 2 can still come from its backup 3"
        );
        // Slice 1 (backup 2, gone) can no longer come.
        reduced(&mut e, 3, 2, "c").unwrap();
        drain(&mut e, at(2));
        assert!(!e.is_complete(at(2)), "its own slice waits for member 3");
        drain(&mut e, at(60));
        assert!(e.is_complete(at(60)));
        assert_eq!(e.finish().missing(), vec![1]);
    }

    #[test]
    fn a_lost_slice_is_waited_for_during_the_grace_and_taken_if_it_comes() {
        let mut e = ex(4, 0);
        drain(&mut e, at(0));
        // Slice 1's reducer and backup die; the news overtakes slice 1's frames.
        e.handle_gone(BTreeSet::from([1, 2]));
        drain(&mut e, at(1));
        for m in [0, 3] {
            contribute(&mut e, at(1), m, 0, 1).unwrap();
        }
        drain(&mut e, at(1));
        for (from, slice, r) in [(0, 0, "a"), (3, 2, "c"), (3, 3, "d")] {
            reduced(&mut e, from, slice, r).unwrap();
        }
        assert!(!e.is_complete(at(2)), "slice 1 may still be in flight");
        assert_eq!(e.poll_timeout(at(2)), Some(at(11)));
        assert!(e.is_complete(at(11)));
        // It came within the grace: taken, like any first word.
        reduced(&mut e, 1, 1, "b").unwrap();
        assert!(e.is_complete(at(3)));
        assert_eq!(e.finish().missing(), Vec::<u32>::new());
    }

    /// The path that needs `CrashPoint::ReducerBeforeSending` in the process tests: the
    /// reducer of slice 0 holds every contribution and dies silently; at `reassign_at` every
    /// member sends its contribution to slice 0 again, to the backup (member 1), which
    /// reduces it once every live member spoke.
    #[test]
    fn a_silent_reducers_slice_is_reduced_by_its_backup_at_reassign_at() {
        let mut b = ex(3, 1);
        let mut other = ex(3, 2);
        drain(&mut b, at(0));
        drain(&mut other, at(0));
        assert!(
            drain(&mut b, at(69))
                .iter()
                .all(|a| matches!(a, Action::Reduce { slice: 1, .. }))
        );
        assert!(
            drain(&mut other, at(69))
                .iter()
                .all(|a| matches!(a, Action::Reduce { slice: 2, .. }))
        );
        // Slices 1 and 2 came back, slice 0 did not.
        for e in [&mut b, &mut other] {
            reduced(e, 1, 1, "b").unwrap();
            reduced(e, 2, 2, "c").unwrap();
        }
        assert_eq!(
            drain(&mut b, at(70)),
            vec![Action::TookOver { slice: 0 }, send(0, 1)]
        );
        assert_eq!(drain(&mut other, at(70)), vec![send(0, 1)]);
        assert!(drain(&mut b, at(70)).is_empty(), "handed over once");
        assert_eq!(
            b.poll_timeout(at(70)),
            Some(at(77) + Duration::from_millis(500))
        );
        contribute(&mut b, at(71), 1, 0, 11).unwrap();
        assert!(drain(&mut b, at(71)).is_empty(), "member 2 can still speak");
        contribute(&mut b, at(72), 2, 0, 12).unwrap();
        // The silent reducer (member 0) is not waited for.
        assert_eq!(drain(&mut b, at(72)), vec![reduce(0, &[(1, 11), (2, 12)])]);
        assert_eq!(
            contribute(&mut b, at(73), 2, 0, 12),
            Ok(Heard::AlreadyReduced)
        );
    }

    #[test]
    fn a_backup_reduces_what_it_has_at_its_own_deadline() {
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        drain(&mut b, at(70));
        contribute(&mut b, at(71), 1, 0, 11).unwrap();
        assert!(drain(&mut b, at(77)).is_empty());
        let due = at(77) + Duration::from_millis(500);
        assert_eq!(drain(&mut b, due), vec![reduce(0, &[(1, 11)])]);
    }

    #[test]
    fn a_backup_holding_the_original_forwards_it_unchanged() {
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        let acts = drain(&mut b, at(70));
        assert!(acts.contains(&Action::TookOver { slice: 0 }));
        // The original arrives after the hand-over, before the backup's deadline.
        reduced(&mut b, 0, 0, "original").unwrap();
        let due = at(77) + Duration::from_millis(500);
        assert_eq!(
            drain(&mut b, due),
            vec![Action::Forward {
                slice: 0,
                reduced: "original",
                to: None
            }]
        );
    }

    #[test]
    fn a_backup_answers_a_member_that_misses_a_slice_it_holds() {
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        reduced(&mut b, 0, 0, "original").unwrap();
        assert_eq!(contribute(&mut b, at(5), 2, 0, 5), Ok(Heard::Answered));
        assert_eq!(
            drain(&mut b, at(5)),
            vec![Action::Forward {
                slice: 0,
                reduced: "original",
                to: Some(2)
            }]
        );
        // A slice held is not handed over.
        assert!(
            !drain(&mut b, at(72))
                .iter()
                .any(|a| matches!(a, Action::TookOver { .. }))
        );
    }

    #[test]
    fn a_contribution_for_a_backed_slice_starts_the_backup_before_it_noticed() {
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        // Member 2 hands slice 0 over first (it knew its reducer gone).
        assert_eq!(contribute(&mut b, at(10), 2, 0, 5), Ok(Heard::Contribution));
        // Due halfway from reassign_at to the end, not yet.
        assert_eq!(drain(&mut b, at(61)), vec![reduce(1, &[])]);
        assert_eq!(b.poll_timeout(at(61)), Some(at(70)));
        let acts = drain(&mut b, at(70));
        assert!(
            !acts.contains(&Action::TookOver { slice: 0 }),
            "not counted as a take-over: {acts:?}"
        );
        assert!(acts.contains(&send(0, 1)));
        contribute(&mut b, at(71), 1, 0, 4).unwrap();
        // Member 0 (the silent reducer) is not waited for: 1 and 2 spoke.
        assert_eq!(drain(&mut b, at(71)), vec![reduce(0, &[(1, 4), (2, 5)])]);
    }

    #[test]
    fn a_gone_reducers_slice_is_handed_over_at_once_and_a_gone_backup_gets_nothing() {
        let mut e = ex(4, 3);
        drain(&mut e, at(0));
        e.handle_gone(BTreeSet::from([0]));
        assert_eq!(drain(&mut e, at(5)), vec![send(0, 1)]);
        e.handle_gone(BTreeSet::from([0, 2]));
        // Slice 2's backup is this replica: it takes it over and sends itself its part.
        assert_eq!(
            drain(&mut e, at(6)),
            vec![Action::TookOver { slice: 2 }, send(2, 3)]
        );
        let mut e = ex(4, 3);
        drain(&mut e, at(0));
        e.handle_gone(BTreeSet::from([0, 1]));
        // Slice 0's backup (1) is gone too: nothing to send; slice 1 goes to 2.
        assert_eq!(drain(&mut e, at(5)), vec![send(1, 2)]);
        // "Gone" never includes this replica, nor out-of-range members.
        e.handle_gone(BTreeSet::from([3, 9]));
        assert!(drain(&mut e, at(6)).is_empty());
    }

    #[test]
    fn the_backup_reduces_a_gone_reducers_slice_once_the_live_members_spoke() {
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        b.handle_gone(BTreeSet::from([0]));
        assert_eq!(
            drain(&mut b, at(1)),
            vec![Action::TookOver { slice: 0 }, send(0, 1)]
        );
        contribute(&mut b, at(2), 1, 0, 1).unwrap();
        contribute(&mut b, at(2), 2, 0, 2).unwrap();
        // Everyone live spoke, but the dead reducer's frames may be in flight: the backup
        // waits out the grace (10 s of the 100 s span from when it took over).
        assert!(drain(&mut b, at(2)).is_empty());
        assert_eq!(b.poll_timeout(at(2)), Some(at(11)));
        assert_eq!(drain(&mut b, at(11)), vec![reduce(0, &[(1, 1), (2, 2)])]);
    }

    #[test]
    fn news_of_a_death_that_overtakes_the_dead_reducers_frames_leaves_one_version() {
        // Member 0 reduced and sent slice 0, then died; the coordinator's word arrives first.
        let mut b = ex(3, 1);
        drain(&mut b, at(0));
        b.handle_gone(BTreeSet::from([0]));
        drain(&mut b, at(1));
        contribute(&mut b, at(1), 1, 0, 1).unwrap();
        contribute(&mut b, at(1), 2, 0, 2).unwrap();
        assert!(
            drain(&mut b, at(1)).is_empty(),
            "waits for frames in flight"
        );
        // The original arrives within the grace: the backup passes it on, reduces nothing.
        let r0 = ex(3, 0).ranges()[0].clone();
        let span0 = Span {
            offset: r0.start as u64,
            len: r0.len() as u64,
        };
        assert_eq!(
            b.handle_reduced(&0, 0, span0, || Ok("orig")),
            Ok(Heard::Reduced)
        );
        assert_eq!(
            drain(&mut b, at(2)),
            vec![Action::Forward {
                slice: 0,
                reduced: "orig",
                to: None
            }]
        );
    }

    #[test]
    fn news_of_departures_replaces_what_was_known() {
        let mut e = ex(4, 0);
        drain(&mut e, at(0));
        e.handle_gone(BTreeSet::from([2, 3]));
        // Slice 2's backup (3) is gone too: lost; slice 3 is this replica's to back.
        assert_eq!(
            drain(&mut e, at(1)),
            vec![Action::TookOver { slice: 3 }, send(3, 0)]
        );
        // A coordinator welcomed us again: the lost coordinator (3) counts no more, so its
        // contribution is waited for again and slice 2 can come from it.
        e.handle_gone(BTreeSet::from([2]));
        contribute(&mut e, at(2), 0, 0, 1).unwrap();
        contribute(&mut e, at(2), 1, 0, 2).unwrap();
        assert!(drain(&mut e, at(2)).is_empty(), "waits for member 3");
        contribute(&mut e, at(3), 3, 0, 4).unwrap();
        assert_eq!(
            drain(&mut e, at(3)),
            vec![reduce(0, &[(0, 1), (1, 2), (3, 4)])]
        );
        for (from, slice, r) in [(0, 0, "a"), (1, 1, "b"), (3, 3, "d")] {
            reduced(&mut e, from, slice, r).unwrap();
        }
        assert!(!e.is_complete(at(3)), "slice 2's backup (3) is back");
        reduced(&mut e, 3, 2, "c").unwrap();
        assert!(e.is_complete(at(3)));
    }

    #[test]
    fn timeouts_follow_the_phases_and_stop_at_the_end() {
        let mut e = ex(3, 1);
        drain(&mut e, at(0));
        assert_eq!(e.poll_timeout(at(0)), Some(at(60)));
        drain(&mut e, at(60));
        assert_eq!(e.poll_timeout(at(60)), Some(at(70)));
        drain(&mut e, at(70));
        // Backing slice 0 now: due at 77.5s.
        assert_eq!(
            e.poll_timeout(at(70)),
            Some(at(77) + Duration::from_millis(500))
        );
        drain(&mut e, at(78));
        assert_eq!(e.poll_timeout(at(78)), Some(at(85)));
        assert_eq!(e.poll_timeout(at(85)), None);
        assert_eq!(e.finish().missing(), vec![0, 1, 2]);
    }

    #[test]
    fn a_lone_member_reduces_its_update_alone() {
        let mut e = ex(1, 0);
        assert_eq!(drain(&mut e, at(0)), vec![send(0, 0)]);
        contribute(&mut e, at(1), 0, 0, 3).unwrap();
        assert_eq!(drain(&mut e, at(1)), vec![reduce(0, &[(0, 3)])]);
        reduced(&mut e, 0, 0, "mine").unwrap();
        assert!(e.is_complete(at(1)));
        assert!(drain(&mut e, at(80)).is_empty(), "no backup of itself");
    }

    #[test]
    fn frames_of_later_exchanges_are_buffered_within_bounds() {
        let e = Exchange::<u32, u32, u32>::new(ExchangeConfig {
            round: 5,
            part: 1,
            members: vec![1, 2],
            me: 0,
            len: 4,
            deadlines: Deadlines::split(t0(), SPAN),
        })
        .unwrap();
        assert_eq!(e.admit(5, 1, 0, || 0), Admit::Current);
        assert_eq!(e.admit(5, 0, 0, || 0), Admit::Stale);
        assert_eq!(e.admit(4, 9, 0, || 0), Admit::Stale);
        assert_eq!(e.admit(5, 2, 0, || 0), Admit::Buffer);
        assert_eq!(e.admit(6, 0, early_cap(2) - 1, || 0), Admit::Buffer);
        assert_eq!(e.admit(6, 0, early_cap(2), || 0), Admit::Full);
        assert_eq!(e.admit(6, 0, 0, || EARLY_PER_PEER), Admit::Full);
    }
}
