//! Regression inputs of the `run_manifest` fuzz target (docs/FUZZING.md).

use potluck_daemon::train::manifest::ResolvedRun;

/// A peer's canonical run manifest whose outer momentum (1e58) is infinite as an `f32`. It
/// was accepted, and re-encoded as `null`, so the run it described had no valid encoding.
#[test]
fn a_canonical_run_with_an_infinite_outer_momentum_is_refused() {
    // The fuzz input's first byte picks the target's canonical-JSON branch.
    let bytes = &include_bytes!("data/run-canonical-infinite-momentum.bin")[1..];
    let err = ResolvedRun::from_canonical(bytes, blake3::hash(bytes).as_bytes())
        .expect_err("an infinite momentum must be refused");
    assert!(err.to_string().contains("outer.momentum"), "{err}");
}
