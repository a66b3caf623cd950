//! The `potluck` command line: one clap `Subcommand` enum and one function per subcommand.
//! To add a subcommand, add a variant to [`Command`] with its own `Args` struct and an arm in
//! [`run`]; commands that talk to a running daemon take [`QueryArgs`] and use
//! [`connect`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use potluck_proto::v1;

use crate::capability::figure;
use crate::config::{Config, LogFormat, RawValue, Source};
use crate::control::{self, ControlClient};
use crate::node::Node;

#[derive(Debug, Parser)]
#[command(
    name = "potluck",
    version,
    about = "Potluck: peer-to-peer training daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (settings: --config file, then POTLUCK_* variables,
    /// then flags).
    Daemon(DaemonArgs),
    /// Show the local daemon's identity, addresses, swarm and capabilities.
    Status(QueryArgs),
    /// List the peers the local daemon knows, with their capability records.
    Peers(QueryArgs),
    /// Print the local daemon's peer id.
    Id(QueryArgs),
    /// Manage a private swarm: invites, members, joining.
    #[command(subcommand)]
    Swarm(SwarmCommand),
    /// Start a local swarm of daemons on loopback that trains a small MoE model on the
    /// built-in corpus, and report loss, bytes exchanged and the final checkpoint's root.
    Demo(crate::train::cli::DemoArgs),
    /// Generate text from a model on disk: a Hugging Face base (optionally with PEFT
    /// adapters) or a Potluck checkpoint.
    Sample(crate::sample::SampleArgs),
    /// Check a checkpoint directory offline: every chunk, header, file hash and signature.
    Verify(crate::train::cli::VerifyArgs),
    /// Start, join or watch a training run on the local daemon.
    #[command(subcommand)]
    Run(crate::train::cli::RunCommand),
    /// Print one string that admits a friend to the run this daemon coordinates (run id,
    /// coordinator, addresses, and a one-time membership invite in a private swarm).
    Invite(crate::train::cli::InviteArgs),
    /// Join the run of a string printed by `potluck invite` (joins the swarm first when the
    /// string carries a membership invite), then train in the background.
    Join(crate::train::cli::JoinArgs),
    /// List the ledgers of the runs in the data dir (works without a daemon) and check each
    /// chain of checkpoints.
    Checkpoints(crate::train::cli::CheckpointsArgs),
    /// Pause training on the local daemon until `potluck resume`: its replica leaves the
    /// run's rounds (nobody waits for it), saves its state and frees the device.
    Pause(QueryArgs),
    /// Resume training: the replica rejoins its run with its saved state (inside a window
    /// of the config's pause_schedule, until that window ends).
    Resume(QueryArgs),
    /// Coordinate a run on the local daemon without training in it (a public swarm's
    /// coordinator), and follow it to the end: `potluck run start FILE --no-replica --follow`.
    Coordinator {
        #[command(flatten)]
        q: QueryArgs,
        /// The run manifest (TOML).
        file: PathBuf,
        /// A peer that takes the run over if this daemon disappears (repeat for more).
        #[arg(long = "successor", value_name = "PEER_ID")]
        successors: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// TOML config file.
    #[arg(long, env = "POTLUCK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Identity, state and control socket live here.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (repeatable); default QUIC and TCP on port 4001, all interfaces.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Peer to bootstrap from (repeatable), e.g. /ip4/1.2.3.4/udp/4001/quic-v1/p2p/12D3...
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Public address to announce (repeatable), e.g. /ip4/203.0.113.7/udp/4001/quic-v1.
    #[arg(long, value_name = "MULTIADDR")]
    pub external: Vec<String>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// human or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve as a circuit relay for peers behind NAT.
    #[arg(long)]
    pub relay_server: bool,
    /// Own a private swarm closed by membership.
    #[arg(long)]
    pub private: bool,
    /// Also serve the control API on this loopback address (token in <data_dir>/control.token).
    #[arg(long, value_name = "IP:PORT")]
    pub control_tcp: Option<String>,
    /// Serve Prometheus metrics (/metrics), the JSON state (/api/state) and the dashboard
    /// (/) here: `on` (127.0.0.1:9464), `off`, or IP:PORT; a non-loopback address requires
    /// the bearer token in <data_dir>/http.token.
    #[arg(long, value_name = "IP:PORT|on|off")]
    pub http_listen: Option<String>,
    /// Train on this device: cpu, cuda (the first GPU) or cuda:N (needs a `cuda` build).
    #[arg(long, value_name = "cpu|cuda|cuda:N")]
    pub device: Option<String>,
}

