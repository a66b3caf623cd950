//! Checkpoint transfer between real daemons on loopback: a ~100 MB checkpoint fetched from
//! several peers at once and verified; a peer serving corrupted pieces banned while the
//! download completes; an interrupted fetch (cancelled, killed, then left without sources)
//! resumed fetching only what is missing; hostile requests refused while the server keeps
//! serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{addr, start};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{RunManifest, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, ManifestBody, SignedManifest, SignerRole, public_key,
};
use potluck_coordinator::store::write_manifest_files;
use potluck_coordinator::verify::{VerifyOptions, verified_pieces, verify_checkpoint_dir};
use potluck_daemon::Node;
use potluck_daemon::ckpt_transfer::{
    CKPT_PROTOCOL, FetchError, FetchOptions, FetchProgress, Op, SourceOutcome, WireRequest,
    fetch_checkpoint, fetch_manifest, fetch_root, partial_dir,
};
use potluck_daemon::net::NetEvent;

const COORD_KEY: [u8; 32] = [7; 32];
const MIB: usize = 1 << 20;

/// A signed checkpoint: a safetensors file of incompressible f32 tensors (`tensor_mib`
/// MiB in total, in tensors of at most 24 MiB plus an odd-sized one) and `config.json`.
struct Checkpoint {
    dir: tempfile::TempDir,
    manifest: SignedManifest,
    run: SignedRunManifest,
}

impl Checkpoint {
    fn root(&self) -> Hash32 {
        self.manifest.body().root
    }

    fn total(&self) -> u64 {
        self.manifest.body().content.total_bytes()
    }

    /// Where a daemon serving from `data_dir` keeps this checkpoint.
    fn home(&self, data_dir: &Path) -> PathBuf {
        data_dir
            .join("runs")
            .join(self.run.run_id().to_hex())
            .join("checkpoints")
            .join(format!("{:020}", self.manifest.body().round))
    }

    /// Puts this checkpoint into `data_dir` (hard links: the bytes are shared).
    fn install(&self, data_dir: &Path) -> PathBuf {
        let home = self.home(data_dir);
        std::fs::create_dir_all(&home).unwrap();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let e = e.unwrap();
            std::fs::hard_link(e.path(), home.join(e.file_name())).unwrap();
        }
        home
    }

    /// Puts a copy into `data_dir` whose safetensors file has one byte flipped in every
    /// chunk (header included): every piece this peer serves is bad.
    fn install_corrupted(&self, data_dir: &Path) {
        let home = self.install(data_dir);
        let path = home.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for i in (3..bytes.len()).step_by(MIB / 2) {
            bytes[i] ^= 0x55;
        }
        std::fs::write(&path, bytes).unwrap();
    }
}

fn make_checkpoint(tensor_mib: usize) -> Checkpoint {
    let dir = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    let mut left = tensor_mib * MIB;
    while left > 0 {
        let n = left.min(24 * MIB);
        sizes.push(n);
        left -= n;
    }
    sizes.push(4 * 12_345); // a tensor that ends mid-chunk
    let mut json = String::from("{");
    let mut at = 0usize;
    for (i, n) in sizes.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#""t{i:02}":{{"dtype":"F32","shape":[{}],"data_offsets":[{at},{}]}}"#,
            n / 4,
            at + n
        ));
        at += n;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + at);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ tensor_mib as u64;
    while out.len() < 8 + json.len() + at {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(8 + json.len() + at);
    std::fs::write(dir.path().join("model.safetensors"), out).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        br#"{"model":"transfer-test","hidden":64}"#,
    )
    .unwrap();
    let content = CheckpointContent::scan(dir.path(), DEFAULT_CHUNK_SIZE).unwrap();
    let pk = public_key(&COORD_KEY);
    let run = SignedRunManifest::create(
        RunManifest {
            name: "transfer-test".into(),
            genesis_root: content.root(),
            coordinator_keys: vec![pk],
            settings: Vec::new(),
        },
        &COORD_KEY,
    )
    .unwrap();
    let mut manifest = SignedManifest::new(ManifestBody {
        run_id: run.run_id(),
        round: 0,
        parent: None,
        root: content.root(),
        content,
        contributors: Vec::new(),
        coordinator_key: pk,
    });
    manifest.sign(SignerRole::Coordinator, &COORD_KEY).unwrap();
    write_manifest_files(dir.path(), &manifest, &run).unwrap();
    Checkpoint { dir, manifest, run }
}

