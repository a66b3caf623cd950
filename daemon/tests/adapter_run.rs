//! Adapter swarms end to end: three daemons on loopback fine-tune LoRA adapters on a frozen
//! Llama-format base. The base is pinned in the run id by its content root; the starter
//! serves it as a package and the two joiners, which do not have it, fetch it from the
//! swarm verified piece by piece. Every replica finishes on the coordinator's root
//! (bit-identical adapters), the eval loss falls well below the base's, each round's
//! exchange carries the adapters only, and `potluck verify` checks the final checkpoint and
//! the base it names. A base whose files no longer have the pinned root is refused.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use potluck_daemon::train::RunManifest;
use potluck_daemon::train::basepack::{self, BASE_DIR};
use potluck_daemon::train::demo::LocalSwarm;
use potluck_daemon::train::{ResolvedRun, TrainError};
use potluck_worker::adapters::{LlamaShape, write_random_llama};
use potluck_worker::{DeviceSpec, Replica};

/// A random-weight Llama-format base with the byte vocabulary (256 tokens), so the run's
/// text is fed as byte ids.
const SHAPE: LlamaShape = LlamaShape {
    vocab: 256,
    hidden: 128,
    intermediate: 256,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    max_positions: 64,
};

fn manifest(base: &Path, text: &Path) -> String {
    format!(
        r#"
name = "adapter-swarm-test"
seed = 5
inner_steps = 10
rounds = 4
compression = "none"
round_deadline_secs = 120
min_peers = 3

[data]
source = {text:?}
train_bytes = 0
eval_bytes = 0
shards = 6
eval_fraction = 0.1

[inner]
lr = 0.02
warmup_steps = 2
weight_decay = 0.0
batch_size = 4
seq_len = 32

[outer]
lr = 1.0
momentum = 0.0

[base]
path = {base:?}

[adapters]
rank = 2
alpha = 4.0
dropout = 0.0
target_modules = ["o_proj", "down_proj"]
"#,
        text = text.display().to_string(),
        base = base.display().to_string(),
    )
}

/// A base and a text corpus under `dir`.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("my-base");
    write_random_llama(&base, &SHAPE, 17).unwrap();
    let text = dir.join("corpus.txt");
    let mut s = String::new();
    for i in 0..400 {
        s.push_str(&format!(
            "the swarm trains adapter {i} on a frozen base while the base stays the same. "
        ));
    }
    std::fs::write(&text, s).unwrap();
    (base, text)
}

fn pinned(base: &Path, text: &Path) -> ResolvedRun {
    RunManifest::parse(&manifest(base, text))
        .unwrap()
        .resolve()
        .unwrap()
        .pin_data()
        .unwrap()
}