/// Options shared by every command that talks to a running daemon.
#[derive(Debug, Args, Clone)]
pub struct QueryArgs {
    /// The daemon's data dir.
    #[arg(long, env = "POTLUCK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Talk to the daemon over loopback TCP instead of its Unix socket; the token is read
    /// from POTLUCK_CONTROL_TOKEN or <data_dir>/control.token.
    #[arg(long, value_name = "IP:PORT")]
    pub control_tcp: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum SwarmCommand {
    /// Owner: create a one-time invite.
    Invite {
        #[command(flatten)]
        q: QueryArgs,
        /// How long the invite stays valid, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Owner: revoke an unused invite by its id.
    Revoke {
        #[command(flatten)]
        q: QueryArgs,
        invite_id: String,
    },
    /// Owner: remove a member.
    Remove {
        #[command(flatten)]
        q: QueryArgs,
        peer_id: String,
    },
    /// Join the private swarm of an invite.
    Join {
        #[command(flatten)]
        q: QueryArgs,
        invite: String,
    },
}

/// Builds the daemon config from the layers, failing on the first bad value.
pub fn daemon_config(
    args: &DaemonArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Config> {
    let mut c = Config::default();
    if let Some(path) = &args.config {
        c.apply_file(path)?;
    }
    c.apply_env(env)?;
    let flag = Source::Flag;
    if let Some(d) = &args.data_dir {
        c.set(
            "data_dir",
            RawValue::Str(d.to_string_lossy().into_owned()),
            &flag,
        )?;
    }
    if !args.listen.is_empty() {
        c.set("listen", RawValue::List(args.listen.clone()), &flag)?;
    }
    if !args.bootstrap.is_empty() {
        c.set("bootstrap", RawValue::List(args.bootstrap.clone()), &flag)?;
    }
    if !args.external.is_empty() {
        c.set("external", RawValue::List(args.external.clone()), &flag)?;
    }
    if args.no_mdns {
        c.set("mdns", RawValue::Bool(false), &flag)?;
    }
    if let Some(f) = &args.log_format {
        c.set("log_format", RawValue::Str(f.clone()), &flag)?;
    }
    if args.relay_server {
        c.set("relay_server", RawValue::Bool(true), &flag)?;
    }
    if args.private {
        c.set("private", RawValue::Bool(true), &flag)?;
    }
    if let Some(t) = &args.control_tcp {
        c.set("control_tcp", RawValue::Str(t.clone()), &flag)?;
    }
    if let Some(h) = &args.http_listen {
        c.set("http_listen", RawValue::Str(h.clone()), &flag)?;
    }
    if let Some(d) = &args.device {
        c.set("device", RawValue::Str(d.clone()), &flag)?;
    }
    Ok(c)
}

/// Logging to stderr; `POTLUCK_LOG` overrides `default` (an `EnvFilter` string).
fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POTLUCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => run_daemon(args).await,
        Command::Status(q) => status(q).await,
        Command::Peers(q) => peers(q).await,
        Command::Id(q) => id(q).await,
        Command::Swarm(cmd) => swarm(cmd).await,
        Command::Demo(args) => {
            // The demo draws its own progress view; log lines would only bury it, so they
            // come with -v, RUST_LOG or POTLUCK_LOG only.
            let rust_log = std::env::var("RUST_LOG").ok();
            let filter = match (&rust_log, args.verbose) {
                (Some(f), _) => f.as_str(),
                (None, true) => "info,libp2p_kad=error,potluck::timing=warn",
                (None, false) => "warn,libp2p_kad=error",
            };
            init_logging(LogFormat::Human, filter);
            crate::train::cli::demo(args).await
        }
        Command::Verify(args) => crate::train::cli::verify(args),
        Command::Sample(args) => crate::sample::run(args),
        Command::Run(cmd) => crate::train::cli::run(cmd).await,
        Command::Invite(args) => crate::train::cli::invite(args).await,
        Command::Join(args) => crate::train::cli::join(args).await,
        Command::Checkpoints(args) => crate::train::cli::checkpoints(args),
        Command::Pause(q) => pause(q, true).await,
        Command::Resume(q) => pause(q, false).await,
        Command::Coordinator {
            q,
            file,
            successors,
        } => {
            crate::train::cli::run(crate::train::cli::RunCommand::Start {
                q,
                file,
                out: None,
                follow: true,
                successors,
                no_replica: true,
                fresh: false,
            })
            .await
        }
    }
}

async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let config = daemon_config(&args, std::env::vars())?;
    init_logging(config.log_format, "info,libp2p_kad=error");
    let node = Node::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// The data dir a query addresses (the flag, POTLUCK_DATA_DIR, or the default).
pub fn data_dir(q: &QueryArgs) -> PathBuf {
    q.data_dir
        .clone()
        .unwrap_or_else(|| Config::default().data_dir)
}

/// Connects to the daemon a query addresses.
pub async fn connect(q: &QueryArgs) -> anyhow::Result<ControlClient> {
    let dir = data_dir(q);
    match q.control_tcp {
        Some(addr) => {
            let token = match std::env::var("POTLUCK_CONTROL_TOKEN") {
                Ok(t) => t,
                Err(_) => std::fs::read_to_string(dir.join(control::TOKEN_FILE))
                    .with_context(|| {
                        format!(
                            "no POTLUCK_CONTROL_TOKEN and cannot read {}",
                            dir.join(control::TOKEN_FILE).display()
                        )
                    })?
                    .trim()
                    .to_string(),
            };
            Ok(control::connect_tcp(addr, token).await?)
        }
        None => Ok(control::connect_unix(&dir).await?),
    }
}

fn print_json(v: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn caps_json(c: &v1::Capabilities) -> serde_json::Value {
    serde_json::json!({
        "protocol_version": c.protocol_version,
        "software_version": c.software_version,
        "device_kind": v1::DeviceKind::try_from(c.device_kind)
            .map(|k| k.as_str_name().to_string())
            .unwrap_or_else(|_| format!("UNKNOWN({})", c.device_kind)),
        "device_name": c.device_name,
        "memory_bytes": c.memory_bytes,
        "cpu_count": c.cpu_count,
        "train_tokens_per_sec": c.train_tokens_per_sec,
        "train_tokens_per_sec_measured": c.train_tokens_per_sec > 0.0,
        "bandwidth_bytes_per_sec": c.bandwidth_bytes_per_sec,
        "bandwidth_measured": c.bandwidth_bytes_per_sec > 0.0,
    })
}

fn caps_line(c: &v1::Capabilities) -> String {
    format!(
        "{} ({}), {} CPUs, {:.1} GiB, train {}, bandwidth {}, potluck {} (protocol {})",
        v1::DeviceKind::try_from(c.device_kind)
            .map(|k| k
                .as_str_name()
                .trim_start_matches("DEVICE_KIND_")
                .to_lowercase())
            .unwrap_or_else(|_| "unknown".into()),
        c.device_name,
        c.cpu_count,
        c.memory_bytes as f64 / (1u64 << 30) as f64,
        figure(c.train_tokens_per_sec, "tokens/s"),
        figure(c.bandwidth_bytes_per_sec / 1e6, "MB/s"),
        c.software_version,
        c.protocol_version,
    )
}

/// `upload 1.0 MB/s (12.3 MB sent, waited 4.1 s), download none, memory 512 MiB, CPU threads all`
fn caps_summary(c: &v1::ResourceCaps) -> String {
    let rate = |cap: u64, bytes: u64, waited: f64, verb: &str| {
        if cap == 0 {
            "none".to_string()
        } else {
            format!(
                "{:.2} MB/s ({:.1} MB {verb}, waited {waited:.1} s)",
                cap as f64 / 1e6,
                bytes as f64 / 1e6
            )
        }
    };
    format!(
        "upload {}, download {}, memory {}, CPU threads {}",
        rate(
            c.upload_bytes_per_sec,
            c.uploaded_bytes,
            c.upload_wait_secs,
            "sent"
        ),
        rate(
            c.download_bytes_per_sec,
            c.downloaded_bytes,
            c.download_wait_secs,
            "received"
        ),
        match c.memory_limit_mb {
            0 => "no cap".to_string(),
            mb => format!("{mb} MiB"),
        },
        match c.cpu_threads {
            0 => "one per core".to_string(),
            n => n.to_string(),
        }
    )
}

async fn status(q: QueryArgs) -> anyhow::Result<()> {
    let s = connect(&q)
        .await?
        .status(v1::StatusRequest {})
        .await
        .map_err(control::ControlError::from)?
        .into_inner();
    if q.json {
        return print_json(serde_json::json!({
            "peer_id": s.peer_id,
            "software_version": s.software_version,
            "protocol_version": s.protocol_version,
            "listen_addrs": s.listen_addrs,
            "external_addrs": s.external_addrs,
            "connected_peers": s.connected_peers,
            "known_peers": s.known_peers,
            "uptime_secs": s.uptime_secs,
            "swarm": s.swarm,
            "paused": s.paused,
            "capabilities": s.capabilities.as_ref().map(caps_json),
            "inbound": s.inbound.as_ref().map(|i| serde_json::json!({
                "pending_tcp": i.pending_tcp,
                "pending_quic": i.pending_quic,
                "pending_other": i.pending_other,
                "established": i.established,
                "denied": i.denied,
            })),
            "caps": s.caps.as_ref().map(|c| serde_json::json!({
                "upload_bytes_per_sec": c.upload_bytes_per_sec,
                "download_bytes_per_sec": c.download_bytes_per_sec,
                "uploaded_bytes": c.uploaded_bytes,
                "downloaded_bytes": c.downloaded_bytes,
                "upload_wait_secs": c.upload_wait_secs,
                "download_wait_secs": c.download_wait_secs,
                "memory_limit_mb": c.memory_limit_mb,
                "cpu_threads": c.cpu_threads,
            })),
        }));
    }
    println!("peer id:     {}", s.peer_id);
    println!("swarm:       {}", s.swarm);
    println!(
        "peers:       {} connected, {} known",
        s.connected_peers, s.known_peers
    );
    if let Some(i) = &s.inbound {
        println!(
            "inbound:     {} established, {} handshaking (TCP {}, QUIC {}, other {}), {} denied by limits",
            i.established,
            i.pending_tcp + i.pending_quic + i.pending_other,
            i.pending_tcp,
            i.pending_quic,
            i.pending_other,
            i.denied
        );
    }
    if let Some(c) = &s.caps {
        println!("caps:        {}", caps_summary(c));
    }
    println!("uptime:      {:?}", Duration::from_secs(s.uptime_secs));
    if !s.paused.is_empty() {
        println!("training:    {}", s.paused);
    }
    if let Some(c) = &s.capabilities {
        println!("this peer:   {}", caps_line(c));
    }
    for a in &s.listen_addrs {
        println!("listening:   {a}");
    }
    for a in &s.external_addrs {
        println!("external:    {a}");
    }
    Ok(())
}

/// `potluck pause` (`pause`) and `potluck resume`.
async fn pause(q: QueryArgs, pause: bool) -> anyhow::Result<()> {
    let mut c = connect(&q).await?;
    let r = if pause {
        c.pause(v1::PauseRequest {}).await
    } else {
        c.resume(v1::ResumeRequest {}).await
    }
    .map_err(control::ControlError::from)?
    .into_inner();
    if q.json {
        return print_json(serde_json::json!({
            "paused": r.paused,
            "reason": r.reason,
            "schedule": r.schedule,
        }));
    }
    match (pause, r.paused) {
        (true, _) => println!(
            "training paused: this daemon's replica leaves its run's rounds and frees its \
             device; `potluck resume` rejoins with its state"
        ),
        (false, false) => println!("training resumed: the replica rejoins its run's rounds"),
        (false, true) => println!("still paused: {}", r.reason),
    }
    if !r.schedule.is_empty() {
        println!("pause schedule: {}", r.schedule);
    }
    Ok(())
}

async fn peers(q: QueryArgs) -> anyhow::Result<()> {
    let r = connect(&q)
        .await?
        .peers(v1::PeersRequest {})
        .await
        .map_err(control::ControlError::from)?
        .into_inner();
    if q.json {
        let list: Vec<_> = r
            .peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "peer_id": p.peer_id,
                    "addrs": p.addrs,
                    "connected": p.connected,
                    "capabilities": p.capabilities.as_ref().map(caps_json),
                    "record_age_ms": p.record_age_ms,
                })
            })
            .collect();
        return print_json(serde_json::Value::Array(list));
    }
    if r.peers.is_empty() {
        println!("no peers known yet");
    }
    for p in &r.peers {
        let state = if p.connected { "connected" } else { "known" };
        match &p.capabilities {
            Some(c) => println!("{}  {state}  {}", p.peer_id, caps_line(c)),
            None => println!("{}  {state}  (no capability record yet)", p.peer_id),
        }
    }
    Ok(())
}

