//! Mamba layers and hybrid layouts: gradients against finite differences, the default layout
//! unchanged, config checks, pipeline cuts through Mamba blocks, training on the built-in
//! corpus, checkpoints, and recurrent generation against the full pass.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{batch, gradcheck, micro};
use potluck_worker::config::{FeedForward, LayerKind, MambaConfig, Mixer};
use potluck_worker::{
    Dataset, DeviceSpec, Model, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec, TrainConfig,
    WorkerError,
};

fn kind(mixer: Mixer, ffn: FeedForward) -> LayerKind {
    LayerKind { mixer, ffn }
}

/// A micro hybrid for f64 checks: Mamba (dense), attention (MoE), Mamba (no feed-forward).
fn micro_hybrid() -> ModelConfig {
    let mut cfg = micro(vec![], 3);
    cfg.layers = vec![
        kind(Mixer::Mamba, FeedForward::Dense),
        kind(Mixer::Attention, FeedForward::Moe),
        kind(Mixer::Mamba, FeedForward::None),
    ];
    cfg.mamba = Some(MambaConfig {
        d_state: 3,
        d_conv: 3,
        expand: 2,
        dt_rank: 2,
        dt_min: 0.01,
        dt_max: 0.3,
    });
    cfg
}

/// Every block Mamba: what recurrent generation runs on.
fn micro_mamba(ffns: &[FeedForward]) -> ModelConfig {
    let mut cfg = micro_hybrid();
    cfg.n_layers = ffns.len();
    cfg.layers = ffns.iter().map(|&f| kind(Mixer::Mamba, f)).collect();
    cfg
}

#[test]
fn mamba_block_gradients_match_finite_differences() {
    let cfg = micro_hybrid();
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 4).unwrap();
    // Long enough for the convolution's window to fill and the scan's state to matter.
    let (x, y) = batch(cfg.vocab, 2, 9, 3);
    let n = gradcheck(
        &model,
        &x,
        &y,
        &[
            "mamba_norm",
            "in_proj",
            "conv1d.weight",
            "conv1d.bias",
            "x_proj",
            "dt_proj.weight",
            "dt_proj.bias",
            "A_log",
            "mamba.D",
            "out_proj",
            "layers.1.attn.wq",
            "experts",
            "tok_emb",
        ],
        3,
    );
    assert!(n >= 60, "only {n} coordinates checked");
}

