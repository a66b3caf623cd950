//! The data plane's rate caps on a real link: a daemon in its own network namespace, joined
//! to the test's namespace by a veth pair shaped with `tc tbf` at 100 Mbit/s (far faster than
//! the caps), serves a checkpoint to daemons in the test process. Measured: a capped
//! server's upload and a capped fetcher's download hold within 10% of the cap, both as the
//! bytes the application received over the fetch and as the bytes the interface carried in
//! the middle half of the transfer; an uncapped fetch over the same link is at least twice as
//! fast as the cap, so the link was not what held the capped ones. Needs root, iproute2 and
//! tc; skips with a message otherwise.
//!
//! Also, on loopback: a fetch slowed by its own download cap past the request deadline is
//! not taken for a dead source.
//!
//! The serving daemons are this test binary again (`serve_in_namespace`, ignored unless
//! run by this test), started with `ip netns exec`, so they are real `Node`s in their own
//! namespace, configured with caps as an operator would.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{RunManifest, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, ManifestBody, SignedManifest, SignerRole, public_key,
};
use potluck_coordinator::store::write_manifest_files;
use potluck_daemon::ckpt_transfer::{FetchOptions, fetch_checkpoint, fetch_manifest};
use potluck_daemon::net::NetEvent;
use potluck_daemon::ratelimit::RateCaps;
use potluck_daemon::{Config, Node};

/// The cap under test, in bytes per second.
const CAP: u64 = 2_000_000;
/// The checkpoint's tensor bytes: four seconds at the cap.
const CHECKPOINT_BYTES: usize = 8_000_000;
/// The link's rate: 12.5 MB/s, six times the cap.
const LINK: &str = "100mbit";

const ROLE_DIR: &str = "POTLUCK_RATECAP_DIR";
const ROLE_IP: &str = "POTLUCK_RATECAP_IP";
const ROLE_UPLOAD: &str = "POTLUCK_RATECAP_UPLOAD";

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(sh(args), "command failed: {}", args.join(" "));
}

fn can_run() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    if !sh(&["ip", "-V"]) {
        return Err("iproute2 `ip` not found".into());
    }
    if !sh(&["tc", "-V"]) {
        return Err("`tc` not found".into());
    }
    Ok(())
}

/// The namespace, its veth pair and the serving processes, removed on drop even when the
/// test fails (deleting the namespace deletes both ends of the pair).
struct Lab {
    ns: String,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// A signed checkpoint of incompressible bytes, as a run's coordinator would write it.
fn make_checkpoint(dir: &Path) -> SignedManifest {
    let header = br#"{"t":{"dtype":"F32","shape":[2000000],"data_offsets":[0,8000000]}}"#;
    let mut json = header.to_vec();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + CHECKPOINT_BYTES);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while out.len() < 8 + json.len() + CHECKPOINT_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(8 + json.len() + CHECKPOINT_BYTES);
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"model":"ratecap"}"#).unwrap();
    let key = [9u8; 32];
    let content = CheckpointContent::scan(dir, DEFAULT_CHUNK_SIZE).unwrap();
    let pk = public_key(&key);
    let run = SignedRunManifest::create(
        RunManifest {
            name: "ratecap".into(),
            genesis_root: content.root(),
            coordinator_keys: vec![pk],
            settings: Vec::new(),
        },
        &key,
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
    manifest.sign(SignerRole::Coordinator, &key).unwrap();
    write_manifest_files(dir, &manifest, &run).unwrap();
    manifest
}

/// Puts the checkpoint in `src` where a daemon with data dir `data` serves it.
fn install(src: &Path, manifest: &SignedManifest, data: &Path) {
    let home = data
        .join("runs")
        .join(manifest.body().run_id.to_hex())
        .join("checkpoints")
        .join("00000000000000000000");
    std::fs::create_dir_all(&home).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), home.join(e.file_name())).unwrap();
    }
}

fn config(dir: &Path, ip: &str, caps: RateCaps) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: vec![format!("/ip4/{ip}/udp/0/quic-v1").parse().unwrap()],
        mdns: false,
        rate_caps: caps,
        ..Config::default()
    }
}

/// Not a test on its own: the serving daemon that `rate_caps_hold_on_a_faster_link` starts
/// in its namespace. It writes its address to `<dir>/addr` and serves until killed.
#[test]
#[ignore = "started by rate_caps_hold_on_a_faster_link in a network namespace"]
fn serve_in_namespace() {
    let (Ok(dir), Ok(ip)) = (std::env::var(ROLE_DIR), std::env::var(ROLE_IP)) else {
        eprintln!("serve_in_namespace only runs inside rate_caps_hold_on_a_faster_link");
        return;
    };
    let upload = std::env::var(ROLE_UPLOAD).ok().and_then(|s| s.parse().ok());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let dir = PathBuf::from(dir);
        let caps = RateCaps {
            upload,
            download: None,
        };
        let node = Node::start(config(&dir.join("data"), &ip, caps))
            .await
            .unwrap();
        let addr = common::addr(&node, "quic-v1").await;
        let tmp = dir.join("addr.tmp");
        std::fs::write(&tmp, addr.to_string()).unwrap();
        std::fs::rename(&tmp, dir.join("addr")).unwrap();
        std::future::pending::<()>().await;
    });
}

