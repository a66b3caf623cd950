//! The training commands of the `potluck` binary: `demo`, `verify`, `run start|join|status`,
//! `invite`, `join` and `checkpoints`. The run commands talk to the local daemon through the
//! control API; `demo`, `verify` and `checkpoints` work on files and need no daemon.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use potluck_coordinator::verify::{VerifyOptions, verify_checkpoint_dir};
use potluck_proto::v1;

use super::demo::{self, DemoOptions};
use super::runs::{ChainVerdict, LedgerReport, list_ledgers};
use crate::cli::{QueryArgs, connect};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of daemons in the local swarm.
    #[arg(long, default_value_t = 3)]
    pub peers: usize,
    /// Rounds to train (default: the embedded run's).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Seed of the initial weights and of batch sampling (default: the run manifest's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Show the daemons' log lines (info and up) under the progress view.
    #[arg(short, long)]
    pub verbose: bool,
    /// Where the peers' data dirs and the final checkpoint go.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// A run manifest (TOML) to train instead of the embedded default.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Print the final report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// A ledger directory: also check the chain of parents back to the first checkpoint
    /// (default: a `ledger` directory beside the checkpoint or its `checkpoints` folder).
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// After verifying, write the checkpoint's safetensors files and `config.json` here,
    /// for tools that load plain safetensors.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
    /// For a checkpoint of an adapter run: the base's directory, checked against the root
    /// the run pins (default: the run's `base` package beside the checkpoint's
    /// `checkpoints` folder).
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let manifest = match &args.manifest {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the run manifest {}", p.display()))?,
        ),
        None => None,
    };
    let report = demo::run(DemoOptions {
        peers: args.peers,
        rounds: args.rounds,
        seed: args.seed,
        out: args.out.clone(),
        manifest,
        progress: !args.json,
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "trained {} rounds on {} peers ({} parameters, seed {}) in {:.0} s",
        report.rounds, report.peers, report.params, report.seed, report.seconds
    );
    match report.entropy_floor_nats {
        Some(h) => {
            println!(
                "final eval loss: {:.4} nats/byte (the corpus's entropy floor is {h:.4}; {:.1}% above it)",
                report.eval_loss,
                (report.eval_loss as f64 / h - 1.0) * 100.0
            );
            let from1 = match (report.round1_eval_loss, report.share_of_the_way_from_round1) {
                (Some(l), Some(s)) => format!(", {:.0}% from round 1's {l:.4}", s * 100.0),
                _ => String::new(),
            };
            println!(
                "learned: {:.0}% of the way from the untrained model's {:.4} to the floor{from1}",
                report.share_of_the_way.unwrap_or(0.0) * 100.0,
                report.round0_eval_loss
            );
        }
        None => println!("final eval loss: {:.4} nats/token", report.eval_loss),
    }
    println!(
        "bytes on the wire: {} (plain data parallel would have sent {}: {:.0}x less)",
        human_bytes(report.bytes_on_wire),
        human_bytes(report.plain_data_parallel_bytes),
        report.reduction_factor
    );
    match (&report.samples, &report.samples_error) {
        (Some(s), _) => {
            println!(
                "samples (temperature {}, seed {}; bytes outside printable ASCII shown as ·):",
                s.temperature, s.seed
            );
            println!("  held-out prompt:       {}", s.prompt);
            println!("  round-0 model goes on: {}", s.round0);
            println!("  final model goes on:   {}", s.final_);
            println!("  the held-out text:     {}", s.held_out);
        }
        (None, Some(e)) => println!("no text samples: {e}"),
        (None, None) => {}
    }
    println!("replicas agree on state root {}", report.root);
    println!(
        "checkpoint {} with root {} (check it with `potluck verify {}`)",
        args.out.join("checkpoint").display(),
        report.checkpoint_root,
        args.out.join("checkpoint").display()
    );
    Ok(())
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let opts = VerifyOptions {
        expected_run_id: None,
        ledger_dir: args.ledger.clone().or_else(|| beside_ledger(&args.path)),
    };
    let v = verify_checkpoint_dir(&args.path, &opts)
        .with_context(|| format!("{} does not verify", args.path.display()))?;
    let run = settings_run_id(&args.path)?;
    let base = verify_base(&args.path, args.base.as_deref())?;
    if let Some(dest) = &args.export {
        let files = potluck_coordinator::verify::export_checkpoint(&args.path, dest, &opts)
            .with_context(|| format!("exporting to {}", dest.display()))?;
        if !args.json {
            println!("exported {} files to {}", files.len(), dest.display());
        }
    }
    if args.json {
        let out = serde_json::json!({
            "ok": true,
            // The run as `run status`, invites and data directories name it.
            "run": hex::encode(run),
            // The id the manifests carry: the hash of the signed run manifest.
            "run_id": v.run_id.to_hex(),
            "round": v.round,
            "root": v.root.to_hex(),
            "manifest_id": v.manifest_id.to_hex(),
            "coordinator_key": hex::encode(v.coordinator_key),
            "replica_signers": v.replica_signers,
            "bytes_checked": v.bytes_checked,
            "chain_len": v.chain_len,
            // An adapter run's base: its pinned root, and whether its files were checked.
            "base_root": base.as_ref().map(|b| b.root.clone()),
            "base_checked": base.as_ref().and_then(|b| b.checked.as_ref()).map(|p| p.display().to_string()),
        });
        println!("{out}");
    } else {
        println!(
            "ok: round {} of run {} (signed run manifest {}), root {}, {} bytes checked, \
             signed by coordinator {}{}",
            v.round,
            hex::encode(&run[..8]),
            v.run_id.short(),
            v.root,
            v.bytes_checked,
            hex::encode(&v.coordinator_key[..8]),
            if v.chain_len > 0 {
                format!(", chain of {} checkpoints verified", v.chain_len)
            } else {
                String::new()
            }
        );
        if let Some(b) = &base {
            match &b.checked {
                Some(dir) => println!(
                    "adapters on base {}: the base at {} has that root",
                    b.root,
                    dir.display()
                ),
                None => println!(
                    "adapters on base {}: the base itself was not checked (not found beside \
                     the checkpoint; give it with --base DIR)",
                    b.root
                ),
            }
        }
    }
    Ok(())
}

