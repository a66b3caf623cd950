//! LoRA and QLoRA fine-tuning throughput and memory on a frozen Llama-format base (issue 20);
//! `benches/gpu/torch_peft.py` runs the same workload in PyTorch + `transformers` + PEFT and
//! `benches/gpu/lora.sh` runs both in one device call.
//!
//! Usage: `gpu_lora_bench [--shape tinyllama|tiny] [--base bf16|nf4|int8] [--checkpoint]
//! [--batch N] [--seq N] [--rank N] [--alpha X] [--dropout P] [--targets a,b,..] [--lr X]
//! [--device cpu|cuda] [--warmup N] [--steps N] [--base-dir DIR]`. Prints one JSON line.
//!
//! The base is random (`adapters::write_random_llama`, f32 on disk) of `--shape`: `tinyllama`
//! is TinyLlama-1.1B's (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 key/value
//! heads, vocabulary 32,000, RoPE theta 10,000, untied head: 1.1B parameters), `tiny` is for
//! the CPU, where CI runs this binary's tests. `--base-dir` keeps the written base for the
//! next run (a base already there is reused when its config has the shape), so a script
//! writes the 4.4 GB of f32 once. The base loads in bf16 (`tiny` on the CPU: f32) and,
//! with `--base nf4|int8`, its projections are quantised (`hf::quant`; embedding, norms and
//! head stay bf16). LoRA defaults are the common PEFT recipe: rank 16, alpha 32, dropout
//! 0.05 on q, k, v, o, gate, up and down. One step is `HfModel::train_grads` on `batch`
//! random sequences of `seq` tokens (each predicts the next: `seq - 1` targets a row, as
//! `transformers` with `labels = input_ids`), then the worker's AdamW (f32 adapters and
//! moments, clipping at 1.0, weight decay 0.01, betas 0.9/0.95), as an adapter replica
//! steps; `--checkpoint` recomputes each decoder layer in the backward pass
//! (`Checkpointing::Layers`).
//!
//! Memory (CUDA) is read as the other GPU benchmarks read it: the GPU's use after the timed
//! steps, the worker's pool keeping its peak, so the peak reservation (`memory_gib`,
//! comparable to PyTorch's `max_memory_reserved`). Loading a quantised base passes through
//! its bf16 weights; the pool is trimmed after the load so that transient is not counted.
//! `context_gib` is the use before anything was allocated (the CUDA context, which PyTorch's
//! counters leave out), `load_gib` the use after the load and trim.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use potluck_worker::adapters::{LlamaShape, write_random_llama};
use potluck_worker::hf::{Checkpointing, HfConfig, HfLoraConfig, QuantFormat};
use potluck_worker::{AdamW, DeviceSpec, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The targets of `--targets`' default, PEFT's names.
const ALL_PROJECTIONS: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    shape: String,
    base: Option<QuantFormat>,
    checkpointing: Checkpointing,
    batch: usize,
    seq: usize,
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: Vec<String>,
    lr: f32,
    device: DeviceSpec,
    warmup: usize,
    steps: usize,
    base_dir: Option<PathBuf>,
}

/// `v` as a count of `flag` (`--warmup` may be 0).
fn count(flag: &str, v: &str) -> Result<usize> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n > 0 || flag == "--warmup")
        .with_context(|| format!("{flag} takes a positive number"))
}

