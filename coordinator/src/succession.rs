//! Finding a run's coordinator again after losing it: the walk along the signed succession
//! list (`failover::RunManifest::coordinator_keys`) that every replica makes, as a pure
//! machine. The daemon reports what happened (lost the coordinator, a candidate was
//! unreachable, refused us, welcomed us) and asks [`Succession::poll`] what to do next:
//! dial a candidate, take the run over itself, wait, or give up.
//!
//! # The window
//! A replica looks for a coordinator for at most `window_ms` from the moment it loses one.
//! The window belongs to one loss: a candidate that welcomes the replica ends the search,
//! and losing that coordinator later starts a new window from that moment. (A window kept
//! from an earlier loss would make a replica that once lost its coordinator and found it
//! again give up at once when the coordinator dies for good much later: issue 17, finding 1.)
//!
//! # The order
//! Candidates are tried in succession order. One that cannot be reached is passed over for
//! the rest of the search (until every candidate has failed, when all are tried again: the
//! coordinator may be restarting). One that is reached but does not take the replica back
//! ends the pass, which starts again from the first candidate after `retry_ms`; one that
//! welcomed the replica and then went away too is passed over like an unreachable one. When
//! this peer's own key comes first among the candidates still in play, it takes the run
//! over.

use std::collections::BTreeSet;

/// A peer's ed25519 public key, as the succession list names it.
pub type Key = [u8; 32];

/// What the daemon should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Following a coordinator: nothing to do until it is lost.
    Following,
    /// Try to join the run at this candidate, then report the outcome.
    Dial(Key),
    /// This peer comes first among the candidates still in play: take the run over. The
    /// keys are those believed gone.
    TakeOver(BTreeSet<Key>),
    /// Nothing to do before this time (ms).
    Wait(u64),
    /// The window passed without a coordinator: the run is lost to this replica.
    GiveUp,
}

#[derive(Debug, Clone)]
enum State {
    Following,
    Searching {
        give_up_at: u64,
        gone: BTreeSet<Key>,
        /// Index into the succession of the next candidate of this pass.
        next: usize,
        /// The pass (re)starts then.
        resume_at: u64,
    },
}

/// The search for a run's coordinator (see the module docs).
#[derive(Debug, Clone)]
pub struct Succession {
    order: Vec<Key>,
    me: Option<Key>,
    window_ms: u64,
    retry_ms: u64,
    state: State,
}

impl Succession {
    /// A replica that follows a coordinator of the run whose succession is `order`; `me` is
    /// this peer's key. It searches for at most `window_ms` after each loss and waits
    /// `retry_ms` between passes.
    pub fn new(order: Vec<Key>, me: Option<Key>, window_ms: u64, retry_ms: u64) -> Self {
        Succession {
            order,
            me,
            window_ms,
            retry_ms: retry_ms.max(1),
            state: State::Following,
        }
    }

    /// Whether a search is under way.
    pub fn searching(&self) -> bool {
        matches!(self.state, State::Searching { .. })
    }

    /// The coordinator was lost at `now`: a new search with a full window.
    pub fn handle_lost(&mut self, now: u64) {
        self.start(now, BTreeSet::new(), now);
    }

    fn start(&mut self, now: u64, gone: BTreeSet<Key>, resume_at: u64) {
        self.state = State::Searching {
            give_up_at: now.saturating_add(self.window_ms),
            gone,
            next: 0,
            resume_at,
        };
    }

    /// `key` welcomed this replica: it follows that coordinator, and the search is over.
    pub fn handle_welcomed(&mut self, _key: Key) {
        self.state = State::Following;
    }

    /// `key` welcomed this replica earlier and has now gone away too: a new loss, so a new
    /// window; `key` is passed over on the first pass.
    pub fn handle_lost_after_welcome(&mut self, key: Key, now: u64) {
        let gone = BTreeSet::from([key]);
        let retry = now.saturating_add(self.retry_ms);
        self.start(now, gone, retry);
    }

    /// `key` could not be reached: pass it over and go on with the next candidate.
    pub fn handle_unreachable(&mut self, key: Key) {
        if let State::Searching { gone, next, .. } = &mut self.state {
            gone.insert(key);
            *next += 1;
        }
    }

    /// `key` was reached but did not take this replica back (not coordinating yet): the pass
    /// starts again from the first candidate after the retry pause.
    pub fn handle_not_coordinating(&mut self, _key: Key, now: u64) {
        if let State::Searching {
            next, resume_at, ..
        } = &mut self.state
        {
            *next = 0;
            *resume_at = now.saturating_add(self.retry_ms);
        }
    }

