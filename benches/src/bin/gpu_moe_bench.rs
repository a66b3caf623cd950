//! Training throughput of the worker's MoE transformer, measured the way
//! `benches/gpu/torch_moe.py` measures the PyTorch reference, so the two can stand side by
//! side (issue 6). One step is exactly what a replica does in the swarm:
//! `Replica::train_on_batch` (forward, backward, gradient clipping, f32-master AdamW).
//!
//! Usage: `gpu_moe_bench --config small|base|tiny --dtype f32|tf32|bf16 --device cpu|cuda
//! [--warmup N] [--steps N] [--json PATH] [--experts batched|single|padded|grouped:ALIGN]
//! [--f32-products split|exact] [--expert-streams N] [--breakdown] [--micro]`.
//! Prints one JSON line per run (and appends it to `--json`). `tf32` is f32 training with
//! TF32 tensor-core matrix products (candle's reduced-precision f32 GEMM switch): an explicit
//! opt-in reported under its own label, never as the f32 row. f32 products on a GPU run split
//! into TF32 parts (three TF32 terms in one product, near f32's error: `fused::F32Products`)
//! unless `--f32-products exact` asks for the f32 units; the JSON says which.
//! `--expert-streams` sets on how many CUDA streams the experts' products run side by side
//! (`fused::set_expert_streams`; 1 runs them one after another). Build for the
//! GPU with the `cuda` feature; without it the binary still builds and runs on the CPU, which
//! is what CI exercises with the tiny config.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use potluck_worker::fused::F32Products;
use potluck_worker::model::ExpertLayout;
use potluck_worker::{AdamW, ComputeDType, DeviceSpec, ModelConfig, Replica, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Dense bf16 peak of the H100 SXM as measured on the device machine (about 780 TFLOP/s);
/// MFU is quoted against it for both dtypes, as issue 6 asks.
const PEAK_FLOPS: f64 = 780e12;

/// Distinct batches the timed loop cycles through, so no two consecutive steps see the same
/// data (and routing does not settle into one pattern).
const BATCHES: usize = 4;

/// One benchmark shape: the model and the batch it trains on.
#[derive(Debug, Clone)]
struct Shape {
    name: String,
    model: ModelConfig,
    batch: usize,
    seq: usize,
}

/// The configs of issue 6, identical to `torch_moe.py`'s: byte vocabulary, every layer MoE
/// with 8 SwiGLU experts of hidden 2*d, top-2, tied embeddings. Capacity is set to never
/// drop (capacity = tokens), because the PyTorch reference is dropless and the FLOP count
/// assumes every token reaches `top_k` experts.
fn shape(name: &str) -> Result<Shape> {
    let (d, layers, heads, ctx, batch) = match name {
        "tiny" => (64, 2, 4, 64, 2),
        "small" => (384, 6, 6, 256, 32),
        "base" => (768, 12, 12, 512, 16),
        other => bail!("unknown config {other:?} (use tiny, small or base)"),
    };
    let n_experts = 8;
    let top_k = 2;
    let model = ModelConfig {
        vocab: 256,
        d_model: d,
        n_heads: heads,
        n_layers: layers,
        context: ctx,
        moe_layers: (0..layers).collect(),
        n_experts,
        expert_hidden: 2 * d,
        top_k,
        capacity_factor: n_experts as f32 / top_k as f32,
        aux_loss_coef: 0.01,
        ffn_hidden: 4 * d,
        tie_embeddings: true,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
        layers: Vec::new(),
        mamba: None,
    };
    model.validate().context("benchmark config")?;
    Ok(Shape {
        name: name.to_string(),
        model,
        batch,
        seq: ctx,
    })
}

/// Parameters a token passes through in matrix products: per layer the four attention
/// projections, the router and `top_k` SwiGLU experts (dense layers: the dense SwiGLU), plus
/// the output head. Norm gains and the embedding lookup do no matrix work and are left out.
/// `torch_moe.py` counts the same way.
fn active_params(m: &ModelConfig) -> u64 {
    let d = m.d_model as u64;
    let mut total = m.vocab as u64 * d;
    for l in 0..m.n_layers {
        total += 4 * d * d;
        total += if m.is_moe(l) {
            m.n_experts as u64 * d + m.top_k as u64 * 3 * d * m.expert_hidden as u64
        } else {
            3 * d * m.ffn_hidden as u64
        };
    }
    total
}

/// Model FLOPs of one training step: `6 * active_params * tokens` plus attention,
/// `12 * layers * d * seq^2 * batch` (QK^T and AV, 2 FLOPs per multiply-add, forward plus a
/// backward of twice the forward). The causal mask is not discounted, as in the PaLM paper's
/// count; `torch_moe.py` uses the same formula.
fn flops_per_step(s: &Shape) -> f64 {
    let tokens = (s.batch * s.seq) as f64;
    let attn = 12.0
        * s.model.n_layers as f64
        * s.model.d_model as f64
        * (s.seq as f64).powi(2)
        * s.batch as f64;
    6.0 * active_params(&s.model) as f64 * tokens + attn
}

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    config: String,
    dtype: ComputeDType,
    device: DeviceSpec,
    warmup: usize,
    steps: usize,
    json: Option<std::path::PathBuf>,
    breakdown: bool,
    micro: bool,
    /// f32 matrix products in TF32 (`--dtype tf32`).
    tf32: bool,
    /// How f32 products run on a GPU (`--f32-products`).
    f32_products: F32Products,
    /// On how many CUDA streams the experts' products run (`--expert-streams`).
    expert_streams: usize,
    /// `--experts batched|single|padded|grouped:ALIGN`: force the experts' path, or keep the
    /// model's choice of path on another layout (default: the model's choice on its
    /// default layout).
    batched: Option<bool>,
    layout: Option<ExpertLayout>,
}

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut a = Args {
        config: "tiny".into(),
        dtype: ComputeDType::F32,
        device: DeviceSpec::Cpu,
        warmup: 5,
        steps: 20,
        json: None,
        breakdown: false,
        micro: false,
        tf32: false,
        f32_products: F32Products::Split,
        expert_streams: potluck_worker::fused::expert_streams(),
        batched: None,
        layout: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--config" => a.config = value()?,
            "--dtype" => {
                let v = value()?;
                a.tf32 = v == "tf32";
                a.dtype = match v.as_str() {
                    "f32" | "tf32" => ComputeDType::F32,
                    "bf16" => ComputeDType::Bf16,
                    other => bail!("unknown dtype {other:?} (use f32, tf32 or bf16)"),
                }
            }
            "--experts" => {
                let v = value()?;
                match v.as_str() {
                    "batched" => a.batched = Some(true),
                    "single" => a.batched = Some(false),
                    // Where the model batches (in f32 only where the padding pays).
                    "padded" => a.layout = Some(ExpertLayout::Padded),
                    other => {
                        let align = other
                            .strip_prefix("grouped:")
                            .and_then(|n| n.parse::<usize>().ok())
                            .filter(|&n| n > 0)
                            .with_context(|| {
                                format!(
                                    "unknown experts path {other:?} (use batched, single, \
                                     padded or grouped:ALIGN)"
                                )
                            })?;
                        a.layout = Some(ExpertLayout::Grouped { align });
                    }
                }
            }
            "--device" => {
                a.device = match value()?.as_str() {
                    "cpu" => DeviceSpec::Cpu,
                    "cuda" => DeviceSpec::Cuda(0),
                    other => bail!("unknown device {other:?} (use cpu or cuda)"),
                }
            }
            "--warmup" => a.warmup = value()?.parse().context("--warmup")?,
            "--steps" => a.steps = value()?.parse().context("--steps")?,
            "--json" => a.json = Some(value()?.into()),
            "--f32-products" => {
                a.f32_products = match value()?.as_str() {
                    "split" => F32Products::Split,
                    "exact" => F32Products::Exact,
                    other => bail!("unknown f32 products {other:?} (use split or exact)"),
                }
            }
            "--expert-streams" => {
                let max = potluck_worker::fused::MAX_EXPERT_STREAMS;
                a.expert_streams = value()?
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .with_context(|| format!("--expert-streams takes 1 to {max}"))?;
            }
            "--breakdown" => a.breakdown = true,
            "--micro" => a.micro = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.steps == 0 || a.steps > 100_000 || a.warmup > 100_000 {
        bail!("--steps must be in 1..=100000 and --warmup at most 100000");
    }
    shape(&a.config)?;
    Ok(a)
}