/// `v` as the finite number of `flag`.
fn float(flag: &str, v: &str) -> Result<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite())
        .with_context(|| format!("{flag} takes a number"))
}

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut a = Args {
        shape: "tinyllama".into(),
        base: None,
        checkpointing: Checkpointing::Off,
        batch: 1,
        seq: 2048,
        rank: 16,
        alpha: 32.0,
        dropout: 0.05,
        targets: ALL_PROJECTIONS.split(',').map(String::from).collect(),
        lr: 2e-4,
        device: DeviceSpec::Cpu,
        warmup: 2,
        steps: 5,
        base_dir: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--shape" => a.shape = value()?,
            "--base" => {
                a.base = match value()?.as_str() {
                    "bf16" => None,
                    "nf4" => Some(QuantFormat::Nf4),
                    "int8" => Some(QuantFormat::Int8),
                    other => bail!("unknown base format {other:?} (use bf16, nf4 or int8)"),
                }
            }
            "--checkpoint" => a.checkpointing = Checkpointing::Layers,
            "--batch" => a.batch = count(flag, &value()?)?,
            "--seq" => a.seq = count(flag, &value()?)?,
            "--rank" => a.rank = count(flag, &value()?)?,
            "--warmup" => a.warmup = count(flag, &value()?)?,
            "--steps" => a.steps = count(flag, &value()?)?,
            "--alpha" => a.alpha = float(flag, &value()?)?,
            "--dropout" => a.dropout = float(flag, &value()?)?,
            "--lr" => a.lr = float(flag, &value()?)? as f32,
            "--targets" => a.targets = value()?.split(',').map(String::from).collect(),
            "--base-dir" => a.base_dir = Some(value()?.into()),
            "--device" => {
                a.device = match value()?.as_str() {
                    "cpu" => DeviceSpec::Cpu,
                    "cuda" => DeviceSpec::Cuda(0),
                    other => bail!("unknown device {other:?} (use cpu or cuda)"),
                }
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.seq < 2 {
        bail!("--seq must be at least 2 (each token predicts the next)");
    }
    Ok(a)
}

/// The base of `name`, with positions for `seq` tokens.
fn shape(name: &str, seq: usize) -> Result<LlamaShape> {
    let s = match name {
        // TinyLlama/TinyLlama-1.1B's config.json.
        "tinyllama" => LlamaShape {
            vocab: 32_000,
            hidden: 2048,
            intermediate: 5632,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            max_positions: 2048,
        },
        "tiny" => LlamaShape {
            vocab: 256,
            hidden: 64,
            intermediate: 176,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_positions: 64,
        },
        other => bail!("unknown shape {other:?} (use tinyllama or tiny)"),
    };
    Ok(LlamaShape {
        max_positions: s.max_positions.max(seq),
        ..s
    })
}

/// Whether the base in `dir` has `s`'s shape (and enough positions).
fn matches(dir: &Path, s: &LlamaShape) -> Result<bool> {
    let path = dir.join(potluck_worker::hf::CONFIG_FILE);
    if !path.exists() || !dir.join("model.safetensors").exists() {
        return Ok(false);
    }
    let c = HfConfig::from_file(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(c.vocab == s.vocab
        && c.hidden == s.hidden
        && c.intermediate == s.intermediate
        && c.layers == s.layers
        && c.heads == s.heads
        && c.kv_heads == s.kv_heads
        && c.max_positions >= s.max_positions)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gib(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| b as f64 / (1u64 << 30) as f64)
}

/// Bytes in use on the GPU of `device` (`None` on the CPU).
fn memory(device: &Device) -> Result<Option<u64>> {
    Ok(potluck_worker::device_memory(device)?.map(|(used, _)| used))
}

fn run(a: &Args) -> Result<serde_json::Value> {
    let shape = shape(&a.shape, a.seq)?;
    let device = a.device.device().context("opening the device")?;
    let context_mem = memory(&device)?;
    // A temporary base lives until the end of the run.
    let (_tmp, dir) = match &a.base_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::tempdir().context("a temporary directory for the base")?;
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    let t0 = Instant::now();
    if !matches(&dir, &shape)? {
        write_random_llama(&dir, &shape, 7).context("writing the random base")?;
    }
    let write_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let mut model = match a.base {
        None => potluck_worker::hf::load_model(&dir, Some(dtype), &device),
        Some(fmt) => potluck_worker::hf::load_quantized(&dir, Some(dtype), fmt, &device),
    }
    .context("loading the base")?;
    let lora = HfLoraConfig {
        rank: a.rank,
        alpha: a.alpha,
        dropout: a.dropout,
        target_modules: a.targets.clone(),
        seed: 3,
    };
    let adapted = model.attach_lora(&lora).context("attaching LoRA")?;
    let params = model.lora_params();
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    // The load's transient bf16 copies of quantised weights must not count as the
    // training's peak.
    potluck_worker::release_pooled_memory(&device)?;
    device.synchronize()?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_mem = memory(&device)?;
    let train = TrainConfig {
        lr: a.lr,
        batch_size: a.batch,
        seq_len: a.seq,
        ..TrainConfig::default()
    };
    let mut opt = AdamW::new(&params)?;
    // Random tokens, never zeros.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let n = a.batch * a.seq;
    let batches: Vec<Tensor> = (0..2)
        .map(|_| {
            let ids: Vec<u32> = (0..n)
                .map(|_| rng.random_range(0..shape.vocab as u32))
                .collect();
            Tensor::from_vec(ids, (a.batch, a.seq), &device)
        })
        .collect::<candle_core::Result<_>>()?;
    let mut step = |i: usize| -> Result<f32> {
        let (loss, grads) = model.train_grads(&batches[i % 2], i as u64, a.checkpointing)?;
        if !loss.is_finite() {
            bail!("loss {loss} at step {i}");
        }
        opt.step(&params, &grads, &train, a.lr)?;
        Ok(loss)
    };
    let mut first_loss = f32::NAN;
    let t0 = Instant::now();
    for i in 0..a.warmup {
        let loss = step(i)?;
        if i == 0 {
            first_loss = loss;
        }
    }
    device.synchronize()?;
    let warmup_s = t0.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(a.steps);
    let mut last_loss = f32::NAN;
    for i in a.warmup..a.warmup + a.steps {
        let t0 = Instant::now();
        let loss = step(i)?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        if first_loss.is_nan() {
            first_loss = loss;
        }
        last_loss = loss;
    }
    let step_s = median(&mut times);
    let mem = memory(&device)?;
    Ok(serde_json::json!({
        "impl": "potluck",
        "shape": a.shape,
        "base_params": shape.params(),
        "base": match a.base { None => "bf16", Some(QuantFormat::Nf4) => "nf4", Some(QuantFormat::Int8) => "int8" },
        "compute_dtype": format!("{dtype:?}").to_lowercase(),
        "base_gib": model.base_bytes() as f64 / (1u64 << 30) as f64,
        "rank": a.rank,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "adapted_modules": adapted,
        "trainable_params": trainable,
        "batch": a.batch,
        "seq": a.seq,
        "checkpoint": a.checkpointing == Checkpointing::Layers,
        "device": match a.device { DeviceSpec::Cpu => "cpu".to_string(), DeviceSpec::Cuda(i) => format!("cuda:{i}") },
        "write_s": write_s,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "steps": a.steps,
        "median_step_ms": step_s * 1e3,
        "tokens_per_s": n as f64 / step_s,
        "memory_gib": gib(mem),
        "context_gib": gib(context_mem),
        "load_gib": gib(load_mem),
        "first_loss": first_loss,
        "last_loss": last_loss,
    }))
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = parse_args(&argv)?;
    println!("{}", run(&a)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_tinyllama_shape_has_tinyllamas_size() {
        // TinyLlama-1.1B: 1,100,048,384 parameters.
        assert_eq!(shape("tinyllama", 2048).unwrap().params(), 1_100_048_384);
        assert_eq!(shape("tinyllama", 4096).unwrap().max_positions, 4096);
    }

    #[test]
    fn tiny_runs_on_the_cpu_in_every_base_format_and_learn() {
        let dir = tempfile::tempdir().unwrap();
        for base in ["bf16", "nf4", "int8"] {
            let a = parse_args(&args(&format!(
                "--shape tiny --base {base} --seq 32 --batch 2 --warmup 1 --steps 6 --lr 1e-2 \
                 --base-dir {}",
                dir.path().display()
            )))
            .unwrap();
            let v = run(&a).unwrap();
            assert_eq!(v["adapted_modules"], 14, "{v}");
            // 2 layers of 7 adapters, rank 16.
            let (h, i, kv) = (64, 176, 32);
            let per_layer = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3);
            assert_eq!(v["trainable_params"], 2 * per_layer, "{v}");
            assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
            assert!(v["memory_gib"].is_null(), "{v}");
            let (first, last) = (
                v["first_loss"].as_f64().unwrap(),
                v["last_loss"].as_f64().unwrap(),
            );
            assert!(first.is_finite() && last.is_finite(), "{v}");
            // Two batches, seen over and over: the adapters fit them.
            assert!(last < first, "{v}");
        }
    }

    #[test]
    fn checkpointing_trains_the_same_and_says_so() {
        let base = "--shape tiny --base nf4 --seq 24 --warmup 1 --steps 2";
        let off = run(&parse_args(&args(base)).unwrap()).unwrap();
        let on = run(&parse_args(&args(&format!("{base} --checkpoint"))).unwrap()).unwrap();
        assert_eq!(off["checkpoint"], false, "{off}");
        assert_eq!(on["checkpoint"], true, "{on}");
        let loss = |v: &serde_json::Value| v["last_loss"].as_f64().unwrap();
        assert!(
            (loss(&off) - loss(&on)).abs() <= 1e-5 * loss(&off),
            "{off} {on}"
        );
    }

    #[test]
    fn a_kept_base_of_another_shape_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let tiny = shape("tiny", 32).unwrap();
        assert!(!matches(dir.path(), &tiny).unwrap());
        write_random_llama(dir.path(), &LlamaShape { layers: 1, ..tiny }, 1).unwrap();
        assert!(!matches(dir.path(), &tiny).unwrap());
        write_random_llama(dir.path(), &tiny, 1).unwrap();
        assert!(matches(dir.path(), &tiny).unwrap());
        assert!(!matches(dir.path(), &shape("tiny", 128).unwrap()).unwrap());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(&args("--shape gpt")).is_ok());
        assert!(run(&parse_args(&args("--shape gpt")).unwrap()).is_err());
        assert!(parse_args(&args("--seq 1")).is_err());
        assert!(parse_args(&args("--base fp8")).is_err());
        assert!(parse_args(&args("--device tpu")).is_err());
        assert!(parse_args(&args("--frobnicate")).is_err());
        assert!(parse_args(&args("--steps 0")).is_err());
        let a = parse_args(&args("--shape tiny --targets q_proj,nothing_here --seq 8")).unwrap();
        assert!(run(&a).is_err());
    }
}
