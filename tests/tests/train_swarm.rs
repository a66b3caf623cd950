//! Swarm training over real QUIC sockets on loopback: several in-process daemons train one
//! model and must end every round on the same root; a replica killed mid-run costs the others
//! nothing but its work.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use libp2p::Multiaddr;
use potluck_daemon::train::manifest::RunMode;
use potluck_daemon::train::session::CrashPoint;
use potluck_daemon::train::{RunEvent, RunManifest};
use potluck_daemon::{Config, Node};

const RUN: &str = r#"
name = "test"
seed = 3
model = "tiny"
inner_steps = 4
rounds = 3
compression = "topk"
round_deadline_secs = 60
min_peers = 3

[data]
source = "builtin"
train_bytes = 60000
eval_bytes = 8000
shards = 6
eval_fraction = 0.05

[inner]
lr = 0.003
warmup_steps = 2
batch_size = 4
seq_len = 32
"#;

async fn start(n: usize, dir: &std::path::Path) -> Vec<Node> {
    start_with(n, dir, |_| {}).await
}

/// [`start`] with the daemons' settings changed by `f`.
async fn start_with(n: usize, dir: &std::path::Path, f: impl Fn(&mut Config)) -> Vec<Node> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POTLUCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut nodes: Vec<Node> = Vec::new();
    let mut seed: Option<Multiaddr> = None;
    for i in 0..n {
        let mut cfg = config_for(&dir.join(format!("p{i}")), seed.clone());
        f(&mut cfg);
        let node = Node::start(cfg).await.unwrap();
        if seed.is_none() {
            seed = Some(listen_addr(&node).await);
        }
        nodes.push(node);
    }
    nodes
}

/// The settings of a test daemon with its data in `data_dir`, bootstrapping from `seed`.
fn config_for(data_dir: &std::path::Path, seed: Option<Multiaddr>) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        mdns: false,
        bootstrap: seed.into_iter().collect(),
        ..Config::default()
    }
}

/// Starts one daemon with its data in `data_dir`, bootstrapping from `seed`.
async fn start_one(data_dir: &std::path::Path, seed: Option<Multiaddr>) -> Node {
    Node::start(config_for(data_dir, seed)).await.unwrap()
}

