//! The aggregation seam: how the replicas' updates become one update, and which updates are
//! refused before that. The rule is the run's [`Aggregation`]: the token-weighted mean, or
//! one of the robust rules of [`crate::robust`] (a per-coordinate trimmed mean, centred
//! clipping), reached through [`aggregate_with`] and [`reduce_with`].
//!
//! The order of summation is fixed (by peer id) and the sum is taken in f64, so every
//! replica that aggregates the same contributions gets bit-identical f32 results, whatever
//! order the updates arrived in: the weights' hashes can only agree if this holds. The robust
//! rules keep that property (see [`crate::robust`]).

use crate::PeerId;
pub use crate::robust::{Aggregation, AggregationError};

/// One replica's update for a round.
#[derive(Debug, Clone, Copy)]
pub struct Contribution<'a> {
    pub peer: &'a PeerId,
    /// Tokens the replica trained on; the weight of its update.
    pub tokens: u64,
    pub values: &'a [f32],
}

/// Why contributions could not be aggregated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AggregateError {
    #[error("no contributions to aggregate")]
    Empty,
    #[error("contributions weigh zero tokens in total")]
    NoTokens,
    #[error("contribution of {peer} has {got} values, expected {expected}")]
    WrongLength {
        peer: PeerId,
        expected: usize,
        got: usize,
    },
    #[error("{peer} contributed twice")]
    DuplicatePeer { peer: PeerId },
    #[error("aggregation rule: {0}")]
    Rule(AggregationError),
}

/// Token-weighted mean of the contributions, summed in peer-id order.
pub fn aggregate(contributions: &[Contribution<'_>]) -> Result<Vec<f32>, AggregateError> {
    aggregate_with(Aggregation::Mean, contributions)
}

/// The contributions aggregated by `rule`, after the same checks as [`aggregate`] (none,
/// duplicate peers, unequal lengths, zero tokens in total). A rule with parameters out of
/// range (see [`Aggregation::validate`]) is refused.
pub fn aggregate_with(
    rule: Aggregation,
    contributions: &[Contribution<'_>],
) -> Result<Vec<f32>, AggregateError> {
    rule.validate().map_err(AggregateError::Rule)?;
    let mut sorted: Vec<&Contribution<'_>> = contributions.iter().collect();
    sorted.sort_by(|a, b| a.peer.cmp(b.peer));
    let first = sorted.first().ok_or(AggregateError::Empty)?;
    let len = first.values.len();
    for w in sorted.windows(2) {
        if w[0].peer == w[1].peer {
            return Err(AggregateError::DuplicatePeer {
                peer: w[1].peer.clone(),
            });
        }
    }
    let mut total: u128 = 0;
    for c in &sorted {
        if c.values.len() != len {
            return Err(AggregateError::WrongLength {
                peer: c.peer.clone(),
                expected: len,
                got: c.values.len(),
            });
        }
        total += u128::from(c.tokens);
    }
    if total == 0 {
        return Err(AggregateError::NoTokens);
    }
    let weights: Vec<f64> = sorted
        .iter()
        .map(|c| c.tokens as f64 / total as f64)
        .collect();
    Ok(match rule {
        Aggregation::Mean => {
            let mut acc = vec![0f64; len];
            for (c, w) in sorted.iter().zip(&weights) {
                for (a, v) in acc.iter_mut().zip(c.values) {
                    *a += w * f64::from(*v);
                }
            }
            acc.into_iter().map(|x| x as f32).collect()
        }
        Aggregation::TrimmedMean { trim } => {
            crate::robust::trimmed_mean(&sorted, &weights, len, trim)
        }
        Aggregation::CentredClip { tau, iters } => {
            crate::robust::centred_clip(&sorted, &weights, len, tau, iters)
        }
    })
}

/// Why a contribution is refused before aggregation.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateFault {
    WrongLength {
        expected: usize,
        got: usize,
    },
    NonFinite {
        index: usize,
    },
    NoTokens,
    /// Its L2 norm exceeds `max_ratio` times the median norm of the other contributions.
    NormTooLarge {
        norm: f64,
        others_median: f64,
    },
}

/// A refused contribution: `index` into the slice given to [`validate_updates`].
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub index: usize,
    pub peer: PeerId,
    pub reason: UpdateFault,
}

