//! Gradient checkpointing of the worker's own model (`Model::train_grads` with
//! `Checkpointing::Layers`, `TrainConfig::checkpointing`): the loss, the load-balancing loss,
//! the routing counts and every parameter's gradient equal those of the plain backward pass
//! (f32 on the CPU; a hybrid of Mamba, attention, dense and MoE blocks and a plain MoE
//! transformer, experts one at a time and batched), and replicas trained with and without
//! it end with the same weights. The model has no dropout, so there are no masks to redraw.
//! The ignored test `peak_memory_with_and_without_checkpointing` measures the heap a
//! training step allocates at its peak on a small Mamba model, with this binary's counting
//! allocator, and prints one JSON object per setting (docs/BENCHMARKS.md).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;
mod heap;

use candle_core::{DType, Device, Tensor};
use common::{batch, micro};
use heap::{peak_since, reset_peak};
use potluck_worker::config::{FeedForward, LayerKind, MambaConfig, Mixer};
use potluck_worker::{
    Checkpointing, Dataset, DeviceSpec, Model, ModelConfig, Replica, SyntheticCorpus,
    SyntheticSpec, TrainConfig,
};

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Every block kind in one model: Mamba with each feed-forward, attention with MoE and
/// dense, tied embeddings (whose gradient comes from the first and the last block's stage).
fn hybrid() -> ModelConfig {
    let kind = |mixer, ffn| LayerKind { mixer, ffn };
    let mut cfg = micro(vec![], 5);
    cfg.layers = vec![
        kind(Mixer::Mamba, FeedForward::Dense),
        kind(Mixer::Attention, FeedForward::Moe),
        kind(Mixer::Mamba, FeedForward::None),
        kind(Mixer::Mamba, FeedForward::Moe),
        kind(Mixer::Attention, FeedForward::Dense),
    ];
    cfg.tie_embeddings = true;
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

/// Attention blocks only, the first and last MoE, untied embeddings; capacity tight enough
/// that some assignments are dropped.
fn plain() -> ModelConfig {
    let mut cfg = micro(vec![0, 2], 3);
    cfg.capacity_factor = 1.0;
    cfg
}

/// Compares one model's plain and checkpointed passes; returns the worst relative difference
/// of a gradient (0 when they are bit-identical).
fn compare(name: &str, model: &Model, x: &Tensor, y: &Tensor) -> f32 {
    let off = model.train_grads(x, y, Checkpointing::Off).unwrap();
    let on = model.train_grads(x, y, Checkpointing::Layers).unwrap();
    assert!(
        (off.ce - on.ce).abs() <= 1e-6 * off.ce.abs(),
        "{name}: loss {} against {}",
        off.ce,
        on.ce
    );
    assert!(
        (off.aux - on.aux).abs() <= 1e-6 * off.aux.abs(),
        "{name}: aux {} against {}",
        off.aux,
        on.aux
    );
    assert_eq!(
        off.stats.expert_tokens, on.stats.expert_tokens,
        "{name}: routing"
    );
    assert_eq!(off.stats.dropped, on.stats.dropped, "{name}: dropped");
    let mut worst = 0f32;
    for ((n, _), (a, b)) in model
        .trainable()
        .iter()
        .zip(off.grads.iter().zip(&on.grads))
    {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (values(a), values(b)),
            (None, None) => continue,
            _ => panic!("{name}: {n} has a gradient in one pass only"),
        };
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "{name}: {n} differs by {diff} (largest {scale})"
        );
        if scale > 0.0 {
            worst = worst.max(diff / scale);
        }
    }
    let with_grad = off.grads.iter().filter(|g| g.is_some()).count();
    assert!(
        with_grad > model.trainable().len() / 2,
        "{name}: only {with_grad} gradients"
    );
    println!("{name}: {with_grad} gradients, worst relative difference {worst:e}");
    worst
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones() {
    let (x, y) = batch(24, 2, 16, 3);
    for (name, cfg) in [("hybrid", hybrid()), ("plain", plain())] {
        let mut model = Model::new(&cfg, &Device::Cpu, DType::F32, 11).unwrap();
        compare(name, &model, &x, &y);
        // Experts as batched products over stacked leaves, as on a GPU.
        model.set_batched_experts(true).unwrap();
        compare(&format!("{name}, batched experts"), &model, &x, &y);
    }
    // The pass sees routing: with the aux loss on, a MoE model's gradient is not the
    // cross-entropy's alone, and both passes add the same load-balancing terms.
    let model = Model::new(&plain(), &Device::Cpu, DType::F32, 11).unwrap();
    let off = model.train_grads(&x, &y, Checkpointing::Off).unwrap();
    assert!(off.aux > 0.0, "the plain model routes");
}

#[test]
fn a_single_block_model_checkpoints_as_one_stage() {
    let mut cfg = hybrid();
    cfg.n_layers = 1;
    cfg.layers.truncate(1);
    let model = Model::new(&cfg, &Device::Cpu, DType::F32, 5).unwrap();
    let (x, y) = batch(24, 1, 8, 1);
    compare("one block", &model, &x, &y);
}