/// The eval loss of the base itself: fresh adapters leave its output unchanged (`B` = 0).
fn base_eval_loss(run: &ResolvedRun, base: &Path) -> f32 {
    let (data, _) = run.load_data().unwrap();
    let spec = run.base.as_ref().unwrap();
    let rep = Replica::new_adapters(
        base,
        &spec.root,
        run.adapters.as_ref().unwrap(),
        &run.inner,
        &DeviceSpec::Cpu,
    )
    .unwrap();
    rep.eval_loss(&data, 8).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_peers_fine_tune_adapters_fetching_the_base_and_exchanging_only_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = setup(dir.path());
    let run = pinned(&base, &text);
    let root = basepack::pinned_root(&run).unwrap().unwrap();
    let before = base_eval_loss(&run, &base);
    let adapter_params = Replica::new_adapters(
        &base,
        &run.base.as_ref().unwrap().root,
        run.adapters.as_ref().unwrap(),
        &run.inner,
        &DeviceSpec::Cpu,
    )
    .unwrap()
    .num_params();

    let swarm = LocalSwarm::start(3, &dir.path().join("swarm"))
        .await
        .unwrap();
    let nodes = swarm.nodes();
    let run_id = run.id();
    let data_dir = |i: usize| nodes[i].train().data_dir().to_path_buf();
    let pack =
        |i: usize| potluck_daemon::train::checkpoint::run_dir(&data_dir(i), &run_id).join(BASE_DIR);

    // The starter checks its base against the pinned root and serves it as a package.
    let out = dir.path().join("final");
    let coordinator = {
        let (svc, run, out) = (nodes[0].train(), run.clone(), out.clone());
        tokio::spawn(async move { svc.coordinate(run, Some(out)).await })
    };
    let served = pack(0);
    let mut waited = 0;
    while potluck_daemon::train::datapack::holds(&served, root) != Ok(true) {
        assert!(waited < 300, "the starter never wrote the base package");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    // The user's copy goes away: from here every replica, the starter's included, reads
    // the base from the packages, and the joiners have none to start with.
    std::fs::rename(&base, dir.path().join("moved-away")).unwrap();
    assert!(!pack(1).exists() && !pack(2).exists());

    let seed = nodes[0].client().local_peer_id();
    let mut joins = Vec::new();
    for n in nodes.iter().skip(1) {
        let svc = n.train();
        joins.push(tokio::spawn(async move {
            let mut last = None;
            for _ in 0..50 {
                match svc.join(seed, run_id, None).await {
                    Ok(s) => return Ok(s),
                    Err(e @ TrainError::Refused(_)) => return Err(e),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last.unwrap())
        }));
    }
    let summary = coordinator.await.unwrap().unwrap();
    assert_eq!(summary.rounds, run.rounds);
    // Bit-identical replicas: every joiner finished on the coordinator's state root.
    for j in joins {
        let s = j.await.unwrap().unwrap();
        assert_eq!(s.root, summary.root, "a replica ended on another state");
    }
    // The joiners fetched the base and hold it, verified against the pinned root.
    for i in 1..3 {
        assert_eq!(
            potluck_daemon::train::datapack::holds(&pack(i), root),
            Ok(true),
            "peer {i} does not hold the fetched base"
        );
    }

    // It learned: well below the base's own eval loss.
    let after = summary.eval_loss;
    eprintln!("eval loss: base {before:.4}, after {after:.4}");
    assert!(after < before - 0.5, "eval loss {before} -> {after}");

    // Only the adapters travel. A run cannot train the base's full model, so the full
    // model's figure is what the daemon counts for the same f32 exchange of the base's
    // parameters: each of n members sends (n-1)/n of the vector as contributions and again
    // as reduced slices, counted by sender and receiver, 16 (n-1) bytes per parameter.
    let per_round = swarm.bytes_per_round();
    let rounds: Vec<u64> = (1..=run.rounds).collect();
    let adapter_round = rounds
        .iter()
        .map(|r| per_round.get(r).copied().unwrap_or(0))
        .max()
        .unwrap();
    let full_round = 16 * 2 * SHAPE.params() as u64;
    let ratio = full_round as f64 / adapter_round as f64;
    eprintln!(
        "bytes per round: adapters {adapter_round} ({adapter_params} values), full model \
         {full_round} ({} values): {ratio:.0}x; per round {per_round:?}",
        SHAPE.params()
    );
    assert!(adapter_round > 0);
    assert!(ratio >= 100.0, "only {ratio:.1}x fewer bytes per round");

    // The final checkpoint holds the adapters and names the base; verify checks both.
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains(&root.to_hex()), "{config}");
    potluck_daemon::train::cli::verify(potluck_daemon::train::cli::VerifyArgs {
        path: out.clone(),
        ledger: None,
        json: false,
        export: None,
        base: Some(pack(2)),
    })
    .unwrap();
    // A base of another root fails the check.
    let other = dir.path().join("other-base");
    write_random_llama(&other, &SHAPE, 18).unwrap();
    let err = potluck_daemon::train::cli::verify(potluck_daemon::train::cli::VerifyArgs {
        path: out,
        ledger: None,
        json: false,
        export: None,
        base: Some(other),
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("but the run pins"), "{err:#}");
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_base_whose_files_do_not_have_the_pinned_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = setup(dir.path());
    let run = pinned(&base, &text);
    // Another base of the same shape in its place: same names, other bytes.
    write_random_llama(&base, &SHAPE, 99).unwrap();
    let err = run.clone().pin_data().unwrap_err().to_string();
    assert!(err.contains("not the run's base"), "{err}");
    let swarm = LocalSwarm::start(1, &dir.path().join("swarm"))
        .await
        .unwrap();
    let err = swarm.nodes()[0]
        .train()
        .coordinate(run.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("changed since the run was started"), "{err}");
    // Nothing of the run was left behind to serve.
    let run_dir =
        potluck_daemon::train::checkpoint::run_dir(swarm.nodes()[0].train().data_dir(), &run.id());
    assert!(!run_dir.join(BASE_DIR).exists());
    swarm.shutdown().await;
}
