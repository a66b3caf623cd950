//! Members known to be gone from a run: the coordinator's word (`MemberLeft`, sent when a
//! member's control stream closes) and the end of this replica's own control stream (its
//! coordinator is gone). An exchange in progress reads them so that it stops waiting for a
//! dead member's contributions and hands its slices to their backups at once, instead of
//! waiting for the deadline phases (issue 17, finding 3).
//!
//! A departure counts for one round (the coordinator names the open round) or, for a lost
//! coordinator, until a coordinator welcomes this replica again. The register is bounded:
//! it keeps the departures of the newest rounds only.

use std::collections::{BTreeMap, BTreeSet};

use libp2p::PeerId;

/// A departure that counts until the next welcome (a lost coordinator).
pub(crate) const UNTIL_WELCOMED: u64 = u64::MAX;
/// Departures kept at most; the oldest rounds' go first.
const MAX_DEPARTURES: usize = 4096;

/// Who left, and for which round.
#[derive(Debug, Default)]
pub(crate) struct Departures {
    by_peer: BTreeMap<PeerId, BTreeSet<u64>>,
    count: usize,
}

impl Departures {
    /// `peer` is gone for `round` ([`UNTIL_WELCOMED`] for a lost coordinator). Returns
    /// whether this is news.
    pub(crate) fn note(&mut self, peer: PeerId, round: u64) -> bool {
        if !self.by_peer.entry(peer).or_default().insert(round) {
            return false;
        }
        self.count += 1;
        while self.count > MAX_DEPARTURES {
            let Some(oldest) = self
                .by_peer
                .values()
                .flat_map(|r| r.iter().copied())
                .filter(|r| *r != UNTIL_WELCOMED)
                .min()
            else {
                break;
            };
            self.forget(|r| r == oldest);
        }
        true
    }

    /// A coordinator welcomed this replica: earlier coordinators' departures no longer count.
    pub(crate) fn welcomed(&mut self) {
        self.forget(|r| r == UNTIL_WELCOMED);
    }

    fn forget(&mut self, drop: impl Fn(u64) -> bool) {
        for rounds in self.by_peer.values_mut() {
            let before = rounds.len();
            rounds.retain(|r| !drop(*r));
            self.count -= before - rounds.len();
        }
        self.by_peer.retain(|_, r| !r.is_empty());
    }

    /// The indices in `members` of the members gone in `round`, `me` excepted.
    pub(crate) fn gone_in(&self, round: u64, members: &[PeerId], me: usize) -> BTreeSet<usize> {
        members
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                *i != me
                    && self
                        .by_peer
                        .get(*p)
                        .is_some_and(|r| r.contains(&round) || r.contains(&UNTIL_WELCOMED))
            })
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_departure_counts_for_its_round_and_a_lost_coordinator_until_a_welcome() {
        let members: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut d = Departures::default();
        assert!(d.note(members[1], 7));
        assert!(!d.note(members[1], 7), "no news twice");
        assert!(d.note(members[0], UNTIL_WELCOMED));
        assert_eq!(d.gone_in(7, &members, 3), BTreeSet::from([0, 1]));
        assert_eq!(d.gone_in(8, &members, 3), BTreeSet::from([0]));
        assert_eq!(d.gone_in(7, &members, 1), BTreeSet::from([0]), "never me");
        d.welcomed();
        assert_eq!(d.gone_in(8, &members, 3), BTreeSet::new());
        assert_eq!(d.gone_in(7, &members, 3), BTreeSet::from([1]));
    }

    #[test]
    fn the_register_is_bounded_and_drops_the_oldest_rounds_first() {
        let p = PeerId::random();
        let mut d = Departures::default();
        for round in 0..(MAX_DEPARTURES as u64 + 10) {
            d.note(p, round);
        }
        assert_eq!(d.count, MAX_DEPARTURES);
        assert!(d.gone_in(5, &[p], 1).is_empty());
        assert_eq!(d.gone_in(MAX_DEPARTURES as u64 + 9, &[p], 1).len(), 1);
    }
}