/// Replicas trained with and without checkpointing (whole batches, and micro-batches) end
/// with the same weights: bit for bit with untied embeddings; within rounding with tied
/// ones, whose gradient the checkpointed pass sums from two stages.
#[test]
fn replicas_train_the_same_with_and_without_checkpointing() {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    let data = Dataset::synthetic(&corpus, 50_000, 5_000, 2).unwrap();
    let tied = ModelConfig::tiny_hybrid();
    assert!(tied.tie_embeddings);
    let untied = ModelConfig {
        tie_embeddings: false,
        ..tied.clone()
    };
    let train = |checkpointing| TrainConfig {
        lr: 3e-3,
        warmup_steps: 2,
        total_steps: 10,
        batch_size: 4,
        seq_len: 32,
        seed: 5,
        checkpointing,
        ..TrainConfig::default()
    };
    let run = |cfg: &ModelConfig, checkpointing, micro_batch| {
        let mut r = Replica::new(cfg, &train(checkpointing), &DeviceSpec::Cpu).unwrap();
        r.set_micro_batch(micro_batch);
        let stats = r.train_steps(&data, 0, 4).unwrap();
        (stats.mean_loss, r.flat_params().unwrap())
    };
    for (name, cfg) in [("untied", &untied), ("tied", &tied)] {
        let r0 = Replica::new(cfg, &train(Checkpointing::Off), &DeviceSpec::Cpu).unwrap();
        let start = r0.flat_params().unwrap();
        for micro_batch in [0, 2] {
            let what = format!("{name}, micro-batch {micro_batch}");
            let (loss_off, off) = run(cfg, Checkpointing::Off, micro_batch);
            let (loss_on, on) = run(cfg, Checkpointing::Layers, micro_batch);
            let moved = off
                .iter()
                .zip(&start)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert!(moved > off.len() / 2, "{what}: training moved only {moved}");
            let identical = off.iter().zip(&on).all(|(a, b)| a.to_bits() == b.to_bits());
            if !cfg.tie_embeddings {
                assert!(identical, "{what}: the weights differ");
                assert_eq!(loss_off.to_bits(), loss_on.to_bits(), "{what}: loss");
                println!("{what}: bit-identical");
                continue;
            }
            assert!(
                (loss_off - loss_on).abs() <= 1e-6 * loss_off.abs(),
                "{what}: loss {loss_off} against {loss_on}"
            );
            // Per tensor, the largest difference against the tensor's largest weight: AdamW
            // divides each gradient by its own running scale, so a rounding difference in a
            // near-zero gradient moves that weight by up to a step; relative to the element
            // it can look large, relative to the tensor it stays at rounding level.
            let mut worst = 0f32;
            let mut at = 0;
            for (n, shape) in r0.param_layout() {
                let k: usize = shape.iter().product();
                let (a, b) = (&off[at..at + k], &on[at..at + k]);
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    diff <= 1e-5 * scale,
                    "{what}: {n} differs by {diff} (largest {scale})"
                );
                worst = worst.max(diff / scale);
                at += k;
            }
            println!("{what}: bit-identical {identical}, worst relative {worst:e}");
        }
    }
}

/// A Mamba model of `layers` blocks of width `d`, tied embeddings.
fn small_mamba(d: usize, layers: usize, vocab: usize, context: usize) -> ModelConfig {
    let cfg = ModelConfig {
        vocab,
        d_model: d,
        n_heads: d / 64,
        n_layers: layers,
        context,
        moe_layers: Vec::new(),
        n_experts: 1,
        expert_hidden: 1,
        top_k: 1,
        capacity_factor: 1.0,
        aux_loss_coef: 0.0,
        ffn_hidden: 1,
        tie_embeddings: true,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        init_std: 0.02,
        layers: vec![
            LayerKind {
                mixer: Mixer::Mamba,
                ffn: FeedForward::None,
            };
            layers
        ],
        mamba: Some(MambaConfig::for_width(d)),
    };
    cfg.validate().unwrap();
    cfg
}

#[test]
#[ignore = "a larger Mamba model (tens of seconds on 2 cores); run alone with --ignored --nocapture --test-threads=1"]
fn peak_memory_with_and_without_checkpointing() {
    let (d, layers, vocab, batch_rows, time) = (256, 8, 2048, 1, 2048);
    let cfg = small_mamba(d, layers, vocab, time);
    let model = Model::new(&cfg, &Device::Cpu, DType::F32, 1).unwrap();
    let (x, y) = batch(vocab, batch_rows, time, 7);
    let model_bytes = 4 * cfg.num_params().unwrap();
    let mut losses = Vec::new();
    for ckpt in [Checkpointing::Off, Checkpointing::Layers] {
        // Once to warm up (thread pools, first-use buffers), then measured.
        drop(model.train_grads(&x, &y, ckpt).unwrap());
        let before = reset_peak();
        let start = std::time::Instant::now();
        let pass = model.train_grads(&x, &y, ckpt).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let peak = peak_since(before);
        let loss = pass.ce;
        losses.push(loss);
        drop(pass);
        println!(
            "{}",
            serde_json::json!({
                "bench": "model_checkpoint_peak_heap",
                "checkpointing": format!("{ckpt:?}"),
                "model": "mamba", "d_model": d, "layers": layers, "vocab": vocab,
                "batch": batch_rows, "time": time, "dtype": "f32",
                "params": cfg.num_params().unwrap(),
                "model_bytes": model_bytes,
                "peak_heap_above_model_bytes": peak,
                "step_seconds": secs,
                "loss": loss,
            })
        );
    }
    assert!((losses[0] - losses[1]).abs() <= 1e-6 * losses[0].abs());
}