/// Starts a serving daemon in `ns` (upload capped at `upload`) and returns its address.
fn spawn_server(lab: &mut Lab, dir: &Path, ip: &str, upload: Option<u64>) -> Multiaddr {
    let exe = std::env::current_exe().unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns])
        .arg(exe)
        .args(["--ignored", "--exact", "serve_in_namespace", "--nocapture"])
        .env(ROLE_DIR, dir)
        .env(ROLE_IP, ip)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(u) = upload {
        cmd.env(ROLE_UPLOAD, u.to_string());
    }
    lab.children.push(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.join("addr")) {
            return s.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the server in {} did not start: {}",
            lab.ns,
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn connect(from: &Node, to: Multiaddr) -> PeerId {
    let Some(libp2p::multiaddr::Protocol::P2p(target)) = to.iter().last() else {
        panic!("{to} names no peer");
    };
    let mut ev = from.client().events();
    from.client().dial(to).await.unwrap();
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

fn rx_bytes(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/rx_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// One fetch's rates in bytes per second: over the whole fetch as the application got the
/// bytes, and on the wire (what `dev` received) between a quarter and three quarters of the
/// transfer, which leaves out the windows a transport fills ahead of a capped reader.
struct Measured {
    app: f64,
    wire: f64,
}

async fn fetch_once(
    fetcher: &Node,
    source: PeerId,
    root: Hash32,
    dest: &Path,
    dev: &str,
) -> Measured {
    let control = fetcher.client().stream_control();
    let opts = FetchOptions {
        rates: fetcher.train().rates().clone(),
        ..Default::default()
    };
    let (manifest, run) = fetch_manifest(&control, &[source], root, &opts)
        .await
        .unwrap();
    // The interface's counter, sampled every 20 ms while the fetch runs.
    let stop = Arc::new(AtomicBool::new(false));
    let (base, start) = (rx_bytes(dev), Instant::now());
    let sampler = {
        let (stop, dev) = (stop.clone(), dev.to_string());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((start.elapsed().as_secs_f64(), rx_bytes(&dev) - base));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples.push((start.elapsed().as_secs_f64(), rx_bytes(&dev) - base));
            samples
        })
    };
    let report = fetch_checkpoint(&control, &[source], &manifest, &run, dest, &opts)
        .await
        .unwrap();
    let took = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    assert_eq!(report.fetched_bytes, manifest.body().content.total_bytes());
    let wire_total = samples.last().unwrap().1 as f64;
    let at = |share: f64| {
        *samples
            .iter()
            .find(|(_, b)| *b as f64 >= share * wire_total)
            .unwrap()
    };
    let ((t0, b0), (t1, b1)) = (at(0.25), at(0.75));
    Measured {
        app: report.fetched_bytes as f64 / took,
        wire: (b1 - b0) as f64 / (t1 - t0),
    }
}

fn within_10_percent(what: &str, got: f64) {
    let err = got / CAP as f64 - 1.0;
    assert!(
        err.abs() <= 0.10,
        "{what}: {:.3} MB/s against a cap of {:.3} MB/s ({:+.1}%)",
        got / 1e6,
        CAP as f64 / 1e6,
        err * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_caps_hold_on_a_faster_link() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED rate_caps_hold_on_a_faster_link: {why}");
        return;
    }
    let pid = std::process::id();
    let net = format!("10.231.{}", pid % 250);
    let (host_ip, ns_ip) = (format!("{net}.1"), format!("{net}.2"));
    let (host_dev, ns_dev) = (
        format!("rch{}", pid % 100_000),
        format!("rcn{}", pid % 100_000),
    );
    let mut lab = Lab {
        ns: format!("plrc{pid}"),
        children: vec![],
    };
    must(&["ip", "netns", "add", &lab.ns]);
    must(&["ip", "-n", &lab.ns, "link", "set", "lo", "up"]);
    must(&[
        "ip", "link", "add", &host_dev, "type", "veth", "peer", "name", &ns_dev, "netns", &lab.ns,
    ]);
    must(&[
        "ip",
        "addr",
        "add",
        &format!("{host_ip}/24"),
        "dev",
        &host_dev,
    ]);
    must(&["ip", "link", "set", &host_dev, "up"]);
    must(&[
        "ip",
        "-n",
        &lab.ns,
        "addr",
        "add",
        &format!("{ns_ip}/24"),
        "dev",
        &ns_dev,
    ]);
    must(&["ip", "-n", &lab.ns, "link", "set", &ns_dev, "up"]);
    // The link, both ways: far faster than the cap, slower than memory.
    for (ns, dev) in [(None, &host_dev), (Some(&lab.ns), &ns_dev)] {
        let mut args = vec!["tc"];
        if let Some(ns) = ns {
            args.extend(["-n", ns.as_str()]);
        }
        args.extend([
            "qdisc", "add", "dev", dev, "root", "tbf", "rate", LINK, "burst", "64kb", "latency",
            "50ms",
        ]);
        must(&args);
    }

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ckpt");
    std::fs::create_dir_all(&src).unwrap();
    let manifest = make_checkpoint(&src);
    let root = manifest.body().root;
    let mut servers = Vec::new();
    for (name, upload) in [("capped", Some(CAP)), ("free", None)] {
        let dir = tmp.path().join(name);
        install(&src, &manifest, &dir.join("data"));
        servers.push(spawn_server(&mut lab, &dir, &ns_ip, upload));
    }

    let free_dir = tmp.path().join("fetch-free");
    let free = Node::start(config(&free_dir, &host_ip, RateCaps::default()))
        .await
        .unwrap();
    let capped_dir = tmp.path().join("fetch-capped");
    let down = RateCaps {
        upload: None,
        download: Some(CAP),
    };
    let capped = Node::start(config(&capped_dir, &host_ip, down))
        .await
        .unwrap();
    let from_capped = connect(&free, servers[0].clone()).await;
    let from_free = connect(&free, servers[1].clone()).await;
    let from_free_capped = connect(&capped, servers[1].clone()).await;

    let control = fetch_once(&free, from_free, root, &free_dir.join("a"), &host_dev).await;
    let upload = fetch_once(&free, from_capped, root, &free_dir.join("b"), &host_dev).await;
    let download = fetch_once(
        &capped,
        from_free_capped,
        root,
        &capped_dir.join("c"),
        &host_dev,
    )
    .await;
    for (what, m) in [
        ("uncapped", &control),
        ("upload cap", &upload),
        ("download cap", &download),
    ] {
        println!(
            "{{\"bench\":\"rate_cap\",\"case\":\"{what}\",\"cap_bytes_per_sec\":{CAP},\"app_bytes_per_sec\":{:.0},\"wire_bytes_per_sec\":{:.0}}}",
            m.app, m.wire
        );
    }
    // The link was not the limit: without a cap the same fetch is at least twice as fast.
    assert!(
        control.app > 2.0 * CAP as f64,
        "the uncapped fetch made {:.2} MB/s: the link is too slow to test a cap of {:.2} MB/s",
        control.app / 1e6,
        CAP as f64 / 1e6
    );
    within_10_percent("upload cap, application", upload.app);
    within_10_percent("upload cap, wire", upload.wire);
    within_10_percent("download cap, application", download.app);
    within_10_percent("download cap, wire", download.wire);
    let (up, _) = capped.train().rates().stats();
    let (_, down) = capped.train().rates().stats();
    assert_eq!(up.cap, None);
    assert!(down.bytes >= CHECKPOINT_BYTES as u64, "{down:?}");
    assert!(down.waited_secs > 0.0, "{down:?}");
    free.shutdown().await;
    capped.shutdown().await;
}

/// On loopback: a fetch under a download cap whose pieces take longer to arrive than the
/// request deadline (four 1 MiB pieces in flight share 1 MiB/s: 4 s each, against 2 s)
/// still completes, because the deadline grows by the queue the cap puts ahead of a piece,
/// instead of dropping the source after three "timed out" requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_capped_fetch_is_not_taken_for_a_dead_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("ckpt");
    std::fs::create_dir_all(&src).unwrap();
    let manifest = make_checkpoint(&src);
    let sdir = tmp.path().join("server");
    install(&src, &manifest, &sdir);
    let server = common::start(&sdir, vec![]).await;
    let fdir = tmp.path().join("fetcher");
    let caps = RateCaps {
        upload: None,
        download: Some(1 << 20),
    };
    let fetcher = Node::start(config(&fdir, "127.0.0.1", caps)).await.unwrap();
    let peer = connect(&fetcher, common::addr(&server, "quic-v1").await).await;
    let control = fetcher.client().stream_control();
    let opts = FetchOptions {
        rates: fetcher.train().rates().clone(),
        request_timeout: Duration::from_secs(2),
        max_in_flight_per_source: 4,
        ..Default::default()
    };
    let (m, run) = fetch_manifest(&control, &[peer], manifest.body().root, &opts)
        .await
        .unwrap();
    let start = Instant::now();
    let report = fetch_checkpoint(&control, &[peer], &m, &run, &fdir.join("got"), &opts)
        .await
        .unwrap();
    let took = start.elapsed().as_secs_f64();
    assert_eq!(report.fetched_bytes, m.body().content.total_bytes());
    // The cap held it back: at least the bytes beyond the burst at the cap.
    let floor = (report.fetched_bytes - (128 << 10)) as f64 / (1 << 20) as f64;
    assert!(took >= floor, "{took} s < {floor} s");
    assert_eq!(report.sources.len(), 1);
    assert_eq!(
        report.sources[0].outcome,
        potluck_daemon::ckpt_transfer::SourceOutcome::Good
    );
    fetcher.shutdown().await;
    server.shutdown().await;
}
