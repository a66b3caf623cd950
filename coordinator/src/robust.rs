//! Robust aggregation rules for one slice: a per-coordinate trimmed mean and centred
//! clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
//! Optimization", 2021), chosen by a run's [`Aggregation`] and reached through
//! [`crate::aggregate::aggregate_with`].
//!
//! Why both: the norm bound of [`crate::aggregate::validate_updates`] refuses an update ten
//! times larger than the others', but a sign-flipped update, or noise of the same norm, passes
//! it and moves the mean by its whole weight. A trimmed mean bounds each coordinate by the
//! honest values' range as long as the attackers are no more than the trimmed share; centred
//! clipping bounds each contributor's pull on the result by a radius, whatever it sends.
//!
//! Determinism, as for the mean: the caller sorts contributions by peer id; every sum is taken
//! in f64 in an order fixed by the inputs alone (peer order, or for the trimmed mean the
//! order of the values with ties broken by peer order); the only output rounding is the final
//! f64 to f32. No hash maps, no threads. Permuting the contributions gives the same bytes.
//!
//! Token weights: a contribution's weight is its share of the tokens, as in the mean. The
//! trimmed mean trims by *count* (a peer cannot escape trimming by claiming more tokens) and
//! weights only the kept values, which all lie in the honest range when the attackers are no
//! more than the trimmed count. Centred clipping weights each clipped displacement, so a peer
//! moves the result by at most its token share times the clipping radius.

use std::fmt;
use std::str::FromStr;

use crate::aggregate::Contribution;

/// How a reducer turns a slice's accepted contributions into one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Aggregation {
    /// The token-weighted mean. Optimal with honest peers; one peer can move it anywhere
    /// within the norm bound.
    #[default]
    Mean,
    /// Per coordinate, drop the `floor(trim * n)` largest and as many smallest of the `n`
    /// values (never all: at most `(n - 1) / 2` each side), then take the token-weighted mean
    /// of the rest. Robust to as many attackers as it trims.
    TrimmedMean { trim: f64 },
    /// Start at the coordinate-wise median `v` (the previous round's value is not known to
    /// the seam), set the radius `T = tau * r` with `r` the median L2 distance of the
    /// contributions from that start, then `iters` times
    /// `v <- v + sum_i w_i * clip(x_i - v, T)`, where `clip` scales a vector down to norm `T`.
    /// With no attackers and `tau` above the spread of honest distances nothing is clipped and
    /// the first step lands on the mean. The radius is relative to the contributions' spread
    /// so that one `tau` fits any model and learning rate.
    CentredClip { tau: f64, iters: u32 },
}

/// The trimmed share `trimmed-mean` without a parameter means: robust to 2 attackers of 6.
pub const DEFAULT_TRIM: f64 = 0.4;
/// `centred-clip` without parameters: radius twice the median distance from the centre.
pub const DEFAULT_TAU: f64 = 2.0;
/// `centred-clip` without parameters: three clipping steps.
pub const DEFAULT_ITERS: u32 = 3;
/// The most clipping steps a run may ask for (each is two passes over the slice per peer).
pub const MAX_ITERS: u32 = 100;
/// The largest radius multiple a run may ask for (beyond it nothing is ever clipped).
pub const MAX_TAU: f64 = 1000.0;

impl Aggregation {
    /// The rule for a swarm that admits strangers: centred clipping with the defaults.
    pub const PUBLIC_DEFAULT: Aggregation = Aggregation::CentredClip {
        tau: DEFAULT_TAU,
        iters: DEFAULT_ITERS,
    };

    /// Whether this is the plain mean (which run manifests leave out of their canonical form).
    pub fn is_mean(&self) -> bool {
        *self == Aggregation::Mean
    }

