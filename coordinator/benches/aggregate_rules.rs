//! What each aggregation rule costs per slice against the plain mean: one JSON object per
//! line with the median wall time of one `aggregate_with` call over `peers` contributions
//! of `len` values, and its ratio to the mean's, all measured in the same process side by
//! side (rules interleaved per repetition, so drift hits them alike).
//!
//! `cargo bench -p potluck-coordinator --bench aggregate_rules`

use std::time::Instant;

use potluck_coordinator::PeerId;
use potluck_coordinator::aggregate::{Aggregation, Contribution, aggregate_with};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const REPS: usize = 7;

fn main() {
    let rules = [
        Aggregation::Mean,
        Aggregation::TrimmedMean { trim: 0.4 },
        Aggregation::PUBLIC_DEFAULT,
    ];
    for (peers, len) in [(6usize, 1usize << 18), (16, 1 << 16), (64, 1 << 14)] {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let ids: Vec<PeerId> = (0..peers).map(|i| PeerId(vec![i as u8])).collect();
        let values: Vec<Vec<f32>> = (0..peers)
            .map(|_| (0..len).map(|_| rng.random::<f32>() - 0.5).collect())
            .collect();
        let cs: Vec<Contribution<'_>> = ids
            .iter()
            .zip(&values)
            .map(|(p, v)| Contribution {
                peer: p,
                tokens: 1000,
                values: v,
            })
            .collect();
        let mut times = vec![Vec::with_capacity(REPS); rules.len()];
        for _ in 0..REPS {
            for (r, rule) in rules.iter().enumerate() {
                let t = Instant::now();
                let out = aggregate_with(*rule, &cs);
                times[r].push(t.elapsed().as_secs_f64() * 1e3);
                assert!(out.is_ok());
            }
        }
        let median = |t: &mut Vec<f64>| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let meds: Vec<f64> = times.iter_mut().map(median).collect();
        for (rule, ms) in rules.iter().zip(&meds) {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "aggregate_rules",
                    "rule": rule.to_string(),
                    "peers": peers,
                    "len": len,
                    "median_ms": ms,
                    "vs_mean": ms / meds[0],
                })
            );
        }
    }
}
