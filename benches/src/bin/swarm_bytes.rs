//! Bytes on the wire against eval loss on real text (issue 23): N replicas in one process
//! on one device (`potluck_benches::swarm_bytes`), trained on the corpus of the crates that
//! `Cargo.lock` pins (`potluck_benches::corpus`), in every mode asked for:
//!
//! - `a`: plain data parallel, f32 gradients reduced every step;
//! - `b`: DiLoCo with f32 pseudo-gradients every H steps;
//! - any codec spec (`int8`, `topk`, `sign`, `topk:CHUNK:K:BITS`, ...): DiLoCo with it.
//!
//! The same total tokens in every mode, one run per mode and seed. Prints the corpus (its
//! hashes and sizes) as the first JSON line, one JSON line per run, one summary line per
//! mode (ratios to (a) per seed, the worst seed's), then the table in markdown.
//!
//! Where `swarm_bytes` differs from `diloco_vs_dp`: that one runs real daemons over QUIC on
//! loopback (slow, and bound to the synthetic corpus); this one hands frames over in memory
//! and so scales to larger models and real text on one GPU.
//!
//! Run (CPU, tiny): `cargo run --release -p potluck-benches --bin swarm_bytes -- --help`.
//! On CUDA: build with `--features cuda` and pass `--device cuda`.

use anyhow::{Context, Result, bail};
use potluck_benches::corpus::{Corpus, CorpusSpec};
use potluck_benches::swarm_bytes::{Measured, Mode, Settings, mean_sd, run, table};
use potluck_worker::{Dataset, DeviceSpec, ModelConfig};
use serde_json::json;

const HELP: &str = "swarm_bytes [--replicas N] [--seeds 1,2,3] [--modes a,b,int8,topk,sign] \
[--model tiny|small|base] [--inner-steps H] [--total-tokens N] [--batch B] [--seq T] [--lr X] \
[--warmup N] [--outer-lr X] [--outer-momentum X] [--eval-batches N] [--device cpu|cuda|cuda:N] \
[--lock Cargo.lock] [--registry-src DIR] [--crates a,b,c] [--eval-permille N] \
[--max-train-bytes N (a prefix of the training split; 0: all)] [--corpus-only true] \
[--save-corpus DIR] [--load-corpus DIR (a saved corpus instead of the crate sources)]";