#[test]
fn the_default_layout_is_unchanged() {
    // No new keys in the serialised config (run ids and checkpoints hash it) ...
    for cfg in [
        ModelConfig::tiny(),
        ModelConfig::small(),
        ModelConfig::base(),
    ] {
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(
            !json.contains("\"layers\"") && !json.contains("mamba"),
            "{json}"
        );
        let back: ModelConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
    }
    // ... and spelling the default layout out gives the same parameters, in the same order,
    // with the same values.
    let cfg = micro(vec![1], 2);
    let spelled = ModelConfig {
        layers: vec![
            kind(Mixer::Attention, FeedForward::Dense),
            kind(Mixer::Attention, FeedForward::Moe),
        ],
        ..cfg.clone()
    };
    let a = Model::new(&cfg, &Device::Cpu, DType::F32, 5).unwrap();
    let b = Model::new(&spelled, &Device::Cpu, DType::F32, 5).unwrap();
    assert_eq!(a.param_layout(), b.param_layout());
    for ((_, va), (_, vb)) in a.trainable().iter().zip(b.trainable()) {
        let (va, vb): (Vec<f32>, Vec<f32>) = (
            va.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            vb.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(va, vb);
    }
}

#[test]
fn num_params_counts_every_hybrid_parameter() {
    for cfg in [
        micro_hybrid(),
        ModelConfig::tiny_hybrid(),
        ModelConfig::tiny(),
    ] {
        cfg.validate().unwrap();
        let model = Model::new(&cfg, &Device::Cpu, DType::F32, 1).unwrap();
        let counted: usize = model
            .param_layout()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(cfg.num_params(), Some(counted as u64));
    }
    let names: Vec<String> = Model::new(&micro_hybrid(), &Device::Cpu, DType::F32, 1)
        .unwrap()
        .param_layout()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // The block without a feed-forward has no second norm either.
    assert!(names.iter().any(|n| n == "layers.2.mamba.A_log"));
    assert!(!names.iter().any(|n| n.starts_with("layers.2.ffn")));
    assert!(!names.iter().any(|n| n.starts_with("layers.0.attn")));
}

#[test]
fn inconsistent_hybrid_configs_are_refused() {
    let ok = micro_hybrid();
    ok.validate().unwrap();
    let cases = [
        (
            "layers lists 3 blocks for n_layers 2",
            ModelConfig {
                n_layers: 2,
                ..ok.clone()
            },
        ),
        (
            "needs the `mamba` settings",
            ModelConfig {
                mamba: None,
                ..ok.clone()
            },
        ),
        (
            "disagrees",
            ModelConfig {
                moe_layers: vec![0],
                ..ok.clone()
            },
        ),
        (
            "no block is a Mamba layer",
            ModelConfig {
                layers: vec![kind(Mixer::Attention, FeedForward::Dense); 3],
                ..ok.clone()
            },
        ),
        (
            "no block is a Mamba layer",
            ModelConfig {
                mamba: ok.mamba.clone(),
                ..micro(vec![], 2)
            },
        ),
        (
            "mamba.d_state 0",
            ModelConfig {
                mamba: Some(MambaConfig {
                    d_state: 0,
                    ..ok.mamba.clone().unwrap()
                }),
                ..ok.clone()
            },
        ),
        (
            "dt_min",
            ModelConfig {
                mamba: Some(MambaConfig {
                    dt_min: 0.5,
                    dt_max: 0.1,
                    ..ok.mamba.clone().unwrap()
                }),
                ..ok.clone()
            },
        ),
    ];
    for (want, cfg) in cases {
        match cfg.validate() {
            Err(WorkerError::Config(m)) => assert!(m.contains(want), "{want:?} not in {m:?}"),
            other => panic!("{want}: {other:?}"),
        }
        assert!(Model::new(&cfg, &Device::Cpu, DType::F32, 1).is_err());
    }
    // A model without attention blocks does not care about the head count.
    let heads = ModelConfig {
        n_heads: 3,
        ..micro_mamba(&[FeedForward::Dense, FeedForward::None])
    };
    heads.validate().unwrap();
    // `moe_layers` may be left empty or agree with `layers`.
    ModelConfig {
        moe_layers: vec![1],
        ..ok
    }
    .validate()
    .unwrap();
}

#[test]
fn a_hybrid_config_reads_from_toml_and_json() {
    let text = r#"
        vocab = 24
        d_model = 16
        n_heads = 2
        n_layers = 2
        context = 16
        moe_layers = []
        n_experts = 2
        expert_hidden = 8
        top_k = 1
        capacity_factor = 2.0
        aux_loss_coef = 0.01
        ffn_hidden = 20
        tie_embeddings = true
        rope_theta = 10000.0
        norm_eps = 1e-5
        init_std = 0.02
        layers = [{ mixer = "mamba", ffn = "moe" }, { mixer = "attention", ffn = "none" }]
        [mamba]
        d_state = 4
        d_conv = 4
        expand = 2
        dt_rank = 1
        dt_min = 0.001
        dt_max = 0.1
    "#;
    let cfg: ModelConfig = toml::from_str(text).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.is_moe(0) && !cfg.is_moe(1));
    assert_eq!(cfg.layer_kind(1), kind(Mixer::Attention, FeedForward::None));
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), cfg);
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn pipeline_stages_cut_through_mamba_blocks() {
    let mut cfg = micro_hybrid();
    cfg.tie_embeddings = true;
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 8).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 8, 5);
    let w = model.weights(true).unwrap();
    let (loss, _) = model.loss(&w, &x, &y).unwrap();
    let full = loss.to_scalar::<f64>().unwrap();
    let reference = model
        .collect_grads(&loss.backward().unwrap(), |_| true)
        .unwrap();
    let stages = model.split_stages(3).unwrap();
    let mut inputs = vec![x.clone()];
    let mut split = 0f64;
    for (i, s) in stages.iter().enumerate() {
        let out = model
            .stage_forward(s, &inputs[i], s.head.then_some(&y))
            .unwrap();
        split += out.aux as f64 + out.ce.unwrap_or(0.0) as f64;
        if let Some(h) = out.hidden {
            inputs.push(h);
        }
    }
    assert!(
        (split - full).abs() < 1e-9 * full.abs(),
        "{split} vs {full}"
    );
    let mut summed: std::collections::HashMap<String, Vec<f64>> = Default::default();
    let mut grad_out: Option<Tensor> = None;
    for (i, s) in stages.iter().enumerate().rev() {
        let back = model
            .stage_backward(s, &inputs[i], grad_out.as_ref(), s.head.then_some(&y))
            .unwrap();
        for (name, g) in back.param_grads {
            assert!(model.stage_owns(s, &name), "{name} in {s:?}");
            let g = to_vec(&g);
            summed
                .entry(name)
                .and_modify(|acc| acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b))
                .or_insert(g);
        }
        grad_out = back.input_grad;
    }
    assert_eq!(summed.len(), reference.len());
    for (name, g) in &reference {
        let got = &summed[name];
        let want = to_vec(g);
        let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff / scale < 1e-9, "{name}: {diff}");
    }
}

