//! The reduction of one slice of a sharded exchange, shared by the daemon's exchange
//! (`session.rs`) and the in-process bytes benchmark (`benches/`): which contributions a
//! reducer accepts (the coordinator crate's validation), how it averages them (its
//! aggregation seam), and the codec the mean is re-encoded with. Pure functions: no
//! sockets, no clocks, so a benchmark that calls them measures the daemon's own reduction.

use std::collections::BTreeMap;

use libp2p::PeerId;
use potluck_coordinator::PeerId as CPeerId;
use potluck_coordinator::aggregate::{Contribution, ValidationLimits, reduce_with};
use potluck_worker::compress::Codec;

/// The run's rule for combining a slice's contributions.
pub use potluck_coordinator::aggregate::Aggregation;
/// A contribution whose norm is this many times the median of the others' is refused.
pub use potluck_coordinator::aggregate::MAX_NORM_RATIO;

/// The codec for a reduced slice: top-k keeps the union of the contributors' supports; any
/// other codec re-encodes the mean with itself. For `sign` that is the sign of the
/// token-weighted mean at its mean magnitude (with equal weights, signSGD's majority vote),
/// one bit per value like the contributions. On the one seed tried it ended lower than a
/// 2-bit encoding of the mean that cost 1.44x the bytes (docs/BENCHMARKS.md). Reducers keep
/// no error feedback: what the re-encoding drops is lost (feedback at the reducer was
/// tried, and made `sign` worse: docs/BENCHMARKS.md).
pub fn reduce_codec(codec: Codec, contributors: usize) -> Codec {
    match codec {
        Codec::TopK { chunk, k, .. } => Codec::TopK {
            chunk,
            k: (k.saturating_mul(contributors.max(1) as u32)).min(chunk),
            bits: 8,
        },
        other => other,
    }
}

/// Validates the contributions to one slice with the coordinator crate's rules (length,
/// finiteness, tokens, norm against the others), then combines the accepted ones with its
/// aggregation seam by the run's `rule` (the mean, or a robust rule: every replica reduces
/// with the one its run id names). The peers whose contributions it refuses are appended to `refused`
/// (the reason of each is logged; the caller counts them). Returns the mean and the peers
/// it folds in; with no acceptable contribution the slice's update is zero.
pub fn reduce_slice(
    contributions: &BTreeMap<PeerId, (u64, Vec<f32>)>,
    len: usize,
    rule: Aggregation,
    refused: &mut Vec<PeerId>,
) -> (Vec<f32>, Vec<PeerId>) {
    if contributions.is_empty() {
        // Every member abstained or was silent: a zero update, nothing to warn about.
        return (vec![0.0; len], Vec::new());
    }
    let ids: Vec<(PeerId, CPeerId)> = contributions
        .keys()
        .map(|p| (*p, CPeerId(p.to_bytes())))
        .collect();
    let all: Vec<Contribution<'_>> = ids
        .iter()
        .zip(contributions.values())
        .map(|((_, c), (tokens, values))| Contribution {
            peer: c,
            tokens: *tokens,
            values,
        })
        .collect();
    let limits = ValidationLimits {
        expected_len: len,
        max_norm_ratio: MAX_NORM_RATIO,
    };
    let r = reduce_with(rule, &all, limits);
    for x in &r.refused {
        let peer = ids[x.index].0;
        tracing::warn!(%peer, reason = ?x.reason, "contribution refused by the reduction");
        refused.push(peer);
    }
    match r.mean {
        Ok(avg) => (avg, r.kept.iter().map(|&i| ids[i].0).collect()),
        Err(e) => {
            tracing::warn!(error = %e, "nothing to reduce for this slice");
            (vec![0.0; len], Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    /// Two of five reducers' contributors send the honest update sign-flipped and 9 times
    /// larger: under the norm bound (10x the others' median), so validation keeps them. The
    /// mean follows them; centred clipping and the trimmed mean stay near the honest value.
    #[test]
    fn the_runs_rule_decides_what_a_minority_of_attackers_can_do() {
        let peers: Vec<PeerId> = (0..5)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let mut c = BTreeMap::new();
        for (i, p) in peers.iter().enumerate() {
            let v = if i < 3 {
                vec![1.0 + 0.01 * i as f32, 1.0, -1.0]
            } else {
                vec![-9.0, -9.0, 9.0]
            };
            c.insert(*p, (100, v));
        }
        let off = |v: &[f32]| {
            (v[0] - 1.01)
                .abs()
                .max((v[1] - 1.0).abs())
                .max((v[2] + 1.0).abs())
        };
        let mut refused = Vec::new();
        let (mean, used) = reduce_slice(&c, 3, Aggregation::Mean, &mut refused);
        assert!(refused.is_empty() && used.len() == 5);
        assert!(off(&mean) > 3.0, "{mean:?}");
        for rule in [
            Aggregation::PUBLIC_DEFAULT,
            Aggregation::TrimmedMean { trim: 0.4 },
        ] {
            let (v, used) = reduce_slice(&c, 3, rule, &mut refused);
            assert!(refused.is_empty() && used.len() == 5);
            assert!(off(&v) < 0.5, "{rule}: {v:?}");
        }
    }
}