    /// Checks the parameters: `trim` in `[0, 0.5)`, `tau` in `(0, MAX_TAU]`, `iters` in
    /// `1..=MAX_ITERS`.
    pub fn validate(&self) -> Result<(), AggregationError> {
        match *self {
            Aggregation::Mean => Ok(()),
            Aggregation::TrimmedMean { trim } => {
                if trim.is_finite() && (0.0..0.5).contains(&trim) {
                    Ok(())
                } else {
                    Err(AggregationError::Parameter {
                        rule: "trimmed-mean",
                        reason: format!("trim {trim} must be in [0, 0.5)"),
                    })
                }
            }
            Aggregation::CentredClip { tau, iters } => {
                if !(tau.is_finite() && tau > 0.0 && tau <= MAX_TAU) {
                    Err(AggregationError::Parameter {
                        rule: "centred-clip",
                        reason: format!("tau {tau} must be in (0, {MAX_TAU}]"),
                    })
                } else if !(1..=MAX_ITERS).contains(&iters) {
                    Err(AggregationError::Parameter {
                        rule: "centred-clip",
                        reason: format!("iters {iters} must be in 1..={MAX_ITERS}"),
                    })
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Why an aggregation rule was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AggregationError {
    #[error("unknown aggregation {0:?}: use mean, trimmed-mean[:TRIM] or centred-clip[:TAU:ITERS]")]
    Unknown(String),
    #[error("{rule}: {reason}")]
    Parameter { rule: &'static str, reason: String },
}

/// `mean`, `trimmed-mean:TRIM`, `centred-clip:TAU:ITERS`; parsed back by [`FromStr`].
impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregation::Mean => write!(f, "mean"),
            Aggregation::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
            Aggregation::CentredClip { tau, iters } => write!(f, "centred-clip:{tau}:{iters}"),
        }
    }
}

/// Parses `mean`, `trimmed-mean`, `trimmed-mean:TRIM`, `centred-clip` or
/// `centred-clip:TAU:ITERS`, and validates the parameters.
impl FromStr for Aggregation {
    type Err = AggregationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let params: Vec<&str> = parts.collect();
        let num = |rule: &'static str, p: &str| {
            p.parse::<f64>().map_err(|_| AggregationError::Parameter {
                rule,
                reason: format!("{p:?} is not a number"),
            })
        };
        let rule = match (name, params.as_slice()) {
            ("mean", []) => Aggregation::Mean,
            ("trimmed-mean", []) => Aggregation::TrimmedMean { trim: DEFAULT_TRIM },
            ("trimmed-mean", [t]) => Aggregation::TrimmedMean {
                trim: num("trimmed-mean", t)?,
            },
            ("centred-clip", []) => Aggregation::PUBLIC_DEFAULT,
            ("centred-clip", [tau, iters]) => Aggregation::CentredClip {
                tau: num("centred-clip", tau)?,
                iters: iters.parse().map_err(|_| AggregationError::Parameter {
                    rule: "centred-clip",
                    reason: format!("iters {iters:?} is not a whole number"),
                })?,
            },
            _ => return Err(AggregationError::Unknown(s.to_string())),
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// Per-coordinate trimmed mean of `sorted` (by peer id, all of length `len`, at least one)
/// with normalised token weights `w`.
pub(crate) fn trimmed_mean(
    sorted: &[&Contribution<'_>],
    w: &[f64],
    len: usize,
    trim: f64,
) -> Vec<f32> {
    let n = sorted.len();
    // floor(trim * n), at most (n - 1) / 2 so that one value is always kept.
    let cut = ((trim * n as f64).floor() as usize).min((n - 1) / 2);
    let mut col: Vec<(f32, usize)> = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(len);
    for j in 0..len {
        col.clear();
        col.extend(sorted.iter().enumerate().map(|(i, c)| (c.values[j], i)));
        // Peer index breaks ties, so the order (and the sum below) depends on inputs only.
        col.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let kept = &col[cut..n - cut];
        let wsum: f64 = kept.iter().map(|&(_, i)| w[i]).sum();
        let v = if wsum > 0.0 {
            kept.iter().map(|&(x, i)| w[i] * f64::from(x)).sum::<f64>() / wsum
        } else {
            // Only zero-token contributions survived: their plain mean.
            kept.iter().map(|&(x, _)| f64::from(x)).sum::<f64>() / kept.len() as f64
        };
        out.push(v as f32);
    }
    out
}

/// Coordinate-wise median (unweighted; the mean of the middle two for an even count).
fn coordinate_median(sorted: &[&Contribution<'_>], len: usize) -> Vec<f64> {
    let n = sorted.len();
    let mut col: Vec<f32> = Vec::with_capacity(n);
    (0..len)
        .map(|j| {
            col.clear();
            col.extend(sorted.iter().map(|c| c.values[j]));
            col.sort_unstable_by(f32::total_cmp);
            median_sorted_f32(&col)
        })
        .collect()
}

fn median_sorted_f32(s: &[f32]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        f64::from(s[n / 2])
    } else {
        (f64::from(s[n / 2 - 1]) + f64::from(s[n / 2])) / 2.0
    }
}

/// L2 distance of `x` from `v`, summed in index order.
fn distance(x: &[f32], v: &[f64]) -> f64 {
    x.iter()
        .zip(v)
        .map(|(a, b)| {
            let d = f64::from(*a) - b;
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// Centred clipping of `sorted` (by peer id, all of length `len`, at least one) with
/// normalised token weights `w`; see [`Aggregation::CentredClip`].
pub(crate) fn centred_clip(
    sorted: &[&Contribution<'_>],
    w: &[f64],
    len: usize,
    tau: f64,
    iters: u32,
) -> Vec<f32> {
    let mut v = coordinate_median(sorted, len);
    let mut dists: Vec<f64> = sorted.iter().map(|c| distance(c.values, &v)).collect();
    dists.sort_unstable_by(f64::total_cmp);
    let n = dists.len();
    let r = if n % 2 == 1 {
        dists[n / 2]
    } else {
        (dists[n / 2 - 1] + dists[n / 2]) / 2.0
    };
    // With r = 0 more than half the contributions sit on the median: it is the answer, and
    // a zero radius keeps it.
    let radius = tau * r;
    let mut step = vec![0f64; len];
    for _ in 0..iters {
        step.iter_mut().for_each(|s| *s = 0.0);
        for (c, wi) in sorted.iter().zip(w) {
            let d = distance(c.values, &v);
            let scale = if d <= radius { 1.0 } else { radius / d };
            let k = wi * scale;
            if k == 0.0 {
                continue;
            }
            for ((s, x), vj) in step.iter_mut().zip(c.values).zip(&v) {
                *s += k * (f64::from(*x) - vj);
            }
        }
        for (vj, s) in v.iter_mut().zip(&step) {
            *vj += s;
        }
    }
    v.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip_through_text() {
        for r in [
            Aggregation::Mean,
            Aggregation::TrimmedMean { trim: 0.25 },
            Aggregation::TrimmedMean { trim: DEFAULT_TRIM },
            Aggregation::CentredClip { tau: 1.5, iters: 4 },
            Aggregation::PUBLIC_DEFAULT,
        ] {
            assert_eq!(r.to_string().parse::<Aggregation>(), Ok(r));
        }
        assert_eq!(
            "trimmed-mean".parse(),
            Ok(Aggregation::TrimmedMean { trim: DEFAULT_TRIM })
        );
        assert_eq!("centred-clip".parse(), Ok(Aggregation::PUBLIC_DEFAULT));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        for bad in [
            "median",
            "mean:1",
            "trimmed-mean:0.5",
            "trimmed-mean:-0.1",
            "trimmed-mean:NaN",
            "trimmed-mean:x",
            "centred-clip:0:3",
            "centred-clip:inf:3",
            "centred-clip:2:0",
            "centred-clip:2:101",
            "centred-clip:2",
            "centred-clip:2:1.5",
            "",
        ] {
            assert!(bad.parse::<Aggregation>().is_err(), "{bad}");
        }
        assert!(matches!(
            "trimmed-mean:0.7".parse::<Aggregation>(),
            Err(AggregationError::Parameter {
                rule: "trimmed-mean",
                ..
            })
        ));
    }

    use crate::PeerId;
    use crate::aggregate::{AggregateError, aggregate_with};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const TRIM: Aggregation = Aggregation::TrimmedMean { trim: DEFAULT_TRIM };
    const CLIP: Aggregation = Aggregation::PUBLIC_DEFAULT;

    fn l2(a: &[f32], b: &[f64]) -> f64 {
        distance(a, b)
    }

    /// `n` honest updates around a shared direction (1.0 per coordinate) with noise of
    /// `sigma`, as pseudo-gradients of replicas that trained on similar data look.
    fn honest(rng: &mut ChaCha8Rng, n: usize, d: usize, sigma: f32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|_| 1.0 + sigma * (rng.random::<f32>() * 2.0 - 1.0))
                    .collect()
            })
            .collect()
    }

    #[derive(Debug, Clone, Copy)]
    enum Attack {
        Scaled,
        SignFlip,
        SameNormNoise,
    }

    fn attack(rng: &mut ChaCha8Rng, kind: Attack, base: &[f32]) -> Vec<f32> {
        match kind {
            Attack::Scaled => base.iter().map(|x| 100.0 * x).collect(),
            Attack::SignFlip => base.iter().map(|x| -x).collect(),
            Attack::SameNormNoise => {
                let noise: Vec<f32> = (0..base.len())
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                let nb = base.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nn = noise.iter().map(|x| x * x).sum::<f32>().sqrt();
                noise.iter().map(|x| x * nb / nn).collect()
            }
        }
    }

    fn run(rule: Aggregation, updates: &[Vec<f32>], tokens: &[u64]) -> Vec<f32> {
        let peers: Vec<PeerId> = (0..updates.len()).map(|i| PeerId(vec![i as u8])).collect();
        let cs: Vec<Contribution<'_>> = updates
            .iter()
            .zip(&peers)
            .zip(tokens)
            .map(|((v, p), t)| Contribution {
                peer: p,
                tokens: *t,
                values: v,
            })
            .collect();
        aggregate_with(rule, &cs).unwrap()
    }

    fn mean_of(updates: &[Vec<f32>]) -> Vec<f64> {
        let d = updates[0].len();
        (0..d)
            .map(|j| updates.iter().map(|u| f64::from(u[j])).sum::<f64>() / updates.len() as f64)
            .collect()
    }

    /// The honest radius: the largest distance of an honest update from the honest mean.
    fn radius(hon: &[Vec<f32>], m: &[f64]) -> f64 {
        hon.iter().map(|u| l2(u, m)).fold(0.0, f64::max)
    }

    /// Whether every coordinate of `r` lies within the honest values' range at it: the bound
    /// a trimmed mean meets when it trims at least as many values as there are attackers.
    fn within_honest_range(r: &[f32], hon: &[Vec<f32>]) -> bool {
        (0..r.len()).all(|j| {
            let lo = hon.iter().map(|u| u[j]).fold(f32::INFINITY, f32::min);
            let hi = hon.iter().map(|u| u[j]).fold(f32::NEG_INFINITY, f32::max);
            lo <= r[j] && r[j] <= hi
        })
    }

    /// Checks one attacked slice: `k` attackers among `n`, equal tokens. Stated bounds:
    /// the trimmed mean (trim 0.4, which trims `floor(0.4 n) >= k` values each side here) lies
    /// per coordinate inside the honest range; centred clipping lies within [`clip_bound`] of
    /// the honest mean; the plain mean lies more than five honest radii and more than that
    /// bound away.
    fn check_attack(seed: u64, n: usize, k: usize, kind: Attack) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let d = 64;
        let hon = honest(&mut rng, n - k, d, 0.05);
        let mut all = hon.clone();
        for a in 0..k {
            let base = hon[a % hon.len()].clone();
            all.push(attack(&mut rng, kind, &base));
        }
        let tokens = vec![100; n];
        let m_h = mean_of(&hon);
        let r_h = radius(&hon, &m_h);
        let mean = run(Aggregation::Mean, &all, &tokens);
        assert!(
            l2(&mean, &m_h) > 5.0 * r_h,
            "{kind:?} n={n} k={k}: the plain mean should be far off"
        );
        let tm = run(TRIM, &all, &tokens);
        assert!(
            within_honest_range(&tm, &hon),
            "{kind:?} n={n} k={k}: trimmed mean outside the honest range"
        );
        let cc = run(CLIP, &all, &tokens);
        let e = l2(&cc, &m_h);
        let bound = clip_bound(&all, k, &m_h, r_h);
        assert!(
            e <= bound,
            "{kind:?} n={n} k={k}: centred clip {e} from the honest mean, bound {bound}"
        );
        assert!(
            l2(&mean, &m_h) > bound,
            "{kind:?} n={n} k={k}: the plain mean is within the clipping bound"
        );
    }

    /// The bound centred clipping (tau 2, 3 steps) is held to with `k` attackers of equal
    /// weight `W = k / n` among `all`: while no honest update is clipped, each step's error
    /// `e' <= W e + W T` (the attackers' clipped pull), so after `L` steps from the median
    /// `e_L <= W^L e_0 + W T / (1 - W)`; one honest radius `r_h` more covers honest updates
    /// that are clipped. `T` is the rule's own radius (tau times the median distance from
    /// the coordinate-wise median).
    fn clip_bound(all: &[Vec<f32>], k: usize, m_h: &[f64], r_h: f64) -> f64 {
        let peers: Vec<PeerId> = (0..all.len()).map(|i| PeerId(vec![i as u8])).collect();
        let cs: Vec<Contribution<'_>> = all
            .iter()
            .zip(&peers)
            .map(|(v, p)| Contribution {
                peer: p,
                tokens: 1,
                values: v,
            })
            .collect();
        let refs: Vec<&Contribution<'_>> = cs.iter().collect();
        let v0 = coordinate_median(&refs, m_h.len());
        let mut d: Vec<f64> = all.iter().map(|u| l2(u, &v0)).collect();
        d.sort_unstable_by(f64::total_cmp);
        let n = d.len();
        let r0 = if n % 2 == 1 {
            d[n / 2]
        } else {
            (d[n / 2 - 1] + d[n / 2]) / 2.0
        };
        let t = DEFAULT_TAU * r0;
        let w = k as f64 / n as f64;
        let e0 = v0
            .iter()
            .zip(m_h)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        w.powi(DEFAULT_ITERS as i32) * e0 + w * t / (1.0 - w) + r_h
    }

    #[test]
    fn attackers_move_the_mean_but_not_the_robust_rules() {
        for kind in [Attack::Scaled, Attack::SignFlip, Attack::SameNormNoise] {
            for (n, k) in [(6, 1), (6, 2), (5, 2), (10, 4), (3, 1)] {
                for seed in 0..3 {
                    check_attack(seed, n, k, kind);
                }
            }
        }
    }

    /// With no attackers: centred clipping clips nothing (the honest distances are within
    /// twice their median) and is the mean to within 1e-6 of the honest radius; the trimmed
    /// mean is within 0.5 honest radius of it (it drops 40% of each side's values).
    #[test]
    fn without_attackers_the_robust_rules_stay_near_the_mean() {
        for seed in 0..5 {
            for n in [2, 3, 6, 10] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let hon = honest(&mut rng, n, 256, 0.05);
                let tokens: Vec<u64> = (0..n as u64).map(|i| 100 + 10 * i).collect();
                let mean = run(Aggregation::Mean, &hon, &tokens);
                let m: Vec<f64> = mean.iter().map(|x| f64::from(*x)).collect();
                let r = radius(&hon, &m);
                let cc = run(CLIP, &hon, &tokens);
                assert!(l2(&cc, &m) <= 1e-6 * r.max(1.0), "n={n}");
                let tm = run(TRIM, &hon, &tokens);
                assert!(l2(&tm, &m) <= 0.5 * r, "n={n}: {} vs {r}", l2(&tm, &m));
            }
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        for rule in [Aggregation::Mean, TRIM, CLIP] {
            assert_eq!(aggregate_with(rule, &[]), Err(AggregateError::Empty));
            let one = vec![vec![1.0f32, -2.0, 3.0]];
            assert_eq!(run(rule, &one, &[5]), one[0]);
            let same = vec![vec![0.5f32, 0.25]; 4];
            assert_eq!(run(rule, &same, &[1, 2, 3, 4]), same[0]);
            let two = vec![vec![1.0f32, 0.0], vec![3.0f32, 2.0]];
            let r = run(rule, &two, &[1, 1]);
            assert_eq!(r, vec![2.0, 1.0], "{rule}");
            let empty_vecs = vec![Vec::<f32>::new(); 3];
            assert!(run(rule, &empty_vecs, &[1, 1, 1]).is_empty());
            let zero = vec![vec![0.0f32; 3]; 3];
            assert_eq!(run(rule, &zero, &[1, 1, 1]), vec![0.0; 3]);
        }
        // Zero-token contributions alone in the kept middle: their plain mean.
        let v = vec![vec![0.0f32], vec![1.0], vec![2.0]];
        assert_eq!(
            run(Aggregation::TrimmedMean { trim: 0.4 }, &v, &[1, 0, 1]),
            vec![1.0]
        );
        // A bad rule is a typed error, not a panic.
        let v = [1.0f32];
        let peer = PeerId(vec![1]);
        let c = [Contribution {
            peer: &peer,
            tokens: 1,
            values: &v,
        }];
        assert!(matches!(
            aggregate_with(Aggregation::TrimmedMean { trim: 0.9 }, &c),
            Err(AggregateError::Rule(_))
        ));
    }

    fn contributions() -> impl Strategy<Value = (Vec<(u64, Vec<f32>)>, Vec<usize>)> {
        (1usize..8, 0usize..12).prop_flat_map(|(n, d)| {
            (
                proptest::collection::vec(
                    (0u64..1000, proptest::collection::vec(-1e3f32..1e3, d)),
                    n,
                ),
                Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
    }

    proptest! {
        /// Any arrival order gives the same bytes, for every rule.
        #[test]
        fn robust_rules_are_independent_of_arrival_order((cs, perm) in contributions()) {
            let peers: Vec<PeerId> = (0..cs.len()).map(|i| PeerId(vec![i as u8, 7])).collect();
            let mk = |order: &[usize]| -> Vec<Contribution<'_>> {
                order.iter().map(|&i| Contribution {
                    peer: &peers[i],
                    tokens: cs[i].0 + 1,
                    values: &cs[i].1,
                }).collect()
            };
            let ident: Vec<usize> = (0..cs.len()).collect();
            for rule in [
                Aggregation::Mean,
                TRIM,
                Aggregation::TrimmedMean { trim: 0.2 },
                CLIP,
                Aggregation::CentredClip { tau: 0.5, iters: 7 },
            ] {
                let a = aggregate_with(rule, &mk(&ident)).unwrap();
                let b = aggregate_with(rule, &mk(&perm)).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&a), bits(&b));
            }
        }

        /// A minority of x100, sign-flipped or same-norm-noise attackers (k < n/2) never
        /// breaks the stated bounds (see `check_attack`).
        #[test]
        fn minority_attacks_are_bounded(
            seed in any::<u64>(),
            n in 3usize..12,
            kind in prop_oneof![
                Just(Attack::Scaled), Just(Attack::SignFlip), Just(Attack::SameNormNoise)
            ],
        ) {
            let k = ((DEFAULT_TRIM * n as f64).floor() as usize).min((n - 1) / 2).max(1);
            check_attack(seed, n, k, kind);
        }
    }
}
