//! Pausing a replica mid-run (`potluck pause` / `potluck resume` act on the same
//! `TrainService` calls), and the refused-update counter by reason, over real QUIC sockets on
//! loopback with in-process daemons.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use potluck_daemon::train::waiting::Phase;
use potluck_daemon::train::{RunEvent, RunManifest};
use potluck_daemon::{Config, Node};

const RUN: &str = r#"
name = "pause"
seed = 5
model = "tiny"
inner_steps = 4
rounds = 12
compression = "int8"
round_deadline_secs = 60
min_peers = 2

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

/// `n` daemons on loopback, each bootstrapping from the first.
async fn start(n: usize, dir: &std::path::Path) -> Vec<Node> {
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
        let cfg = Config {
            data_dir: dir.join(format!("p{i}")),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            mdns: false,
            bootstrap: seed.clone().into_iter().collect(),
            ..Config::default()
        };
        let node = Node::start(cfg).await.unwrap();
        if seed.is_none() {
            let c = node.client();
            for _ in 0..100 {
                let st = c.status().await.unwrap();
                if let Some(a) = st.listen_addrs.first() {
                    seed = Some(a.clone().with(libp2p::multiaddr::Protocol::P2p(st.peer_id)));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(seed.is_some(), "the first daemon never listened");
        }
        nodes.push(node);
    }
    nodes
}

/// Joins the run, retrying while the coordinator is not ready.
async fn join_retrying(
    svc: potluck_daemon::train::TrainService,
    coordinator: libp2p::PeerId,
    run_id: [u8; 32],
) -> potluck_daemon::train::RunSummary {
    for _ in 0..300 {
        match svc.join(coordinator, run_id, None).await {
            Ok(s) => return s,
            Err(e) => tracing::warn!(error = %e, "join failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("never joined");
}

/// Polls `f` every 50 ms until it holds, for at most `within`.
async fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let give_up = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < give_up, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three replicas; a joined one pauses mid-run and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_replica_is_not_waited_for_and_rejoins_with_its_state() {
    pause_one(2).await;
}

/// The coordinator's own replica pauses and resumes; the coordinator goes on coordinating
/// (it fetches each committed state from an agreeing replica meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinators_own_replica_pauses_and_rejoins_with_its_state() {
    pause_one(0).await;
}

/// Three replicas; replica `which` (0: the coordinator's own) pauses after a commit that
/// names all three, the run commits two rounds with the other two without waiting for the
/// deadline, then it resumes, is named by a later commit, and ends on the same root. Its
/// state is intact: its ledger holds every commit (those made while it was paused
/// included) and verifies, and it rebuilt its replica from the state it saved when it
/// paused.
async fn pause_one(which: usize) {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let run = RunManifest::parse(RUN)
        .unwrap()
        .resolve()
        .unwrap()
        .pin_data()
        .unwrap();
    let run_id = run.id();
    let deadline = Duration::from_secs(run.round_deadline_secs);
    let coordinator = nodes[0].client().local_peer_id();
    let pauser = nodes[which].train();
    let pauser_id = nodes[which].client().local_peer_id();
    let mut events = nodes[0].train().subscribe();
    let joined: Vec<_> = nodes[1..]
        .iter()
        .map(|n| tokio::spawn(join_retrying(n.train(), coordinator, run_id)))
        .collect();
    let coord = nodes[0].train();
    let coordinating = tokio::spawn(async move { coord.coordinate(run, None).await });

    // (round, agreeing, members) of every commit, and when the pause and resume happened.
    let mut commits: Vec<(u64, usize, usize)> = Vec::new();
    let mut paused_at: Option<(Instant, u64)> = None;
    let mut first_after_pause: Option<Duration> = None;
    let mut resumed_after: Option<u64> = None;
    let watching = tokio::time::timeout(Duration::from_secs(400), async {
        loop {
            match events.recv().await {
                Ok(RunEvent::Committed {
                    round,
                    agreeing,
                    members,
                    ..
                }) => {
                    commits.push((round, agreeing, members));
                    if paused_at.is_none() && agreeing == 3 {
                        let cause = pauser.pause().unwrap();
                        assert!(cause.is_some(), "pause() pauses at once");
                        paused_at = Some((Instant::now(), round));
                    } else if let Some((at, _)) = paused_at {
                        if first_after_pause.is_none() {
                            first_after_pause = Some(at.elapsed());
                        }
                        let without = commits
                            .iter()
                            .filter(|(r, a, m)| *r > paused_at.unwrap().1 && *a == 2 && *m == 2)
                            .count();
                        if resumed_after.is_none() && without >= 2 {
                            // Paused: out of the rounds, following the commits.
                            let st = pauser.status();
                            assert_eq!(st.phase, Phase::Paused, "{st:?}");
                            assert!(st.paused.contains("potluck pause"), "{st:?}");
                            assert!(st.waiting.starts_with("paused"), "{st:?}");
                            assert!(
                                st.committed_round > paused_at.unwrap().1,
                                "it follows the commits while paused: {st:?}"
                            );
                            assert_eq!(pauser.resume().unwrap(), None, "resume() resumes");
                            resumed_after = Some(round);
                        }
                    }
                }
                Ok(RunEvent::Finished { .. }) => break,
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await;
    watching.expect("the run finished in time");
    let summary = coordinating.await.unwrap().expect("the run succeeded");
    let mut summaries = vec![];
    for j in joined {
        summaries.push(j.await.unwrap());
    }
    eprintln!("commits (round, agreeing, members): {commits:?}");
    let (_, paused_in) = paused_at.expect("the replica paused");
    let took = first_after_pause.expect("a round committed after the pause");
    eprintln!("first commit {took:?} after the pause");
    assert!(
        took < deadline / 3,
        "the first commit after the pause took {took:?}: the round waited for the paused replica"
    );
    let resumed_after = resumed_after.expect("two rounds committed without the paused replica");
    assert!(
        commits
            .iter()
            .any(|(r, a, m)| *r > resumed_after && *a == 3 && *m == 3),
        "after resuming, a commit names all three again: {commits:?}"
    );
    // Every participant agreed, but in the round the pause may have caught the replica
    // in (it was a participant, it left): at most one such commit, right after the pause.
    let short: Vec<_> = commits.iter().filter(|(_, a, m)| a != m).collect();
    assert!(
        short.is_empty() || (short.len() == 1 && short[0].1 == 2 && short[0].0 > paused_in),
        "{commits:?}"
    );
    // Every replica, the paused one included, ends on the final root.
    for s in &summaries {
        assert_eq!(s.root, summary.root);
    }
    summaries.insert(0, summary);
    let summary = &summaries[0];
    let paused_summary = &summaries[which];
    assert!(paused_summary.resumed_from.is_none(), "it never restarted");
    // Its ledger copy has every commit, the ones made while it was paused included, and
    // the chain verifies.
    use potluck_daemon::train::checkpoint::{ledger_dir, run_dir};
    let rd = run_dir(&dir.path().join(format!("p{which}")), &run_id);
    let entries = potluck_coordinator::store::Ledger::read_entries(&ledger_dir(&rd)).unwrap();
    let coordinator_entries = potluck_coordinator::store::Ledger::read_entries(&ledger_dir(
        &run_dir(&dir.path().join("p0"), &run_id),
    ))
    .unwrap();
    assert_eq!(
        entries.iter().map(|m| m.body().round).collect::<Vec<_>>(),
        coordinator_entries
            .iter()
            .map(|m| m.body().round)
            .collect::<Vec<_>>(),
        "the paused replica's ledger copy holds every commit"
    );
    assert!(
        entries.iter().any(|m| m.body().round > paused_in
            && m.body().round <= resumed_after
            && !m
                .body()
                .contributors
                .iter()
                .any(|c| c.peer.0 == pauser_id.to_bytes())),
        "commits made while it was paused do not name it"
    );
    // Checked against the coordinator's signed run manifest (a replica keeps none).
    let signed = potluck_coordinator::failover::SignedRunManifest::decode(
        &std::fs::read(
            run_dir(&dir.path().join("p0"), &run_id).join(potluck_coordinator::manifest::RUN_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    potluck_coordinator::verify::verify_chain(&signed, &entries).unwrap();
    // It rebuilt its replica (inner optimizer, error feedback) from the state it saved when
    // it paused, which is labelled with the last commit it held then: the round it paused
    // after, or the one before when that commit had not reached it yet.
    let st = pauser.status();
    let from = st
        .resumed_from
        .expect("the resumed replica rebuilt itself from its saved state");
    assert!(
        from == paused_in || from + 1 == paused_in,
        "resumed from round {from}, paused after round {paused_in}"
    );
    assert_eq!(paused_summary.rounds, summary.rounds);
    assert!(st.paused.is_empty(), "{st:?}");
    assert_eq!(st.phase, Phase::Finished);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A run short of `min_peers` says how many peers joined, at the coordinator and at a
/// replica, and starts once the last one joins; a finished run waits for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_short_of_min_peers_says_how_many_joined() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(3, dir.path()).await;
    let mut m = RunManifest::parse(RUN).unwrap();
    m.rounds = Some(2);
    m.min_peers = Some(3);
    let run = m.resolve().unwrap().pin_data().unwrap();
    let run_id = run.id();
    let coordinator = nodes[0].client().local_peer_id();
    let coord = nodes[0].train();
    let coordinating = tokio::spawn(async move { coord.coordinate(run, None).await });
    let first = tokio::spawn(join_retrying(nodes[1].train(), coordinator, run_id));
    let expected = "waiting for peers: 2 of 3 peers joined (min_peers = 3)";
    for (i, n) in nodes[..2].iter().enumerate() {
        let svc = n.train();
        until(
            Duration::from_secs(60),
            &format!("peer {i} says 2 of 3"),
            || svc.status().waiting == expected,
        )
        .await;
    }
    let second = tokio::spawn(join_retrying(nodes[2].train(), coordinator, run_id));
    let summary = tokio::time::timeout(Duration::from_secs(120), coordinating)
        .await
        .expect("the run finished in time")
        .unwrap()
        .expect("the run succeeded");
    for j in [first, second] {
        assert_eq!(j.await.unwrap().root, summary.root);
    }
    for n in &nodes {
        let st = n.train().status();
        assert_eq!(st.phase, Phase::Finished, "{st:?}");
        assert_eq!(st.waiting, "", "{st:?}");
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A tensor frame whose header lies about its sender (signed by another key than the
/// stream's peer), and one whose signature is garbage, are refused and counted under
/// `bad_signature`; the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_frames_are_counted_as_rejected_by_reason() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use potluck_daemon::dataplane::{seal_payload, signing_bytes, write_frame};
    use potluck_daemon::train::session::TENSOR_PROTOCOL;
    use potluck_proto::v1::{FrameHeader, FrameKind};
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(2, dir.path()).await;
    let target = nodes[0].client().local_peer_id();
    let target_svc = nodes[0].train();
    let liar = libp2p::identity::Keypair::generate_ed25519();
    let payload = vec![7u8; 64];
    let frames = [
        // Signed, correctly, by a key that is not the sender's.
        (liar.clone(), true),
        // A signature that does not verify.
        (liar.clone(), false),
    ];
    let mut control = nodes[1].client().stream_control();
    for (i, (key, sign)) in frames.iter().enumerate() {
        let mut h = FrameHeader {
            run_id: vec![1; 32],
            round: 1,
            kind: FrameKind::Contribution as i32,
            len: 64,
            tokens: 10,
            ..Default::default()
        };
        let wire = seal_payload(&mut h, &payload, None).into_owned();
        h.public_key = key.public().encode_protobuf();
        h.signature = if *sign {
            key.sign(&signing_bytes(&h)).unwrap()
        } else {
            vec![0u8; 64]
        };
        let mut s = control
            .open_stream(target, TENSOR_PROTOCOL)
            .await
            .unwrap_or_else(|e| panic!("frame {i}: {e}"));
        write_frame(&mut s, &h, &wire).await.unwrap();
        let _ = s.close().await;
        let mut ack = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut ack))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        assert_eq!(n, 0, "frame {i}: a refused frame is not acknowledged");
    }
    until(Duration::from_secs(10), "both frames counted", || {
        target_svc
            .status()
            .rejected_by_reason
            .get("bad_signature")
            .copied()
            == Some(2)
    })
    .await;
    let st = target_svc.status();
    assert_eq!(st.rejected_updates, 2, "{st:?}");
    assert_eq!(st.rejected_by_reason.len(), 1, "{st:?}");
    // Still serving: its network answers.
    nodes[0].client().status().await.unwrap();
    for n in nodes {
        n.shutdown().await;
    }
}