struct Opts {
    settings: Settings,
    seeds: Vec<u64>,
    modes: Vec<Mode>,
    corpus: CorpusSpec,
    max_train_bytes: usize,
    /// Print the corpus line and stop.
    corpus_only: bool,
    save_corpus: Option<std::path::PathBuf>,
    load_corpus: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Opts> {
    let mut s = Settings {
        replicas: 3,
        model: ModelConfig::tiny(),
        model_name: "tiny".into(),
        inner_steps: 20,
        total_tokens: 3 * 8 * 64 * 200,
        batch: 8,
        seq: 64,
        lr: 3e-3,
        warmup: 20,
        outer_lr: 1.0,
        outer_momentum: 0.3,
        eval_batches: 16,
        device: DeviceSpec::Cpu,
    };
    let mut seeds = vec![1, 2, 3];
    let mut modes = "a,b,int8,topk,sign".to_string();
    let mut corpus = CorpusSpec::new("Cargo.lock".into());
    let mut max_train_bytes = 0;
    let mut corpus_only = false;
    let (mut save_corpus, mut load_corpus) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{HELP}");
            std::process::exit(0);
        }
        let v = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{HELP}"))?;
        let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{flag} {v}: {e}");
        match flag.as_str() {
            "--replicas" => s.replicas = v.parse().map_err(|e| bad(&e))?,
            "--seeds" => {
                seeds = v
                    .split(',')
                    .map(|x| x.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(&e))?
            }
            "--modes" => modes = v,
            "--model" => {
                s.model = match v.as_str() {
                    "tiny" => ModelConfig::tiny(),
                    "small" => ModelConfig::small(),
                    "base" => ModelConfig::base(),
                    _ => bail!("--model takes tiny, small or base, not {v}"),
                };
                s.model_name = v;
            }
            "--inner-steps" => s.inner_steps = v.parse().map_err(|e| bad(&e))?,
            "--total-tokens" => s.total_tokens = v.parse().map_err(|e| bad(&e))?,
            "--batch" => s.batch = v.parse().map_err(|e| bad(&e))?,
            "--seq" => s.seq = v.parse().map_err(|e| bad(&e))?,
            "--lr" => s.lr = v.parse().map_err(|e| bad(&e))?,
            "--warmup" => s.warmup = v.parse().map_err(|e| bad(&e))?,
            "--outer-lr" => s.outer_lr = v.parse().map_err(|e| bad(&e))?,
            "--outer-momentum" => s.outer_momentum = v.parse().map_err(|e| bad(&e))?,
            "--eval-batches" => s.eval_batches = v.parse().map_err(|e| bad(&e))?,
            "--device" => {
                s.device = match v.as_str() {
                    "cpu" => DeviceSpec::Cpu,
                    "cuda" => DeviceSpec::Cuda(0),
                    d => match d.strip_prefix("cuda:") {
                        Some(n) => DeviceSpec::Cuda(n.parse().map_err(|e| bad(&e))?),
                        None => bail!("--device takes cpu, cuda or cuda:N, not {v}"),
                    },
                }
            }
            "--lock" => corpus.lock = v.into(),
            "--registry-src" => corpus.registry_src = v.into(),
            "--crates" => corpus.only = Some(v.split(',').map(|c| c.trim().to_string()).collect()),
            "--eval-permille" => corpus.eval_permille = v.parse().map_err(|e| bad(&e))?,
            "--max-train-bytes" => max_train_bytes = v.parse().map_err(|e| bad(&e))?,
            "--corpus-only" => corpus_only = v.parse().map_err(|e| bad(&e))?,
            "--save-corpus" => save_corpus = Some(v.into()),
            "--load-corpus" => load_corpus = Some(v.into()),
            _ => bail!("unknown flag {flag}\n{HELP}"),
        }
    }
    if seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    if !(1..1000).contains(&corpus.eval_permille) {
        bail!("--eval-permille must be in 1..1000");
    }
    let modes = modes
        .split(',')
        .map(Mode::parse)
        .collect::<Result<Vec<_>>>()?;
    s.steps()?;
    Ok(Opts {
        settings: s,
        seeds,
        modes,
        corpus,
        max_train_bytes,
        corpus_only,
        save_corpus,
        load_corpus,
    })
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let s = &o.settings;
    let corpus = match &o.load_corpus {
        Some(dir) => Corpus::load(dir).context("loading the saved corpus")?,
        None => Corpus::build(&o.corpus).context("building the corpus")?,
    };
    if let Some(dir) = &o.save_corpus {
        corpus.save(dir).context("saving the corpus")?;
    }
    let mut train = corpus.train.clone();
    if o.max_train_bytes > 0 {
        train.truncate(o.max_train_bytes);
    }
    println!(
        "{}",
        json!({
            "bench": "swarm_bytes",
            "corpus_info": corpus.describe(),
            "train_bytes_used": train.len(),
        })
    );
    if o.corpus_only {
        return Ok(());
    }
    let tok = |b: &[u8]| b.iter().map(|&x| u32::from(x)).collect::<Vec<u32>>();
    let data = Dataset::from_tokens(tok(&train), tok(&corpus.eval), 256, s.replicas as u64)?;
    let mut results: Vec<Measured> = Vec::new();
    for &mode in &o.modes {
        for &seed in &o.seeds {
            let m = run(&data, s, mode, seed)
                .with_context(|| format!("mode {}, seed {seed}", mode.label()))?;
            let mut line = m.to_json(s);
            line["train_blake3"] = json!(corpus.train_hash());
            line["eval_blake3"] = json!(corpus.eval_hash());
            line["device"] = json!(format!("{:?}", s.device));
            println!("{line}");
            results.push(m);
        }
    }
    for &mode in &o.modes {
        let runs: Vec<&Measured> = results.iter().filter(|r| r.mode == mode).collect();
        let (bytes, bytes_sd) = mean_sd(&runs.iter().map(|r| r.bytes() as f64).collect::<Vec<_>>());
        let (loss, loss_sd) = mean_sd(&runs.iter().map(|r| r.eval_loss).collect::<Vec<_>>());
        // Per seed against (a) of the same seed; the goal asks for every seed.
        let per_seed: Vec<(f64, f64)> = runs
            .iter()
            .filter_map(|r| {
                results
                    .iter()
                    .find(|a| a.mode == Mode::DataParallel && a.seed == r.seed)
                    .map(|a| {
                        (
                            a.bytes() as f64 / r.bytes() as f64,
                            r.eval_loss / a.eval_loss,
                        )
                    })
            })
            .collect();
        let worst_ratio = per_seed.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let worst_loss = per_seed
            .iter()
            .map(|p| p.1)
            .fold(f64::NEG_INFINITY, f64::max);
        let min_drop = runs
            .iter()
            .filter_map(|r| r.last_tenth_drop())
            .fold(f64::INFINITY, f64::min);
        let complete = per_seed.len() == o.seeds.len();
        println!(
            "{}",
            json!({
                "bench": "swarm_bytes",
                "summary": mode.label(),
                "seeds": o.seeds,
                "bytes_on_wire_mean": bytes,
                "bytes_on_wire_sd": bytes_sd,
                "eval_loss_mean": loss,
                "eval_loss_sd": loss_sd,
                "worst_seed_bytes_ratio_a_over_this": complete.then_some(worst_ratio),
                "worst_seed_loss_ratio_this_over_a": complete.then_some(worst_loss),
                "goal_3000x_within_2pct": complete.then_some(worst_ratio >= 3000.0 && worst_loss <= 1.02),
                "min_last_tenth_drop": min_drop.is_finite().then_some(min_drop),
                "train_blake3": corpus.train_hash(),
            })
        );
    }
    if let Some(a) = results.iter().find(|r| r.mode == Mode::DataParallel)
        && a.last_tenth_drop().is_some_and(|d| d < 0.01)
    {
        eprintln!(
            "warning: (a) is no longer learning (its eval loss fell less than 1% over the last \
             tenth of the steps, seed {}): the comparison says little",
            a.seed
        );
    }
    println!(
        "\ncorpus train blake3 {} eval blake3 {}, model {}, {} replicas, H {}, {} tokens, \
         device {:?}\n",
        corpus.train_hash(),
        corpus.eval_hash(),
        s.model_name,
        s.replicas,
        s.inner_steps,
        s.total_tokens,
        s.device
    );
    print!("{}", table(&results));
    Ok(())
}
