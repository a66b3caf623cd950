//! A swarm run between two daemons whose data planes are capped in both directions: the
//! rounds still commit on both, and the tensor frames of the exchange went through the caps
//! (both directions counted bytes, and streams waited for tokens).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use potluck_daemon::Node;
use potluck_daemon::control::{self, ControlClient};
use potluck_daemon::ratelimit::RateCaps;
use potluck_proto::v1;

/// The tiny model, two peers, two rounds, int8 updates: each round's exchange moves more
/// than the caps' 64 KiB burst.
const MANIFEST: &str = r#"
name = "capped-run"
seed = 5
model = "tiny"
inner_steps = 2
rounds = 2
compression = "int8"
round_deadline_secs = 60
min_peers = 2

[data]
source = "builtin"
train_bytes = 30000
eval_bytes = 4000
shards = 4
eval_fraction = 0.05

[inner]
lr = 0.003
warmup_steps = 1
batch_size = 2
seq_len = 32
"#;

const CAP: u64 = 64 << 10;

async fn run_status(c: &mut ControlClient) -> v1::RunStatusResponse {
    c.run_status(v1::RunStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn wait_finished(c: &mut ControlClient, timeout: Duration) -> v1::RunStatusResponse {
    let deadline = Instant::now() + timeout;
    loop {
        let s = run_status(c).await;
        if !s.active {
            return s;
        }
        assert!(Instant::now() < deadline, "run still active: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_between_capped_daemons_commits_through_the_caps() {
    let dir = tempfile::tempdir().unwrap();
    let caps = RateCaps {
        upload: Some(CAP),
        download: Some(CAP),
    };
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let mut ca = common::config(&da, vec![]);
    ca.rate_caps = caps;
    let a = Node::start(ca).await.unwrap();
    let mut cb = common::config(&db, vec![common::addr(&a, "quic-v1").await]);
    cb.rate_caps = caps;
    let b = Node::start(cb).await.unwrap();
    let mut cli_a = control::connect_unix(&da).await.unwrap();
    let mut cli_b = control::connect_unix(&db).await.unwrap();
    let started = cli_a
        .start_run(v1::StartRunRequest {
            manifest_toml: MANIFEST.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    cli_b
        .join_run(v1::JoinRunRequest {
            coordinator_peer_id: a.client().local_peer_id().to_base58(),
            run_id: started.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sa = wait_finished(&mut cli_a, Duration::from_secs(240)).await;
    let sb = wait_finished(&mut cli_b, Duration::from_secs(60)).await;
    assert_eq!(sa.state, "finished", "{sa:?}");
    assert_eq!(sb.state, "finished", "{sb:?}");
    assert_eq!((sa.committed_round, sb.committed_round), (2, 2));
    assert_eq!(sa.committed_root, sb.committed_root);
    for node in [&a, &b] {
        let (up, down) = node.train().rates().stats();
        assert_eq!((up.cap, down.cap), (Some(CAP), Some(CAP)));
        assert!(up.bytes > 0 && down.bytes > 0, "{up:?} {down:?}");
    }
    // The exchange's frames went through the replica's caps: more than a burst, so its
    // streams waited for tokens.
    let (up, down) = b.train().rates().stats();
    eprintln!("replica through its caps: up {up:?}, down {down:?}");
    assert!(
        up.waited_secs + down.waited_secs > 0.0,
        "{up:?} {down:?} (run: {} bytes sent, {} received)",
        sb.bytes_sent,
        sb.bytes_received
    );
    b.shutdown().await;
    a.shutdown().await;
}