/// What `verify` found about an adapter checkpoint's base.
struct BaseCheck {
    /// The root the run pins and the adapters name.
    root: String,
    /// The base directory whose files were found to have that root.
    checked: Option<PathBuf>,
}

/// For a checkpoint of an adapter run: checks that its adapters name the base the run
/// pins, and that the base (`base`, or the run's `base` package beside the checkpoint)
/// has that root. `None` for a checkpoint of the worker's own model.
fn verify_base(checkpoint: &Path, base: Option<&Path>) -> anyhow::Result<Option<BaseCheck>> {
    let signed = read_signed_manifest(checkpoint)?;
    let settings = &signed.body().settings;
    let run: super::ResolvedRun = serde_json::from_slice(settings).with_context(|| {
        format!(
            "the run settings in {}",
            checkpoint
                .join(potluck_coordinator::manifest::RUN_FILE)
                .display()
        )
    })?;
    let Some(spec) = &run.base else {
        return Ok(None);
    };
    let (named, _) = potluck_worker::replica::adapter_checkpoint_base(checkpoint)
        .with_context(|| format!("{} is not an adapter checkpoint", checkpoint.display()))?;
    if named != spec.root {
        anyhow::bail!(
            "the adapters in {} name the base {named}, but the run pins {}",
            checkpoint.display(),
            spec.root
        );
    }
    let root = super::basepack::pinned_root(&run)?
        .ok_or_else(|| anyhow::anyhow!("the run's base has no root"))?;
    let beside = std::fs::canonicalize(checkpoint)
        .ok()
        .and_then(|d| Some(d.parent()?.parent()?.join(super::basepack::BASE_DIR)))
        .filter(|d| d.is_dir());
    let checked = match (base, beside) {
        (Some(dir), _) => {
            let spec = super::manifest::BaseSpec {
                path: dir.display().to_string(),
                root: String::new(),
                vocab: 0,
            };
            let have = super::basepack::base_root(&spec)?;
            if have != root {
                anyhow::bail!(
                    "the base at {} has the root {}, but the run pins {}",
                    dir.display(),
                    have.to_hex(),
                    root.to_hex()
                );
            }
            Some(dir.to_path_buf())
        }
        (None, Some(pack)) => match super::datapack::holds(&pack, root) {
            Ok(true) => Some(pack),
            Ok(false) => None,
            Err(reason) => anyhow::bail!("the run's base package {}: {reason}", pack.display()),
        },
        (None, None) => None,
    };
    Ok(Some(BaseCheck {
        root: spec.root.clone(),
        checked,
    }))
}