async fn connect(from: &Node, to: &Node) -> PeerId {
    let target = to.client().local_peer_id();
    let mut ev = from.client().events();
    from.client().dial(addr(to, "quic-v1").await).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let NetEvent::Connected { peer, .. } = ev.recv().await.unwrap()
                && peer == target
            {
                return;
            }
        }
    })
    .await
    .expect("connected");
    target
}

/// Starts a daemon whose data dir was prepared by `prepare`.
async fn serving_node(prepare: impl FnOnce(&Path)) -> (tempfile::TempDir, Node) {
    let d = tempfile::tempdir().unwrap();
    prepare(d.path());
    let n = start(d.path(), vec![]).await;
    (d, n)
}

fn verifies(dir: &Path, ck: &Checkpoint) {
    let v = verify_checkpoint_dir(
        dir,
        &VerifyOptions {
            expected_run_id: Some(ck.run.run_id()),
            ledger_dir: None,
        },
    )
    .unwrap();
    assert_eq!(v.root, ck.root());
    assert_eq!(v.bytes_checked, ck.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_100mb_from_three_peers_and_bans_a_liar() {
    let ck = make_checkpoint(96);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(serving_node(|d| drop(ck.install(d))).await);
    }
    servers.push(serving_node(|d| ck.install_corrupted(d)).await);
    let fd = tempfile::tempdir().unwrap();
    let fetcher = start(fd.path(), vec![]).await;
    let mut peers = Vec::new();
    for (_, n) in &servers {
        peers.push(connect(&fetcher, n).await);
    }
    let control = fetcher.client().stream_control();
    let opts = FetchOptions::default();

    // The manifest comes from the network too, checked against the root.
    let (m, run) = fetch_manifest(&control, &peers[..3], ck.root(), &opts)
        .await
        .unwrap();
    assert_eq!(m.id(), ck.manifest.id());

    // Three honest peers: every one of them serves part of it.
    let dest = fd.path().join("honest");
    let t = Instant::now();
    let r = fetch_checkpoint(&control, &peers[..3], &m, &run, &dest, &opts)
        .await
        .unwrap();
    eprintln!(
        "fetched {} bytes from 3 peers in {:?} ({:.0} MB/s)",
        r.fetched_bytes,
        t.elapsed(),
        r.fetched_bytes as f64 / t.elapsed().as_secs_f64() / 1e6
    );
    assert_eq!(r.fetched_bytes, ck.total());
    assert_eq!((r.resumed_pieces, r.rejected_pieces), (0, 0));
    assert_eq!(r.fetched_pieces, r.total_pieces);
    assert_eq!(r.sources.len(), 3);
    for s in &r.sources {
        assert_eq!(s.outcome, SourceOutcome::Good);
        assert!(s.served_bytes > 0, "{} served nothing", s.peer);
    }
    verifies(&dest, &ck);
    assert!(!partial_dir(&dest).unwrap().exists());

    // The liar first in line: it is banned and the others finish the download.
    let liar = peers[3];
    let sources = [liar, peers[0], peers[1]];
    let dest = fd.path().join("with-liar");
    let r = fetch_checkpoint(&control, &sources, &m, &run, &dest, &opts)
        .await
        .unwrap();
    verifies(&dest, &ck);
    let l = r.sources.iter().find(|s| s.peer == liar).unwrap();
    assert!(
        matches!(&l.outcome, SourceOutcome::Banned { reason } if reason.contains("banned")),
        "{:?}",
        l.outcome
    );
    // It may have served intact pieces of config.json before it was caught; only
    // verified bytes count.
    assert!(l.served_bytes < ck.total() / 50, "{}", l.served_bytes);
    assert!(r.rejected_pieces >= 1);
    assert_eq!(
        r.sources.iter().map(|s| s.served_bytes).sum::<u64>(),
        ck.total()
    );

    // Fetching over an existing checkpoint is refused with what to do.
    let again = fetch_checkpoint(&control, &peers[..1], &m, &run, &dest, &opts).await;
    assert!(matches!(again, Err(FetchError::DestinationExists { .. })));

    fetcher.shutdown().await;
    for (_, n) in servers {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_fetch_resumes_with_only_the_missing_pieces() {
    let ck = make_checkpoint(32);
    let (d1, s1) = serving_node(|d| drop(ck.install(d))).await;
    let (_d2, s2) = serving_node(|d| drop(ck.install(d))).await;
    let fd = tempfile::tempdir().unwrap();
    let fetcher = start(fd.path(), vec![]).await;
    let p1 = connect(&fetcher, &s1).await;
    let p2 = connect(&fetcher, &s2).await;
    let control = fetcher.client().stream_control();
    let dest = fd.path().join("ckpt");
    let total = ck.total();

    // 1. Cancelled once a third is verified.
    let (tx, mut rx) = tokio::sync::watch::channel(FetchProgress::default());
    let opts = FetchOptions {
        max_in_flight_per_source: 2,
        progress: Some(tx),
        ..FetchOptions::default()
    };
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        let _ = rx.wait_for(|p| p.verified_bytes >= total / 3).await;
        cancel.cancel();
    });
    let err = fetch_checkpoint(&control, &[p1, p2], &ck.manifest, &ck.run, &dest, &opts)
        .await
        .unwrap_err();
    let FetchError::Cancelled { verified_bytes, .. } = err else {
        panic!("expected a cancellation, got {err}");
    };
    assert!(verified_bytes >= total / 3 && verified_bytes < total);
    assert!(!dest.exists() && partial_dir(&dest).unwrap().exists());

    // 2. Killed: the fetch is dropped half-way. Every piece it verified still reaches the
    //    disk.
    let (tx, mut rx) = tokio::sync::watch::channel(FetchProgress::default());
    let opts = FetchOptions {
        max_in_flight_per_source: 2,
        progress: Some(tx),
        ..FetchOptions::default()
    };
    let killed_at = {
        let both = [p1, p2];
        let fetch = fetch_checkpoint(&control, &both, &ck.manifest, &ck.run, &dest, &opts);
        tokio::select! {
            r = fetch => panic!("finished before it was killed: {r:?}"),
            p = rx.wait_for(|p| p.verified_bytes >= total / 2) => p.unwrap().verified_bytes,
        }
    };
    assert!(killed_at > verified_bytes && killed_at < total);
    let partial = partial_dir(&dest).unwrap();
    let on_disk = || {
        let content = &ck.manifest.body().content;
        verified_pieces(&partial, content)
            .iter()
            .zip(content.pieces())
            .filter(|(ok, _)| **ok)
            .map(|(_, p)| p.len)
            .sum::<u64>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while on_disk() < killed_at && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        on_disk() >= killed_at,
        "{} of {killed_at} on disk",
        on_disk()
    );

    // 3. Resumed from s1 alone, which has lost the last third of its tensor file: it is
    //    dropped when it cannot read a piece, and the fetch stops with what it has.
    let s1_model = ck.home(d1.path()).join("model.safetensors");
    let mut bytes = std::fs::read(&s1_model).unwrap();
    bytes.truncate(bytes.len() * 2 / 3);
    std::fs::remove_file(&s1_model).unwrap();
    std::fs::write(&s1_model, bytes).unwrap();
    let opts = FetchOptions {
        max_in_flight_per_source: 2,
        ..FetchOptions::default()
    };
    let err = fetch_checkpoint(&control, &[p1], &ck.manifest, &ck.run, &dest, &opts)
        .await
        .unwrap_err();
    let FetchError::Stalled {
        verified_bytes: second,
        sources,
        ..
    } = &err
    else {
        panic!("expected a stalled fetch, got {err}");
    };
    let second = *second;
    assert!(second >= killed_at && second < total, "{second}");
    assert!(
        matches!(
            &sources[0].outcome,
            SourceOutcome::Dropped { reason } if reason.contains("cannot read")
        ),
        "{:?}",
        sources[0].outcome
    );
    let msg = err.to_string();
    assert!(
        msg.contains("fetch again") && msg.contains("resume"),
        "the message says what to do: {msg}"
    );

    // 4. s1 goes away for good; finished from s2: only what was missing is fetched.
    s1.shutdown().await;
    let r = fetch_checkpoint(
        &control,
        &[p1, p2],
        &ck.manifest,
        &ck.run,
        &dest,
        &FetchOptions {
            request_timeout: Duration::from_secs(3),
            ..FetchOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(r.resumed_bytes, second);
    assert_eq!(r.fetched_bytes, total - second);
    assert_eq!(r.resumed_pieces + r.fetched_pieces, r.total_pieces);
    assert_eq!(r.sources[0].served_bytes, 0, "s1 is gone");
    verifies(&dest, &ck);
    assert!(!partial_dir(&dest).unwrap().exists());
    fetcher.shutdown().await;
    s2.shutdown().await;
}

/// Sends one raw request and reads the answer: (status, body), or `None` when the stream
/// ended without one.
async fn ask(s: &mut libp2p::Stream, req: &[u8]) -> Option<(u8, Vec<u8>)> {
    s.write_all(req).await.ok()?;
    s.flush().await.ok()?;
    let mut head = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("answer in time")
        .ok()?;
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    assert!(len <= 64 << 20);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_the_server_keeps_serving() {
    let ck = make_checkpoint(4);
    let linked = make_checkpoint(1);
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("secret"), b"do not serve me").unwrap();
    let (_d, server) = serving_node(|d| {
        ck.install(d);
        // Another checkpoint whose config.json was replaced by a link out of it.
        let home = linked.install(d);
        std::fs::remove_file(home.join("config.json")).unwrap();
        std::os::unix::fs::symlink(secret.path().join("secret"), home.join("config.json")).unwrap();
    })
    .await;
    let fd = tempfile::tempdir().unwrap();
    let client = start(fd.path(), vec![]).await;
    let peer = connect(&client, &server).await;
    let mut control = client.client().stream_control();
    let root = ck.root();
    let range = |file: u32, len: u32, offset: u64| {
        WireRequest {
            op: Op::Range,
            root,
            file,
            len,
            offset,
        }
        .encode()
    };
    let mut s = control.open_stream(peer, CKPT_PROTOCOL).await.unwrap();
    // Well-framed but wrong requests get an error and the stream stays usable.
    let cases: Vec<(&str, [u8; 56], u8)> = vec![
        (
            "unknown root",
            WireRequest {
                op: Op::Range,
                root: Hash32([1; 32]),
                file: 0,
                len: 10,
                offset: 0,
            }
            .encode(),
            1,
        ),
        ("huge length", range(1, u32::MAX, 0), 2),
        ("file out of range", range(1000, 10, 0), 2),
        ("offset overflow", range(1, 10, u64::MAX - 3), 2),
        ("past the end", range(0, 10, ck.total()), 2),
        ("zero length", range(1, 0, 0), 2),
        (
            "manifest with a range",
            WireRequest {
                op: Op::Manifest,
                root,
                file: 1,
                len: 5,
                offset: 0,
            }
            .encode(),
            2,
        ),
    ];
    for (name, req, want) in cases {
        let (status, body) = ask(&mut s, &req)
            .await
            .unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(status, want, "{name}: {}", String::from_utf8_lossy(&body));
        assert!(!body.is_empty() && body.len() <= 1024, "{name}: a reason");
    }
    // A good request on the same stream is still answered.
    let (status, body) = ask(&mut s, &range(0, 5, 2)).await.unwrap();
    assert_eq!((status, body.as_slice()), (0, &br#"model"#[..]));

    // Garbage: one error answer, then the stream is closed.
    let mut garbage = [0u8; 56];
    garbage
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 37) as u8);
    let (status, _) = ask(&mut s, &garbage).await.unwrap();
    assert_eq!(status, 2);
    let mut rest = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0)) | Ok(Err(_))), "stream closed");

    // A truncated request gets no answer; the stream just ends.
    let mut s = control.open_stream(peer, CKPT_PROTOCOL).await.unwrap();
    s.write_all(&range(0, 5, 0)[..20]).await.unwrap();
    s.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "no answer to half a request"
    );

    // A file that is a link out of its checkpoint is not read.
    let mut s = control.open_stream(peer, CKPT_PROTOCOL).await.unwrap();
    let req = WireRequest {
        op: Op::Range,
        root: linked.root(),
        file: 0,
        len: 10,
        offset: 0,
    };
    let (status, body) = ask(&mut s, &req.encode()).await.unwrap();
    assert_eq!(status, 3, "{}", String::from_utf8_lossy(&body));
    assert!(!String::from_utf8_lossy(&body).contains("do not serve"));

    // More streams than a peer may hold: the extra one is closed unanswered.
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut h = control.open_stream(peer, CKPT_PROTOCOL).await.unwrap();
        assert!(ask(&mut h, &range(0, 5, 2)).await.is_some());
        held.push(h);
    }
    let extra = control.open_stream(peer, CKPT_PROTOCOL).await;
    if let Ok(mut extra) = extra {
        assert!(ask(&mut extra, &range(0, 5, 2)).await.is_none());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The server still serves an honest fetch, and a peer without the root is refused.
    let opts = FetchOptions::default();
    let dest = fd.path().join("ok");
    let r = fetch_root(&control, &[peer], root, &dest, &opts)
        .await
        .unwrap();
    assert_eq!(r.fetched_bytes, ck.total());
    verifies(&dest, &ck);
    let missing = fetch_manifest(&control, &[peer], Hash32([2; 32]), &opts).await;
    assert!(matches!(missing, Err(FetchError::NoManifest { .. })));
    client.shutdown().await;
    server.shutdown().await;
}
