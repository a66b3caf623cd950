//! `potluck demo`: a local swarm of real daemons (each with its own identity, data dir and
//! QUIC socket on loopback) that trains a small MoE model on the built-in corpus. It draws a
//! progress view (a line per round with the eval loss and how far it went toward the corpus's
//! entropy floor, a bar per peer), serves the first peer's dashboard on loopback, and ends
//! with the eval loss, the bytes exchanged against what plain data-parallel training would
//! have sent, the root hash of the final checkpoint, and a text sample from the round-0 model
//! beside one from the final checkpoint. What it trains is the embedded manifest
//! ([`DEMO_MANIFEST`]), the same TOML a user would write.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use libp2p::Multiaddr;
use potluck_worker::sample::{SampleConfig, sample};
use potluck_worker::{Dataset, DeviceSpec, Replica};
use serde::Serialize;

use super::cli::human_bytes;
use super::manifest::ResolvedRun;
use super::manifest::{DEMO_MANIFEST, RunManifest};
use super::plan::plain_data_parallel_bytes;
use super::session::{RunEvent, RunSummary};
use crate::config::Config;
use crate::node::Node;

/// Held-out batches of each round's eval, as the replicas measure it (the session's
/// `EVAL_BATCHES`), so the round-0 figure compares with the rounds' figures.
const ROUND_EVAL_BATCHES: usize = 4;
/// Held-out bytes the samples start from, and bytes each sample continues them by.
const PROMPT_BYTES: usize = 32;
const SAMPLE_BYTES: usize = 64;

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub peers: usize,
    pub rounds: Option<u64>,
    /// Seed of the initial weights and of batch sampling (default: the manifest's).
    pub seed: Option<u64>,
    pub out: PathBuf,
    /// A run manifest to use instead of the embedded default.
    pub manifest: Option<String>,
    /// Draw the progress view (off for tests and JSON output).
    pub progress: bool,
}

/// A text sample from the round-0 model and one from the final checkpoint, continuing the
/// same held-out prompt, with the held-out text that really follows it.
#[derive(Clone, Debug, Serialize)]
pub struct DemoSamples {
    pub prompt: String,
    pub round0: String,
    #[serde(rename = "final")]
    pub final_: String,
    pub held_out: String,
    /// Softmax temperature of both samples, and the seed of their random stream.
    pub temperature: f32,
    pub seed: u64,
}

/// What a demo run measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub peers: usize,
    pub rounds: u64,
    pub seed: u64,
    pub params: usize,
    /// Eval loss of the last committed round, as the replicas measured it.
    pub eval_loss: f32,
    /// The same eval of the round-0 model (every replica's starting point).
    pub round0_eval_loss: f32,
    /// The first committed round's eval loss.
    pub round1_eval_loss: Option<f32>,
    pub entropy_floor_nats: Option<f64>,
    /// How far the eval loss went from its round-0 value to the entropy floor (0 to 1).
    pub share_of_the_way: Option<f64>,
    /// The same from the first committed round's value.
    pub share_of_the_way_from_round1: Option<f64>,
    pub bytes_on_wire: u64,
    pub plain_data_parallel_bytes: u64,
    pub reduction_factor: f64,
    pub root: String,
    pub checkpoint_root: String,
    /// The dashboard the first peer served while the demo ran.
    pub dashboard: Option<String>,
    /// Absent when the run's model or tokenizer has no text to show (see `samples_error`).
    pub samples: Option<DemoSamples>,
    pub samples_error: Option<String>,
    pub seconds: f64,
}

