//! The `sign` codec end to end: three daemons on loopback train a short DiLoCo run with
//! 1-bit updates (contributions and reduced slices), every replica finishes on the
//! coordinator's root (bit-identical weights, so every reducer's re-encoding was decoded the
//! same everywhere), and the exchange costs about 1/31 of the same run in f32.
#![allow(clippy::unwrap_used)]

use potluck_daemon::train::RunManifest;
use potluck_daemon::train::demo::LocalSwarm;

fn manifest(compression: &str) -> String {
    format!(
        r#"
name = "sign-codec-test"
seed = 7
model = "tiny"
inner_steps = 2
rounds = 3
compression = "{compression}"
round_deadline_secs = 120
min_peers = 3

[data]
source = "builtin"
train_bytes = 30000
eval_bytes = 4000
shards = 6
eval_fraction = 0.05

[inner]
lr = 0.003
warmup_steps = 1
batch_size = 2
seq_len = 32
"#
    )
}

/// Trains the run on a fresh 3-daemon swarm; returns the rounds done and the bytes.
async fn train(compression: &str) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let run = RunManifest::parse(&manifest(compression))
        .unwrap()
        .resolve()
        .unwrap()
        .pin_data()
        .unwrap();
    let swarm = LocalSwarm::start(3, dir.path()).await.unwrap();
    // `train` fails when a replica finishes on another root than the coordinator.
    let summary = swarm.train(&run, None).await.unwrap();
    let bytes = swarm.bytes_on_wire();
    swarm.shutdown().await;
    (summary.rounds, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sign_run_agrees_everywhere_and_sends_a_thirty_first_of_f32() {
    let (rounds, sign_bytes) = train("sign").await;
    assert_eq!(rounds, 3);
    let (rounds, f32_bytes) = train("none").await;
    assert_eq!(rounds, 3);
    // 1.03 bits against 32 per value; frame headers and acknowledgements cost a little more
    // on the small run, and zstd may take a little off the f32 frames.
    let ratio = f32_bytes as f64 / sign_bytes as f64;
    assert!(
        (15.0..=32.0).contains(&ratio),
        "f32 {f32_bytes} bytes against sign {sign_bytes}: {ratio:.1}x"
    );
}