/// What one run measured; serialised as one JSON line with the same fields as
/// `torch_moe.py`'s.
#[derive(Debug, Clone)]
struct Measured {
    config: String,
    dtype: &'static str,
    /// How f32 products ran (`split` or `exact`); `None` where no f32 product ran on a GPU
    /// (bf16, tf32, the CPU).
    f32_products: Option<&'static str>,
    /// On how many CUDA streams the experts' products ran; `None` on the CPU.
    expert_streams: Option<usize>,
    device: String,
    tokens_per_step: usize,
    steps: usize,
    warmup: usize,
    median_step_ms: f64,
    tokens_per_s: f64,
    flops_per_step: f64,
    active_params: u64,
    mfu: f64,
    first_loss: f32,
    last_loss: f32,
    dropped: u64,
    /// Padding of the batched experts' layout in the last timed step, mean and largest over
    /// the MoE layers: experts x the busiest expert's tokens, over the tokens routed.
    pad_ratio: [f64; 2],
    /// Median forward, backward and optimizer milliseconds of separately timed steps, then
    /// the host time until each of the three calls returned (before the synchronisation):
    /// when that is close to the full time, the host (launching kernels, routing) is the
    /// bottleneck rather than the GPU.
    breakdown_ms: Option<[f64; 6]>,
}