#[test]
fn recurrent_generation_matches_the_full_pass_with_a_constant_state() {
    let cfg = micro_mamba(&[FeedForward::Dense, FeedForward::None, FeedForward::Moe]);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 6).unwrap();
    let w = model.weights(false).unwrap();
    let (x, _) = batch(cfg.vocab, 2, 11, 9);
    let full = model.logits(&w, &x).unwrap();
    assert_eq!(full.dims(), [2, 11, cfg.vocab]);
    let mut state = model.recurrent_state(&w, 2).unwrap();
    let size = state.elem_count();
    for t in 0..11 {
        let tokens = x.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let step = model.step_logits(&w, &mut state, &tokens).unwrap();
        let want = full.narrow(1, t, 1).unwrap().squeeze(1).unwrap();
        let diff = (step - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-9, "position {t}: {diff}");
        assert_eq!(state.elem_count(), size, "the state grew at {t}");
    }
    // Attention would need a KV cache: refused clearly.
    let hybrid = Model::new(&micro_hybrid(), &Device::Cpu, DType::F32, 1).unwrap();
    let err = hybrid
        .recurrent_state(&hybrid.weights(false).unwrap(), 1)
        .unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
    // A batch that does not fit the state is refused.
    let one = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    assert!(model.step_logits(&w, &mut state, &one).is_err());
}

fn corpus() -> (SyntheticCorpus, Dataset) {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    let data = Dataset::synthetic(&corpus, 200_000, 20_000, 4).unwrap();
    (corpus, data)
}

fn train_config(steps: u64) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        warmup_steps: 10,
        total_steps: steps,
        batch_size: 8,
        seq_len: 64,
        seed: 7,
        ..TrainConfig::default()
    }
}

