//! The updates a replica refused in a round, as it reports them to the coordinator: typed
//! (who, which round and slice, a reason from a fixed set), deduplicated per peer and
//! reason, and capped.
//!
//! Why capped: every refused frame is a peer's fault, and a peer (a member, or anyone who
//! can open a stream, members or not) can send as many as it likes. Listed one by one they
//! would grow the round's report until it passes the control limit, and the coordinator
//! would close an honest replica's control stream over it. So a list holds at most
//! [`MAX_REJECTIONS`] entries, one per (peer, reason) with a count; what does not fit is
//! only counted ([`Rejections::dropped`]). The encoded list stays a few KiB
//! ([`MAX_ENCODED_BYTES`]), whatever peers send. The coordinator decodes a report's list
//! with the same cap ([`Rejections::from_proto`]): it trusts the sender no more than the
//! sender trusts its peers.
//!
//! The reasons are the daemon's metrics labels (`potluck_rejected_updates_total`), one fixed
//! set, so that a peer cannot make up labels or log lines.

use std::collections::BTreeMap;

use potluck_proto::v1;

use crate::PeerId;
use crate::exchange::{Invalid, Rejected};

/// Entries one list holds at most: distinct (peer, reason) pairs.
pub const MAX_REJECTIONS: usize = 64;

/// An upper bound on the encoded size of a full list (entries of the longest peer id the
/// wire accepts and the largest numbers), well under the control limit of 1 MiB.
pub const MAX_ENCODED_BYTES: usize = MAX_REJECTIONS * (crate::MAX_PEER_ID_LEN + 48) + 16;

// A sixty-fourth of the control limit (1 MiB) at most.
const _: () = assert!(MAX_ENCODED_BYTES <= (1 << 20) / 64);

/// Why an update (a frame, a contribution, a reduced slice) was refused. A fixed set: the
/// `reason` label of the daemon's `potluck_rejected_updates_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// The frame's signature or public key does not match its sender.
    BadSignature,
    /// From a peer that is not a member of the round.
    NotAMember,
    /// A contribution for a slice this replica does not reduce, or a reduced slice from a
    /// peer that does not reduce it.
    WrongSlice,
    /// A payload its codec cannot decode (bad length, bad header).
    Undecodable,
    /// A reduced slice with NaN or infinite values.
    NonFinite,
    /// A contribution that came after this replica had reduced its slice (a slow or
    /// restarted member; not a fault in itself).
    Late,
    /// Refused by the reduction's validation (length, values, tokens, norm).
    Invalid,
}

impl RejectReason {
    /// Its metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadSignature => "bad_signature",
            RejectReason::NotAMember => "not_a_member",
            RejectReason::WrongSlice => "wrong_slice",
            RejectReason::Undecodable => "undecodable",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Late => "late",
            RejectReason::Invalid => "invalid",
        }
    }

    fn to_proto(self) -> v1::RejectReason {
        match self {
            RejectReason::BadSignature => v1::RejectReason::BadSignature,
            RejectReason::NotAMember => v1::RejectReason::NotAMember,
            RejectReason::WrongSlice => v1::RejectReason::WrongSlice,
            RejectReason::Undecodable => v1::RejectReason::Undecodable,
            RejectReason::NonFinite => v1::RejectReason::NonFinite,
            RejectReason::Late => v1::RejectReason::Late,
            RejectReason::Invalid => v1::RejectReason::Invalid,
        }
    }

    /// The reason a wire value names; `None` for one unknown to this version.
    fn from_proto(v: i32) -> Option<Self> {
        Some(match v1::RejectReason::try_from(v).ok()? {
            v1::RejectReason::Unspecified => return None,
            v1::RejectReason::BadSignature => RejectReason::BadSignature,
            v1::RejectReason::NotAMember => RejectReason::NotAMember,
            v1::RejectReason::WrongSlice => RejectReason::WrongSlice,
            v1::RejectReason::Undecodable => RejectReason::Undecodable,
            v1::RejectReason::NonFinite => RejectReason::NonFinite,
            v1::RejectReason::Late => RejectReason::Late,
            v1::RejectReason::Invalid => RejectReason::Invalid,
        })
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&Rejected> for RejectReason {
    fn from(r: &Rejected) -> Self {
        match r {
            Rejected::NotAMember { .. } => RejectReason::NotAMember,
            Rejected::Late => RejectReason::Late,
            Rejected::WrongSlice | Rejected::NotTheReducer => RejectReason::WrongSlice,
            Rejected::Invalid(Invalid::Undecodable(_)) => RejectReason::Undecodable,
            Rejected::Invalid(Invalid::NonFinite) => RejectReason::NonFinite,
        }
    }
}

/// A peer's refused updates of one reason, in one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection<P> {
    pub peer: P,
    pub reason: RejectReason,
    pub round: u64,
    /// The slice of the first refused update.
    pub slice: u32,
    /// How many were refused (at least 1).
    pub count: u64,
}