/// Runs the demo swarm to the end.
pub async fn run(opts: DemoOptions) -> Result<DemoReport> {
    let started = Instant::now();
    if opts.peers == 0 || opts.peers > 64 {
        bail!("--peers must be between 1 and 64");
    }
    let mut manifest = RunManifest::parse(opts.manifest.as_deref().unwrap_or(DEMO_MANIFEST))?;
    if let Some(r) = opts.rounds {
        manifest.rounds = Some(r);
    }
    if let Some(s) = opts.seed {
        manifest.seed = Some(s);
    }
    manifest.min_peers = Some(opts.peers);
    let run = manifest.resolve()?.pin_data()?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating the output dir {}", opts.out.display()))?;
    let peers_dir = opts.out.join("peers");
    // What an earlier demo left (its peers' data dirs hold that run's ledger) is removed:
    // each demo is a new run.
    for old in [
        &peers_dir,
        &opts.out.join("checkpoint"),
        &opts.out.join("ledger"),
    ] {
        if old.exists() {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("removing {} left by an earlier demo", old.display()))?;
        }
    }
    // The round-0 model is what every replica starts from: the run's seed decides it.
    let (data, _) = run.load_data()?;
    let round0 = Replica::new(&run.model, &run.inner, &DeviceSpec::Cpu)
        .context("building the round-0 model")?;
    let round0_eval = round0
        .eval_loss(&data, ROUND_EVAL_BATCHES)
        .context("evaluating the round-0 model")?;
    let floor = run.entropy_floor();

    let swarm = LocalSwarm::start_with_dashboard(opts.peers, &peers_dir).await?;
    let dashboard = swarm.nodes()[0].http_addr().map(|a| format!("http://{a}/"));
    let view = Progress::new(opts.progress, run.rounds, opts.peers);
    if let Some(url) = &dashboard {
        view.line(format!(
            "dashboard: {url} (peers, loss curve, bytes and time per round; live while the demo runs)"
        ));
    }
    view.line(format!(
        "round   0: eval loss {round0_eval:.4} nats/byte (the untrained model){}",
        floor
            .map(|h| format!("; the corpus's entropy floor is {h:.4}"))
            .unwrap_or_default()
    ));

    let run_id = run.id();
    let mut events = swarm.nodes()[0].train().subscribe();
    let mut round1_eval = None;
    let mut on_event = |ev: RunEvent, swarm: &LocalSwarm| match ev {
        RunEvent::RoundOpened { round, members } => {
            view.round_opened(round, members);
        }
        RunEvent::Committed {
            round,
            root,
            agreeing,
            members,
            eval_loss,
        } => {
            // The first round takes every run from the untrained model's near-uniform
            // prediction to the symbols' frequencies; what is learned after it is the
            // corpus's structure, so the meter measures from there.
            let from = *round1_eval.get_or_insert(eval_loss);
            let learned = floor
                .map(|h| meter(share_of_the_way(from, eval_loss, h)))
                .unwrap_or_default();
            view.round_line(
                round,
                format!(
                    "round {round:>3}: eval loss {eval_loss:.4} {learned} | {} on the wire | \
                     {agreeing} of {members} replicas agree on {}",
                    human_bytes(swarm.bytes_on_wire()),
                    &hex::encode(root)[..12]
                ),
            );
        }
        RunEvent::NotCommitted { round, reason } => {
            view.round_line(round, format!("round {round:>3}: not committed ({reason})"));
        }
        RunEvent::Finished { .. } => {}
    };
    let summary = {
        let training = swarm.train(&run, Some(opts.out.join("checkpoint")));
        tokio::pin!(training);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut open = true;
        let res = loop {
            tokio::select! {
                res = &mut training => break res,
                ev = events.recv(), if open => match ev {
                    Ok(ev) => on_event(ev, &swarm),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => open = false,
                },
                _ = tick.tick() => view.peers(&swarm),
            }
        };
        // Events sent just before the run ended.
        while let Ok(ev) = events.try_recv() {
            on_event(ev, &swarm);
        }
        view.peers(&swarm);
        view.finish();
        res?
    };
    let bytes = swarm.bytes_on_wire();
    let plain = plain_data_parallel_bytes(
        summary.num_params as u64,
        opts.peers as u64,
        summary.total_steps,
    );
    let checkpoint_root = summary.checkpoint_root.clone().unwrap_or_default();
    // The coordinator's ledger goes beside the checkpoint, where `potluck verify` finds it.
    let ledger = super::checkpoint::ledger_dir(&super::checkpoint::run_dir(
        &peers_dir.join("peer-0"),
        &run_id,
    ));
    super::checkpoint::copy_ledger(&ledger, &opts.out.join("ledger"))?;
    swarm.shutdown().await;
    let (samples, samples_error) = match samples(&run, &data, &round0, &opts.out.join("checkpoint"))
    {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(DemoReport {
        peers: opts.peers,
        rounds: summary.rounds,
        seed: run.inner.seed,
        params: summary.num_params,
        eval_loss: summary.eval_loss,
        round0_eval_loss: round0_eval,
        round1_eval_loss: round1_eval,
        entropy_floor_nats: floor,
        share_of_the_way: floor.map(|h| share_of_the_way(round0_eval, summary.eval_loss, h)),
        share_of_the_way_from_round1: floor
            .zip(round1_eval)
            .map(|(h, r1)| share_of_the_way(r1, summary.eval_loss, h)),
        bytes_on_wire: bytes,
        plain_data_parallel_bytes: plain,
        reduction_factor: if bytes > 0 {
            plain as f64 / bytes as f64
        } else {
            0.0
        },
        root: hex::encode(summary.root),
        checkpoint_root,
        dashboard,
        samples,
        samples_error,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How far `now` went from `start` to `floor`, as a share of the way (negative when it rose).
pub fn share_of_the_way(start: f32, now: f32, floor: f64) -> f64 {
    let span = start as f64 - floor;
    if span <= 0.0 {
        return 0.0;
    }
    (start as f64 - now as f64) / span
}

/// A ten-cell meter of a share of the way, with the percentage.
fn meter(share: f64) -> String {
    let cells = (share.clamp(0.0, 1.0) * 10.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}% of the way to the floor since round 1",
        "#".repeat(cells),
        "-".repeat(10 - cells),
        share * 100.0
    )
}

/// Samples the round-0 model and the final checkpoint from the same held-out prompt. Only
/// byte-level runs have text to show this way.
fn samples(
    run: &ResolvedRun,
    data: &Dataset,
    round0: &Replica,
    checkpoint: &Path,
) -> Result<DemoSamples> {
    if run.model.vocab != 256 || run.data.tokenizer.is_some() {
        bail!("samples are shown for byte-level runs only");
    }
    let held = data.eval_tokens();
    if held.len() < PROMPT_BYTES + SAMPLE_BYTES {
        bail!("the held-out split is too short for a sample");
    }
    let prompt = &held[..PROMPT_BYTES];
    let cfg = SampleConfig {
        max_new_tokens: SAMPLE_BYTES,
        // The source is random: at temperature 1 a model that learned it writes text like
        // it, where greedy decoding would loop on the likeliest path.
        temperature: 1.0,
        top_p: 1.0,
        seed: run.inner.seed,
    };
    let trained = Replica::load_checkpoint(checkpoint, &DeviceSpec::Cpu)
        .with_context(|| format!("loading the final checkpoint {}", checkpoint.display()))?;
    let (Some(round0), Some(trained)) = (round0.model(), trained.model()) else {
        bail!("the demo samples the worker's own model, not adapters on a base");
    };
    let before = sample(round0, prompt, &cfg).context("sampling the round-0 model")?;
    let after = sample(trained, prompt, &cfg).context("sampling the final model")?;
    Ok(DemoSamples {
        prompt: printable(prompt),
        round0: printable(&before),
        final_: printable(&after),
        held_out: printable(&held[PROMPT_BYTES..PROMPT_BYTES + SAMPLE_BYTES]),
        temperature: cfg.temperature,
        seed: cfg.seed,
    })
}

/// Bytes as text, each byte outside printable ASCII shown as `·`.
pub fn printable(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(|&t| match u8::try_from(t) {
            Ok(b) if (0x20..0x7f).contains(&b) => b as char,
            _ => '·',
        })
        .collect()
}

/// The demo's progress view: a line per round above one bar per peer (its committed round,
/// state, last training loss and bytes). Without a terminal (a pipe, CI) the bars are hidden
/// and the round lines are plain stdout lines; with progress off (JSON output) nothing is
/// drawn.
struct Progress {
    multi: Option<MultiProgress>,
    swarm: Option<ProgressBar>,
    peers: Vec<ProgressBar>,
    enabled: bool,
}

impl Progress {
    fn new(enabled: bool, rounds: u64, peers: usize) -> Self {
        if !enabled {
            return Progress {
                multi: None,
                swarm: None,
                peers: Vec::new(),
                enabled,
            };
        }
        let multi = MultiProgress::new();
        let style = |t: &str| {
            ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar())
        };
        let swarm = multi.add(ProgressBar::new(rounds));
        swarm.set_style(style(
            "{spinner} swarm  [{bar:20}] round {pos}/{len} {elapsed:>4} {msg}",
        ));
        swarm.enable_steady_tick(Duration::from_millis(200));
        let bars = (0..peers)
            .map(|i| {
                let b = multi.add(ProgressBar::new(rounds));
                b.set_style(style("  {prefix:<6} [{bar:20}] {pos:>3}/{len} {msg}"));
                b.set_prefix(format!("peer-{i}"));
                b
            })
            .collect();
        Progress {
            multi: Some(multi),
            swarm: Some(swarm),
            peers: bars,
            enabled,
        }
    }

    /// A line above the bars (or on stdout without a terminal).
    fn line(&self, text: String) {
        match &self.multi {
            Some(m) if !m.is_hidden() => {
                let _ = m.println(text);
            }
            Some(_) => println!("{text}"),
            None => tracing::info!("{text}"),
        }
    }

    fn round_opened(&self, round: u64, members: usize) {
        if let Some(b) = &self.swarm {
            b.set_message(format!("training round {round} on {members} peers"));
        }
    }

    fn round_line(&self, round: u64, text: String) {
        if let Some(b) = &self.swarm {
            b.set_position(round.min(b.length().unwrap_or(round)));
        }
        self.line(text);
    }

    /// Redraws the peers' bars from their daemons' status.
    fn peers(&self, swarm: &LocalSwarm) {
        if !self.enabled {
            return;
        }
        for (bar, node) in self.peers.iter().zip(swarm.nodes()) {
            let st = node.train().status();
            bar.set_position(st.committed_round.min(bar.length().unwrap_or(0)));
            let loss = if st.train_loss > 0.0 {
                format!("{:.3}", st.train_loss)
            } else {
                "-".into()
            };
            let state: String = st.state.chars().take(22).collect();
            bar.set_message(format!(
                "{state:<22} loss {loss:<5} sent {:>9} got {:>9}",
                human_bytes(st.bytes_sent),
                human_bytes(st.bytes_received)
            ));
        }
    }

    fn finish(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
        for b in self.swarm.iter().chain(&self.peers) {
            b.finish_and_clear();
        }
    }
}

/// A local swarm: `n` daemons in this process, each with its own identity, data dir
/// (`<dir>/peer-<i>`) and QUIC socket on loopback; the first listens and the others
/// bootstrap from it. The demo and the benchmarks train on one.
#[derive(Debug)]
pub struct LocalSwarm {
    nodes: Vec<Node>,
}

impl LocalSwarm {
    /// Starts the daemons and waits until every one is connected to the first.
    pub async fn start(peers: usize, dir: &Path) -> Result<Self> {
        Self::start_inner(peers, dir, false).await
    }

    /// As [`LocalSwarm::start`], and the first daemon serves its dashboard, metrics and JSON
    /// state on a free loopback port ([`Node::http_addr`]).
    pub async fn start_with_dashboard(peers: usize, dir: &Path) -> Result<Self> {
        Self::start_inner(peers, dir, true).await
    }

    async fn start_inner(peers: usize, dir: &Path, dashboard: bool) -> Result<Self> {
        if peers == 0 {
            bail!("a swarm needs at least one peer");
        }
        let mut nodes: Vec<Node> = Vec::new();
        let mut seed_addr: Option<Multiaddr> = None;
        for i in 0..peers {
            let mut cfg = Config {
                data_dir: dir.join(format!("peer-{i}")),
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
                mdns: false,
                ..Config::default()
            };
            if let Some(a) = &seed_addr {
                cfg.bootstrap = vec![a.clone()];
            }
            if dashboard && i == 0 {
                cfg.http_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            }
            let node = Node::start(cfg)
                .await
                .with_context(|| format!("starting local peer {i}"))?;
            if seed_addr.is_none() {
                seed_addr = Some(wait_for_listen_addr(&node).await?);
            }
            nodes.push(node);
        }
        let seed = nodes[0].client().local_peer_id();
        for (i, n) in nodes.iter().enumerate().skip(1) {
            wait_connected(n, seed)
                .await
                .with_context(|| format!("local peer {i} did not reach the first peer"))?;
        }
        Ok(LocalSwarm { nodes })
    }

    /// The daemons; the first coordinates the runs of [`LocalSwarm::train`].
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Runs `run` to the end: the first daemon coordinates it (writing the final checkpoint
    /// to `out` when given), every daemon is a replica. Fails when a replica finishes on
    /// another root than the coordinator.
    pub async fn train(&self, run: &ResolvedRun, out: Option<PathBuf>) -> Result<RunSummary> {
        let seed = self.nodes[0].client().local_peer_id();
        let run_id = run.id();
        let mut joins = Vec::new();
        for n in self.nodes.iter().skip(1) {
            let svc = n.train();
            joins.push(tokio::spawn(async move {
                // The coordinator registers its run a moment after it starts: retry briefly.
                let mut last = None;
                for _ in 0..50 {
                    match svc.join(seed, run_id, None).await {
                        Ok(s) => return Ok(s),
                        Err(e @ super::TrainError::Refused(_)) => return Err(e),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(last.unwrap_or(super::TrainError::CoordinatorGone))
            }));
        }
        let summary = self.nodes[0].train().coordinate(run.clone(), out).await?;
        for j in joins {
            match j.await {
                Ok(Ok(s)) if s.root != summary.root => {
                    bail!("a replica finished on a different root than the coordinator")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "a replica ended with an error"),
                Err(e) => tracing::warn!(error = %e, "a replica task failed"),
            }
        }
        Ok(summary)
    }

    /// Bytes on the wire so far, sent plus received, summed over every daemon: the tensor
    /// frames of the data plane, counted at both ends (see [`super::session::Traffic`]).
    pub fn bytes_on_wire(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                let (s, r) = n.train().traffic().totals();
                s + r
            })
            .sum()
    }

    /// Bytes on the wire during each round (round 0: before the first), sent plus
    /// received, summed over every daemon.
    pub fn bytes_per_round(&self) -> std::collections::BTreeMap<u64, u64> {
        let mut out = std::collections::BTreeMap::new();
        for n in &self.nodes {
            for (round, (s, r)) in n.train().traffic().per_round() {
                *out.entry(round).or_default() += s + r;
            }
        }
        out
    }

    /// Stops every daemon.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

async fn wait_for_listen_addr(node: &Node) -> Result<Multiaddr> {
    let client = node.client();
    for _ in 0..100 {
        let st = client.status().await?;
        if let Some(a) = st.listen_addrs.first() {
            return Ok(a.clone().with(libp2p::multiaddr::Protocol::P2p(st.peer_id)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the first local peer did not start listening")
}

async fn wait_connected(node: &Node, peer: libp2p::PeerId) -> Result<()> {
    let client = node.client();
    for _ in 0..200 {
        if client
            .peers()
            .await?
            .iter()
            .any(|p| p.peer_id == peer && p.connected)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no connection after 10 s")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use potluck_coordinator::verify::{VerifyOptions, verify_checkpoint_dir};

    use super::*;

    /// The demo's settings, cut to seconds: 2 rounds of 3 steps on a small corpus.
    const SHORT: &str = r#"
name = "demo-test"
seed = 7
model = "tiny"
inner_steps = 3
rounds = 2
compression = "sign"
round_deadline_secs = 120

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

[outer]
lr = 1.0
momentum = 0.0
"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_short_demo_reports_its_learning_samples_and_a_checkpoint_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // What an earlier demo left is replaced, not mixed in.
        std::fs::create_dir_all(out.join("checkpoint")).unwrap();
        std::fs::write(out.join("checkpoint").join("stale"), b"x").unwrap();
        let report = run(DemoOptions {
            peers: 2,
            rounds: None,
            seed: Some(3),
            out: out.clone(),
            manifest: Some(SHORT.into()),
            progress: false,
        })
        .await
        .unwrap();
        assert_eq!((report.rounds, report.peers, report.seed), (2, 2, 3));
        // The untrained model predicts about uniformly over 256 bytes (ln 256 = 5.55); six
        // steps take it well below that, toward the corpus's 8 symbols.
        assert!(report.round0_eval_loss > 5.0, "{report:?}");
        assert!(
            report.eval_loss < report.round0_eval_loss - 0.5,
            "{report:?}"
        );
        let floor = report.entropy_floor_nats.unwrap();
        let share = report.share_of_the_way.unwrap();
        assert!(share > 0.0 && share < 1.0, "{report:?}");
        assert_eq!(
            share,
            share_of_the_way(report.round0_eval_loss, report.eval_loss, floor)
        );
        assert!(report.round1_eval_loss.is_some());
        let url = report.dashboard.as_deref().unwrap();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let s = report.samples.as_ref().unwrap();
        assert_eq!(s.prompt.chars().count(), PROMPT_BYTES);
        for text in [&s.round0, &s.final_, &s.held_out] {
            assert_eq!(text.chars().count(), SAMPLE_BYTES);
        }
        // The prompt and its continuation are the corpus's: its 8 symbols.
        assert!(
            s.prompt
                .chars()
                .chain(s.held_out.chars())
                .all(|c| ('a'..='h').contains(&c)),
            "{s:?}"
        );
        assert_ne!(s.round0, s.final_);
        assert_eq!(s.seed, 3);
        // The checkpoint is the final state, and its chain checks out.
        assert!(!out.join("checkpoint").join("stale").exists());
        let v = verify_checkpoint_dir(
            &out.join("checkpoint"),
            &VerifyOptions {
                expected_run_id: None,
                ledger_dir: Some(out.join("ledger")),
            },
        )
        .unwrap();
        assert_eq!(v.round, 2);
        assert_eq!(v.root.to_hex(), report.checkpoint_root);
    }

    #[test]
    fn the_share_of_the_way_and_the_text_view() {
        assert_eq!(share_of_the_way(2.0, 1.5, 1.0), 0.5);
        assert_eq!(share_of_the_way(2.0, 2.5, 1.0), -0.5);
        // A start at or below the floor has no way to go.
        assert_eq!(share_of_the_way(1.0, 0.9, 1.0), 0.0);
        assert!(
            meter(0.5).starts_with("[#####-----]  50%"),
            "{}",
            meter(0.5)
        );
        assert!(meter(-0.2).starts_with("[----------]"));
        assert!(meter(1.3).starts_with("[##########]"));
        assert_eq!(printable(&[97, 32, 0, 10, 255, 126, 300]), "a ···~·");
    }
}
