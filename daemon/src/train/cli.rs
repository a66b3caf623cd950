//! The training commands of the `potluck` binary: `demo` and `verify`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use potluck_coordinator::verify::{VerifyOptions, verify_checkpoint_dir};

use super::demo::{self, DemoOptions};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of daemons in the local swarm.
    #[arg(long, default_value_t = 3)]
    pub peers: usize,
    /// Rounds to train (default: the embedded run's).
    #[arg(long)]
    pub rounds: Option<u64>,
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
        "trained {} rounds on {} peers ({} parameters) in {:.0} s",
        report.rounds, report.peers, report.params, report.seconds
    );
    match report.entropy_floor_nats {
        Some(h) => println!(
            "final eval loss: {:.4} nats/byte (the corpus's entropy floor is {h:.4}; {:.1}% above it)",
            report.eval_loss,
            (report.eval_loss as f64 / h - 1.0) * 100.0
        ),
        None => println!("final eval loss: {:.4} nats/token", report.eval_loss),
    }
    println!(
        "bytes on the wire: {} (plain data parallel would have sent {}: {:.0}x less)",
        human_bytes(report.bytes_on_wire),
        human_bytes(report.plain_data_parallel_bytes),
        report.reduction_factor
    );
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
    if args.json {
        let out = serde_json::json!({
            "ok": true,
            "run_id": v.run_id.to_hex(),
            "round": v.round,
            "root": v.root.to_hex(),
            "manifest_id": v.manifest_id.to_hex(),
            "coordinator_key": hex::encode(v.coordinator_key),
            "replica_signers": v.replica_signers,
            "bytes_checked": v.bytes_checked,
            "chain_len": v.chain_len,
        });
        println!("{out}");
    } else {
        println!(
            "ok: round {} of run {}, root {}, {} bytes checked, signed by coordinator {}{}",
            v.round,
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
    }
    Ok(())
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

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}