impl Measured {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "impl": "candle",
            "config": self.config,
            "dtype": self.dtype,
            "f32_products": self.f32_products,
            "expert_streams": self.expert_streams,
            "device": self.device,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "warmup": self.warmup,
            "median_step_ms": self.median_step_ms,
            "tokens_per_s": self.tokens_per_s,
            "flops_per_step": self.flops_per_step,
            "active_params": self.active_params,
            "mfu": self.mfu,
            "peak_tflops": PEAK_FLOPS / 1e12,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "dropped": self.dropped,
            "pad_ratio_mean": self.pad_ratio[0],
            "pad_ratio_max": self.pad_ratio[1],
            "breakdown_ms": self.breakdown_ms.map(|[f, b, o, fh, bh, oh]| serde_json::json!({
                "forward": f, "backward": b, "optimizer": o,
                "forward_host": fh, "backward_host": bh, "optimizer_host": oh,
            })),
        })
    }
}

/// The dtype as reported: `tf32` for f32 with TF32 matrix products.
fn dtype_label(a: &Args) -> &'static str {
    match a.dtype {
        ComputeDType::F32 if a.tf32 => "tf32",
        ComputeDType::F32 => "f32",
        ComputeDType::Bf16 => "bf16",
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Trains `warmup` untimed steps (kernel JIT, allocator growth), then times `steps` steps one
/// by one, synchronising the device before each clock read, and reports the median.
fn run(a: &Args) -> Result<Measured> {
    let s = shape(&a.config)?;
    let train = TrainConfig {
        lr: 1e-3,
        warmup_steps: 10,
        total_steps: 1000,
        batch_size: s.batch,
        seq_len: s.seq,
        seed: 1,
        compute_dtype: a.dtype,
        ..TrainConfig::default()
    };
    // Process-wide in candle: only this opt-in run changes it.
    candle_core::cuda::set_gemm_reduced_precision_f32(a.tf32);
    potluck_worker::fused::set_f32_products(a.f32_products);
    potluck_worker::fused::set_expert_streams(a.expert_streams);
    let mut replica = Replica::new(&s.model, &train, &a.device).context("building the replica")?;
    if let Some(on) = a.batched {
        replica.set_batched_experts(on)?;
    }
    if let Some(layout) = a.layout {
        replica.set_expert_layout(layout);
    }
    let device = replica
        .model()
        .context("a native replica")?
        .device()
        .clone();
    // Random bytes, never zeros: uniform tokens keep the router busy on every expert.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let n = s.batch * s.seq;
    let batches: Vec<(Vec<u32>, Vec<u32>)> = (0..BATCHES)
        .map(|_| {
            let x = (0..n).map(|_| rng.random_range(0..256u32)).collect();
            let y = (0..n).map(|_| rng.random_range(0..256u32)).collect();
            (x, y)
        })
        .collect();
    let mut first_loss = f32::NAN;
    let mut last_loss = f32::NAN;
    let mut dropped = 0;
    let mut pad_ratio = [f64::NAN; 2];
    for i in 0..a.warmup {
        let (x, y) = &batches[i % BATCHES];
        let (ce, _, _, _) = replica.train_on_batch(x, y, s.batch)?;
        if i == 0 {
            first_loss = ce;
        }
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.steps {
        let (x, y) = &batches[(a.warmup + i) % BATCHES];
        let t0 = Instant::now();
        let (ce, _, stats, _) = replica.train_on_batch(x, y, s.batch)?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        if first_loss.is_nan() {
            first_loss = ce;
        }
        last_loss = ce;
        dropped += stats.dropped;
        pad_ratio = padding(&stats.expert_tokens);
    }
    let step_s = median(&mut times);
    let breakdown_ms = if a.breakdown {
        Some(breakdown(&replica, &train, &batches, s.batch, a.steps)?)
    } else {
        None
    };
    let flops = flops_per_step(&s);
    Ok(Measured {
        config: s.name.clone(),
        dtype: dtype_label(a),
        f32_products: match (a.dtype, a.tf32, a.device) {
            (ComputeDType::F32, false, DeviceSpec::Cuda(_)) => Some(match a.f32_products {
                F32Products::Split => "split",
                F32Products::Exact => "exact",
            }),
            _ => None,
        },
        expert_streams: match a.device {
            DeviceSpec::Cuda(_) => Some(a.expert_streams),
            DeviceSpec::Cpu => None,
        },
        device: match a.device {
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(i) => format!("cuda:{i}"),
        },
        tokens_per_step: n,
        steps: a.steps,
        warmup: a.warmup,
        median_step_ms: step_s * 1e3,
        tokens_per_s: n as f64 / step_s,
        flops_per_step: flops,
        active_params: active_params(&s.model),
        mfu: flops / step_s / PEAK_FLOPS,
        first_loss,
        last_loss,
        dropped,
        pad_ratio,
        breakdown_ms,
    })
}

/// Mean and largest padding ratio over the layers (see `Measured::pad_ratio`).
fn padding(expert_tokens: &[Vec<u64>]) -> [f64; 2] {
    let ratios: Vec<f64> = expert_tokens
        .iter()
        .filter(|c| c.iter().sum::<u64>() > 0)
        .map(|c| {
            let cap = c.iter().copied().max().unwrap_or(0);
            (c.len() as u64 * cap) as f64 / c.iter().sum::<u64>() as f64
        })
        .collect();
    if ratios.is_empty() {
        return [f64::NAN; 2];
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    [mean, ratios.iter().copied().fold(f64::MIN, f64::max)]
}

/// Times forward, backward and the optimizer step apart (a synchronisation after each), on
/// the replica's model with an optimizer of its own: where a step's time goes. Run after the
/// main measurement, which it does not disturb.
fn breakdown(
    replica: &Replica,
    train: &TrainConfig,
    batches: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    steps: usize,
) -> Result<[f64; 6]> {
    let model = replica.model().context("a native replica")?;
    let device = model.device().clone();
    let mut opt = AdamW::new(model.trainable())?;
    let mut parts: [Vec<f64>; 6] = Default::default();
    for i in 0..steps + 1 {
        let (x, y) = &batches[i % BATCHES];
        let seq = x.len() / batch;
        let x = Tensor::from_slice(x, (batch, seq), &device)?;
        let y = Tensor::from_slice(y, (batch, seq), &device)?;
        device.synchronize()?;
        let t0 = Instant::now();
        let w = model.weights(true)?;
        let (loss, _) = model.loss(&w, &x, &y)?;
        let h0 = t0.elapsed();
        device.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let h1 = t1.elapsed();
        device.synchronize()?;
        let t2 = Instant::now();
        let grads = model.param_grads(&grads)?;
        if i == 0 {
            eprintln!("{}", grad_summary(model, &grads));
        }
        model.optimizer_step(&mut opt, &grads, train, train.lr)?;
        let h2 = t2.elapsed();
        device.synchronize()?;
        let t3 = Instant::now();
        // The first step allocates the new optimizer's state: not timed.
        if i > 0 {
            parts[0].push((t1 - t0).as_secs_f64() * 1e3);
            parts[1].push((t2 - t1).as_secs_f64() * 1e3);
            parts[2].push((t3 - t2).as_secs_f64() * 1e3);
            parts[3].push(h0.as_secs_f64() * 1e3);
            parts[4].push(h1.as_secs_f64() * 1e3);
            parts[5].push(h2.as_secs_f64() * 1e3);
        }
    }
    Ok(parts.map(|mut p| median(&mut p)))
}

/// What the optimizer is given: gradients by dtype, missing and non-contiguous ones, and
/// whether the multi-tensor kernels take them (printed once by `--breakdown`).
fn grad_summary(model: &potluck_worker::Model, grads: &[Option<Tensor>]) -> String {
    let mut by_dtype: std::collections::BTreeMap<String, usize> = Default::default();
    let (mut missing, mut strided) = (0, 0);
    let mut params = Vec::new();
    for ((_, p), g) in model.trainable().iter().zip(grads) {
        match g {
            Some(g) => {
                *by_dtype.entry(format!("{:?}", g.dtype())).or_default() += 1;
                strided += usize::from(!g.is_contiguous());
            }
            None => missing += 1,
        }
        params.push(potluck_worker::fused::MultiParam {
            master: p.as_tensor().clone(),
            grad: g.clone(),
            copy: None,
            decay: false,
        });
    }
    format!(
        "optimizer input: grads by dtype {by_dtype:?}, missing {missing}, non-contiguous \
         {strided}, multi-tensor kernels take them (without copies): {}",
        potluck_worker::fused::MultiTensor::supported(&params)
    )
}

/// Times single candle ops at the shapes one MoE layer of the config uses (tokens, width,
/// tokens per expert), to find which primitive a step's time goes to. Returns one JSON
/// object per op: the median milliseconds over `steps` synchronised repetitions.
fn micro(a: &Args) -> Result<Vec<serde_json::Value>> {
    let s = shape(&a.config)?;
    let device = a.device.device()?;
    let dt = a.dtype.dtype();
    candle_core::cuda::set_gemm_reduced_precision_f32(a.tf32);
    potluck_worker::fused::set_f32_products(a.f32_products);
    potluck_worker::fused::set_expert_streams(a.expert_streams);
    let (n, d) = (s.batch * s.seq, s.model.d_model);
    let per_expert = n * s.model.top_k / s.model.n_experts;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut ids = |count: usize, below: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..count)
            .map(|_| rng.random_range(0..below as u32))
            .collect();
        Ok(Tensor::from_vec(v, count, &device)?)
    };
    let rows = ids(per_expert, n)?;
    let tokens = ids(n, s.model.vocab)?;
    let flat = ids(per_expert, n * s.model.n_experts)?;
    let x = Tensor::randn(0f32, 1.0, (n, d), &device)?.to_dtype(dt)?;
    let src = Tensor::randn(0f32, 1.0, (per_expert, d), &device)?.to_dtype(dt)?;
    let src_tok = Tensor::randn(0f32, 1.0, (n, d), &device)?.to_dtype(dt)?;
    let gate_src = Tensor::randn(0f32, 1.0, per_expert, &device)?.to_dtype(dt)?;
    let w = Tensor::randn(0f32, 1.0, (2 * d, d), &device)?.to_dtype(dt)?;
    let big = Tensor::randn(0f32, 1.0, 46_000_000, &device)?;
    // One MoE layer's experts in the padded batched layout, and their stacked weights as the
    // model keeps them (`[experts, out, in]`).
    let n_exp = s.model.n_experts;
    let hid = s.model.expert_hidden;
    let xs = Tensor::randn(0f32, 1.0, (n_exp, per_expert, d), &device)?.to_dtype(dt)?;
    let gs = Tensor::randn(0f32, 1.0, (n_exp, per_expert, hid), &device)?.to_dtype(dt)?;
    let ws = Tensor::randn(0f32, 1.0, (n_exp, hid, d), &device)?.to_dtype(dt)?;
    let xs_e: Vec<Tensor> = (0..n_exp)
        .map(|e| xs.get(e))
        .collect::<candle_core::Result<_>>()?;
    let ws_e: Vec<Tensor> = (0..n_exp)
        .map(|e| ws.get(e))
        .collect::<candle_core::Result<_>>()?;
    // Attention's `probs @ v` of one layer, and the experts' rows in the grouped layout.
    let heads = s.model.n_heads;
    let probs = Tensor::rand(0f32, 1.0, (s.batch, heads, s.seq, s.seq), &device)?.to_dtype(dt)?;
    let v = Tensor::randn(0f32, 1.0, (s.batch, heads, s.seq, d / heads), &device)?.to_dtype(dt)?;
    let rows_grouped = xs.reshape((n_exp * per_expert, d))?;
    let counts = vec![per_expert; n_exp];
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        (
            "index_add rows [per_expert, d] into [tokens, d]",
            Box::new(|| x.zeros_like()?.index_add(&rows, &src, 0)),
        ),
        (
            "index_select rows [per_expert] of [tokens, d]",
            Box::new(|| x.index_select(&rows, 0)),
        ),
        (
            "index_add 1-D [per_expert] into [tokens * experts]",
            Box::new(|| {
                Tensor::zeros(n * s.model.n_experts, dt, &device)?.index_add(&flat, &gate_src, 0)
            }),
        ),
        (
            "index_add embedding grad [tokens, d] into [vocab, d]",
            Box::new(|| {
                Tensor::zeros((s.model.vocab, d), dt, &device)?.index_add(&tokens, &src_tok, 0)
            }),
        ),
        (
            "matmul expert up [per_expert, d] x [d, 2d]",
            Box::new(|| src.matmul(&w.t()?)),
        ),
        (
            "experts up, batched [E, per_expert, d] x [E, d, 2d] (transposed stack)",
            Box::new(|| xs.matmul(&ws.transpose(1, 2)?)),
        ),
        (
            "experts up, one product per expert [per_expert, d] x [d, 2d] (x E)",
            Box::new(|| {
                let ys = xs_e
                    .iter()
                    .zip(&ws_e)
                    .map(|(x, w)| x.matmul(&w.t()?))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(ys.into_iter().next_back().unwrap_or(xs.clone()))
            }),
        ),
        (
            "experts up backward dx, batched [E, per_expert, 2d] x [E, 2d, d]",
            Box::new(|| gs.matmul(&ws)),
        ),
        (
            "experts up backward dw, batched [E, d, per_expert] x [E, per_expert, 2d]",
            Box::new(|| xs.transpose(1, 2)?.matmul(&gs)),
        ),
        (
            "experts up backward dw in the stack's layout [E, 2d, per_expert] x [E, per_expert, d]",
            Box::new(|| gs.transpose(1, 2)?.matmul(&xs)),
        ),
        (
            "fused::matmul_t x [tokens, d] x w [2d, d]^T",
            Box::new(|| potluck_worker::fused::matmul_t(&x, &w)),
        ),
        (
            "fused::matmul probs [B, H, T, T] x v [B, H, T, d/H]",
            Box::new(|| potluck_worker::fused::matmul(&probs, &v)),
        ),
        (
            "fused::grouped_matmul_t experts up [E * per_expert, d] x [E, 2d, d]",
            Box::new(|| potluck_worker::fused::grouped_matmul_t(&rows_grouped, &ws, &counts)),
        ),
        ("sum_all f32 [46M]", Box::new(|| big.sum_all())),
        (
            "sum over rows f32 [46M / 65536, 65536]",
            Box::new(|| big.narrow(0, 0, 45_940_736)?.reshape((701, 65536))?.sum(1)),
        ),
    ];
    let mut out = Vec::new();
    // Routing of one MoE layer (`Model::moe_route`, host decisions included) on a model of
    // the config: the host time until it returns, from an idle GPU, and the full time.
    let model = potluck_worker::Model::new(&s.model, &device, dt, 1)?;
    let w = model.weights(false)?;
    let h = Tensor::randn(0f32, 1.0, (n, d), &device)?.to_dtype(dt)?;
    let (mut host, mut full) = (Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let r = model.moe_route(&w, 0, &h)?;
        let th = t0.elapsed();
        device.synchronize()?;
        if i >= a.warmup {
            host.push(th.as_secs_f64() * 1e3);
            full.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        drop(r);
    }
    out.push(serde_json::json!({
        "micro": "moe_route of one layer (host ms until it returns)", "config": s.name,
        "dtype": format!("{dt:?}"), "tokens": n, "d": d, "median_ms": median(&mut host),
    }));
    out.push(serde_json::json!({
        "micro": "moe_route of one layer (synchronised)", "config": s.name,
        "dtype": format!("{dt:?}"), "tokens": n, "d": d, "median_ms": median(&mut full),
    }));
    for (name, op) in &ops {
        let mut times = Vec::new();
        for i in 0..a.warmup + a.steps {
            device.synchronize()?;
            let t0 = Instant::now();
            let r = op()?;
            device.synchronize()?;
            if i >= a.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            drop(r);
        }
        out.push(serde_json::json!({
            "micro": name, "config": s.name, "dtype": format!("{dt:?}"),
            "tokens": n, "d": d, "per_expert": per_expert, "median_ms": median(&mut times),
        }));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let a = parse_args(&argv)?;
    if a.micro {
        for v in micro(&a)? {
            println!("{v}");
        }
        return Ok(());
    }
    let m = run(&a)?;
    let line = m.json().to_string();
    println!("{line}");
    if let Some(path) = &a.json {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// The FLOP counts are the ones `torch_moe.py` prints for the same configs; a change on
    /// either side must change both.
    #[test]
    fn flop_counts_match_the_reference_script() {
        let small = shape("small").unwrap();
        assert_eq!(active_params(&small.model), 14_272_512);
        assert_eq!(flops_per_step(&small), 759_504_568_320.0);
        let base = shape("base").unwrap();
        assert_eq!(active_params(&base.model), 113_516_544);
        assert_eq!(flops_per_step(&base), 6_043_421_638_656.0);
        assert_eq!(small.batch * small.seq, 8192);
        assert_eq!(base.batch * base.seq, 8192);
    }

    #[test]
    fn tiny_run_on_the_cpu_measures_and_trains() {
        let a = parse_args(&args("--config tiny --steps 3 --warmup 1 --breakdown")).unwrap();
        let m = run(&a).unwrap();
        let [f, b, o, fh, bh, oh] = m.breakdown_ms.unwrap();
        assert!(f > 0.0 && b > 0.0 && o > 0.0, "{f} {b} {o}");
        // The host part is measured inside the full time of the same call.
        assert!(fh <= f && bh <= b && oh <= o);
        assert_eq!(m.steps, 3);
        assert_eq!(m.dropped, 0, "the bench config must be dropless");
        assert!(m.median_step_ms > 0.0 && m.tokens_per_s > 0.0);
        assert!(m.first_loss.is_finite() && m.last_loss.is_finite());
        // Uniform random bytes start near ln(256).
        assert!((m.first_loss - 256f32.ln()).abs() < 0.2, "{}", m.first_loss);
        let j = m.json();
        for key in [
            "impl",
            "config",
            "dtype",
            "tokens_per_s",
            "median_step_ms",
            "mfu",
        ] {
            assert!(j.get(key).is_some(), "{key} missing");
        }
    }

    #[test]
    fn micro_timings_run_on_the_cpu() {
        let a = parse_args(&args("--config tiny --steps 1 --warmup 0 --micro")).unwrap();
        let out = micro(&a).unwrap();
        assert_eq!(out.len(), 17);
        assert!(out.iter().all(|v| v["median_ms"].as_f64().unwrap() >= 0.0));
    }

    #[test]
    fn padding_ratio_counts_the_busiest_expert() {
        let [mean, max] = padding(&[vec![2, 2], vec![3, 1], vec![0, 0]]);
        assert!((mean - 1.25).abs() < 1e-12 && (max - 1.5).abs() < 1e-12);
        assert!(padding(&[]).iter().all(|x| x.is_nan()));
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            "--config huge",
            "--dtype f16",
            "--device tpu",
            "--steps 0",
            "--steps",
            "--what 1",
            "--experts some",
            "--f32-products fast",
            "--expert-streams 0",
            "--expert-streams 9",
            "--expert-streams many",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad} accepted");
        }
        let a = parse_args(&args("--dtype tf32 --experts single")).unwrap();
        assert!(a.tf32 && a.dtype == ComputeDType::F32 && a.batched == Some(false));
        assert_eq!(dtype_label(&a), "tf32");
        let a = parse_args(&args("--experts padded")).unwrap();
        assert!(a.layout == Some(ExpertLayout::Padded) && a.batched.is_none());
        let a = parse_args(&args("--experts grouped:16")).unwrap();
        assert_eq!(a.layout, Some(ExpertLayout::Grouped { align: 16 }));
        assert!(parse_args(&args("--experts grouped:0")).is_err());
        let a = parse_args(&args("--f32-products exact")).unwrap();
        assert_eq!(a.f32_products, F32Products::Exact);
        assert_eq!(parse_args(&[]).unwrap().f32_products, F32Products::Split);
        assert_eq!(
            parse_args(&args("--expert-streams 3"))
                .unwrap()
                .expert_streams,
            3
        );
        let a = parse_args(&args("--config base --dtype bf16 --device cuda --steps 25")).unwrap();
        assert_eq!(a.config, "base");
        assert_eq!(a.dtype, ComputeDType::Bf16);
        assert_eq!(a.device, DeviceSpec::Cuda(0));
        assert_eq!(a.steps, 25);
    }
}
