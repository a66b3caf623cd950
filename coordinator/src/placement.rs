//! Placement planner: from the peers' capability records to an assignment of data shards,
//! proportional to each peer's measured training throughput and stable under small changes
//! of membership. Pipeline stages and experts are not planned yet (see the crate's issue);
//! they will come here as more pure functions over the same [`PeerCapability`] list.
//!
//! Method: weighted rendezvous hashing. Each shard goes to the peer with the highest score
//! `-w / ln(u)`, where `u` in (0, 1) is a hash of (run, peer, shard) and `w` the peer's
//! weight. A shard moves only when the peer that wins it leaves or a new peer outscores it,
//! so a join or leave moves about `shards / peers` shards, and each peer's expected share
//! is proportional to its weight.

use crate::{Hash32, PeerId};
use potluck_proto::{DecodeError, invalid, v1};
use std::collections::BTreeMap;

/// What the planner needs to know about a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCapability {
    pub peer: PeerId,
    /// Tokens per second of the reference step; 0 when not measured yet.
    pub train_tokens_per_sec: f64,
    pub memory_bytes: u64,
    pub bandwidth_bytes_per_sec: f64,
}

impl TryFrom<&v1::CapabilityRecord> for PeerCapability {
    type Error = DecodeError;

    fn try_from(r: &v1::CapabilityRecord) -> Result<Self, DecodeError> {
        let c = r
            .capabilities
            .as_ref()
            .ok_or_else(|| invalid("capability record", "no capabilities"))?;
        let finite = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        Ok(PeerCapability {
            peer: PeerId::from_wire(&r.peer_id)?,
            train_tokens_per_sec: finite(c.train_tokens_per_sec),
            memory_bytes: c.memory_bytes,
            bandwidth_bytes_per_sec: finite(c.bandwidth_bytes_per_sec),
        })
    }
}

/// A peer's weight: its throughput, or the median of the measured ones while it has none
/// (so a new peer is neither starved nor flooded), clamped to keep scores finite.
fn weights(peers: &[PeerCapability]) -> Vec<f64> {
    let mut measured: Vec<f64> = peers
        .iter()
        .map(|p| p.train_tokens_per_sec)
        .filter(|x| *x > 0.0)
        .collect();
    measured.sort_by(f64::total_cmp);
    let fallback = measured.get(measured.len() / 2).copied().unwrap_or(1.0);
    peers
        .iter()
        .map(|p| {
            let w = if p.train_tokens_per_sec > 0.0 {
                p.train_tokens_per_sec
            } else {
                fallback
            };
            w.clamp(1e-6, 1e15)
        })
        .collect()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Assigns shards `0..num_shards` to peers in proportion to their throughput; returns each
/// peer's shards (sorted), peers sorted by id; peers listed twice count once.
pub fn plan_data_shards(
    run_id: &Hash32,
    peers: &[PeerCapability],
    num_shards: u32,
) -> BTreeMap<PeerId, Vec<u32>> {
    let mut uniq: BTreeMap<&PeerId, &PeerCapability> = BTreeMap::new();
    for p in peers {
        uniq.entry(&p.peer).or_insert(p);
    }
    let list: Vec<PeerCapability> = uniq.values().map(|p| (*p).clone()).collect();
    let w = weights(&list);
    let keys: Vec<u64> = list
        .iter()
        .map(|p| {
            let mut h = blake3::Hasher::new();
            h.update(b"potluck/placement/v1");
            h.update(&run_id.0);
            h.update(&p.peer.0);
            let mut b = [0u8; 8];
            b.copy_from_slice(&h.finalize().as_bytes()[..8]);
            u64::from_le_bytes(b)
        })
        .collect();
    let mut out: BTreeMap<PeerId, Vec<u32>> =
        list.iter().map(|p| (p.peer.clone(), Vec::new())).collect();
    if list.is_empty() {
        return out;
    }
    for s in 0..num_shards {
        let sh = splitmix(u64::from(s) ^ 0x5eed);
        let mut best = (f64::NEG_INFINITY, 0usize);
        for (i, k) in keys.iter().enumerate() {
            // u in (0, 1): 53 random bits, never 0 or 1.
            let u = ((splitmix(k ^ sh) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -w[i] / u.ln();
            if score > best.0 {
                best = (score, i);
            }
        }
        if let Some(v) = out.get_mut(&list[best.1].peer) {
            v.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(i: u32, tps: f64) -> PeerCapability {
        PeerCapability {
            peer: PeerId(i.to_be_bytes().to_vec()),
            train_tokens_per_sec: tps,
            memory_bytes: 1 << 30,
            bandwidth_bytes_per_sec: 1e8,
        }
    }

    #[test]
    fn shares_follow_throughput() {
        let run = Hash32([1; 32]);
        let peers = vec![cap(1, 100.0), cap(2, 300.0), cap(3, 0.0)];
        let plan = plan_data_shards(&run, &peers, 6000);
        let n = |i: u32| plan[&PeerId(i.to_be_bytes().to_vec())].len() as f64;
        assert_eq!(plan.values().map(Vec::len).sum::<usize>(), 6000);
        // weights 100 : 300 : 300 (unmeasured peer gets the median) -> 1/7, 3/7, 3/7
        assert!((n(1) / 6000.0 - 1.0 / 7.0).abs() < 0.03, "{}", n(1));
        assert!((n(2) / 6000.0 - 3.0 / 7.0).abs() < 0.03, "{}", n(2));
    }

    #[test]
    fn a_join_moves_only_the_newcomers_share() {
        let run = Hash32([2; 32]);
        let mut peers: Vec<PeerCapability> = (0..20).map(|i| cap(i, 100.0)).collect();
        let before = plan_data_shards(&run, &peers, 4000);
        peers.push(cap(99, 100.0));
        let after = plan_data_shards(&run, &peers, 4000);
        let owner = |plan: &BTreeMap<PeerId, Vec<u32>>| {
            let mut o = vec![PeerId(vec![]); 4000];
            for (p, ss) in plan {
                for s in ss {
                    o[*s as usize] = p.clone();
                }
            }
            o
        };
        let (a, b) = (owner(&before), owner(&after));
        let moved = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        let newcomer = after[&PeerId(99u32.to_be_bytes().to_vec())].len();
        assert_eq!(moved, newcomer, "only shards the newcomer won moved");
        assert!(moved < 4000 / 10);
    }

    #[test]
    fn capability_record_conversion_checks_input() {
        let mut r = v1::CapabilityRecord {
            protocol_version: 1,
            peer_id: vec![1; 38],
            capabilities: Some(v1::Capabilities {
                train_tokens_per_sec: f64::NAN,
                ..Default::default()
            }),
            listen_addrs: vec![],
            issued_at_ms: 0,
        };
        assert_eq!(
            PeerCapability::try_from(&r).unwrap().train_tokens_per_sec,
            0.0
        );
        r.peer_id = vec![];
        assert!(PeerCapability::try_from(&r).is_err());
        r.peer_id = vec![1];
        r.capabilities = None;
        assert!(PeerCapability::try_from(&r).is_err());
    }
}