/// A contribution whose norm is this many times the median of the others' is refused by a
/// reducer (the daemon's limit, and the simulation's).
pub const MAX_NORM_RATIO: f64 = 10.0;

/// Limits applied by [`validate_updates`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidationLimits {
    pub expected_len: usize,
    /// A norm more than this many times the others' median is refused.
    pub max_norm_ratio: f64,
}

/// Checks every contribution and returns those to refuse, with the reason. The norm test
/// compares each update with the median of the *other* well-formed updates, so with two
/// peers each is judged against the other; it is skipped when fewer than two updates are
/// well-formed or when the others' median is zero (nothing to compare with).
pub fn validate_updates(
    contributions: &[Contribution<'_>],
    limits: ValidationLimits,
) -> Vec<Rejection> {
    let mut out = Vec::new();
    let mut norms: Vec<(f64, usize)> = Vec::new();
    for (i, c) in contributions.iter().enumerate() {
        let reason = if c.values.len() != limits.expected_len {
            Some(UpdateFault::WrongLength {
                expected: limits.expected_len,
                got: c.values.len(),
            })
        } else if let Some(index) = c.values.iter().position(|v| !v.is_finite()) {
            Some(UpdateFault::NonFinite { index })
        } else if c.tokens == 0 {
            Some(UpdateFault::NoTokens)
        } else {
            None
        };
        match reason {
            Some(reason) => out.push(Rejection {
                index: i,
                peer: c.peer.clone(),
                reason,
            }),
            None => {
                let n = c
                    .values
                    .iter()
                    .map(|v| f64::from(*v) * f64::from(*v))
                    .sum::<f64>()
                    .sqrt();
                norms.push((n, i));
            }
        }
    }
    if norms.len() >= 2 {
        norms.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let sorted: Vec<f64> = norms.iter().map(|(n, _)| *n).collect();
        for (k, (norm, i)) in norms.iter().enumerate() {
            let med = median_without(&sorted, k);
            if med > 0.0 && *norm > limits.max_norm_ratio * med {
                out.push(Rejection {
                    index: *i,
                    peer: contributions[*i].peer.clone(),
                    reason: UpdateFault::NormTooLarge {
                        norm: *norm,
                        others_median: med,
                    },
                });
            }
        }
    }
    out.sort_by_key(|r| r.index);
    out
}

/// What a reducer makes of one slice's contributions ([`reduce`]).
#[derive(Debug, PartialEq)]
pub struct Reduction {
    /// The accepted contributions aggregated by the rule (the mean unless
    /// [`reduce_with`] was given another), or why there is none.
    pub mean: Result<Vec<f32>, AggregateError>,
    /// Indices (into the contributions given) of those folded into the mean.
    pub kept: Vec<usize>,
    /// Those refused, with the reason.
    pub refused: Vec<Rejection>,
}

/// A reducer's work on one slice: refuses what [`validate_updates`] refuses and averages the
/// rest with [`aggregate`]. The daemon's reduction and the exchange simulation both call
/// this, so they agree on what is kept and on every bit of the mean.
pub fn reduce(contributions: &[Contribution<'_>], limits: ValidationLimits) -> Reduction {
    reduce_with(Aggregation::Mean, contributions, limits)
}

/// [`reduce`] with the run's aggregation rule in place of the mean: the same validation, then
/// [`aggregate_with`].
pub fn reduce_with(
    rule: Aggregation,
    contributions: &[Contribution<'_>],
    limits: ValidationLimits,
) -> Reduction {
    let refused = validate_updates(contributions, limits);
    let kept: Vec<usize> = (0..contributions.len())
        .filter(|i| !refused.iter().any(|r| r.index == *i))
        .collect();
    let accepted: Vec<Contribution<'_>> = kept.iter().map(|&i| contributions[i]).collect();
    Reduction {
        mean: aggregate_with(rule, &accepted),
        kept,
        refused,
    }
}

/// Median of the sorted slice `s` with the element at `skip` left out (`s.len() >= 2`).
fn median_without(s: &[f64], skip: usize) -> f64 {
    let m = s.len() - 1;
    let at = |j: usize| if j < skip { s[j] } else { s[j + 1] };
    if m % 2 == 1 {
        at(m / 2)
    } else {
        (at(m / 2 - 1) + at(m / 2)) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u8) -> PeerId {
        PeerId(vec![i])
    }

    #[test]
    fn weighted_mean_is_independent_of_arrival_order() {
        let (a, b, c) = (p(1), p(2), p(3));
        let va = [1.0f32, 0.1, -3.0];
        let vb = [3.0f32, 0.2, 7.0];
        let vc = [0.3f32, 1e-7, 2.5];
        let x = [
            Contribution {
                peer: &a,
                tokens: 1,
                values: &va,
            },
            Contribution {
                peer: &b,
                tokens: 3,
                values: &vb,
            },
            Contribution {
                peer: &c,
                tokens: 7,
                values: &vc,
            },
        ];
        let y = [x[2], x[0], x[1]];
        let r1 = aggregate(&x).unwrap();
        let r2 = aggregate(&y).unwrap();
        assert_eq!(
            r1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            r2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let expect0 = (1.0 * 1.0 + 3.0 * 3.0 + 0.3 * 7.0) / 11.0;
        assert!((r1[0] - expect0 as f32).abs() < 1e-6);
    }

    #[test]
    fn aggregate_refuses_bad_input() {
        let (a, b) = (p(1), p(2));
        let v2 = [1.0f32, 2.0];
        let v3 = [1.0f32, 2.0, 3.0];
        assert_eq!(aggregate(&[]), Err(AggregateError::Empty));
        let e = aggregate(&[
            Contribution {
                peer: &a,
                tokens: 1,
                values: &v2,
            },
            Contribution {
                peer: &b,
                tokens: 1,
                values: &v3,
            },
        ]);
        assert!(matches!(e, Err(AggregateError::WrongLength { got: 3, .. })));
        let e = aggregate(&[
            Contribution {
                peer: &a,
                tokens: 0,
                values: &v2,
            },
            Contribution {
                peer: &b,
                tokens: 0,
                values: &v2,
            },
        ]);
        assert_eq!(e, Err(AggregateError::NoTokens));
        let e = aggregate(&[
            Contribution {
                peer: &a,
                tokens: 1,
                values: &v2,
            },
            Contribution {
                peer: &a,
                tokens: 1,
                values: &v2,
            },
        ]);
        assert!(matches!(e, Err(AggregateError::DuplicatePeer { .. })));
    }

    #[test]
    fn validation_names_each_bad_update() {
        let peers: Vec<PeerId> = (0..6).map(p).collect();
        let ok1 = [1.0f32, 0.0];
        let ok2 = [0.0f32, 1.1];
        let ok3 = [0.9f32, 0.0];
        let huge = [100.0f32, 0.0];
        let nan = [f32::NAN, 0.0];
        let short = [1.0f32];
        let cs = [
            Contribution {
                peer: &peers[0],
                tokens: 5,
                values: &ok1,
            },
            Contribution {
                peer: &peers[1],
                tokens: 5,
                values: &huge,
            },
            Contribution {
                peer: &peers[2],
                tokens: 5,
                values: &nan,
            },
            Contribution {
                peer: &peers[3],
                tokens: 5,
                values: &ok2,
            },
            Contribution {
                peer: &peers[4],
                tokens: 5,
                values: &short,
            },
            Contribution {
                peer: &peers[5],
                tokens: 5,
                values: &ok3,
            },
        ];
        let rej = validate_updates(
            &cs,
            ValidationLimits {
                expected_len: 2,
                max_norm_ratio: 10.0,
            },
        );
        let got: Vec<(usize, &UpdateFault)> = rej.iter().map(|r| (r.index, &r.reason)).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(got[0], (1, UpdateFault::NormTooLarge { .. })));
        assert!(matches!(got[1], (2, UpdateFault::NonFinite { index: 0 })));
        assert!(matches!(
            got[2],
            (
                4,
                UpdateFault::WrongLength {
                    expected: 2,
                    got: 1
                }
            )
        ));
    }

    #[test]
    fn two_peers_are_judged_against_each_other() {
        let (a, b) = (p(1), p(2));
        let small = [1.0f32];
        let big = [50.0f32];
        let cs = [
            Contribution {
                peer: &a,
                tokens: 1,
                values: &small,
            },
            Contribution {
                peer: &b,
                tokens: 1,
                values: &big,
            },
        ];
        let rej = validate_updates(
            &cs,
            ValidationLimits {
                expected_len: 1,
                max_norm_ratio: 10.0,
            },
        );
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].peer, b);
    }
}