/// The hybrid learns the built-in corpus on the CPU, replicas with the same seed and data
/// are bit-identical, and a checkpoint reloads the same model.
#[test]
fn tiny_hybrid_trains_on_the_builtin_corpus() {
    let (corpus, data) = corpus();
    let cfg = ModelConfig::tiny_hybrid();
    let steps = 40;
    let train = train_config(steps as u64);
    let mut replica = Replica::new(&cfg, &train, &DeviceSpec::Cpu).unwrap();
    let before = replica.eval_loss(&data, 4).unwrap();
    replica.train_steps(&data, 0, steps).unwrap();
    let after = replica.eval_loss(&data, 4).unwrap();
    eprintln!(
        "tiny_hybrid: eval loss {before:.4} -> {after:.4} (entropy rate {:.4})",
        corpus.entropy_rate_nats_per_byte()
    );
    assert!(
        after < 0.8 * before,
        "loss {before} -> {after} did not fall"
    );

    let dir = tempfile::tempdir().unwrap();
    replica.save_checkpoint(dir.path(), true).unwrap();
    let loaded = Replica::load_checkpoint(dir.path(), &DeviceSpec::Cpu).unwrap();
    assert_eq!(loaded.model_config(), Some(&cfg));
    let bits = |r: &Replica| -> Vec<u32> {
        r.flat_params()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert!(
        bits(&loaded) == bits(&replica),
        "the checkpoint changed the weights"
    );

    let short = |seed| {
        let train = TrainConfig {
            seed,
            batch_size: 2,
            seq_len: 16,
            ..train.clone()
        };
        let mut r = Replica::new(&cfg, &train, &DeviceSpec::Cpu).unwrap();
        r.train_steps(&data, 1, 3).unwrap();
        bits(&r)
    };
    assert!(short(1) == short(1), "two replicas differ");
    assert!(short(1) != short(2), "the seed must matter");
}

#[test]
fn every_mamba_parameter_gets_a_gradient() {
    let cfg = ModelConfig::tiny_hybrid();
    let model = Model::new(&cfg, &Device::Cpu, DType::F32, 3).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 16, 1);
    let w = model.weights(true).unwrap();
    let (loss, _) = model.loss(&w, &x, &y).unwrap();
    let grads = model.param_grads(&loss.backward().unwrap()).unwrap();
    for ((name, _), g) in model.trainable().iter().zip(grads) {
        if name.contains("experts") {
            continue; // an expert may get no tokens from one small batch
        }
        let g = g.unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = to_vec(&g).iter().map(|v| v * v).sum::<f64>();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

#[test]
fn bf16_compute_runs_the_scan_in_f32() {
    let (_, data) = corpus();
    let cfg = ModelConfig::tiny_hybrid();
    let train = TrainConfig {
        compute_dtype: potluck_worker::ComputeDType::Bf16,
        batch_size: 4,
        seq_len: 32,
        ..train_config(10)
    };
    let mut replica = Replica::new(&cfg, &train, &DeviceSpec::Cpu).unwrap();
    let before = replica.eval_loss(&data, 2).unwrap();
    replica.train_steps(&data, 0, 10).unwrap();
    let after = replica.eval_loss(&data, 2).unwrap();
    assert!(after.is_finite() && after < before, "{before} -> {after}");
}

/// The hybrid against an all-attention model at about equal parameters, same data, steps
/// and settings: both losses printed as JSON lines (docs/BENCHMARKS.md has the numbers).
/// Ignored: minutes of CPU.
#[test]
#[ignore]
fn hybrid_and_attention_losses_side_by_side() {
    let (corpus, data) = corpus();
    let steps = 300;
    let train = train_config(steps);
    for (name, cfg) in [
        ("tiny_hybrid", ModelConfig::tiny_hybrid()),
        (
            "tiny_attention",
            // The hybrid's layout with attention in every block; the dense blocks are wider
            // (256 instead of 128) to make up the Mamba mixers' extra parameters.
            ModelConfig {
                n_layers: 4,
                moe_layers: vec![1, 3],
                ffn_hidden: 256,
                ..ModelConfig::tiny()
            },
        ),
    ] {
        let mut replica = Replica::new(&cfg, &train, &DeviceSpec::Cpu).unwrap();
        let start = std::time::Instant::now();
        let before = replica.eval_loss(&data, 8).unwrap();
        replica.train_steps(&data, 0, steps as usize).unwrap();
        let after = replica.eval_loss(&data, 8).unwrap();
        println!(
            "{{\"model\":\"{name}\",\"params\":{},\"steps\":{steps},\"batch\":{},\"seq\":{},\
             \"eval_before\":{before:.4},\"eval_after\":{after:.4},\"entropy_rate\":{:.4},\
             \"seconds\":{:.1}}}",
            cfg.num_params().unwrap(),
            train.batch_size,
            train.seq_len,
            corpus.entropy_rate_nats_per_byte(),
            start.elapsed().as_secs_f64()
        );
    }
}

/// Random `(u, delta, a, b, c)` on the CPU in f32, in the ranges a trained model feeds the
/// scan (delta is a softplus, A = -exp(A_log) is negative).
#[cfg(feature = "cuda")]
fn scan_inputs(bs: usize, l: usize, d: usize, n: usize, seed: u64) -> [Tensor; 5] {
    let rand = |shape: &[usize], lo: f32, hi: f32, s: u64| {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed * 10 + s);
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    [
        rand(&[bs, l, d], -1.0, 1.0, 0),
        rand(&[bs, l, d], 0.001, 0.2, 1),
        rand(&[d, n], -4.0, -0.05, 2),
        rand(&[bs, l, n], -1.0, 1.0, 3),
        rand(&[bs, l, n], -1.0, 1.0, 4),
    ]
}

/// The largest difference between `got` and `want`, over the largest magnitude of `want`.
#[cfg(feature = "cuda")]
fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let f = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
    };
    let (got, want) = (f(got), f(want));
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let scale: f64 = max(want.clone()).to_scalar().unwrap();
    let diff: f64 = max((got - want).unwrap()).to_scalar().unwrap();
    diff / scale.max(1e-30)
}