/// Refused updates, one entry per (peer, reason), at most [`MAX_REJECTIONS`] of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejections<P> {
    entries: BTreeMap<(P, RejectReason), Rejection<P>>,
    /// Refusals not listed: the list was full when their (peer, reason) first came.
    dropped: u64,
}

impl<P> Default for Rejections<P> {
    fn default() -> Self {
        Rejections {
            entries: BTreeMap::new(),
            dropped: 0,
        }
    }
}

impl<P: Ord + Clone> Rejections<P> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `count` refusals of `peer`'s updates for `reason`.
    fn add(&mut self, peer: &P, reason: RejectReason, round: u64, slice: u32, count: u64) {
        let key = (peer.clone(), reason);
        if let Some(e) = self.entries.get_mut(&key) {
            e.count = e.count.saturating_add(count);
        } else if self.entries.len() < MAX_REJECTIONS {
            self.entries.insert(
                key,
                Rejection {
                    peer: peer.clone(),
                    reason,
                    round,
                    slice,
                    count,
                },
            );
        } else {
            self.dropped = self.dropped.saturating_add(count);
        }
    }

    /// Counts one refused update of `peer`, for `slice` of `round`.
    pub fn note(&mut self, peer: &P, reason: RejectReason, round: u64, slice: u32) {
        self.add(peer, reason, round, slice, 1);
    }

    /// Adds another list's refusals (of another exchange of the round) to this one.
    pub fn merge(&mut self, other: Rejections<P>) {
        for e in other.entries.into_values() {
            self.add(&e.peer, e.reason, e.round, e.slice, e.count);
        }
        self.dropped = self.dropped.saturating_add(other.dropped);
    }

    /// The entries, by peer and reason.
    pub fn iter(&self) -> impl Iterator<Item = &Rejection<P>> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.dropped == 0
    }

    /// Refusals counted but not listed, because the list was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Every refusal counted, listed or not.
    pub fn total(&self) -> u64 {
        self.entries
            .values()
            .fold(self.dropped, |n, e| n.saturating_add(e.count))
    }
}

impl Rejections<PeerId> {
    /// The wire form: the entries (at most [`MAX_REJECTIONS`], at most
    /// [`MAX_ENCODED_BYTES`] encoded) and the count of those dropped.
    pub fn to_proto(&self) -> (Vec<v1::Rejection>, u64) {
        let list = self
            .entries
            .values()
            .map(|e| v1::Rejection {
                peer: e.peer.0.clone(),
                reason: e.reason.to_proto() as i32,
                round: e.round,
                slice: e.slice,
                count: e.count,
            })
            .collect();
        (list, self.dropped)
    }

    /// A report's list as a peer sent it, checked: at most [`MAX_REJECTIONS`] entries are
    /// kept (duplicates merged); entries beyond them, with a malformed peer id or a reason
    /// this version does not know, are only counted as dropped.
    pub fn from_proto(list: &[v1::Rejection], dropped: u64) -> Self {
        let mut out = Rejections {
            entries: BTreeMap::new(),
            dropped,
        };
        for w in list {
            let count = w.count.max(1);
            match (
                PeerId::from_wire(&w.peer),
                RejectReason::from_proto(w.reason),
            ) {
                (Ok(peer), Some(reason)) => out.add(&peer, reason, w.round, w.slice, count),
                _ => out.dropped = out.dropped.saturating_add(count),
            }
        }
        out
    }
}

/// What an older replica reported as text (`TrainReport.rejected`), bounded for a log: at
/// most [`MAX_REJECTIONS`] lines of at most [`MAX_LEGACY_CHARS`] characters.
pub fn legacy_lines(rejected: &[String]) -> impl Iterator<Item = &str> {
    rejected.iter().take(MAX_REJECTIONS).map(|s| {
        let end = s
            .char_indices()
            .nth(MAX_LEGACY_CHARS)
            .map_or(s.len(), |(i, _)| i);
        &s[..end]
    })
}

