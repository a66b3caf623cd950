//! `potluck demo`: a local swarm of real daemons (each with its own identity, data dir and
//! QUIC socket on loopback) that trains a small MoE model on the built-in corpus, shows
//! progress per round, and ends with the eval loss, the bytes exchanged against what plain
//! data-parallel training would have sent, and the root hash of the final checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use libp2p::Multiaddr;
use serde::Serialize;

use super::manifest::ResolvedRun;
use super::manifest::{DEMO_MANIFEST, RunManifest};
use super::plan::plain_data_parallel_bytes;
use super::session::{RunEvent, RunSummary};
use crate::config::Config;
use crate::node::Node;

/// Settings of a demo run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub peers: usize,
    pub rounds: Option<u64>,
    pub out: PathBuf,
    /// A run manifest to use instead of the embedded default.
    pub manifest: Option<String>,
    /// Print progress bars (off for tests and JSON output).
    pub progress: bool,
}

/// What a demo run measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub peers: usize,
    pub rounds: u64,
    pub params: usize,
    pub eval_loss: f32,
    pub entropy_floor_nats: Option<f64>,
    pub bytes_on_wire: u64,
    pub plain_data_parallel_bytes: u64,
    pub reduction_factor: f64,
    pub root: String,
    pub checkpoint_root: String,
    pub seconds: f64,
}

/// Runs the demo swarm to the end.
pub async fn run(opts: DemoOptions) -> Result<DemoReport> {
    if opts.peers == 0 || opts.peers > 64 {
        bail!("--peers must be between 1 and 64");
    }
    let mut manifest = RunManifest::parse(opts.manifest.as_deref().unwrap_or(DEMO_MANIFEST))?;
    if let Some(r) = opts.rounds {
        manifest.rounds = Some(r);
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
    let started = Instant::now();
    let swarm = LocalSwarm::start(opts.peers, &peers_dir).await?;

    let total = run.rounds;
    let bar = if opts.progress {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        Some(b)
    } else {
        None
    };
    let mut events = swarm.nodes()[0].train().subscribe();
    let watcher_bar = bar.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            let line = match &ev {
                RunEvent::RoundOpened { round, members } => {
                    if let Some(b) = &watcher_bar {
                        b.set_message(format!("training round {round} on {members} peers"));
                    }
                    continue;
                }
                RunEvent::Committed {
                    round,
                    root,
                    agreeing,
                    members,
                    eval_loss,
                } => format!(
                    "round {round:>3}: eval loss {eval_loss:.4} nats/byte, committed when {agreeing} of {members} replicas agreed on {}",
                    &hex::encode(root)[..16]
                ),
                RunEvent::NotCommitted { round, reason } => {
                    format!("round {round:>3}: not committed ({reason})")
                }
                RunEvent::Finished { .. } => break,
            };
            match &watcher_bar {
                Some(b) if !b.is_hidden() => {
                    b.println(line);
                    b.inc(1);
                }
                // Not a terminal (a pipe, CI): plain lines.
                Some(_) => println!("{line}"),
                None => tracing::info!("{line}"),
            }
        }
    });

    let run_id = run.id();
    let summary = swarm.train(&run, Some(opts.out.join("checkpoint"))).await?;
    let _ = watcher.await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
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
    let entropy = run.entropy_floor();
    Ok(DemoReport {
        peers: opts.peers,
        rounds: summary.rounds,
        params: summary.num_params,
        eval_loss: summary.eval_loss,
        entropy_floor_nats: entropy,
        bytes_on_wire: bytes,
        plain_data_parallel_bytes: plain,
        reduction_factor: if bytes > 0 {
            plain as f64 / bytes as f64
        } else {
            0.0
        },
        root: hex::encode(summary.root),
        checkpoint_root,
        seconds: started.elapsed().as_secs_f64(),
    })
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
