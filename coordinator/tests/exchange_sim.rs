//! The exchange machine under the in-memory simulation (`potluck_coordinator::sim`): whole
//! exchanges of many peers with crashes at any step, late and duplicated frames, loss and
//! partitions, checked for the properties the daemon relies on.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use potluck_coordinator::PeerId;
use potluck_coordinator::aggregate::{Contribution, MAX_NORM_RATIO, ValidationLimits, reduce};
use potluck_coordinator::exchange::GONE_GRACE;
use potluck_coordinator::sim::{Fault, SimConfig, SimReport, exchange_limit, run, update_of};
use proptest::prelude::*;

/// Bit patterns of what a peer applied in each part (`None`: a missing slice).
fn applied_bits(r: &SimReport, p: usize) -> Vec<Vec<Option<Vec<u32>>>> {
    r.peers[p]
        .applied
        .iter()
        .map(|part| {
            part.iter()
                .map(|s| s.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect()))
                .collect()
        })
        .collect()
}

/// What must hold in every run, whatever the faults.
fn check_always(cfg: &SimConfig, r: &SimReport) -> Result<(), TestCaseError> {
    prop_assert!(r.violations.is_empty(), "violations: {:?}", r.violations);
    for (p, peer) in r.peers.iter().enumerate() {
        if !peer.alive {
            continue;
        }
        // Every live peer finishes every part, each by its deadline.
        prop_assert_eq!(peer.finished.len(), cfg.parts as usize, "peer {}", p);
        for (s, f) in peer.started.iter().zip(&peer.finished) {
            prop_assert!(
                *f - *s <= exchange_limit(cfg.span),
                "peer {} ran past its deadline",
                p
            );
        }
        // Whatever it applied, some peer reduced (nothing invented, nothing mixed).
        for (part, slices) in peer.applied.iter().enumerate() {
            for (slice, got) in slices.iter().enumerate() {
                if let Some(v) = got {
                    let made = r.produced.get(&(part as u32, slice));
                    prop_assert!(
                        made.is_some_and(|m| m.iter().any(|x| x[..] == v[..])),
                        "peer {} applied a slice {} of part {} nobody reduced",
                        p,
                        slice,
                        part
                    );
                }
            }
        }
    }
    Ok(())
}

/// Every live peer applied the same bytes in every part.
fn check_agreement(r: &SimReport) -> Result<(), TestCaseError> {
    let live: Vec<usize> = (0..r.peers.len()).filter(|p| r.peers[*p].alive).collect();
    if let Some(first) = live.first() {
        let want = applied_bits(r, *first);
        for p in &live[1..] {
            prop_assert_eq!(
                &applied_bits(r, *p),
                &want,
                "peers {} and {} disagree",
                first,
                p
            );
        }
    }
    Ok(())
}

#[test]
fn a_clean_exchange_applies_every_members_mean_everywhere() {
    let cfg = SimConfig::clean(7, 1);
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // The mean of every update, slice by slice, with the reducer's own rule.
    let n = cfg.peers;
    let vps = cfg.values_per_slice;
    let updates: Vec<Vec<f32>> = (0..n).map(|p| update_of(cfg.seed, p, 0, n * vps)).collect();
    let ids: Vec<PeerId> = (0..n as u32)
        .map(|p| PeerId(p.to_be_bytes().to_vec()))
        .collect();
    for (slice, got) in r.peers[0].applied[0].iter().enumerate() {
        let range = slice * vps..(slice + 1) * vps;
        let all: Vec<Contribution<'_>> = (0..n)
            .map(|p| Contribution {
                peer: &ids[p],
                tokens: 1 + (p as u64 % 4),
                values: &updates[p][range.clone()],
            })
            .collect();
        let limits = ValidationLimits {
            expected_len: vps,
            max_norm_ratio: MAX_NORM_RATIO,
        };
        let want = reduce(&all, limits).mean.unwrap();
        assert_eq!(got.as_deref(), Some(&want), "slice {slice}");
    }
    for p in 1..n {
        assert_eq!(applied_bits(&r, p), applied_bits(&r, 0));
    }
    // Each slice reduced once, by its reducer, and nobody took one over.
    assert!(r.produced.values().all(|v| v.len() == 1));
    assert!(r.peers.iter().all(|p| p.took_over == 0));
    // Done long before the deadline phases.
    assert!(
        r.peers
            .iter()
            .all(|p| p.finished[0] < Duration::from_millis(100))
    );
}