/// Characters of an older replica's refusal line that are logged.
pub const MAX_LEGACY_CHARS: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn peer(i: u32) -> PeerId {
        PeerId(i.to_be_bytes().to_vec())
    }

    #[test]
    fn refusals_are_merged_per_peer_and_reason() {
        let mut r = Rejections::new();
        for _ in 0..10_000 {
            r.note(&peer(1), RejectReason::NotAMember, 3, 0);
        }
        r.note(&peer(1), RejectReason::Late, 3, 1);
        r.note(&peer(2), RejectReason::NotAMember, 3, 2);
        assert_eq!(r.len(), 3);
        assert_eq!(r.dropped(), 0);
        assert_eq!(r.total(), 10_002);
        let first = r.iter().next().unwrap();
        assert_eq!(
            (first.reason, first.count, first.round),
            (RejectReason::NotAMember, 10_000, 3)
        );
    }

    #[test]
    fn a_full_list_counts_what_it_does_not_hold() {
        let mut r = Rejections::new();
        for i in 0..(MAX_REJECTIONS as u32 + 100) {
            r.note(&peer(i), RejectReason::WrongSlice, 1, 0);
            r.note(&peer(i), RejectReason::WrongSlice, 1, 0);
        }
        assert_eq!(r.len(), MAX_REJECTIONS);
        assert_eq!(r.dropped(), 200);
        assert_eq!(r.total(), 2 * (MAX_REJECTIONS as u64 + 100));
        // A listed peer's later refusals still count in its entry.
        r.note(&peer(0), RejectReason::WrongSlice, 1, 0);
        assert_eq!(r.iter().next().unwrap().count, 3);
    }

    #[test]
    fn merging_keeps_the_cap_and_the_counts() {
        let mut a = Rejections::new();
        let mut b = Rejections::new();
        for i in 0..MAX_REJECTIONS as u32 {
            a.note(&peer(i), RejectReason::Invalid, 1, 0);
            b.note(&peer(i + 1), RejectReason::Invalid, 1, 1);
        }
        b.note(&peer(1_000_000), RejectReason::Late, 1, 1);
        let total = a.total() + b.total();
        a.merge(b);
        assert_eq!(a.len(), MAX_REJECTIONS);
        assert_eq!(a.total(), total);
        assert_eq!(a.dropped(), 2);
    }

    #[test]
    fn a_full_list_of_the_largest_entries_encodes_within_its_bound() {
        let mut r = Rejections::new();
        for i in 0..(2 * MAX_REJECTIONS) {
            let mut id = vec![0xff; crate::MAX_PEER_ID_LEN];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            r.add(
                &PeerId(id),
                RejectReason::BadSignature,
                u64::MAX,
                u32::MAX,
                u64::MAX,
            );
        }
        let (rejections, rejections_dropped) = r.to_proto();
        let report = v1::TrainReport {
            rejections,
            rejections_dropped,
            ..Default::default()
        };
        let n = report.encoded_len();
        assert!(n <= MAX_ENCODED_BYTES, "{n} > {MAX_ENCODED_BYTES}");
    }

    #[test]
    fn the_wire_form_round_trips() {
        let mut r = Rejections::new();
        for (i, reason) in [
            RejectReason::BadSignature,
            RejectReason::NotAMember,
            RejectReason::WrongSlice,
            RejectReason::Undecodable,
            RejectReason::NonFinite,
            RejectReason::Late,
            RejectReason::Invalid,
        ]
        .into_iter()
        .enumerate()
        {
            r.note(&peer(i as u32), reason, 9, i as u32);
        }
        let (list, dropped) = r.to_proto();
        assert_eq!(Rejections::from_proto(&list, dropped), r);
    }

    #[test]
    fn a_peers_list_is_capped_and_checked_when_read() {
        let good = |i: u32| v1::Rejection {
            peer: peer(i).0,
            reason: v1::RejectReason::Late as i32,
            round: 2,
            slice: 0,
            count: 1,
        };
        let mut list: Vec<v1::Rejection> = (0..1_000).map(good).collect();
        list.push(v1::Rejection {
            peer: Vec::new(),
            ..good(0)
        });
        list.push(v1::Rejection {
            reason: 99,
            count: 5,
            ..good(0)
        });
        let r = Rejections::from_proto(&list, 7);
        assert_eq!(r.len(), MAX_REJECTIONS);
        assert_eq!(r.dropped(), 7 + (1_000 - MAX_REJECTIONS as u64) + 1 + 5);
        // The same peer and reason twice is one entry.
        let twice = Rejections::from_proto(&[good(1), good(1)], 0);
        assert_eq!(twice.len(), 1);
        assert_eq!(twice.total(), 2);
    }

    #[test]
    fn exchange_refusals_map_onto_the_fixed_reasons() {
        assert_eq!(
            RejectReason::from(&Rejected::NotAMember { round: 1 }),
            RejectReason::NotAMember
        );
        assert_eq!(
            RejectReason::from(&Rejected::NotTheReducer),
            RejectReason::WrongSlice
        );
        assert_eq!(
            RejectReason::from(&Rejected::Invalid(Invalid::Undecodable("x".into()))),
            RejectReason::Undecodable
        );
    }

    #[test]
    fn legacy_lines_are_bounded() {
        let long = "é".repeat(10_000);
        let lines: Vec<String> = std::iter::repeat_n(long, 1_000).collect();
        let out: Vec<&str> = legacy_lines(&lines).collect();
        assert_eq!(out.len(), MAX_REJECTIONS);
        assert!(out.iter().all(|l| l.chars().count() == MAX_LEGACY_CHARS));
    }
}