/// The CUDA scan (a chunked parallel scan, `worker/src/mamba/scan.cu`) against the CPU
/// version, forward and all five gradients, in f32 and in bf16, for lengths below, at and
/// past the 64-step chunk and not multiples of it, state sizes that take one and two
/// register groups, and channel counts that leave warps and blocks part-filled. Run with
/// `cargo test -p potluck-worker --features cuda --test mamba -- --ignored cuda_`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_scan_matches_the_cpu_version_in_f32_and_bf16() {
    use candle_core::Var;
    use potluck_worker::mamba::selective_scan;
    let gpu = Device::new_cuda(0).unwrap();
    for (case, &(bs, l, d, n)) in [
        (1, 1, 8, 16),
        (2, 63, 33, 16),
        (1, 64, 130, 16),
        (3, 129, 96, 20),
        (1, 1000, 64, 4),
        (2, 4099, 256, 16),
    ]
    .iter()
    .enumerate()
    {
        let inputs = scan_inputs(bs, l, d, n, case as u64);
        let weight = scan_inputs(bs, l, d, 1, 100 + case as u64)[0].clone();
        for dtype in [DType::F32, DType::BF16] {
            // Both sides start from the same values: rounded to bf16 for the bf16 case.
            let cpu: Vec<Var> = inputs
                .iter()
                .map(|t| {
                    Var::from_tensor(&t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
                        .unwrap()
                })
                .collect();
            let dev: Vec<Var> = inputs
                .iter()
                .map(|t| {
                    Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(&gpu).unwrap()).unwrap()
                })
                .collect();
            let run = |v: &[Var], w: &Tensor| {
                let y = selective_scan(&v[0], &v[1], &v[2], &v[3], &v[4]).unwrap();
                let loss = (y.to_dtype(DType::F32).unwrap() * w)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                let g: Vec<Tensor> = v.iter().map(|x| grads.get(x).unwrap().clone()).collect();
                (y, g)
            };
            let (y_cpu, g_cpu) = run(&cpu, &weight);
            let (y_gpu, g_gpu) = run(&dev, &weight.to_device(&gpu).unwrap());
            assert_eq!(y_gpu.dtype(), dtype);
            let (tol_y, tol_g) = if dtype == DType::F32 {
                (1e-4, 1e-3)
            } else {
                (1e-2, 3e-2)
            };
            let dy = rel_diff(&y_gpu, &y_cpu);
            eprintln!("scan {bs}x{l}x{d}x{n} {dtype:?}: y {dy:.2e}");
            assert!(
                dy <= tol_y,
                "{bs}x{l}x{d}x{n} {dtype:?}: y differs by {dy:.2e}"
            );
            for (name, (g, want)) in ["u", "delta", "a", "b", "c"]
                .iter()
                .zip(g_gpu.iter().zip(&g_cpu))
            {
                let dg = rel_diff(g, want);
                eprintln!("  grad {name} {dg:.2e}");
                assert!(
                    dg <= tol_g,
                    "{bs}x{l}x{d}x{n} {dtype:?}: grad {name} differs by {dg:.2e}"
                );
            }
        }
    }
}