#[test]
fn the_simulation_is_deterministic() {
    let mut cfg = SimConfig::clean(9, 3);
    cfg.loss = 0.1;
    cfg.duplicate = 0.2;
    cfg.parts = 2;
    cfg.faults = vec![Fault::CrashAtStep { peer: 2, step: 11 }];
    let a = run(&cfg);
    let b = run(&cfg);
    assert_eq!(
        (a.frames, a.lost, a.refused, a.end),
        (b.frames, b.lost, b.refused, b.end)
    );
    for p in 0..cfg.peers {
        assert_eq!(applied_bits(&a, p), applied_bits(&b, p));
    }
}

/// The reducer dies holding every contribution, before it sends the mean (the process
/// test's `CrashPoint::ReducerBeforeSending`): its backup reduces the slice from the copies
/// the others send it at 70%, and everyone applies that.
#[test]
fn a_reducer_dead_before_sending_is_replaced_by_its_backup() {
    let mut cfg = SimConfig::clean(4, 5);
    // Peer 2's actions: 4 sends, then its reduction (step 4).
    cfg.faults = vec![Fault::CrashAtStep { peer: 2, step: 4 }];
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.peers[3].took_over, 1, "the backup of slice 2 is peer 3");
    let applied = &r.peers[0].applied[0];
    assert!(applied.iter().all(Option::is_some), "no slice missing");
    // The backup's mean is that of the three survivors' slices.
    let slice = 2;
    let range = slice * cfg.values_per_slice..(slice + 1) * cfg.values_per_slice;
    let updates: Vec<Vec<f32>> = [0usize, 1, 3]
        .iter()
        .map(|p| update_of(cfg.seed, *p, 0, cfg.peers * cfg.values_per_slice))
        .collect();
    let ids: Vec<PeerId> = [0u32, 1, 3]
        .iter()
        .map(|p| PeerId(p.to_be_bytes().to_vec()))
        .collect();
    let all: Vec<Contribution<'_>> = ids
        .iter()
        .zip(&updates)
        .zip([1u64, 2, 4])
        .map(|((peer, u), tokens)| Contribution {
            peer,
            tokens,
            values: &u[range.clone()],
        })
        .collect();
    let want = reduce(
        &all,
        ValidationLimits {
            expected_len: range.len(),
            max_norm_ratio: MAX_NORM_RATIO,
        },
    )
    .mean
    .unwrap();
    assert_eq!(applied[slice].as_deref(), Some(&want));
    for p in [1, 3] {
        assert_eq!(applied_bits(&r, p), applied_bits(&r, 0));
    }
    // It waited for the reassignment time (70% of the span) before the backup took over.
    assert!(r.peers[0].finished[0] >= cfg.span.mul_f64(0.7));
}

#[test]
fn a_reducer_and_its_backup_dead_lose_one_slice_for_everyone() {
    let mut cfg = SimConfig::clean(5, 8);
    cfg.faults = vec![
        Fault::CrashAtStep { peer: 1, step: 0 },
        Fault::CrashAtStep { peer: 2, step: 0 },
    ];
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    for p in [0, 3, 4] {
        let missing: Vec<usize> = (0..5)
            .filter(|s| r.peers[p].applied[0][*s].is_none())
            .collect();
        // Slice 1 (reducer 1, backup 2) is lost; slice 2 is reduced by its backup, 3.
        assert_eq!(missing, vec![1], "peer {p}");
        assert_eq!(applied_bits(&r, p), applied_bits(&r, 0));
    }
}

#[test]
fn the_coordinators_word_hands_a_dead_reducers_slice_over_before_the_phases() {
    let mut cfg = SimConfig::clean(4, 9);
    cfg.faults = vec![Fault::CrashAt {
        peer: 1,
        at: Duration::ZERO,
    }];
    cfg.gone_notice = Some(Duration::from_millis(5));
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert_eq!(r.peers[2].took_over, 1);
    for p in [0, 2, 3] {
        assert!(r.peers[p].applied[0].iter().all(Option::is_some));
        // Long before 60% of the span: the backup waits out the grace for frames the dead
        // reducer may have sent, no longer.
        assert!(
            r.peers[p].finished[0] < cfg.span.mul_f64(GONE_GRACE + 0.01),
            "peer {p}"
        );
    }
}

#[test]
fn later_parts_frames_are_buffered_and_stale_ones_dropped() {
    let mut cfg = SimConfig::clean(6, 12);
    cfg.parts = 4;
    // Wide latency: fast peers start the next part while slow frames of this one fly.
    cfg.latency = (Duration::from_millis(1), Duration::from_millis(150));
    cfg.duplicate = 0.3;
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(
        r.dropped > 0,
        "late duplicates of earlier parts are dropped"
    );
    for p in 0..cfg.peers {
        assert_eq!(r.peers[p].applied.len(), 4);
        assert!(
            r.peers[p]
                .applied
                .iter()
                .all(|part| part.iter().all(Option::is_some))
        );
        assert_eq!(applied_bits(&r, p), applied_bits(&r, 0));
    }
}

