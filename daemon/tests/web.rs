//! The HTTP listener of real daemons: `/metrics` parses as Prometheus text and carries a run's
//! rounds, bytes and peers; `/api/state` follows the run and marks a peer that left as gone;
//! an exposed listener refuses requests without its token; a real Prometheus server scrapes
//! the daemon; and the dashboard, in a real headless Chromium, renders, gains loss points
//! without reloading, and shows a dead peer as gone (screenshot under target/tmp/).
//!
//! `prometheus` and `chromium` come from Debian (`.ci/run` installs them). Without them the
//! tests that need them say so and pass, unless `CI` is set: then they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use potluck_daemon::train::{ResolvedRun, RunManifest};
use potluck_daemon::{Config, Node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A run that finishes in seconds on a 2-core machine.
fn run(rounds: u64, min_peers: usize, inner_steps: u64) -> ResolvedRun {
    RunManifest::parse(&format!(
        r#"
name = "web-test"
seed = 9
model = "tiny"
inner_steps = {inner_steps}
rounds = {rounds}
compression = "int8"
round_deadline_secs = 60
min_peers = {min_peers}

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
"#
    ))
    .unwrap()
    .resolve()
    .unwrap()
    .pin_data()
    .unwrap()
}

fn logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("POTLUCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Starts `n` daemons on loopback, each serving HTTP on `http(i)`; all bootstrap from the
/// first and are connected to it when this returns.
async fn start(n: usize, dir: &Path, http: impl Fn(usize) -> SocketAddr) -> Vec<Node> {
    logging();
    let mut nodes: Vec<Node> = Vec::new();
    let mut seed: Option<Multiaddr> = None;
    for i in 0..n {
        let cfg = Config {
            data_dir: dir.join(format!("p{i}")),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            mdns: false,
            bootstrap: seed.clone().into_iter().collect(),
            capability_interval: Duration::from_secs(1),
            http_listen: Some(http(i)),
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
        }
        nodes.push(node);
    }
    let first = nodes[0].client().local_peer_id();
    for n in &nodes[1..] {
        let c = n.client();
        let deadline = Instant::now() + Duration::from_secs(15);
        while !c
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == first && p.connected)
        {
            assert!(
                Instant::now() < deadline,
                "a daemon never reached the first"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes
}

fn loopback(_: usize) -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Trains `run` on `nodes` (the first coordinates); returns when every replica finished.
async fn train(nodes: &[Node], run: &ResolvedRun) {
    let coordinator = nodes[0].client().local_peer_id();
    let mut joins = Vec::new();
    for n in &nodes[1..] {
        let svc = n.train();
        let id = run.id();
        joins.push(tokio::spawn(async move {
            for _ in 0..100 {
                if let Ok(s) = svc.join(coordinator, id, None).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("never joined");
        }));
    }
    let done = nodes[0]
        .train()
        .coordinate(run.clone(), None)
        .await
        .unwrap();
    for j in joins {
        assert_eq!(j.await.unwrap().root, done.root);
    }
}

/// One HTTP/1.1 GET; returns the status code and the body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .unwrap()
    .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the test client reads only sized bodies: {head}"
    );
    (code, body.to_string())
}

async fn state(addr: SocketAddr, token: Option<&str>) -> serde_json::Value {
    let (code, body) = get(addr, "/api/state", token).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Checks OpenMetrics text line by line (the grammar Prometheus parses: metadata lines,
/// samples `name{label="value",...} value`, `# EOF` last, every sample of a declared
/// family) and returns the samples, keyed by name and labels as written.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    fn is_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no EOF marker");
    for line in &lines[..lines.len() - 1] {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name, rest) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
            );
            assert!(is_name(name), "bad family name in {line}");
            match kind {
                "TYPE" => {
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "info",
                            "summary",
                            "unknown",
                            "stateset",
                            "gaugehistogram"
                        ]
                        .contains(&rest),
                        "bad type in {line}"
                    );
                    assert!(
                        families
                            .insert(name.to_string(), rest.to_string())
                            .is_none(),
                        "family {name} declared twice"
                    );
                }
                "HELP" => assert!(!rest.is_empty(), "empty help: {line}"),
                "UNIT" => assert!(name.ends_with(&format!("_{rest}")), "unit: {line}"),
                _ => panic!("unknown metadata line {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(is_name(name), "bad metric name in {line}");
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line}"));
            // label="value" pairs; values may hold escaped quotes.
            let mut rest = inner;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"").unwrap();
                assert!(is_name(key), "bad label name in {line}");
                let mut end = None;
                let mut escaped = false;
                for (i, ch) in after.char_indices() {
                    match (escaped, ch) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label in {line}"));
                rest = after[end + 1..]
                    .strip_prefix(',')
                    .unwrap_or(&after[end + 1..]);
            }
        }
        let family = [
            "_total", "_bucket", "_count", "_sum", "_info", "_created", "",
        ]
        .iter()
        .find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            families.contains_key(base).then_some(base)
        });
        assert!(family.is_some(), "sample of an undeclared family: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate {series}"
        );
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_state_follow_a_run_and_a_departure() {
    let dir = tempfile::tempdir().unwrap();
    // The second daemon listens on every interface: its endpoints need the token.
    let nodes = start(2, dir.path(), |i| {
        if i == 0 {
            "127.0.0.1:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        }
    })
    .await;
    let a = nodes[0].http_addr().unwrap();
    let b_port = nodes[1].http_addr().unwrap().port();
    let b: SocketAddr = ([127, 0, 0, 1], b_port).into();

    // The exposed listener: the page is public, the data is not.
    let token = std::fs::read_to_string(dir.path().join("p1/http.token")).unwrap();
    assert_eq!(get(b, "/metrics", None).await.0, 401);
    assert_eq!(get(b, "/api/state", Some("wrong-token-here")).await.0, 401);
    let (code, html) = get(b, "/", None).await;
    assert_eq!(code, 200);
    assert!(html.contains("loss-chart"));
    let (code, text) = get(b, "/metrics", Some(token.trim())).await;
    assert_eq!(code, 200);
    parse_metrics(&text);
    assert!(!dir.path().join("p0/http.token").exists());

    train(&nodes, &run(3, 2, 3)).await;

    let (code, text) = get(a, "/metrics", None).await;
    assert_eq!(code, 200, "{text}");
    let m = parse_metrics(&text);
    assert!(m["potluck_rounds_committed_total"] >= 3.0, "{text}");
    assert_eq!(m["potluck_run_committed_round"], 3.0);
    assert!(m["potluck_dataplane_bytes_total{direction=\"sent\"}"] > 0.0);
    assert!(m["potluck_dataplane_bytes_total{direction=\"received\"}"] > 0.0);
    assert_eq!(m["potluck_peers{state=\"connected\"}"], 1.0);
    assert!(m["potluck_round_duration_seconds_count"] >= 1.0, "{text}");
    assert!(m["potluck_round_phase_seconds_total{phase=\"train\"}"] > 0.0);
    assert!(m["potluck_eval_loss"] > 0.0);
    assert!(m["potluck_uptime_seconds"] > 0.0);
    // libp2p's own swarm metrics ride along.
    let established: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("libp2p_swarm_connections_established_total{"))
        .map(|(_, v)| v)
        .sum();
    assert!(established >= 1.0, "{text}");
    let b_id = nodes[1].client().local_peer_id().to_string();
    assert!(
        m[&format!("potluck_peer_dataplane_bytes_total{{peer=\"{b_id}\",direction=\"sent\"}}")]
            > 0.0
    );

    let s = state(a, None).await;
    let history = s["history"].as_array().unwrap();
    let committed: Vec<u64> = history
        .iter()
        .filter(|p| p["committed"] == true)
        .map(|p| p["round"].as_u64().unwrap())
        .collect();
    assert_eq!(committed, vec![1, 2, 3], "{s:#}");
    assert!(
        history
            .iter()
            .all(|p| p["eval_loss"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(s["run"]["state"], "finished");
    assert_eq!(s["ledger"]["chain"]["verdict"], "ok", "{:#}", s["ledger"]);
    assert_eq!(s["ledger"]["entries"].as_array().unwrap().len(), 4);
    let peer = |s: &serde_json::Value| {
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == b_id.as_str())
            .cloned()
    };
    assert_eq!(peer(&s).unwrap()["state"], "connected");

    // The second daemon stops: the first shows it as gone.
    let mut nodes = nodes;
    nodes.pop().unwrap().shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = state(a, None).await;
        if peer(&s).is_some_and(|p| p["state"] == "gone") {
            break;
        }
        assert!(Instant::now() < deadline, "never shown as gone: {s:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = parse_metrics(&get(a, "/metrics", None).await.1);
    assert_eq!(m["potluck_peers{state=\"gone\"}"], 1.0);
    assert_eq!(m["potluck_peers{state=\"connected\"}"], 0.0);
    nodes.pop().unwrap().shutdown().await;
}

/// Finds `name` on the PATH. Without it a test is skipped with a message, except in CI.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "`{name}` is not installed; CI must run this test (.ci/run installs it)"
        );
        eprintln!(
            "SKIPPED: `{name}` is not installed (apt-get install {name}); set CI=true to make this a failure"
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nodes = start(1, dir.path(), loopback).await;
    let target = nodes[0].http_addr().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: potluck\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _server = Killed(
        std::process::Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Until the target is up and a Potluck metric has a value in Prometheus' own store.
    let query = |q: &'static str| async move {
        let (code, body) =
            match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(web))
                .await
            {
                Ok(Ok(_)) => get(web, &format!("/api/v1/query?query={q}"), None).await,
                _ => return None,
            };
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()?
            .parse::<f64>()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    let (up, uptime, peers) = loop {
        let up = query("up").await;
        let uptime = query("potluck_uptime_seconds").await;
        let peers = query("potluck_peers%7Bstate%3D%22connected%22%7D").await;
        if let (Some(1.0), Some(u), Some(p)) = (up, uptime, peers) {
            break (1.0, u, p);
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap();
            let targets = get(web, "/api/v1/targets", None).await.1;
            panic!(
                "Prometheus never scraped the daemon (up {up:?}, uptime {uptime:?}):\n{targets}\n{log}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(up, 1.0);
    assert!(uptime > 0.0);
    assert_eq!(peers, 0.0);
    for n in nodes {
        n.shutdown().await;
    }
}

/// A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// the browser reads commands on fd 3 and writes answers on fd 4, NUL-terminated JSON).
struct Browser {
    _child: Killed,
    to: std::process::ChildStdin,
    from: std::sync::mpsc::Receiver<serde_json::Value>,
    next: u64,
    session: Option<String>,
}

impl Browser {
    fn launch(chromium: &Path, profile: &Path, log: &Path) -> Browser {
        // The shell maps our pipes onto fds 3 and 4 and then points stdin and stdout away.
        let script = format!(
            "exec '{}' --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
             --no-first-run --no-default-browser-check --user-data-dir='{}' \
             --remote-debugging-pipe --window-size=1400,1100 about:blank \
             3<&0 4>&1 </dev/null >/dev/null 2>'{}'",
            chromium.display(),
            profile.display(),
            log.display()
        );
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, from) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop();
                        if let Ok(v) = serde_json::from_slice(&buf)
                            && tx.send(v).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            _child: Killed(child),
            to,
            from,
            next: 0,
            session: None,
        }
    }

    /// Sends one command (to the attached page, once there is one) and waits for its answer.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next += 1;
        let id = self.next;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer to {method}: {e}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", serde_json::json!({"url": url}));
        let attached = self.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    }

    /// Evaluates `expr` in the page; it must return a JSON string.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        match r["result"]["value"].as_str() {
            Some(s) => serde_json::from_str(s).unwrap(),
            None => serde_json::Value::Null,
        }
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png"}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// What the test reads off the page: how often it redrew (the same page load: no reload),
/// the loss curve's points, and each peer row's state.
const LOOK: &str = r#"JSON.stringify({
  origin: performance.timeOrigin,
  updates: +document.body.dataset.updates,
  points: +document.getElementById('loss-chart').dataset.points,
  peers: Object.fromEntries([...document.querySelectorAll('#peers tbody tr')]
    .map(r => [r.dataset.peer, r.dataset.state])),
  chain: document.getElementById('chain-verdict').dataset.verdict || null,
  banner: document.getElementById('banner').style.display
})"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_lives_in_headless_chromium() {
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start(3, dir.path(), loopback).await;
    // Polling every 200 ms, so that the page sees the run's rounds one by one.
    let url = format!("http://{}/#poll=200", nodes[0].http_addr().unwrap());
    let log = dir.path().join("chromium.log");
    let mut browser = tokio::task::block_in_place(|| {
        let mut b = Browser::launch(&chromium, &dir.path().join("profile"), &log);
        b.open(&url);
        b
    });
    let look = |b: &mut Browser| tokio::task::block_in_place(|| b.eval(LOOK));
    let fail = |what: &str, seen: &serde_json::Value| -> ! {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("{what}; the page shows {seen:#}\nchromium's log:\n{log}");
    };
    let waiting = |secs| Instant::now() + Duration::from_secs(secs);

    // The page renders and lists both other daemons as connected.
    let ids: Vec<String> = nodes[1..]
        .iter()
        .map(|n| n.client().local_peer_id().to_string())
        .collect();
    let deadline = waiting(20);
    let first = loop {
        let seen = look(&mut browser);
        if ids.iter().all(|id| seen["peers"][id] == "connected") {
            break seen;
        }
        if Instant::now() > deadline {
            fail("the peers never appeared", &seen);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(first["points"], 0);

    // A run: the curve gains points while the same page load keeps polling.
    let run = run(6, 3, 6);
    let training = {
        let coordinator = nodes[0].train();
        let replicas: Vec<_> = nodes[1..].iter().map(|n| n.train()).collect();
        let seed = nodes[0].client().local_peer_id();
        tokio::spawn(async move {
            let mut joins = Vec::new();
            for svc in replicas {
                let id = run.id();
                joins.push(tokio::spawn(async move {
                    for _ in 0..100 {
                        if svc.join(seed, id, None).await.is_ok() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }));
            }
            coordinator.coordinate(run, None).await.unwrap();
            for j in joins {
                j.await.unwrap();
            }
        })
    };
    let mut counts = Vec::new();
    let deadline = waiting(60);
    loop {
        let seen = look(&mut browser);
        if seen["origin"] != first["origin"] {
            fail("the page reloaded", &seen);
        }
        let points = seen["points"].as_u64().unwrap_or(0);
        if counts.last() != Some(&points) {
            counts.push(points);
        }
        if points == 6 {
            break;
        }
        if Instant::now() > deadline {
            fail(&format!("the curve stopped at {counts:?}"), &seen);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("loss points seen by the page, in order: {counts:?}");
    // More than the final picture: it grew in steps while the page stayed loaded.
    let grown: Vec<&u64> = counts.iter().filter(|&&c| c > 0 && c < 6).collect();
    assert!(
        !grown.is_empty(),
        "the curve jumped from nothing to everything: {counts:?}"
    );
    training.await.unwrap();

    // A replica dies: its row turns to gone; the chain is verified.
    let dead = ids[1].clone();
    nodes.pop().unwrap().shutdown().await;
    let deadline = waiting(20);
    let last = loop {
        let seen = look(&mut browser);
        if seen["peers"][&dead] == "gone" && seen["chain"] == "ok" {
            break seen;
        }
        if Instant::now() > deadline {
            fail("the dead peer never showed as gone", &seen);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(last["peers"][&ids[0]], "connected");
    assert_ne!(last["banner"], "block");
    // The artifact: target/tmp/dashboard.png.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    tokio::task::block_in_place(|| browser.screenshot(&shot));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("dashboard screenshot: {}", shot.display());
    for n in nodes {
        n.shutdown().await;
    }
}