/// Starts a daemon again with `cfg` (its data dir and address). In one process the old
/// endpoint may hold the port a little longer than a dead process would.
async fn restart(cfg: &Config) -> Node {
    for _ in 0..100 {
        match Node::start(cfg.clone()).await {
            Ok(n) => return n,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("the daemon did not restart on its address");
}

/// A daemon's first listen address, without its peer id.
async fn bare_addr(node: &Node) -> Multiaddr {
    listen_addr(node)
        .await
        .into_iter()
        .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        .collect()
}

/// A daemon's first listen address, with its peer id.
async fn listen_addr(node: &Node) -> Multiaddr {
    let c = node.client();
    for _ in 0..100 {
        let st = c.status().await.unwrap();
        if let Some(a) = st.listen_addrs.first() {
            return a.clone().with(libp2p::multiaddr::Protocol::P2p(st.peer_id));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the daemon never listened");
}

/// Joins `run_id` at `coordinator`, retrying for up to two minutes while the run is not
/// (yet, or again) coordinated there.
async fn join_retrying(
    svc: potluck_daemon::train::TrainService,
    coordinator: libp2p::PeerId,
    run_id: [u8; 32],
) -> Option<potluck_daemon::train::RunSummary> {
    for _ in 0..600 {
        match svc.join(coordinator, run_id, None).await {
            Ok(s) => return Some(s),
            Err(potluck_daemon::train::TrainError::ShuttingDown) => return None,
            Err(e) => tracing::warn!(error = %e, "join failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Hostile input on the tensor and run-control protocols: a 2^32 length prefix, a
/// truncated frame, random bytes and a well-framed garbage body, each on a fresh stream that
/// the daemon must close within 5 s without answering.
async fn hostile_streams(from: &Node, target: libp2p::PeerId) {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use potluck_daemon::train::session::{CONTROL_PROTOCOL, TENSOR_PROTOCOL};
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let attacks: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "2^32 length prefix",
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            false,
        ),
        ("truncated frame", vec![100, 0, 0, 0, 1, 2, 3], true),
        ("random bytes", random, true),
        (
            "garbage body",
            [vec![8, 0, 0, 0], vec![0xff; 8]].concat(),
            true,
        ),
    ];
    let mut control = from.client().stream_control();
    for protocol in [TENSOR_PROTOCOL, CONTROL_PROTOCOL] {
        for (name, bytes, close) in &attacks {
            let mut s = control
                .open_stream(target, protocol.clone())
                .await
                .unwrap_or_else(|e| panic!("{name}: cannot open a stream: {e}"));
            let _ = s.write_all(bytes).await;
            let _ = s.flush().await;
            if *close {
                let _ = s.close().await;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Err(_) => panic!("{name} on {protocol}: stream left open"),
                Ok(Ok(n)) if n > 0 => panic!("{name} on {protocol}: daemon answered {n} bytes"),
                Ok(_) => {}
            }
        }
    }
}

fn run_with(f: impl FnOnce(&mut RunManifest)) -> potluck_daemon::train::ResolvedRun {
    let mut m = RunManifest::parse(RUN).unwrap();
    f(&mut m);
    m.resolve().unwrap().pin_data().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_peers_end_every_round_on_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = run_with(|_| {});
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    // Before the run, a peer throws garbage at both training protocols of the coordinator:
    // every such stream is refused and closed, and the run below still succeeds.
    hostile_streams(&nodes[1], coordinator).await;
    let mut events = nodes[0].train().subscribe();
    let mut joins = Vec::new();
    for n in nodes.iter().skip(1) {
        let svc = n.train();
        joins.push(tokio::spawn(async move {
            for _ in 0..50 {
                match svc.join(coordinator, run_id, None).await {
                    Ok(s) => return Some(s),
                    Err(e) => tracing::warn!(error = %e, "join failed; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None
        }));
    }
    let out = dir.path().join("ckpt");
    let summary = tokio::time::timeout(
        Duration::from_secs(240),
        nodes[0].train().coordinate(run.clone(), Some(out.clone())),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 3);
    for j in joins {
        let s = j.await.unwrap().expect("replica finished");
        assert_eq!(
            s.root, summary.root,
            "every replica ends on the committed root"
        );
    }
    // Every round was committed by a quorum of the three replicas (the coordinator commits
    // as soon as two agree; the third then finds it holds the same root).
    let mut committed = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let RunEvent::Committed {
            round,
            root,
            agreeing,
            members,
            ..
        } = ev
        {
            assert_eq!(members, 3);
            assert!(agreeing >= 2);
            committed.push((round, root));
        }
    }
    assert_eq!(committed.len(), 3);
    // The root each round committed is the content root of a signed checkpoint manifest in
    // the coordinator's ledger, chained back to the genesis; every replica keeps a copy of
    // the ledger and the newest checkpoints, which verify offline against it.
    use potluck_coordinator::store::Ledger;
    use potluck_daemon::train::checkpoint::{checkpoint_dir, ledger_dir, run_dir};
    let ledgers: Vec<Vec<_>> = (0..3)
        .map(|i| {
            let rd = run_dir(&dir.path().join(format!("p{i}")), &run_id);
            Ledger::read_entries(&ledger_dir(&rd)).unwrap()
        })
        .collect();
    assert_eq!(ledgers[0].len(), 4, "genesis and three rounds");
    assert_eq!(ledgers[1], ledgers[0]);
    assert_eq!(ledgers[2], ledgers[0]);
    for (round, root) in &committed {
        let m = &ledgers[0][*round as usize];
        assert_eq!(m.body().round, *round);
        assert_eq!(m.body().root.0, *root);
        assert_eq!(m.body().parent.unwrap().0, round - 1);
    }
    // Every replica that held the last commit (at least the quorum) wrote it; one that
    // missed a deadline under load resyncs instead and holds no checkpoint of that round.
    let mut holders = 0;
    for i in 0..3 {
        let rd = run_dir(&dir.path().join(format!("p{i}")), &run_id);
        if !checkpoint_dir(&rd, 3).exists() {
            continue;
        }
        holders += 1;
        let v = potluck_coordinator::verify::verify_checkpoint_dir(
            &checkpoint_dir(&rd, 3),
            &potluck_coordinator::verify::VerifyOptions {
                expected_run_id: None,
                ledger_dir: Some(ledger_dir(&rd)),
            },
        )
        .unwrap_or_else(|e| panic!("peer {i}'s round-3 checkpoint: {e}"));
        assert_eq!(v.chain_len, 4);
        assert_eq!(v.root.0, summary.root);
    }
    assert!(
        holders >= 2,
        "only {holders} replicas hold the last checkpoint"
    );
    // Data really moved between the peers, and the checkpoint verifies offline.
    let (sent, received) = nodes[1].train().traffic().totals();
    assert!(sent > 0 && received > 0);
    // Counted per round too: every round moved bytes both ways, and the rounds add up.
    let per_round = nodes[1].train().traffic().per_round();
    for r in 1..=3 {
        let (s, rcv) = per_round.get(&r).copied().unwrap_or_default();
        assert!(s > 0 && rcv > 0, "round {r}: {s} sent, {rcv} received");
    }
    assert_eq!(per_round.values().map(|v| v.0).sum::<u64>(), sent);
    assert_eq!(
        nodes[1].train().status().round_bytes.len(),
        per_round.len().min(8)
    );
    let verified = potluck_coordinator::verify::verify_checkpoint_dir(
        &out,
        &potluck_coordinator::verify::VerifyOptions::default(),
    )
    .expect("checkpoint verifies");
    assert_eq!(Some(verified.root.to_hex()), summary.checkpoint_root);
    assert_eq!(
        verified.root.0, summary.root,
        "the final checkpoint is the last commit"
    );
    assert_eq!(verified.round, 3);
    for n in nodes {
        n.shutdown().await;
    }
}

/// An overlapped run: each round exchanges the previous round's update while it trains,
/// and the last round flushes its own. Every round still ends on one root everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_peers_overlapped_end_every_round_on_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        m.overlap = Some(true);
        m.rounds = Some(4);
    });
    assert!(run.overlap);
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let joins = join_all_but_the_first(&nodes, coordinator, run_id);
    let summary = tokio::time::timeout(
        Duration::from_secs(300),
        nodes[0].train().coordinate(run.clone(), None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 4);
    for j in joins {
        let s = j.await.unwrap().expect("replica finished");
        assert_eq!(s.root, summary.root, "every replica ends on the final root");
    }
    let mut committed = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let RunEvent::Committed {
            round,
            root,
            agreeing,
            members,
            ..
        } = ev
        {
            assert_eq!(members, 3);
            assert!(agreeing >= 2, "round {round}: {agreeing} agree");
            committed.push((round, root));
        }
    }
    assert_eq!(committed.len(), 4);
    // Every checkpoint a replica kept (the newest three rounds) is the committed one.
    use potluck_daemon::train::checkpoint::{checkpoint_dir, run_dir};
    let mut kept = 0;
    for i in 0..3 {
        let rd = run_dir(&dir.path().join(format!("p{i}")), &run_id);
        for (round, root) in &committed {
            let cd = checkpoint_dir(&rd, *round);
            if !cd.exists() {
                continue;
            }
            kept += 1;
            let v = potluck_coordinator::verify::verify_checkpoint_dir(
                &cd,
                &potluck_coordinator::verify::VerifyOptions::default(),
            )
            .unwrap_or_else(|e| panic!("peer {i}'s round-{round} checkpoint: {e}"));
            assert_eq!(v.root.0, *root, "peer {i}, round {round}");
        }
    }
    assert!(kept >= 6, "only {kept} checkpoints kept");
    // Each replica timed its rounds: training, and the network wait after it.
    for n in &nodes {
        let timings = n.train().status().round_timings;
        assert_eq!(timings.len(), 4, "{timings:?}");
        for t in &timings {
            assert!(
                t.overlap && t.train_ms > 0 && t.wall_ms >= t.train_ms,
                "{t:?}"
            );
            assert!((0.0..=1.0).contains(&t.network_wait_share), "{t:?}");
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_does_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        m.rounds = Some(4);
        m.round_deadline_secs = Some(20);
        // Rounds go on with the two survivors after the kill.
        m.min_peers = Some(2);
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let joiner = |svc: potluck_daemon::train::TrainService| async move {
        for _ in 0..50 {
            match svc.join(coordinator, run_id, None).await {
                Ok(s) => return Some(s),
                Err(potluck_daemon::train::TrainError::ShuttingDown) => return None,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        None
    };
    let survivor_task = tokio::spawn(joiner(nodes[1].train()));
    let victim = nodes.pop().unwrap();
    tokio::spawn(joiner(victim.train()));
    // Kill the third peer when a round that counts on all three opens, after a commit: it
    // dies in the middle of that round.
    let killer = tokio::spawn(async move {
        let mut committed = false;
        while let Ok(ev) = events.recv().await {
            match ev {
                RunEvent::Committed { .. } => committed = true,
                RunEvent::RoundOpened { round, members: 3 } if committed => {
                    victim.shutdown().await;
                    return Some(round);
                }
                RunEvent::Finished { .. } => return None,
                _ => {}
            }
        }
        None
    });
    let summary = tokio::time::timeout(
        Duration::from_secs(300),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    let killed_in = tokio::time::timeout(Duration::from_secs(10), killer)
        .await
        .expect("killer done")
        .unwrap()
        .expect("a round with all three peers opened and the victim was killed in it");
    let s = tokio::time::timeout(Duration::from_secs(60), survivor_task)
        .await
        .expect("survivor done")
        .unwrap()
        .expect("survivor finished");
    assert_eq!(s.root, summary.root);
    assert!(
        summary.rounds >= killed_in,
        "the survivors committed the round the victim died in, or a later one (last commit {}, kill in {killed_in})",
        summary.rounds
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reducer_killed_after_its_contributions_arrived_is_replaced_within_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        // Round 1 opens only once all three are members, so the victim reduces a slice of
        // round 2 however late its join lands (a round takes a few hundred milliseconds,
        // less than one retried join).
        m.rounds = Some(2);
        m.min_peers = Some(3);
        // Room under load: the survivors wait for the dead reducer until 70% of what is
        // left of the round, and no other slice may go missing meanwhile.
        m.round_deadline_secs = Some(60);
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let victim = nodes.pop().unwrap();
    // The victim dies in round 2 holding every contribution to its slice, before it sends
    // the mean back: only the survivors' copies of their updates can save that slice.
    victim
        .train()
        .crash_at(Some(CrashPoint::ReducerBeforeSending(2)));
    let coordinating = nodes[0].train();
    let run_task = tokio::spawn(async move { coordinating.coordinate(run, None).await });
    // Its own replica has been welcomed once the status names the run.
    for _ in 0..600 {
        if !nodes[0].train().status().run_id.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let survivor = tokio::spawn(join_retrying(nodes[1].train(), coordinator, run_id));
    let victim_task = tokio::spawn(join_retrying(victim.train(), coordinator, run_id));
    let watcher = tokio::spawn(async move {
        let mut commits = Vec::new();
        while let Ok(ev) = events.recv().await {
            match ev {
                RunEvent::Committed {
                    round, agreeing, ..
                } => commits.push((round, agreeing)),
                RunEvent::Finished { .. } => break,
                _ => {}
            }
        }
        commits
    });
    let died = tokio::time::timeout(Duration::from_secs(300), victim_task)
        .await
        .expect("the victim reached its crash point")
        .unwrap();
    assert!(
        died.is_none(),
        "the victim finished the run instead of dying"
    );
    victim.shutdown().await;
    let summary = tokio::time::timeout(Duration::from_secs(300), run_task)
        .await
        .expect("run finished in time")
        .unwrap()
        .expect("run succeeded");
    let s = tokio::time::timeout(Duration::from_secs(60), survivor)
        .await
        .expect("survivor done")
        .unwrap()
        .expect("survivor finished");
    assert_eq!(s.root, summary.root);
    let commits = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    assert!(
        commits.contains(&(2, 2)),
        "round 2 was committed by the two survivors: {commits:?}"
    );
    let (a, b) = (nodes[0].train().status(), nodes[1].train().status());
    assert_eq!(
        a.reassigned_slices + b.reassigned_slices,
        1,
        "exactly one survivor took the dead reducer's slice over"
    );
    assert_eq!(
        (a.missing_slices, b.missing_slices),
        (0, 0),
        "no survivor applied a zero slice: the dead reducer's slice was reduced again"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_joins_at_round_3_ends_on_the_same_root() {
    joins_at_round_3(false, RunMode::Diloco).await;
}

/// In a data-parallel run the inner AdamW moments are part of the shared state: the late
/// peer takes them with the weights and agrees from its first round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_joins_a_data_parallel_run_at_round_3_agrees_from_its_first_round() {
    joins_at_round_3(false, RunMode::DataParallel).await;
}

/// Overlapped, the late peer has no delta of its own in its first round: it abstains, and
/// the others' reducers do not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_joins_an_overlapped_run_at_round_3_ends_on_the_same_root() {
    joins_at_round_3(true, RunMode::Diloco).await;
}

async fn joins_at_round_3(overlap: bool, mode: RunMode) {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        m.rounds = Some(5);
        m.min_peers = Some(2);
        m.round_deadline_secs = Some(30);
        m.overlap = Some(overlap);
        m.mode = Some(mode);
        if mode == RunMode::DataParallel {
            m.compression = None;
        }
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let early = tokio::spawn(join_retrying(nodes[1].train(), coordinator, run_id));
    let late_node = nodes.pop().unwrap();
    let late_svc = late_node.train();
    // The third peer joins once round 2 is committed, while round 3 runs without it.
    let watcher = tokio::spawn(async move {
        let mut late = None;
        let mut opened_with_three = Vec::new();
        while let Ok(ev) = events.recv().await {
            match ev {
                RunEvent::Committed { round: 2, .. } if late.is_none() => {
                    late = Some(tokio::spawn(join_retrying(
                        late_svc.clone(),
                        coordinator,
                        run_id,
                    )));
                }
                RunEvent::RoundOpened { round, members: 3 } => opened_with_three.push(round),
                RunEvent::Finished { .. } => break,
                _ => {}
            }
        }
        (late, opened_with_three)
    });
    let summary = tokio::time::timeout(
        Duration::from_secs(300),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 5);
    let (late, opened_with_three) = watcher.await.unwrap();
    assert!(
        opened_with_three.iter().all(|r| *r > 3) && !opened_with_three.is_empty(),
        "the late peer trains in the rounds after it joined: {opened_with_three:?}"
    );
    let late = late
        .expect("round 2 was committed")
        .await
        .unwrap()
        .expect("the late peer finished");
    assert_eq!(
        late.root, summary.root,
        "the late peer ends on the committed root"
    );
    // It got the state it started from as the committed checkpoint, over the verified
    // checkpoint transfer: it holds the checkpoint of a round it did not train in.
    let late_dir = potluck_daemon::train::checkpoint::run_dir(&dir.path().join("p2"), &run_id);
    let held: Vec<u64> = std::fs::read_dir(late_dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
        .collect();
    let first_trained = *opened_with_three.iter().min().unwrap();
    assert!(
        held.iter().any(|r| *r < first_trained),
        "checkpoints held {held:?}, first round trained {first_trained}"
    );
    // It copied the ledger it joined too late to see begin (so it could take the run over):
    // one verified chain from the genesis to the final commit, as the coordinator's.
    let copy = potluck_coordinator::store::Ledger::read_entries(
        &potluck_daemon::train::checkpoint::ledger_dir(&late_dir),
    )
    .unwrap();
    let own = verified_ledger(&dir.path().join("p0"), &run_id);
    assert_eq!(
        copy.iter().map(|m| m.encode()).collect::<Vec<_>>(),
        own.iter().map(|m| m.encode()).collect::<Vec<_>>(),
        "the late peer's ledger copy is the coordinator's ledger"
    );
    let early = early.await.unwrap().expect("the early peer finished");
    assert_eq!(early.root, summary.root);
    for n in nodes.iter().chain([&late_node]) {
        let st = n.train().status();
        assert_eq!(
            (st.missing_slices, st.rejected_updates),
            (0, 0),
            "an abstention is neither a missing slice nor a rejected update"
        );
        // Every replica, the late one included, ended every round it trained in on the
        // committed root (one that computed another root would resync each round).
        assert_eq!(st.disagreed_rounds, 0);
    }
    late_node.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_peer_resumes_from_its_own_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let seed = listen_addr(&nodes[0]).await;
    let run = run_with(|m| {
        m.rounds = Some(6);
        m.min_peers = Some(2);
        m.round_deadline_secs = Some(30);
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let steady = tokio::spawn(join_retrying(nodes[1].train(), coordinator, run_id));
    let victim = nodes.pop().unwrap();
    let first_life = tokio::spawn(join_retrying(victim.train(), coordinator, run_id));
    let victim_dir = dir.path().join("p2");
    // Once round 2 is committed and the third daemon has saved a state (it saves after each
    // round it took part in; under load it may have joined too late for round 1), it stops,
    // and a new daemon on its data dir (same identity, same saved state) joins the run again.
    // The first life's replica task is waited for before the second starts: in one process
    // it could otherwise still be saving its state (and pruning the older one) while the new
    // daemon reads it, which a dead process never does.
    let local = potluck_daemon::train::checkpoint::run_dir(&victim_dir, &run_id).join("local");
    let saved = move || {
        std::fs::read_dir(&local).is_ok_and(|d| {
            d.flatten()
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
        })
    };
    let restarter = tokio::spawn(async move {
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            };
            if let RunEvent::Committed { round, .. } = ev
                && round >= 2
                && saved()
            {
                victim.shutdown().await;
                let first = first_life.await.unwrap();
                let again = start_one(&victim_dir, Some(seed)).await;
                let s = join_retrying(again.train(), coordinator, run_id).await;
                again.shutdown().await;
                return (first, s);
            }
        }
        (None, None)
    });
    let summary = tokio::time::timeout(
        Duration::from_secs(300),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 6);
    let (first, second) = restarter.await.unwrap();
    assert!(first.is_none(), "the first life was cut short");
    let second = second.expect("the restarted peer finished the run");
    assert!(
        second.resumed_from.is_some_and(|r| r >= 1),
        "it resumed from its saved state: {:?}",
        second.resumed_from
    );
    assert_eq!(second.root, summary.root);
    assert_eq!(steady.await.unwrap().unwrap().root, summary.root);
    for n in nodes {
        n.shutdown().await;
    }
}

/// Kills the coordinator once round 2 is committed and returns it (shut down).
async fn kill_after_round_2(
    mut events: tokio::sync::broadcast::Receiver<RunEvent>,
    victim: Node,
) -> bool {
    while let Ok(ev) = events.recv().await {
        if let RunEvent::Committed { round: 2, .. } = ev {
            victim.shutdown().await;
            return true;
        }
    }
    false
}

/// The ledger a daemon keeps of `run_id`, verified link by link from the genesis.
fn verified_ledger(
    data_dir: &std::path::Path,
    run_id: &[u8; 32],
) -> Vec<potluck_coordinator::manifest::SignedManifest> {
    use potluck_daemon::train::checkpoint::{ledger_dir, run_dir};
    let rd = run_dir(data_dir, run_id);
    let entries = potluck_coordinator::store::Ledger::read_entries(&ledger_dir(&rd)).unwrap();
    let run = potluck_coordinator::failover::SignedRunManifest::decode(
        &std::fs::read(rd.join(potluck_coordinator::manifest::RUN_FILE)).unwrap(),
    )
    .unwrap();
    potluck_coordinator::verify::verify_chain(&run, &entries).unwrap();
    entries
}

/// `node` joins `run_id` again after its coordinator ended it, and is told the end.
async fn rejoin_after_the_end(
    node: &Node,
    coordinator: libp2p::PeerId,
    run_id: [u8; 32],
) -> potluck_daemon::train::RunSummary {
    tokio::time::timeout(
        Duration::from_secs(60),
        node.train().join(coordinator, run_id, None),
    )
    .await
    .expect("the ended run answered in time")
    .expect("a returning replica is told the run ended")
}

/// Five rounds that go on with two replicas.
fn five_rounds_of_two() -> potluck_daemon::train::ResolvedRun {
    run_with(|m| {
        m.rounds = Some(5);
        m.min_peers = Some(2);
        m.round_deadline_secs = Some(20);
    })
}

/// Every node but the first joins the run in the background.
fn join_all_but_the_first(
    nodes: &[Node],
    coordinator: libp2p::PeerId,
    run_id: [u8; 32],
) -> Vec<tokio::task::JoinHandle<Option<potluck_daemon::train::RunSummary>>> {
    nodes
        .iter()
        .skip(1)
        .map(|n| tokio::spawn(join_retrying(n.train(), coordinator, run_id)))
        .collect()
}

/// The coordinator dies at `point` (or, with `None`, once round 2 is committed and
/// announced), comes back on the same data dir and address, and is asked to run the same
/// run: the run goes on from its ledger, no announced commit is lost, no round is committed
/// twice, and every replica ends on the final root.
async fn coordinator_dies_and_comes_back(point: Option<CrashPoint>) {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let run = five_rounds_of_two();
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let replicas = join_all_but_the_first(&nodes, coordinator, run_id);
    let first = nodes.remove(0);
    let first_addr = bare_addr(&first).await;
    let mut events = first.train().subscribe();
    first.train().crash_at(point);
    let svc = first.train();
    let first_life = tokio::spawn({
        let run = run.clone();
        async move { svc.coordinate(run, None).await }
    });
    let res = match point {
        None => {
            let events = first.train().subscribe();
            assert!(kill_after_round_2(events, first).await);
            first_life.await.unwrap()
        }
        Some(_) => {
            // The training stops dead at the crash point; then the whole daemon goes.
            let res = tokio::time::timeout(Duration::from_secs(120), first_life)
                .await
                .expect("the crash point was reached")
                .unwrap();
            first.shutdown().await;
            res
        }
    };
    assert!(res.is_err(), "the first life was cut short at {point:?}");
    if point.is_some() {
        // Whatever its ledger names, the dead coordinator kept on disk, verified: even the
        // commit that no replica was told of before it died.
        let head = verified_ledger(&dir.path().join("p0"), &run_id)
            .pop()
            .unwrap();
        let kept = potluck_daemon::train::checkpoint::checkpoint_dir(
            &potluck_daemon::train::checkpoint::run_dir(&dir.path().join("p0"), &run_id),
            head.body().round,
        );
        let verified = potluck_coordinator::verify::verify_checkpoint_dir(
            &kept,
            &potluck_coordinator::verify::VerifyOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{point:?}: round {}: {e}", head.body().round));
        assert_eq!(verified.root, head.body().root, "{point:?}");
    }
    let mut announced = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let RunEvent::Committed { round, .. } = ev {
            announced.push(round);
        }
    }
    // The coordinator comes back on the same data dir and address, and is asked to run the
    // same run. In one process the old endpoint may hold the port a little longer than a
    // dead process would.
    let cfg = Config {
        data_dir: dir.path().join("p0"),
        listen: vec![first_addr],
        mdns: false,
        bootstrap: vec![listen_addr(&nodes[0]).await],
        // Its second life keeps only the last commit's checkpoint.
        keep_checkpoints: 1,
        ..Config::default()
    };
    let again = restart(&cfg).await;
    assert_eq!(again.client().local_peer_id(), coordinator);
    let summary = tokio::time::timeout(
        Duration::from_secs(300),
        again.train().coordinate(run, None),
    )
    .await
    .expect("run finished in time")
    .expect("run continued");
    assert_eq!(summary.rounds, 5);
    for r in replicas {
        let s = r.await.unwrap().expect("the replica rejoined and finished");
        assert_eq!(s.root, summary.root, "{point:?}");
    }
    // One chain (so no round twice), ending on the final root, holding every commit that
    // was announced before the crash.
    let ledger = verified_ledger(&dir.path().join("p0"), &run_id);
    assert_eq!(ledger.last().unwrap().body().root.0, summary.root);
    let checkpoints = potluck_daemon::train::checkpoint::run_dir(&dir.path().join("p0"), &run_id)
        .join(potluck_coordinator::store::CHECKPOINTS_DIR);
    let kept: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        kept,
        [format!("{:020}", 5)],
        "{point:?}: keep_checkpoints = 1 keeps the last commit's only"
    );
    for r in &announced {
        assert!(
            ledger.iter().any(|m| m.body().round == *r),
            "{point:?}: announced round {r} lost"
        );
    }
    again.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// Issue 17, finding 1: a replica that lost its coordinator and found it again looks for it
/// afresh when it loses it again, however long after the first loss: each loss has its own
/// search window. (Before, the window of the first loss was kept, so a replica gave up at
/// once when its coordinator went away a second time, long after the first.) Here the
/// coordinator dies twice and comes back each time; the second death comes well after the
/// first loss's window of three round deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_found_its_coordinator_again_looks_for_it_afresh_later() {
    let dir = tempfile::tempdir().unwrap();
    let failover_min = Duration::from_secs(1);
    let mut nodes = start_with(3, dir.path(), |c| c.failover_min = failover_min).await;
    let deadline = 4;
    let window = Duration::from_secs(deadline).max(failover_min) * 3;
    let run = run_with(|m| {
        m.rounds = Some(100_000);
        m.min_peers = Some(2);
        m.round_deadline_secs = Some(deadline);
    });
    let run_id = run.id();
    let first = nodes.remove(0);
    let coordinator = first.client().local_peer_id();
    let cfg = Config {
        listen: vec![bare_addr(&first).await],
        bootstrap: vec![listen_addr(&nodes[0]).await],
        failover_min,
        ..config_for(&dir.path().join("p0"), None)
    };
    // One life of the coordinator: it coordinates the run until it is shut down.
    let live = |node: Node, run: potluck_daemon::train::ResolvedRun| {
        let svc = node.train();
        tokio::spawn(async move {
            let _ = svc.coordinate(run, None).await;
        });
        node
    };
    let hex_id = hex::encode(run_id);
    let first = live(first, run.clone());
    for _ in 0..200 {
        if first.train().status().run_id == hex_id {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The replicas join once: each must live through both losses on its own.
    let replicas: Vec<_> = nodes
        .iter()
        .map(|n| {
            let svc = n.train();
            tokio::spawn(async move { svc.join(coordinator, run_id, None).await })
        })
        .collect();
    let until_commit =
        |node: &Node, min_round: u64, after: Option<(std::time::Instant, Duration)>| {
            let mut events = node.train().subscribe();
            async move {
                while let Ok(ev) = events.recv().await {
                    if let RunEvent::Committed {
                        round, agreeing, ..
                    } = ev
                        && round >= min_round
                        && agreeing == 3
                        && after.is_none_or(|(t, d)| t.elapsed() > d)
                    {
                        return;
                    }
                }
                panic!("the run ended early");
            }
        };
    tokio::time::timeout(Duration::from_secs(120), until_commit(&first, 2, None))
        .await
        .expect("round 2 committed by all three");
    first.shutdown().await;
    let first_loss = std::time::Instant::now();
    // Back again: the replicas find it, and train on with it for longer than the window.
    let second = live(restart(&cfg).await, run.clone());
    tokio::time::timeout(
        Duration::from_secs(180),
        until_commit(
            &second,
            0,
            Some((first_loss, window + Duration::from_secs(2))),
        ),
    )
    .await
    .expect("the replicas came back and trained past the first loss's window");
    second.shutdown().await;
    for r in &replicas {
        assert!(!r.is_finished(), "a replica gave up on its run");
    }
    // Back once more: the replicas look for it afresh and find it.
    let third = live(restart(&cfg).await, run.clone());
    tokio::time::timeout(Duration::from_secs(120), until_commit(&third, 0, None))
        .await
        .expect("both replicas came back after the second loss");
    for r in &replicas {
        assert!(!r.is_finished(), "a replica gave up on its run");
    }
    third.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
}

/// Issue 17, findings 3 and 4: a member that dies in a round is not waited for. The
/// coordinator tells the round's other members at once, so they stop waiting for its
/// contribution and its slice goes to its backup without waiting for the deadline phases
/// (60% and 70% of the round); the round commits long before them. And every commit names
/// every replica whose update went into it, not only the first quorum to report.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_dies_mid_round_is_not_waited_for_and_commits_name_every_contributor() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(4, dir.path()).await;
    let deadline = Duration::from_secs(120);
    let run = run_with(|m| {
        m.rounds = Some(5);
        m.min_peers = Some(3);
        m.round_deadline_secs = Some(deadline.as_secs());
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let replicas = join_all_but_the_first(&nodes, coordinator, run_id);
    let victim = nodes.pop().unwrap();
    let mut events = nodes[0].train().subscribe();
    // Kills the victim when a round that counts on all four opens, after a commit; notes
    // every commit (round, agreeing, participants) and how long after the kill the first
    // one came.
    let mut victim = Some(victim);
    let watcher = tokio::spawn(async move {
        let mut commits = Vec::new();
        let mut killed: Option<(u64, std::time::Instant)> = None;
        let mut took = None;
        while let Ok(ev) = events.recv().await {
            match ev {
                RunEvent::Committed {
                    round,
                    agreeing,
                    members,
                    ..
                } => {
                    if let Some((k, at)) = killed
                        && took.is_none()
                    {
                        took = Some((k, round, at.elapsed()));
                    }
                    commits.push((round, agreeing, members));
                }
                RunEvent::RoundOpened { round, members: 4 }
                    if !commits.is_empty() && killed.is_none() =>
                {
                    killed = Some((round, std::time::Instant::now()));
                    if let Some(v) = victim.take() {
                        v.shutdown().await;
                    }
                }
                RunEvent::Finished { .. } => break,
                _ => {}
            }
        }
        (took, commits)
    });
    let summary = tokio::time::timeout(
        Duration::from_secs(600),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    let (took, commits) = watcher.await.unwrap();
    let (killed_in, committed, took) =
        took.expect("a round with all four opened, the victim died in it, and a round committed");
    assert_eq!(
        committed, killed_in,
        "the round the member died in still committed"
    );
    eprintln!("the round with a dead member committed {took:?} after the kill");
    assert!(
        took < deadline / 2,
        "the round with a dead member took {took:?}: its exchange waited for the deadline phases"
    );
    for (round, agreeing, members) in &commits {
        let dead = usize::from(*round == killed_in);
        assert_eq!(
            *agreeing + dead,
            *members,
            "round {round}: the commit names every replica that took part: {commits:?}"
        );
    }
    let ledger = verified_ledger(&dir.path().join("p0"), &run_id);
    for (round, agreeing, _) in &commits {
        let entry = ledger.iter().find(|m| m.body().round == *round).unwrap();
        assert_eq!(entry.body().contributors.len(), *agreeing, "round {round}");
    }
    for r in replicas.into_iter().take(2) {
        let s = r.await.unwrap().expect("a survivor finished");
        assert_eq!(s.root, summary.root);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_coordinator_continues_the_run_from_its_ledger() {
    coordinator_dies_and_comes_back(None).await;
}

/// The coordinator stops dead at each persistence point in turn (in-process; the same with
/// real processes is in `daemon/tests/process.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_killed_at_each_persistence_point_continues_the_run() {
    for point in [
        CrashPoint::AfterRoundOpened(3),
        CrashPoint::BeforeLedgerAppend(2),
        CrashPoint::AfterLedgerAppend(2),
    ] {
        coordinator_dies_and_comes_back(Some(point)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_successor_takes_over_when_the_coordinator_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path()).await;
    let run = five_rounds_of_two();
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let successor = nodes[1].client().local_peer_id();
    let replicas = join_all_but_the_first(&nodes, coordinator, run_id);
    let first = nodes.remove(0);
    let events = first.train().subscribe();
    let svc = first.train();
    let doomed = tokio::spawn(async move { svc.coordinate_with(run, None, vec![successor]).await });
    assert!(kill_after_round_2(events, first).await);
    assert!(doomed.await.unwrap().is_err());
    // The successor (a replica until now) and the other replica finish the run together.
    let mut roots = Vec::new();
    for r in replicas {
        let s = tokio::time::timeout(Duration::from_secs(300), r)
            .await
            .expect("finished in time")
            .unwrap()
            .expect("finished the run after the failover");
        assert_eq!(s.rounds, 5);
        roots.push(s.root);
    }
    assert_eq!(roots[0], roots[1]);
    // The successor's ledger continues the dead coordinator's: rounds up to 2 signed by it,
    // later ones by the successor, one chain.
    let ledger = verified_ledger(&dir.path().join("p1"), &run_id);
    assert_eq!(ledger.last().unwrap().body().root.0, roots[0]);
    let keys: std::collections::BTreeSet<[u8; 32]> =
        ledger.iter().map(|m| m.body().coordinator_key).collect();
    assert_eq!(
        keys.len(),
        2,
        "signed by the coordinator, then by its successor"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_without_a_replica_runs_the_swarm() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        m.rounds = Some(3);
        m.min_peers = Some(2);
    });
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let replicas = join_all_but_the_first(&nodes, coordinator, run_id);
    let summary = tokio::time::timeout(
        Duration::from_secs(240),
        nodes[0].train().coordinate_only(run, Vec::new()),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 3);
    for r in replicas {
        assert_eq!(r.await.unwrap().unwrap().root, summary.root);
    }
    // It trained nothing, yet signed every commit: it hashed the state it fetched from an
    // agreeing replica.
    assert!(nodes[0].train().traffic().totals().1 > 0);
    let ledger = verified_ledger(&dir.path().join("p0"), &run_id);
    assert_eq!(ledger.len(), 4);
    assert_eq!(ledger[3].body().root.0, summary.root);
    let own = potluck_daemon::train::checkpoint::run_dir(&dir.path().join("p0"), &run_id);
    assert!(
        !own.join("local").exists(),
        "no replica state on the coordinator"
    );
    // A run that ended under an older daemon recorded only its last round in `ended`: a
    // replica that comes back is told the end from the ledger.
    std::fs::write(own.join("ended"), b"3").unwrap();
    let again = rejoin_after_the_end(&nodes[1], coordinator, run_id).await;
    assert_eq!((again.rounds, again.root), (3, summary.root));
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ledger_that_cannot_be_written_ends_the_run_on_its_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = five_rounds_of_two();
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let replicas = join_all_but_the_first(&nodes, coordinator, run_id);
    // Once round 1 is in the ledger, the ledger's directory becomes unwritable (a file
    // where the directory was, as a full or broken disk would leave it).
    let mut events = nodes[0].train().subscribe();
    let ledger = potluck_daemon::train::checkpoint::ledger_dir(
        &potluck_daemon::train::checkpoint::run_dir(&dir.path().join("p0"), &run_id),
    );
    let breaker = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if let RunEvent::Committed { round: 1, root, .. } = ev {
                std::fs::rename(&ledger, ledger.with_extension("moved")).unwrap();
                std::fs::write(&ledger, b"not a directory").unwrap();
                return Some(root);
            }
        }
        None
    });
    let err = tokio::time::timeout(
        Duration::from_secs(240),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("run ended in time")
    .expect_err("the run cannot go on without its ledger");
    assert!(err.to_string().contains("ledger"), "{err}");
    let kept = breaker.await.unwrap().expect("round 1 was committed");
    // Every replica ends on the last commit the ledger recorded.
    for r in replicas {
        let s = r.await.unwrap().expect("the replica finished");
        assert_eq!(s.rounds, 1);
        assert_eq!(s.root, kept);
    }
    // A replica that comes back after the end (as one that joined late, or was away when
    // the end was sent, does) is told the same end, though the ledger cannot be read.
    let again = rejoin_after_the_end(&nodes[1], coordinator, run_id).await;
    assert_eq!((again.rounds, again.root), (1, kept));
    for n in nodes {
        n.shutdown().await;
    }
}

/// Plain data parallel (`mode = "data-parallel"`): every inner step the gradients go through
/// the sharded reduction between the daemons, and every replica applies the mean with its
/// inner AdamW, so all of them end every round on the committed root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_parallel_run_ends_every_round_on_the_same_root_on_every_peer() {
    use potluck_daemon::train::checkpoint::{checkpoint_dir, run_dir};
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = run_with(|m| {
        m.mode = Some(RunMode::DataParallel);
        m.compression = None;
    });
    assert_eq!(run.mode, RunMode::DataParallel);
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let joins = join_all_but_the_first(&nodes, coordinator, run_id);
    let summary = tokio::time::timeout(
        Duration::from_secs(240),
        nodes[0].train().coordinate(run.clone(), None),
    )
    .await
    .expect("run finished in time")
    .expect("run succeeded");
    assert_eq!(summary.rounds, 3);
    assert_eq!(summary.total_steps, 3 * 4, "H inner steps per round");
    for j in joins {
        let s = j.await.unwrap().expect("replica finished");
        assert_eq!(s.root, summary.root);
    }
    let mut committed = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let RunEvent::Committed { round, root, .. } = ev {
            committed.push((round, root));
        }
    }
    assert_eq!(committed.len(), 3);
    // A replica keeps a round's checkpoint only when its own root was the committed one:
    // every peer holds every round's.
    for i in 0..3 {
        let rd = run_dir(&dir.path().join(format!("p{i}")), &run_id);
        for (round, root) in &committed {
            let v = potluck_coordinator::verify::verify_checkpoint_dir(
                &checkpoint_dir(&rd, *round),
                &potluck_coordinator::verify::VerifyOptions::default(),
            )
            .unwrap_or_else(|e| panic!("peer {i} did not end round {round} on its root: {e}"));
            assert_eq!(v.root.0, *root, "peer {i}, round {round}");
        }
    }
    // Every step of every round moved gradients between the peers, both ways.
    for n in &nodes {
        let per_round = n.train().traffic().per_round();
        for r in 1..=3 {
            let (s, rcv) = per_round.get(&r).copied().unwrap_or_default();
            assert!(s > 0 && rcv > 0, "round {r}: {s} sent, {rcv} received");
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A two-round run on a directory of text files with a word-level tokenizer, both under
/// `dir`, waiting for `min_peers`; returns it with the corpus's and the tokenizer's paths.
fn path_source_run(
    dir: &std::path::Path,
    min_peers: usize,
) -> (
    potluck_daemon::train::ResolvedRun,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let src = dir.join("corpus");
    std::fs::create_dir_all(src.join("more")).unwrap();
    std::fs::write(src.join("a.txt"), "hello world ! ".repeat(900)).unwrap();
    std::fs::write(src.join("more/b.txt"), "world ! hello hello ".repeat(700)).unwrap();
    let tok = dir.join("words.json");
    std::fs::write(
        &tok,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                      "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "!": 3}}}"#,
    )
    .unwrap();
    let run = run_with(|m| {
        m.rounds = Some(2);
        m.min_peers = Some(min_peers);
        m.data.source = src.display().to_string();
        m.data.tokenizer = Some(tok.display().to_string());
        m.data.train_bytes = 0;
        m.data.eval_bytes = 0;
        m.data.eval_fraction = 0.1;
    });
    (run, src, tok)
}

/// Waits until `package` holds the data package of `root`, intact.
async fn packaged(package: &std::path::Path, root: potluck_coordinator::Hash32) {
    use potluck_daemon::train::datapack::holds;
    for _ in 0..600 {
        if holds(package, root) == Ok(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} never held the run's data package", package.display());
}

/// Peers that lack a run's data and tokenizer fetch them from the swarm. The starter has a
/// directory of text files and a tokenizer and packages them; peer 1, which finds them at
/// the manifest's paths, reads its own copy and serves it too. Then both are moved away,
/// so the last peer cannot read them; it holds a copy of the package with a flipped byte,
/// refuses that copy and fetches a good one from the others. Every peer trains on the run's
/// data (the pinned token hash is checked on what they read) and ends on the committed
/// root, and both keep the verified package to serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_without_the_data_fetch_it_and_its_tokenizer_from_the_swarm() {
    use potluck_daemon::train::checkpoint::run_dir;
    use potluck_daemon::train::datapack::{DATA_DIR, holds, pinned_root};
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let (run, src, tok) = path_source_run(dir.path(), 3);
    let run_id = run.id();
    let root = pinned_root(&run)
        .unwrap()
        .expect("a path source pins its package");
    let coordinator = nodes[0].client().local_peer_id();
    let svc = nodes[0].train();
    let coordinating = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(240), svc.coordinate(run, None)).await
    });
    // The starter packages the data before its run waits for peers.
    let package = run_dir(&dir.path().join("p0"), &run_id).join(DATA_DIR);
    packaged(&package, root).await;
    // Peer 1 finds the data at the manifest's paths: it trains on its own copy and serves
    // it too, through hard links to the very files it read (no copy).
    let first = tokio::spawn(join_retrying(nodes[1].train(), coordinator, run_id));
    let linked = run_dir(&dir.path().join("p1"), &run_id).join(DATA_DIR);
    packaged(&linked, root).await;
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(linked.join("text-000000")), ino(src.join("a.txt")));
        assert_eq!(ino(linked.join("tokenizer.json")), ino(tok.clone()));
    }
    // Then the data disappears from the paths.
    let gone = dir.path().join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    std::fs::rename(&src, gone.join("corpus")).unwrap();
    std::fs::rename(&tok, gone.join("words.json")).unwrap();
    // Peer 2 holds a damaged copy of the package.
    let damaged = run_dir(&dir.path().join("p2"), &run_id).join(DATA_DIR);
    std::fs::create_dir_all(&damaged).unwrap();
    for e in std::fs::read_dir(&package).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), damaged.join(e.file_name())).unwrap();
    }
    let good = std::fs::read(package.join("text-000001")).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x01;
    std::fs::write(damaged.join("text-000001"), &bad).unwrap();
    assert!(holds(&damaged, root).is_err());

    let last = tokio::spawn(join_retrying(nodes[2].train(), coordinator, run_id));
    let summary = coordinating
        .await
        .unwrap()
        .expect("run finished in time")
        .expect("run succeeded");
    assert_eq!(summary.rounds, 2);
    for j in [first, last] {
        let s = j.await.unwrap().expect("replica finished");
        assert_eq!(s.root, summary.root);
    }
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let pack = run_dir(&dir.path().join(format!("p{i}")), &run_id).join(DATA_DIR);
        assert_eq!(holds(&pack, root), Ok(true), "peer {i} keeps the package");
        assert_eq!(std::fs::read(pack.join("text-000001")).unwrap(), good);
        let st = node.train().status();
        assert_eq!(
            (st.rejected_updates, st.disagreed_rounds),
            (0, 0),
            "peer {i}"
        );
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A run whose source files changed after it was pinned (between `potluck run start`'s pin
/// and its coordinator opening the run) is refused before anything of the run is written:
/// no ledger, no package.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_changed_after_pinning_is_refused_before_the_ledger_exists() {
    use potluck_daemon::train::checkpoint::{ledger_dir, run_dir};
    use potluck_daemon::train::datapack::DATA_DIR;
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(1, dir.path()).await;
    let (run, src, _) = path_source_run(dir.path(), 1);
    let run_id = run.id();
    std::fs::write(src.join("a.txt"), "edited after the run was pinned").unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        nodes[0].train().coordinate(run, None),
    )
    .await
    .expect("refused in time")
    .expect_err("a changed source is refused");
    assert!(
        err.to_string()
            .contains("changed since the run was started"),
        "{err}"
    );
    let rd = run_dir(&dir.path().join("p0"), &run_id);
    assert!(!ledger_dir(&rd).exists(), "no ledger for the refused run");
    assert!(
        !rd.join(DATA_DIR).exists(),
        "no package for the refused run"
    );
    for n in nodes {
        n.shutdown().await;
    }
}

/// A peer without the run's data, when no peer holds the run's package any more, is refused
/// with an error that says so, and keeps no package.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_can_fetch_the_data_from_nowhere_says_so() {
    use potluck_daemon::train::checkpoint::run_dir;
    use potluck_daemon::train::datapack::{DATA_DIR, pinned_root};
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(2, dir.path()).await;
    let (run, src, tok) = path_source_run(dir.path(), 1);
    let run_id = run.id();
    let root = pinned_root(&run).unwrap().unwrap();
    let coordinator = nodes[0].client().local_peer_id();
    let svc = nodes[0].train();
    let coordinating = tokio::spawn(async move { svc.coordinate_only(run, Vec::new()).await });
    let package = run_dir(&dir.path().join("p0"), &run_id).join(DATA_DIR);
    packaged(&package, root).await;
    // The data is gone everywhere: the source, the tokenizer and the starter's package.
    for p in [&src, &package] {
        std::fs::remove_dir_all(p).unwrap();
    }
    std::fs::remove_file(&tok).unwrap();
    let mut refused = None;
    for _ in 0..100 {
        match nodes[1].train().join(coordinator, run_id, None).await {
            Err(e) if e.to_string().contains("fetching its package") => {
                refused = Some(e.to_string());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(_) => panic!("a replica trained without the run's data"),
        }
    }
    let refused = refused.expect("the join was refused for want of the data");
    assert!(refused.contains(&root.short()), "{refused}");
    let joiner = run_dir(&dir.path().join("p1"), &run_id).join(DATA_DIR);
    assert!(!joiner.exists(), "no package left behind");
    coordinating.abort();
    for n in nodes {
        n.shutdown().await;
    }
}