    /// What to do at `now`.
    pub fn poll(&mut self, now: u64) -> Step {
        let retry_ms = self.retry_ms;
        let State::Searching {
            give_up_at,
            gone,
            next,
            resume_at,
        } = &mut self.state
        else {
            return Step::Following;
        };
        if now >= *give_up_at {
            return Step::GiveUp;
        }
        if now < *resume_at {
            return Step::Wait((*resume_at).min(*give_up_at));
        }
        while let Some(k) = self.order.get(*next) {
            if gone.contains(k) {
                *next += 1;
                continue;
            }
            if Some(*k) == self.me {
                return Step::TakeOver(gone.clone());
            }
            return Step::Dial(*k);
        }
        // The pass is over without a coordinator.
        if self.order.iter().all(|k| gone.contains(k)) {
            // Everyone failed once: the coordinator may be restarting; try them all again.
            gone.clear();
        }
        *next = 0;
        *resume_at = now.saturating_add(retry_ms);
        Step::Wait((*resume_at).min(*give_up_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Key = [1; 32];
    const B: Key = [2; 32];
    const C: Key = [3; 32];
    const WINDOW: u64 = 120_000;

    fn machine(me: Option<Key>) -> Succession {
        Succession::new(vec![A, B, C], me, WINDOW, 500)
    }

    #[test]
    fn follows_until_lost_then_walks_the_succession_in_order() {
        let mut s = machine(Some(C));
        assert_eq!(s.poll(0), Step::Following);
        s.handle_lost(1_000);
        assert_eq!(
            s.poll(1_000),
            Step::Dial(A),
            "the lost coordinator may be restarting"
        );
        s.handle_unreachable(A);
        assert_eq!(s.poll(1_010), Step::Dial(B));
        s.handle_unreachable(B);
        assert_eq!(s.poll(1_020), Step::TakeOver(BTreeSet::from([A, B])));
    }

    #[test]
    fn a_candidate_that_is_not_coordinating_restarts_the_pass_after_a_pause() {
        let mut s = machine(None);
        s.handle_lost(0);
        assert_eq!(s.poll(0), Step::Dial(A));
        s.handle_unreachable(A);
        assert_eq!(s.poll(1), Step::Dial(B));
        s.handle_not_coordinating(B, 2);
        assert_eq!(s.poll(3), Step::Wait(502));
        // A stays passed over; B is asked again.
        assert_eq!(s.poll(502), Step::Dial(B));
    }

    #[test]
    fn everyone_unreachable_tries_everyone_again() {
        let mut s = machine(None);
        s.handle_lost(0);
        for k in [A, B, C] {
            assert_eq!(s.poll(0), Step::Dial(k));
            s.handle_unreachable(k);
        }
        assert_eq!(s.poll(10), Step::Wait(510));
        assert_eq!(s.poll(510), Step::Dial(A));
    }

    #[test]
    fn gives_up_when_the_window_passes() {
        let mut s = machine(None);
        s.handle_lost(5_000);
        s.handle_not_coordinating(A, 5_000);
        assert_eq!(s.poll(5_000 + WINDOW - 1), Step::Dial(A));
        assert_eq!(s.poll(5_000 + WINDOW), Step::GiveUp);
    }

    /// Issue 17, finding 1: a replica that lost its coordinator, got it back, and trained
    /// longer than the window afterwards, must still fail over when the coordinator dies for
    /// good.
    #[test]
    fn a_rejoin_ends_the_window_and_a_later_loss_gets_a_full_one() {
        let mut s = machine(Some(B));
        s.handle_lost(0);
        assert_eq!(s.poll(0), Step::Dial(A));
        s.handle_welcomed(A);
        assert_eq!(s.poll(10_000), Step::Following);
        // Minutes later the coordinator dies for good.
        let later = 10 * WINDOW;
        s.handle_lost_after_welcome(A, later);
        assert_eq!(s.poll(later), Step::Wait(later + 500));
        assert_eq!(
            s.poll(later + 500),
            Step::TakeOver(BTreeSet::from([A])),
            "the successor takes over instead of giving up"
        );
        let mut r = machine(Some(C));
        r.handle_lost(0);
        r.handle_welcomed(A);
        r.handle_lost_after_welcome(A, later);
        assert_eq!(
            r.poll(later + 500),
            Step::Dial(B),
            "a replica dials the successor"
        );
    }

    proptest! {
        /// Whatever happens, a search ends by its window, every wait ends inside it, and a
        /// peer that is not in the succession never takes the run over.
        #[test]
        fn a_search_ends_by_its_window(
            outsider in any::<bool>(),
            events in proptest::collection::vec((0u8..4, 0u64..2_000), 1..100),
        ) {
            let me = if outsider { [9; 32] } else { C };
            let mut s = machine(Some(me));
            let mut now = 0;
            s.handle_lost(now);
            let mut lost_at = now;
            for (what, dt) in events {
                now += dt * 100;
                match s.poll(now) {
                    Step::Dial(k) => {
                        prop_assert!(k != me);
                        match what {
                            0 => s.handle_unreachable(k),
                            1 => s.handle_not_coordinating(k, now),
                            2 => s.handle_welcomed(k),
                            _ => {}
                        }
                    }
                    Step::TakeOver(_) => prop_assert!(!outsider),
                    Step::GiveUp => prop_assert!(now >= lost_at + WINDOW),
                    Step::Wait(t) => prop_assert!(t > now && t <= lost_at + WINDOW),
                    Step::Following => prop_assert!(!s.searching()),
                }
                if what == 3 && !s.searching() {
                    s.handle_lost_after_welcome(A, now);
                    lost_at = now;
                }
            }
        }
    }
}