/// A 1,000-peer exchange in one process (2,000,000 frames; about 12 s in a debug build).
/// Its wall time and memory, with 10 and 100 peers beside it, are measured by `cargo bench
/// -p potluck-coordinator --bench exchange_sim`.
#[test]
fn a_thousand_peers_exchange_in_one_process() {
    let n = 1000;
    let cfg = SimConfig::clean(n, 21);
    let r = run(&cfg);
    assert!(
        r.violations.is_empty(),
        "{:?}",
        &r.violations[..r.violations.len().min(5)]
    );
    assert_eq!(r.produced.len(), n);
    for p in [1, n / 2, n - 1] {
        assert_eq!(r.peers[p].applied[0], r.peers[0].applied[0]);
    }
    assert!(r.peers[0].applied[0].iter().all(Option::is_some));
}

fn faults(peers: usize, span: Duration) -> impl Strategy<Value = Vec<Fault>> {
    let span_ms = span.as_millis() as u64;
    let fault = prop_oneof![
        (0..peers, 0..span_ms).prop_map(|(peer, ms)| Fault::CrashAt {
            peer,
            at: Duration::from_millis(ms)
        }),
        (0..peers, 0..4 * peers).prop_map(|(peer, step)| Fault::CrashAtStep { peer, step }),
    ];
    proptest::collection::vec(fault, 0..4)
}

/// Configs where agreement must hold: nothing lost and latency well inside the phases. The
/// coordinator's word about a death (if any) may overtake the dead peer's last frames (1 ms
/// against up to 100 ms of latency).
fn reliable() -> impl Strategy<Value = SimConfig> {
    (
        3usize..12,
        1u32..4,
        any::<u64>(),
        0.0f64..0.3,
        proptest::option::of(prop_oneof![Just(1u64), Just(100)]),
    )
        .prop_flat_map(|(peers, parts, seed, duplicate, notice)| {
            let span = Duration::from_secs(10);
            (
                Just((peers, parts, seed, duplicate, notice, span)),
                faults(peers, span),
                proptest::collection::btree_set(0..peers, 0..2),
            )
        })
        .prop_map(
            |((peers, parts, seed, duplicate, notice, span), faults, abstaining)| {
                let mut cfg = SimConfig::clean(peers, seed);
                cfg.parts = parts;
                cfg.span = span;
                cfg.latency = (Duration::from_millis(1), Duration::from_millis(100));
                cfg.duplicate = duplicate;
                cfg.faults = faults;
                cfg.abstaining = abstaining;
                cfg.gone_notice = notice.map(Duration::from_millis);
                cfg
            },
        )
}

/// Anything goes: loss, partitions, crashes, early notices.
fn hostile() -> impl Strategy<Value = SimConfig> {
    (
        reliable(),
        0.0f64..0.4,
        any::<bool>(),
        0u64..10_000,
        0u64..10_000,
    )
        .prop_map(|(mut cfg, loss, partition, a, b)| {
            cfg.loss = loss;
            cfg.gone_notice = cfg.gone_notice.map(|_| Duration::from_millis(1));
            if partition {
                let side: BTreeSet<usize> = (0..cfg.peers / 2).collect();
                cfg.faults.push(Fault::Partition {
                    side,
                    from: Duration::from_millis(a.min(b)),
                    until: Duration::from_millis(a.max(b)),
                });
            }
            cfg
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn crashes_duplicates_and_reordering_leave_the_live_replicas_agreeing(cfg in reliable()) {
        let r = run(&cfg);
        check_always(&cfg, &r)?;
        check_agreement(&r)?;
        // A slice whose reducer and backup both live is never missing.
        let n = cfg.peers;
        for p in (0..n).filter(|p| r.peers[*p].alive) {
            for part in &r.peers[p].applied {
                for (slice, got) in part.iter().enumerate() {
                    if r.peers[slice].alive && r.peers[(slice + 1) % n].alive {
                        prop_assert!(got.is_some(), "peer {} misses slice {}", p, slice);
                    }
                }
            }
        }
    }

    #[test]
    fn loss_and_partitions_never_break_the_invariants(cfg in hostile()) {
        let r = run(&cfg);
        check_always(&cfg, &r)?;
    }
}

/// Agreement is promised only where frames arrive: with a fifth of them lost, replicas miss
/// different slices (and the round's roots then disagree, which the coordinator's quorum
/// resolves). This also shows the agreement check above can fail.
#[test]
fn lost_frames_can_leave_replicas_disagreeing() {
    let mut cfg = SimConfig::clean(6, 0);
    cfg.loss = 0.2;
    let r = run(&cfg);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(check_agreement(&r).is_err());
}