async fn id(q: QueryArgs) -> anyhow::Result<()> {
    let r = connect(&q)
        .await?
        .id(v1::IdRequest {})
        .await
        .map_err(control::ControlError::from)?
        .into_inner();
    if q.json {
        return print_json(serde_json::json!({
            "peer_id": r.peer_id,
            "listen_addrs": r.listen_addrs,
        }));
    }
    println!("{}", r.peer_id);
    Ok(())
}

async fn swarm(cmd: SwarmCommand) -> anyhow::Result<()> {
    match cmd {
        SwarmCommand::Invite { q, ttl_secs } => {
            let r = connect(&q)
                .await?
                .create_invite(v1::CreateInviteRequest { ttl_secs })
                .await
                .map_err(control::ControlError::from)?
                .into_inner();
            if q.json {
                return print_json(serde_json::json!({
                    "invite": r.invite,
                    "invite_id": r.invite_id,
                    "expires_at_ms": r.expires_at_ms,
                }));
            }
            println!("{}", r.invite);
            eprintln!(
                "invite id {} (revoke with `potluck swarm revoke {}`)",
                r.invite_id, r.invite_id
            );
        }
        SwarmCommand::Revoke { q, invite_id } => {
            connect(&q)
                .await?
                .revoke_invite(v1::RevokeInviteRequest { invite_id })
                .await
                .map_err(control::ControlError::from)?;
        }
        SwarmCommand::Remove { q, peer_id } => {
            connect(&q)
                .await?
                .remove_member(v1::RemoveMemberRequest { peer_id })
                .await
                .map_err(control::ControlError::from)?;
        }
        SwarmCommand::Join { q, invite } => {
            let r = connect(&q)
                .await?
                .join(v1::JoinRequest { invite })
                .await
                .map_err(control::ControlError::from)?
                .into_inner();
            if q.json {
                return print_json(serde_json::json!({ "owner_peer_id": r.owner_peer_id }));
            }
            println!("joined the private swarm of {}", r.owner_peer_id);
        }
    }
    Ok(())
}