/// The same scan twice on the GPU gives the same bits: every sum of the backward pass is
/// added in a fixed order, so replicas stay bit-identical.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_scan_is_deterministic() {
    use candle_core::Var;
    use potluck_worker::mamba::selective_scan;
    let gpu = Device::new_cuda(0).unwrap();
    let inputs = scan_inputs(2, 700, 200, 16, 9);
    let grads = || {
        let v: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(&gpu).unwrap()).unwrap())
            .collect();
        let y = selective_scan(&v[0], &v[1], &v[2], &v[3], &v[4]).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        v.iter()
            .flat_map(|x| {
                let t = g.get(x).unwrap().flatten_all().unwrap();
                t.to_vec1::<f32>().unwrap()
            })
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    assert_eq!(grads(), grads());
}

/// A hybrid (Mamba, attention, MoE) trains on the GPU as on the CPU: the same initial loss,
/// then eval losses within the tolerance of each dtype after a short run.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_hybrid_reaches_the_cpu_loss() {
    use potluck_worker::ComputeDType;
    let (_, data) = corpus();
    let steps = 60;
    let run = |device: DeviceSpec, dtype: ComputeDType| {
        let train = TrainConfig {
            compute_dtype: dtype,
            ..train_config(steps)
        };
        let mut r = Replica::new(&ModelConfig::tiny_hybrid(), &train, &device).unwrap();
        let before = r.eval_loss(&data, 4).unwrap();
        r.train_steps(&data, 0, steps as usize).unwrap();
        let after = r.eval_loss(&data, 4).unwrap();
        eprintln!("hybrid {device:?} {dtype:?}: eval loss {before:.5} -> {after:.5}");
        (before, after)
    };
    let (cpu0, cpu) = run(DeviceSpec::Cpu, ComputeDType::F32);
    let (gpu0, gpu) = run(DeviceSpec::Cuda(0), ComputeDType::F32);
    let (bf0, bf) = run(DeviceSpec::Cuda(0), ComputeDType::Bf16);
    assert!(
        cpu < 0.85 * cpu0,
        "the CPU run did not learn: {cpu0} -> {cpu}"
    );
    assert!(
        (gpu0 - cpu0).abs() <= 1e-3 * cpu0,
        "initial cuda f32 {gpu0} vs cpu {cpu0}"
    );
    assert!(
        (bf0 - cpu0).abs() <= 1e-2 * cpu0,
        "initial cuda bf16 {bf0} vs cpu {cpu0}"
    );
    assert!(
        (gpu - cpu).abs() <= 0.02 * cpu,
        "cuda f32 {gpu} vs cpu {cpu}"
    );
    assert!(
        (bf - cpu).abs() <= 0.05 * cpu,
        "cuda bf16 {bf} vs cpu {cpu}"
    );
}
