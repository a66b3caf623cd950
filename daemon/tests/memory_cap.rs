//! A daemon's `memory_limit_mb` on a real run: `run start` of a run whose model cannot train
//! under the cap even one sequence at a time is refused at once with the figures and the
//! setting to change, before anything of the run is written or allocated. (How a batch is split into micro-batches when
//! one sequence fits is tested in the worker: `worker/tests/memory_cap.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use potluck_daemon::Node;
use potluck_daemon::control;
use potluck_proto::v1;

/// A dense model of 2.2 M parameters: 34 MiB of weights, gradients and moments.
const MANIFEST: &str = r#"
name = "memory-cap"
seed = 5
inner_steps = 2
rounds = 2
compression = "int8"
round_deadline_secs = 60
min_peers = 1

[data]
source = "builtin"
train_bytes = 30000
eval_bytes = 4000
shards = 4
eval_fraction = 0.05

[inner]
batch_size = 2
seq_len = 32

[model]
vocab = 256
d_model = 256
n_heads = 4
n_layers = 2
context = 128
moe_layers = []
n_experts = 1
expert_hidden = 64
top_k = 1
capacity_factor = 1.0
aux_loss_coef = 0.0
ffn_hidden = 1024
tie_embeddings = true
rope_theta = 10000.0
norm_eps = 1e-5
init_std = 0.02
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_the_memory_cap_fails_with_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path(), vec![]);
    cfg.memory_limit_mb = Some(16);
    let node = Node::start(cfg).await.unwrap();
    let mut cli = control::connect_unix(dir.path()).await.unwrap();
    // `run start` is refused before anything of the run is written.
    let refused = cli
        .start_run(v1::StartRunRequest {
            manifest_toml: MANIFEST.into(),
            out_dir: dir.path().join("out").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("memory_limit_mb"),
        "{}",
        refused.message()
    );
    let status = cli
        .run_status(v1::RunStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state, "failed", "{status:?}");
    assert!(
        status.error.contains("memory_limit_mb") && status.error.contains("limit of 16 MiB"),
        "{}",
        status.error
    );
    assert_eq!(status.committed_round, 0);
    // `status` shows the cap.
    let caps = cli
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .caps
        .unwrap();
    assert_eq!(caps.memory_limit_mb, 16);
    assert_eq!((caps.upload_bytes_per_sec, caps.cpu_threads), (0, 0));
    node.shutdown().await;
}
