//! Runs through the control API of real daemons and through the `potluck` binary: `run
//! start` refuses a bad manifest with its error and a second run while one is active;
//! `invite` names the active run; `join STRING` on a second daemon (a friend outside the
//! private swarm) joins the swarm and the run, which both daemons finish on the same root;
//! hostile invite strings get clear errors; `checkpoints` lists a ledger built with the
//! coordinator crate and names a broken link.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::config;
use potluck_daemon::Node;
use potluck_daemon::control::{self, ControlClient};
use potluck_daemon::train::runs::{ChainVerdict, RunInvite, list_ledgers};
use potluck_proto::v1;

/// A run small enough to finish in seconds on a 2-core machine.
fn manifest(min_peers: usize) -> String {
    format!(
        r#"
name = "cli-test"
seed = 5
model = "tiny"
inner_steps = 2
rounds = 2
compression = "int8"
round_deadline_secs = 60
min_peers = {min_peers}

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
"#
    )
}

/// Runs the `potluck` binary with `args` (blocking, off the runtime).
async fn potluck(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
            .args(&args)
            .env_remove("POTLUCK_DATA_DIR")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(a: &[&str], data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    v.push("--data-dir".into());
    v.push(data_dir.display().to_string());
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn run_status(c: &mut ControlClient) -> v1::RunStatusResponse {
    c.run_status(v1::RunStatusRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Polls the run status until the run is no longer active.
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

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POTLUCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_start_refuses_bad_manifests_and_a_second_run_and_invites_name_the_run() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let node = Node::start(config(&data, vec![])).await.unwrap();
    let me = node.client().local_peer_id();
    let mut c = control::connect_unix(&data).await.unwrap();

    // Nothing yet: status says so, and there is no run to invite to.
    let s = run_status(&mut c).await;
    assert!(!s.known && !s.active);
    let out = potluck(args(&["run", "status"], &data)).await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("no run"),
        "{}",
        text(&out.stdout)
    );
    let err = c
        .create_run_invite(v1::CreateRunInviteRequest { ttl_secs: 60 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("coordinates no run"), "{err}");

    // A manifest with a bad value is refused with the manifest's own error, by the API and
    // by the binary.
    let bad = manifest(1).replace("\"int8\"", "\"gzip\"");
    let err = c
        .start_run(v1::StartRunRequest {
            manifest_toml: bad.clone(),
            out_dir: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("compression"), "{err}");
    // A successor that is not a peer id is refused before anything starts.
    let err = c
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(1),
            out_dir: String::new(),
            successors: vec!["not-a-peer".into()],
            coordinate_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("not a peer id"), "{err}");
    let bad_file = dir.path().join("bad.toml");
    std::fs::write(&bad_file, &bad).unwrap();
    let out = potluck(args(&["run", "start", bad_file.to_str().unwrap()], &data)).await;
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("cannot start the run") && e.contains("compression"),
        "{e}"
    );
    let out = potluck(args(&["run", "start", "/nonexistent/run.toml"], &data)).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("reading the run manifest"));
    assert!(
        !run_status(&mut c).await.known,
        "a refused start leaves no run"
    );

    // Data that cannot be loaded: the start fails with the data error, and the status
    // keeps the failed run and its error until another starts.
    let err = c
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(1).replace("\"builtin\"", "\"/nonexistent/corpus\""),
            out_dir: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("run data"), "{err}");
    let s = run_status(&mut c).await;
    assert!(s.known && !s.active, "{s:?}");
    assert_eq!(s.state, "failed");
    assert!(s.error.contains("run data"), "{s:?}");

    // A run that waits for a second peer stays active; the binary prints its id.
    let good = dir.path().join("run.toml");
    std::fs::write(&good, manifest(2)).unwrap();
    let out = potluck(args(&["run", "start", good.to_str().unwrap()], &data)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run_id = text(&out.stdout).trim().to_string();
    assert_eq!(run_id.len(), 64, "{run_id}");
    let s = run_status(&mut c).await;
    assert!(s.known && s.active, "{s:?}");
    assert_eq!(s.run_id, run_id);
    assert_eq!(s.role, "coordinator");
    assert_eq!(s.coordinator_peer_id, me.to_base58());
    assert_eq!(s.name, "cli-test");
    assert_eq!(s.rounds, 2);
    assert!(s.error.is_empty());
    assert!(
        s.train_loss.is_nan() && s.eval_loss.is_nan(),
        "no loss before the first round: {s:?}"
    );

    // A second run while this one is active is refused, naming the active run.
    let err = c
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(1),
            out_dir: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("still active") && err.message().contains(&run_id),
        "{err}"
    );
    let out = potluck(args(&["run", "start", good.to_str().unwrap()], &data)).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("still active"));
    // Joining another run is refused the same way.
    let err = c
        .join_run(v1::JoinRunRequest {
            coordinator_peer_id: libp2p::PeerId::random().to_base58(),
            run_id: "ab".repeat(32),
            out_dir: String::new(),
            coordinator_addrs: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    // The invite of a public swarm: this run, this coordinator, loopback addresses, no
    // membership token.
    let out = potluck(args(&["invite"], &data)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout).trim().to_string();
    assert_eq!(line.lines().count(), 1);
    let inv = RunInvite::parse(&line).unwrap();
    assert_eq!(hex::encode(inv.run_id), run_id);
    assert_eq!(inv.coordinator, me);
    assert!(inv.swarm_invite.is_none());
    assert!(!inv.addrs.is_empty());
    assert!(
        inv.addrs
            .iter()
            .all(|a| a.to_string().contains("127.0.0.1"))
    );

    // Hostile strings, through the API and the binary, are refused with clear errors.
    for (bad, expect) in [
        ("garbage".to_string(), "not a run invite"),
        ("potluck9:AAAA".to_string(), "version 9"),
        ("potluck1:%%%%".to_string(), "damaged"),
        (
            format!("potluck1:{}", "A".repeat(1 << 20)),
            "more than the limit",
        ),
        (line.clone(), "coordinates itself"),
    ] {
        let err = c
            .accept_run_invite(v1::AcceptRunInviteRequest {
                invite: bad.clone(),
                out_dir: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(expect), "{expect}: {err}");
    }
    for (bad, expect) in [
        ("garbage".to_string(), "not a run invite"),
        (format!("potluck1:{}", "A".repeat(100_000)), "limit"),
    ] {
        let out = potluck(args(&["join", &bad], &data)).await;
        assert!(!out.status.success());
        let e = text(&out.stderr);
        assert!(e.contains(expect), "{expect}: {e}");
    }
    // A valid invite of another private swarm, on a busy daemon: refused before the daemon
    // changes swarms.
    let other_owner = libp2p::identity::Keypair::generate_ed25519();
    let (swarm_text, _, _) = potluck_daemon::membership::SwarmState::default().create_invite(
        &other_owner,
        &["/ip4/127.0.0.1/udp/9/quic-v1".parse().unwrap()],
        u64::MAX / 4,
        60_000,
        &mut rand::rng(),
    );
    use base64::Engine as _;
    let other = RunInvite {
        run_id: [3; 32],
        coordinator: other_owner.public().to_peer_id(),
        addrs: vec!["/ip4/127.0.0.1/udp/9/quic-v1".parse().unwrap()],
        swarm_invite: Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&swarm_text)
                .unwrap(),
        ),
    };
    let err = c
        .accept_run_invite(v1::AcceptRunInviteRequest {
            invite: other.encode(),
            out_dir: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("still active"), "{err}");
    let st = c.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.swarm, "public");

    assert!(run_status(&mut c).await.active, "the run is unharmed");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_friend_joins_with_one_string_and_both_finish_the_run() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let mut ca = config(&da, vec![]);
    ca.private = true;
    let a = Node::start(ca).await.unwrap();
    let b = Node::start(config(&db, vec![])).await.unwrap();
    let mut cli_a = control::connect_unix(&da).await.unwrap();
    let mut cli_b = control::connect_unix(&db).await.unwrap();

    let started = cli_a
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(2),
            out_dir: dir.path().join("ckpt").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let out = potluck(args(&["invite"], &da)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout).trim().to_string();
    let inv = RunInvite::parse(&line).unwrap();
    assert!(
        inv.swarm_invite.is_some(),
        "an owner's invite carries a membership token"
    );
    assert!(line.len() < 1024, "{} chars", line.len());

    // The friend's daemon is outside the private swarm: the one string is all it needs.
    let out = potluck(args(&["join", &line], &db)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("joined the private swarm") && said.contains(&started.run_id),
        "{said}"
    );
    let s = run_status(&mut cli_b).await;
    assert!(s.known);
    assert_eq!(s.role, "replica");
    assert_eq!(s.run_id, started.run_id);

    let sa = wait_finished(&mut cli_a, Duration::from_secs(180)).await;
    let sb = wait_finished(&mut cli_b, Duration::from_secs(60)).await;
    assert_eq!(sa.state, "finished", "{sa:?}");
    assert_eq!(sb.state, "finished", "{sb:?}");
    assert!(sa.error.is_empty() && sb.error.is_empty());
    let first_root = sa.committed_root.clone();
    assert_eq!(sa.committed_round, 2);
    assert_eq!(sb.committed_round, 2);
    assert_eq!(
        sa.committed_root, sb.committed_root,
        "both replicas hold the same state"
    );
    assert!(sb.bytes_sent > 0 && sb.bytes_received > 0);
    // Per-round traffic, newest first, both directions, for both rounds.
    let rounds: Vec<u64> = sb.round_bytes.iter().map(|b| b.round).collect();
    assert!(
        rounds.starts_with(&[2, 1]) || rounds.starts_with(&[3, 2, 1]),
        "{rounds:?}"
    );
    assert!(
        sb.round_bytes
            .iter()
            .filter(|b| b.round <= 2)
            .all(|b| b.sent > 0 && b.received > 0),
        "{:?}",
        sb.round_bytes
    );
    // Per-round timings, newest first: each round's wall time covers its parts.
    let timed: Vec<u64> = sb.round_timings.iter().map(|t| t.round).collect();
    assert!(
        timed.starts_with(&[2, 1]) || timed.starts_with(&[3, 2, 1]),
        "{timed:?}"
    );
    for t in &sb.round_timings {
        let parts = t.train_ms + t.local_ms + t.persist_ms + t.network_wait_ms;
        assert!(t.wall_ms > 0 && t.train_ms > 0, "{t:?}");
        assert_eq!(t.coordination_ms, t.wall_ms.saturating_sub(parts), "{t:?}");
        assert!((0.0..=1.0).contains(&t.network_wait_share), "{t:?}");
    }
    assert!(sa.eval_loss.is_finite());
    assert!(!sa.checkpoint_root.is_empty(), "the checkpoint was written");

    let out = potluck(args(&["run", "status", "--follow"], &db)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("finished; committed root {}", sb.committed_root)),
        "{}",
        text(&out.stdout)
    );

    // The binary's JSON status shows the same run.
    let out = potluck(args(&["run", "status", "--json"], &db)).await;
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["run_id"], started.run_id.as_str());
    assert_eq!(j["state"], "finished");
    assert_eq!(j["role"], "replica");
    assert!(j["round_bytes"][0]["sent"].as_u64().unwrap() > 0, "{j}");
    // Its replica ended every round on the committed root.
    assert_eq!(j["disagreed_rounds"].as_u64(), Some(0), "{j}");
    assert_eq!(
        j["round_timings"][0]["round"].as_u64(),
        Some(sb.round_timings[0].round),
        "{j}"
    );
    assert!(
        j["round_timings"][0]["wall_ms"].as_u64().unwrap() > 0,
        "{j}"
    );
    let out = potluck(args(&["run", "status"], &db)).await;
    assert!(
        text(&out.stdout).contains("per round:  round "),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains(&format!(
            "timing:     round {}: ",
            sb.round_timings[0].round
        )),
        "{}",
        text(&out.stdout)
    );

    // The membership token inside was used up: the same string admits no one else.
    let dc = dir.path().join("c");
    let cnode = Node::start(config(&dc, vec![])).await.unwrap();
    let out = potluck(args(&["join", &line], &dc)).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invite already used"),
        "{}",
        text(&out.stderr)
    );
    // Issue 17, finding 7: that outsider's low-level join is refused at once and says why,
    // instead of "joining" and failing a minute later on a protocol name.
    let a_addr = common::addr(&a, "quic-v1").await;
    let mut cli_c = control::connect_unix(&dc).await.unwrap();
    let err = cli_c
        .join_run(v1::JoinRunRequest {
            coordinator_peer_id: a.client().local_peer_id().to_base58(),
            run_id: started.run_id.clone(),
            out_dir: String::new(),
            coordinator_addrs: vec![a_addr.to_string()],
        })
        .await
        .expect_err("an outsider of a private swarm cannot join its run");
    assert!(err.message().contains("private swarm"), "{err}");
    cnode.shutdown().await;

    // Issue 17, finding 6: the finished run's manifest again is refused with what to do, on
    // its coordinator and on its replica, and the refusal leaves nothing behind.
    let err = cli_a
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(2),
            ..Default::default()
        })
        .await
        .expect_err("a finished run does not start again");
    assert!(
        err.message().contains("already finished") && err.message().contains("--fresh"),
        "{err}"
    );
    let err = cli_b
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(2),
            ..Default::default()
        })
        .await
        .expect_err("a replica does not start its run as a new coordinator");
    assert!(
        err.message().contains("as a replica") && err.message().contains("--fresh"),
        "{err}"
    );
    let b_run_dir =
        potluck_daemon::train::checkpoint::run_dir(&db, &RunInvite::parse(&line).unwrap().run_id);
    assert!(
        !b_run_dir
            .join(potluck_coordinator::manifest::RUN_FILE)
            .exists(),
        "the refused start wrote nothing"
    );
    let out = potluck(args(&["checkpoints"], &db)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A new run can start once the last one ended.
    let again = cli_a
        .start_run(v1::StartRunRequest {
            manifest_toml: manifest(2).replace("seed = 5", "seed = 6"),
            out_dir: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.run_id, started.run_id);
    // The low-level join: coordinator and run id by hand (B is a member of A's swarm now).
    let a_id = a.client().local_peer_id().to_base58();
    let out = potluck(args(
        &[
            "run",
            "join",
            "--coordinator",
            &a_id,
            "--run",
            &again.run_id,
        ],
        &db,
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), again.run_id);
    let sa = wait_finished(&mut cli_a, Duration::from_secs(180)).await;
    let sb = wait_finished(&mut cli_b, Duration::from_secs(60)).await;
    assert_eq!(
        (sa.state.as_str(), sb.state.as_str()),
        ("finished", "finished")
    );
    assert_eq!(sb.run_id, again.run_id);
    assert_eq!(sa.committed_root, sb.committed_root);
    assert_ne!(
        sa.committed_root, first_root,
        "a different seed, a different run"
    );
    // Bad arguments of the low-level join are refused before anything happens.
    for (argv, expect) in [
        (
            vec!["--coordinator", "nope", "--run", &again.run_id],
            "not a peer id",
        ),
        (
            vec!["--coordinator", &a_id, "--run", "abc"],
            "64 hex digits",
        ),
    ] {
        let mut v = vec!["run", "join"];
        v.extend(argv);
        let out = potluck(args(&v, &db)).await;
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(expect), "{}", text(&out.stderr));
    }
    // The same settings as a new run: `--fresh` gives the finished run's manifest a new id.
    let file = dir.path().join("run.toml");
    std::fs::write(&file, manifest(2)).unwrap();
    let out = potluck(args(
        &["run", "start", file.to_str().unwrap(), "--fresh"],
        &da,
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fresh_id = text(&out.stdout).trim().to_string();
    assert_eq!(fresh_id.len(), 64, "{fresh_id}");
    assert_ne!(fresh_id, started.run_id);
    assert_ne!(fresh_id, again.run_id);
    a.shutdown().await;
    b.shutdown().await;
}

mod ledger {
    use std::path::{Path, PathBuf};

    use potluck_coordinator::failover::{RunManifest, SignedRunManifest};
    use potluck_coordinator::manifest::{
        CheckpointContent, FileKind, FileRecord, ManifestBody, RUN_FILE, SignedManifest,
        SignerRole, public_key,
    };
    use potluck_coordinator::round::Contributor;
    use potluck_coordinator::store::{Ledger, write_atomic};
    use potluck_coordinator::{Hash32, PeerId};

    pub const COORD: [u8; 32] = [9; 32];
    pub const REPLICA: [u8; 32] = [4; 32];
    pub const FORGER: [u8; 32] = [5; 32];

    /// What round `r`'s weights hash to (one empty opaque file named for the round).
    pub fn content(r: u64) -> CheckpointContent {
        CheckpointContent {
            chunk_size: 4096,
            files: vec![FileRecord {
                path: "w".into(),
                kind: FileKind::Opaque,
                size: 0,
                file_hash: blake3::hash(&r.to_le_bytes()).into(),
                header_len: 0,
                header_hash: Hash32::default(),
                tensors: vec![],
                chunk_hashes: vec![],
            }],
        }
    }

    pub fn run() -> SignedRunManifest {
        SignedRunManifest::create(
            RunManifest {
                name: "ledger-test".into(),
                genesis_root: content(0).root(),
                coordinator_keys: vec![public_key(&COORD)],
                settings: b"{}".to_vec(),
            },
            &COORD,
        )
        .unwrap()
    }

    /// Round `r`'s manifest with `parent`, signed by `key` as coordinator and by a replica.
    pub fn entry(
        run_id: Hash32,
        r: u64,
        parent: Option<(u64, Hash32)>,
        key: &[u8; 32],
    ) -> SignedManifest {
        let content = content(r);
        let mut m = SignedManifest::new(ManifestBody {
            run_id,
            round: r,
            parent,
            root: content.root(),
            content,
            contributors: (0..3u8)
                .map(|i| Contributor {
                    peer: PeerId(vec![i]),
                    tokens: 100,
                    update_hash: Hash32([i; 32]),
                })
                .collect(),
            coordinator_key: public_key(key),
        });
        m.sign(SignerRole::Coordinator, key).unwrap();
        m.sign(SignerRole::Replica, &REPLICA).unwrap();
        m
    }

    /// A run directory with rounds 0..=3 in its ledger, `run.pb`, and checkpoints of rounds
    /// 2 and 3 only (0 and 1 pruned). Returns the run dir.
    pub fn build(data_dir: &Path, name: &str) -> PathBuf {
        let run = run();
        let run_dir = data_dir.join("runs").join(name);
        std::fs::create_dir_all(&run_dir).unwrap();
        write_atomic(&run_dir.join(RUN_FILE), &run.encode()).unwrap();
        let mut ledger = Ledger::open(&run_dir.join("ledger"), run.clone()).unwrap();
        let mut parent = None;
        for r in 0..=3 {
            let m = entry(run.run_id(), r, parent, &COORD);
            parent = Some((r, m.body().root));
            ledger.append(m).unwrap();
        }
        for r in [2u64, 3] {
            std::fs::create_dir_all(run_dir.join("checkpoints").join(format!("{r:020}"))).unwrap();
        }
        run_dir
    }

    pub fn entry_path(run_dir: &Path, r: u64) -> PathBuf {
        run_dir.join("ledger").join(format!("{r:020}.pb"))
    }
}

#[tokio::test]
async fn checkpoints_lists_a_ledger_and_names_a_broken_link() {
    use potluck_coordinator::store::write_atomic;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let out = potluck(args(&["checkpoints"], data)).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no runs under"));

    let good = "aa".repeat(32);
    let run_dir = ledger::build(data, &good);
    let reports = list_ledgers(data, None).unwrap();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(
        r.chain,
        ChainVerdict::Ok {
            entries: 4,
            anchored: true
        }
    );
    let rounds: Vec<u64> = r.entries.iter().map(|e| e.round).collect();
    assert_eq!(rounds, vec![0, 1, 2, 3]);
    let present: Vec<bool> = r.entries.iter().map(|e| e.checkpoint_present).collect();
    assert_eq!(present, vec![false, false, true, true]);
    for e in &r.entries {
        assert_eq!(e.contributors, 3);
        assert_eq!(e.signatures, 2);
        assert!(e.coordinator_signed);
        assert_eq!(e.replica_signatures, 1);
        assert_eq!(e.root, ledger::content(e.round).root().to_hex());
        assert_eq!(e.parent_round, e.round.checked_sub(1));
    }
    let out = potluck(args(&["checkpoints"], data)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(o.contains("chain: OK (4 entries"), "{o}");
    assert!(o.contains("pruned") && o.contains("present"), "{o}");
    let out = potluck(args(&["checkpoints", "--json", "--run", "aaaa"], data)).await;
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["chain"]["verdict"], "ok");
    assert_eq!(j[0]["entries"].as_array().unwrap().len(), 4);

    // A second run whose round 2 names the wrong parent (properly signed otherwise).
    let bad = "bb".repeat(32);
    let bad_dir = ledger::build(data, &bad);
    let run_id = ledger::run().run_id();
    let wrong = ledger::entry(
        run_id,
        2,
        Some((1, ledger::content(7).root())),
        &ledger::COORD,
    );
    write_atomic(&ledger::entry_path(&bad_dir, 2), &wrong.encode()).unwrap();
    let r = list_ledgers(data, Some("bb")).unwrap().remove(0);
    match &r.chain {
        ChainVerdict::Broken { round, reason } => {
            assert_eq!(*round, 2);
            assert!(reason.contains("parent"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.entries.len(), 4, "every entry is still listed");
    let out = potluck(args(&["checkpoints"], data)).await;
    assert!(!out.status.success(), "a broken chain fails the command");
    let o = text(&out.stdout);
    assert!(
        o.contains("chain: OK") && o.contains("chain: BROKEN at round 2"),
        "{o}"
    );
    assert!(text(&out.stderr).contains("broken ledger chain"));

    // Round 3 signed by a key the run does not allow.
    let forged = ledger::entry(
        run_id,
        3,
        Some((2, ledger::content(2).root())),
        &ledger::FORGER,
    );
    write_atomic(&ledger::entry_path(&run_dir, 3), &forged.encode()).unwrap();
    let r = list_ledgers(data, Some(&good)).unwrap().remove(0);
    match &r.chain {
        ChainVerdict::Broken { round, .. } => assert_eq!(*round, 3),
        other => panic!("{other:?}"),
    }

    // A flipped byte in an entry makes it unreadable; it is named, the rest still listed.
    let p = ledger::entry_path(&run_dir, 1);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&p, &bytes).unwrap();
    let r = list_ledgers(data, Some(&good)).unwrap().remove(0);
    match &r.chain {
        ChainVerdict::Broken { round, reason } => {
            assert_eq!(*round, 1);
            assert!(reason.contains("cannot be read"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(r.entries[1].error.is_some());
    assert_eq!(r.entries.len(), 4);

    // A missing genesis entry is a broken chain too.
    std::fs::remove_file(ledger::entry_path(&bad_dir, 0)).unwrap();
    let r = list_ledgers(data, Some(&bad)).unwrap().remove(0);
    assert!(
        matches!(&r.chain, ChainVerdict::Broken { round: 1, reason } if reason.contains("genesis")),
        "{:?}",
        r.chain
    );
    assert!(list_ledgers(data, Some("cc")).is_err());
}