/// The signed run manifest a checkpoint directory holds, read within its size limit.
fn read_signed_manifest(
    checkpoint: &Path,
) -> anyhow::Result<potluck_coordinator::failover::SignedRunManifest> {
    let path = checkpoint.join(potluck_coordinator::manifest::RUN_FILE);
    let bytes = crate::fsutil::read_limited(
        &path,
        potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    potluck_coordinator::failover::SignedRunManifest::decode(&bytes)
        .with_context(|| format!("{} is not a signed run manifest", path.display()))
}

/// The id of the run a verified checkpoint belongs to, as `run status`, invites and data
/// directories name it: the hash of the run's settings inside its signed run manifest.
fn settings_run_id(checkpoint: &Path) -> anyhow::Result<[u8; 32]> {
    let signed = read_signed_manifest(checkpoint)?;
    Ok(*blake3::hash(&signed.body().settings).as_bytes())
}

/// The ledger that belongs with a checkpoint directory, when there is one: `../ledger`
/// (a demo's or an export's layout) or `../../ledger` (a run directory's
/// `checkpoints/<round>`).
fn beside_ledger(checkpoint: &std::path::Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(checkpoint).ok()?;
    [dir.parent(), dir.parent().and_then(|p| p.parent())]
        .into_iter()
        .flatten()
        .map(|p| p.join(potluck_coordinator::store::LEDGER_DIR))
        .find(|l| l.is_dir())
}

pub(crate) fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Start the run of a TOML run manifest on the local daemon, which coordinates it; prints
    /// the run id and returns (training goes on in the daemon).
    Start {
        #[command(flatten)]
        q: QueryArgs,
        /// The run manifest (TOML). A `data.source` path is read by the daemon: make it
        /// absolute.
        file: PathBuf,
        /// Write the final checkpoint here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stay and print progress until the run ends.
        #[arg(long)]
        follow: bool,
        /// A peer that takes the run over if this daemon disappears (repeat for more, in
        /// order of succession). It must be a replica of the run (one that joins late
        /// copies the ledger from the coordinator).
        #[arg(long = "successor", value_name = "PEER_ID")]
        successors: Vec<String>,
        /// Coordinate only: this daemon trains no replica (a public swarm's coordinator).
        #[arg(long)]
        no_replica: bool,
        /// Start a new run with the file's settings (a random `instance`, so a new run id),
        /// for a manifest whose run already finished or ran elsewhere.
        #[arg(long)]
        fresh: bool,
    },
    /// Show the run the local daemon started or joined last: round, loss, peers, bytes.
    Status {
        #[command(flatten)]
        q: QueryArgs,
        /// Keep printing changes until the run ends.
        #[arg(long)]
        follow: bool,
    },
    /// Join a run by its coordinator and id (what `potluck join STRING` does after joining
    /// the swarm).
    Join {
        #[command(flatten)]
        q: QueryArgs,
        /// The coordinator's peer id.
        #[arg(long)]
        coordinator: String,
        /// The run id (64 hex digits).
        #[arg(long = "run", value_name = "RUNID")]
        run_id: String,
        /// An address of the coordinator to dial first (repeatable).
        #[arg(long, value_name = "MULTIADDR")]
        addr: Vec<String>,
        /// Write the final checkpoint here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stay and print progress until the run ends.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Args)]
pub struct InviteArgs {
    #[command(flatten)]
    pub q: QueryArgs,
    /// How long the membership invite inside stays valid, in seconds (private swarms).
    #[arg(long, default_value_t = 86_400)]
    pub ttl_secs: u64,
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub q: QueryArgs,
    /// The string `potluck invite` printed.
    pub invite: String,
    /// Write the final checkpoint here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stay and print progress until the run ends.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// The daemon's data dir.
    #[arg(long, env = "POTLUCK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Only this run (its id or a unique prefix of it).
    #[arg(long = "run", value_name = "RUNID")]
    pub run_id: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// What the daemon said, without tonic's wrapping.
fn rpc(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", s.message())
}

fn absolute(p: Option<PathBuf>) -> anyhow::Result<String> {
    match p {
        None => Ok(String::new()),
        Some(p) => Ok(std::path::absolute(&p)
            .with_context(|| format!("resolving {}", p.display()))?
            .display()
            .to_string()),
    }
}

pub async fn run(cmd: RunCommand) -> anyhow::Result<()> {
    match cmd {
        RunCommand::Start {
            q,
            file,
            out,
            follow,
            successors,
            no_replica,
            fresh,
        } => {
            let bytes =
                crate::fsutil::read_limited(&file, super::manifest::MAX_MANIFEST_BYTES as u64)
                    .with_context(|| {
                        format!(
                            "reading the run manifest {} (at most {} bytes)",
                            file.display(),
                            super::manifest::MAX_MANIFEST_BYTES
                        )
                    })?;
            let mut manifest_toml = String::from_utf8(bytes)
                .with_context(|| format!("{} is not UTF-8 text", file.display()))?;
            if fresh {
                let (toml, instance) = super::manifest::fresh_instance(&manifest_toml)
                    .with_context(|| format!("reading {}", file.display()))?;
                eprintln!("a new run of these settings: instance = \"{instance}\"");
                manifest_toml = toml;
            }
            let mut c = connect(&q).await?;
            let r = c
                .start_run(v1::StartRunRequest {
                    manifest_toml,
                    out_dir: absolute(out)?,
                    successors,
                    coordinate_only: no_replica,
                })
                .await
                .map_err(|s| rpc("cannot start the run", s))?
                .into_inner();
            if q.json && !follow {
                println!(
                    "{}",
                    serde_json::json!({"run_id": r.run_id, "name": r.name, "rounds": r.rounds})
                );
                return Ok(());
            }
            println!("{}", r.run_id);
            eprintln!(
                "started run '{}' ({} rounds); watch it with `potluck run status`, invite \
                 friends with `potluck invite`",
                r.name, r.rounds
            );
            if follow {
                return follow_run(&mut c).await;
            }
        }
        RunCommand::Status { q, follow } => {
            let mut c = connect(&q).await?;
            if follow {
                return follow_run(&mut c).await;
            }
            let s = c
                .run_status(v1::RunStatusRequest {})
                .await
                .map_err(|s| rpc("cannot read the run status", s))?
                .into_inner();
            if q.json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                print_status(&s);
            }
        }
        RunCommand::Join {
            q,
            coordinator,
            run_id,
            addr,
            out,
            follow,
        } => {
            let mut c = connect(&q).await?;
            let r = c
                .join_run(v1::JoinRunRequest {
                    coordinator_peer_id: coordinator.clone(),
                    run_id,
                    out_dir: absolute(out)?,
                    coordinator_addrs: addr,
                })
                .await
                .map_err(|s| rpc("cannot join the run", s))?
                .into_inner();
            if q.json && !follow {
                println!("{}", serde_json::json!({"run_id": r.run_id}));
                return Ok(());
            }
            println!("{}", r.run_id);
            eprintln!(
                "joining run {} of {coordinator}; watch it with `potluck run status`",
                r.run_id
            );
            if follow {
                return follow_run(&mut c).await;
            }
        }
    }
    Ok(())
}

pub async fn invite(args: InviteArgs) -> anyhow::Result<()> {
    let r = connect(&args.q)
        .await?
        .create_run_invite(v1::CreateRunInviteRequest {
            ttl_secs: args.ttl_secs,
        })
        .await
        .map_err(|s| rpc("cannot create a run invite", s))?
        .into_inner();
    if args.q.json {
        println!(
            "{}",
            serde_json::json!({
                "invite": r.invite,
                "run_id": r.run_id,
                "swarm_invite_id": r.swarm_invite_id,
                "expires_at_ms": r.expires_at_ms,
            })
        );
        return Ok(());
    }
    println!("{}", r.invite);
    eprintln!(
        "invite to run {}: a friend runs `potluck join <the line above>` with their daemon up",
        r.run_id
    );
    if !r.swarm_invite_id.is_empty() {
        eprintln!(
            "it admits one peer to this private swarm (revoke with `potluck swarm revoke {}`)",
            r.swarm_invite_id
        );
    }
    Ok(())
}

pub async fn join(args: JoinArgs) -> anyhow::Result<()> {
    // Decode here too, so a mangled string is explained before any daemon is involved.
    let inv = super::runs::RunInvite::parse(&args.invite).context("cannot use this invite")?;
    let mut c = connect(&args.q).await?;
    let r = c
        .accept_run_invite(v1::AcceptRunInviteRequest {
            invite: args.invite.clone(),
            out_dir: absolute(args.out)?,
        })
        .await
        .map_err(|s| rpc("cannot join", s))?
        .into_inner();
    if args.q.json && !args.follow {
        println!(
            "{}",
            serde_json::json!({
                "run_id": r.run_id,
                "coordinator_peer_id": r.coordinator_peer_id,
                "joined_swarm": r.joined_swarm,
            })
        );
        return Ok(());
    }
    if r.joined_swarm {
        println!(
            "joined the private swarm of {}",
            inv.swarm_invite_text()
                .and_then(|t| crate::membership::Invite::parse(&t).ok())
                .map(|i| i.owner.to_base58())
                .unwrap_or_default()
        );
    }
    println!(
        "joining run {} of coordinator {}; training goes on in the daemon (`potluck run status`)",
        r.run_id, r.coordinator_peer_id
    );
    if args.follow {
        return follow_run(&mut c).await;
    }
    Ok(())
}

fn loss(x: f32) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "-".into()
    }
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

fn status_json(s: &v1::RunStatusResponse) -> serde_json::Value {
    let f = |x: f32| {
        if x.is_finite() {
            serde_json::json!(x)
        } else {
            serde_json::Value::Null
        }
    };
    serde_json::json!({
        "known": s.known,
        "active": s.active,
        "run_id": s.run_id,
        "name": s.name,
        "role": s.role,
        "coordinator": s.coordinator_peer_id,
        "state": s.state,
        "round": s.round,
        "rounds": s.rounds,
        "committed_round": s.committed_round,
        "committed_root": s.committed_root,
        "train_loss": f(s.train_loss),
        "eval_loss": f(s.eval_loss),
        "peers": s.peers,
        "bytes_sent": s.bytes_sent,
        "bytes_received": s.bytes_received,
        "round_bytes": s.round_bytes.iter().map(|b| serde_json::json!({
            "round": b.round, "sent": b.sent, "received": b.received,
        })).collect::<Vec<_>>(),
        "round_timings": s.round_timings.iter().map(|t| serde_json::json!({
            "round": t.round, "overlap": t.overlap, "wall_ms": t.wall_ms,
            "train_ms": t.train_ms, "local_ms": t.local_ms, "persist_ms": t.persist_ms,
            "network_wait_ms": t.network_wait_ms, "coordination_ms": t.coordination_ms,
            "network_wait_share": t.network_wait_share,
        })).collect::<Vec<_>>(),
        "rejected_updates": s.rejected_updates,
        "rejected_by_reason": s.rejected_by_reason.iter()
            .map(|r| (r.reason.clone(), serde_json::json!(r.count)))
            .collect::<serde_json::Map<_, _>>(),
        "paused": s.paused,
        "waiting": s.waiting,
        "reassigned_slices": s.reassigned_slices,
        "missing_slices": s.missing_slices,
        "disagreed_rounds": s.disagreed_rounds,
        "error": s.error,
        "out_dir": s.out_dir,
        "elapsed_secs": s.elapsed_secs,
        "checkpoint_root": s.checkpoint_root,
    })
}

/// Milliseconds as seconds, for the status display.
fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

fn print_status(s: &v1::RunStatusResponse) {
    if !s.known {
        println!("no run: start one with `potluck run start FILE` or join one with `potluck join`");
        if !s.paused.is_empty() {
            println!("paused:     {} (a run joined now starts paused)", s.paused);
        }
        return;
    }
    let name = if s.name.is_empty() {
        String::new()
    } else {
        format!(" ('{}')", s.name)
    };
    println!(
        "run:        {}{name}",
        if s.run_id.is_empty() {
            "(id not known yet)"
        } else {
            &s.run_id
        }
    );
    println!(
        "role:       {} (coordinator {})",
        s.role, s.coordinator_peer_id
    );
    println!("state:      {}", s.state);
    if !s.paused.is_empty() {
        println!("paused:     {}", s.paused);
    }
    if !s.waiting.is_empty() {
        println!("waiting:    {}", s.waiting);
    }
    if !s.error.is_empty() {
        println!("error:      {}", s.error);
    }
    let of = if s.rounds > 0 {
        format!(" of {}", s.rounds)
    } else {
        String::new()
    };
    println!("round:      {}{of}", s.round);
    if !s.committed_root.is_empty() {
        println!(
            "committed:  round {}, root {}",
            s.committed_round,
            short(&s.committed_root)
        );
    }
    println!(
        "loss:       train {}, eval {}",
        loss(s.train_loss),
        loss(s.eval_loss)
    );
    println!("peers:      {}", s.peers.len());
    for p in &s.peers {
        println!("            {p}");
    }
    println!(
        "traffic:    sent {}, received {} (daemon totals)",
        human_bytes(s.bytes_sent),
        human_bytes(s.bytes_received)
    );
    for (i, b) in s.round_bytes.iter().take(3).enumerate() {
        println!(
            "{}round {}: sent {}, received {}",
            if i == 0 {
                "per round:  "
            } else {
                "            "
            },
            b.round,
            human_bytes(b.sent),
            human_bytes(b.received)
        );
    }
    for (i, t) in s.round_timings.iter().take(3).enumerate() {
        println!(
            "{}round {}: {} wall = train {}, local {}, persist {}, network {} ({:.0}%), \
             coordination {}{}",
            if i == 0 {
                "timing:     "
            } else {
                "            "
            },
            t.round,
            secs(t.wall_ms),
            secs(t.train_ms),
            secs(t.local_ms),
            secs(t.persist_ms),
            secs(t.network_wait_ms),
            t.network_wait_share * 100.0,
            secs(t.coordination_ms),
            if t.overlap { " (overlapped)" } else { "" }
        );
    }
    if s.rejected_updates > 0 {
        let why: Vec<String> = s
            .rejected_by_reason
            .iter()
            .map(|r| format!("{} {}", r.count, r.reason))
            .collect();
        println!(
            "rejected:   {} updates ({})",
            s.rejected_updates,
            why.join(", ")
        );
    }
    if s.reassigned_slices > 0 || s.missing_slices > 0 {
        println!(
            "reducers:   {} slices reduced for a silent reducer, {} applied as zero",
            s.reassigned_slices, s.missing_slices
        );
    }
    if s.disagreed_rounds > 0 {
        println!(
            "disagreed:  {} rounds ended on another root than the committed one (resynced)",
            s.disagreed_rounds
        );
    }
    println!("elapsed:    {} s", s.elapsed_secs);
    if !s.checkpoint_root.is_empty() {
        println!("checkpoint: {} (root {})", s.out_dir, s.checkpoint_root);
    }
}

/// Prints a line whenever the run moves, until it ends; fails when the run failed.
async fn follow_run(c: &mut crate::control::ControlClient) -> anyhow::Result<()> {
    let mut last = None;
    loop {
        let s = c
            .run_status(v1::RunStatusRequest {})
            .await
            .map_err(|s| rpc("cannot read the run status", s))?
            .into_inner();
        let key = (s.state.clone(), s.round, s.committed_round);
        if last.as_ref() != Some(&key) {
            println!(
                "round {}/{}  committed {}  train {}  eval {}  peers {}  sent {}  received {}  {}",
                s.round,
                s.rounds,
                s.committed_round,
                loss(s.train_loss),
                loss(s.eval_loss),
                s.peers.len(),
                human_bytes(s.bytes_sent),
                human_bytes(s.bytes_received),
                s.state
            );
            last = Some(key);
        }
        if !s.active {
            if !s.error.is_empty() {
                anyhow::bail!("the run failed: {}", s.error);
            }
            if !s.committed_root.is_empty() {
                println!("finished; committed root {}", s.committed_root);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn data_dir_of(d: &Option<PathBuf>) -> PathBuf {
    d.clone()
        .unwrap_or_else(|| crate::config::Config::default().data_dir)
}

pub fn checkpoints(args: CheckpointsArgs) -> anyhow::Result<()> {
    let dir = data_dir_of(&args.data_dir);
    let reports = list_ledgers(&dir, args.run_id.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_ledger(r, &dir);
        }
    }
    let broken: Vec<String> = reports
        .iter()
        .filter_map(|r| match &r.chain {
            ChainVerdict::Broken { round, reason } => {
                Some(format!("run {} at round {round}: {reason}", short(&r.run)))
            }
            _ => None,
        })
        .collect();
    if !broken.is_empty() {
        anyhow::bail!("broken ledger chain: {}", broken.join("; "));
    }
    Ok(())
}

fn print_ledger(r: &LedgerReport, data_dir: &Path) {
    println!(
        "run {}  ({})",
        r.run,
        r.run_dir
            .strip_prefix(data_dir)
            .unwrap_or(&r.run_dir)
            .display()
    );
    if r.entries.is_empty() {
        println!("  no committed rounds in the ledger yet");
    } else {
        println!(
            "  {:>6}  {:<16}  {:<24}  {:>7}  {:>5}  checkpoint",
            "round", "root", "parent", "contrib", "sigs"
        );
    }
    for e in &r.entries {
        if let Some(err) = &e.error {
            println!("  {:>6}  unreadable: {err}", e.round);
            continue;
        }
        let parent = match (e.parent_round, &e.parent_root) {
            (Some(pr), Some(h)) => format!("{pr} {}", &h[..h.len().min(16)]),
            _ => "-".into(),
        };
        println!(
            "  {:>6}  {:<16}  {:<24}  {:>7}  {:>5}  {}",
            e.round,
            short(&e.root),
            parent,
            e.contributors,
            format!(
                "{}{}",
                e.signatures,
                if e.coordinator_signed { "" } else { "!" }
            ),
            if e.checkpoint_present {
                "present"
            } else {
                "pruned"
            }
        );
    }
    for f in &r.ignored {
        println!("  (not a ledger entry, ignored: {f})");
    }
    match &r.chain {
        ChainVerdict::Ok { entries, anchored } => println!(
            "  chain: OK ({entries} entries{})",
            if *anchored {
                ", anchored in the signed run manifest"
            } else {
                "; no run.pb found, so the genesis root and coordinator keys were not checked"
            }
        ),
        ChainVerdict::Empty => println!("  chain: empty"),
        ChainVerdict::Broken { round, reason } => {
            println!("  chain: BROKEN at round {round}: {reason}")
        }
    }
    // The listing checks the chain, not the files: point at the command that does.
    if let Some(e) = r.entries.iter().rev().find(|e| e.checkpoint_present) {
        println!(
            "  check a checkpoint's files: potluck verify {} --ledger {}",
            r.run_dir
                .join(potluck_coordinator::store::CHECKPOINTS_DIR)
                .join(format!("{:020}", e.round))
                .display(),
            super::checkpoint::ledger_dir(&r.run_dir).display()
        );
    }
}
