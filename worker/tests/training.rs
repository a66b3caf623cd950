//! Training behaviour: convergence to the source's entropy rate, expert balance, every
//! parameter trained, determinism, the swarm's flat-vector and outer-step pieces.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use candle_core::{DType, Device};
use potluck_worker::{
    ComputeDType, Dataset, DeviceSpec, Model, ModelConfig, OuterOptimizer, Replica,
    SyntheticCorpus, SyntheticSpec, TrainConfig, WorkerError, pseudo_gradient,
};

fn small_train() -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        warmup_steps: 10,
        total_steps: 200,
        batch_size: 8,
        seq_len: 32,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn corpus() -> (SyntheticCorpus, Dataset) {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    let data = Dataset::synthetic(&corpus, 200_000, 20_000, 4).unwrap();
    (corpus, data)
}

#[test]
fn every_parameter_gets_a_gradient_in_one_step() {
    let cfg = ModelConfig {
        moe_layers: vec![1],
        tie_embeddings: false,
        ..ModelConfig::tiny()
    };
    let model = Model::new(&cfg, &Device::Cpu, DType::F32, 3).unwrap();
    let (_, data) = corpus();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let (x, y) = data.sample_batch(0, 8, 32, &mut rng).unwrap();
    let x = candle_core::Tensor::from_vec(x, (8, 32), &Device::Cpu).unwrap();
    let y = candle_core::Tensor::from_vec(y, (8, 32), &Device::Cpu).unwrap();
    let w = model.weights(true).unwrap();
    let (loss, _) = model.loss(&w, &x, &y).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s > 0.0 && s.is_finite(), "{name}: gradient magnitude {s}");
    }
}

/// The built-in corpus is learnable: after a short CPU run the held-out loss is within 15%
/// of the source's entropy rate, and the experts share the tokens.
#[test]
fn tiny_model_reaches_entropy_rate_with_balanced_experts() {
    let (corpus, data) = corpus();
    let h = corpus.entropy_rate_nats_per_byte();
    let train = TrainConfig {
        lr: 3e-3,
        total_steps: 500,
        batch_size: 16,
        ..small_train()
    };
    let mut replica = Replica::new(&ModelConfig::tiny(), &train, &DeviceSpec::Cpu).unwrap();
    let before = replica.eval_loss(&data, 8).unwrap();
    replica.train_steps(&data, 0, 450).unwrap();
    // Routing balance is measured over the later steps, once the router has learnt.
    let last = replica.train_steps(&data, 1, 50).unwrap();
    let after = replica.eval_loss(&data, 8).unwrap() as f64;
    eprintln!("entropy rate {h:.4} nats/byte, eval loss {before:.4} -> {after:.4}");
    assert!(
        after <= 1.15 * h,
        "eval loss {after} is not within 15% of {h}"
    );
    for (l, counts) in last.expert_tokens.iter().enumerate() {
        let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
        for (e, &c) in counts.iter().enumerate() {
            let share = c as f64 / mean;
            assert!(
                (0.25..=2.0).contains(&share),
                "layer {l} expert {e}: {c} tokens, {share:.2}x the mean ({counts:?})"
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn same_seed_same_data_gives_bit_identical_weights() {
    let (_, data) = corpus();
    let train = TrainConfig {
        batch_size: 4,
        seq_len: 16,
        ..small_train()
    };
    let run = || {
        let mut r = Replica::new(&ModelConfig::tiny(), &train, &DeviceSpec::Cpu).unwrap();
        r.train_steps(&data, 2, 4).unwrap();
        bits(&r.flat_params().unwrap())
    };
    let a = run();
    let b = run();
    assert!(a == b, "two runs differ");
    let other = TrainConfig {
        seed: 8,
        ..train.clone()
    };
    let mut r = Replica::new(&ModelConfig::tiny(), &other, &DeviceSpec::Cpu).unwrap();
    r.train_steps(&data, 2, 4).unwrap();
    assert!(bits(&r.flat_params().unwrap()) != a, "the seed must matter");
}

#[test]
fn snapshot_pseudo_gradient_and_outer_step() {
    let (_, data) = corpus();
    let train = TrainConfig {
        batch_size: 4,
        seq_len: 16,
        ..small_train()
    };
    let mut r = Replica::new(&ModelConfig::tiny(), &train, &DeviceSpec::Cpu).unwrap();
    let layout = r.param_layout();
    assert_eq!(layout[0].0, "tok_emb.weight");
    // Names are part of the checkpoint format: a few spot checks of the scheme.
    let names: Vec<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "layers.0.attn_norm.weight",
        "layers.0.attn.wq.weight",
        "layers.0.moe.router.weight",
        "layers.1.moe.experts.3.w_down.weight",
        "final_norm.weight",
    ] {
        assert!(names.contains(&want), "{want} missing");
    }
    assert!(!names.contains(&"lm_head.weight"), "tiny ties its head");
    let n: usize = layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(n, r.num_params());
    assert_eq!(n as u64, ModelConfig::tiny().num_params().unwrap());

    let theta_start = r.flat_params().unwrap();
    let start_bits = bits(&theta_start);
    r.train_steps(&data, 0, 3).unwrap();
    let now = r.flat_params().unwrap();
    // The snapshot is a copy: training did not change it.
    assert_eq!(bits(&theta_start), start_bits);
    let delta = pseudo_gradient(&theta_start, &now).unwrap();
    assert!(delta.iter().any(|d| *d != 0.0));

    let mut outer_a = OuterOptimizer::new(0.7, 0.9, n);
    let mut outer_b = OuterOptimizer::new(0.7, 0.9, n);
    let a1 = outer_a.step(&theta_start, &delta).unwrap();
    let b1 = outer_b.step(&theta_start, &delta).unwrap();
    assert_eq!(bits(&a1), bits(&b1));
    let a2 = outer_a.step(&a1, &delta).unwrap();
    let b2 = outer_b.step(&b1, &delta).unwrap();
    assert_eq!(bits(&a2), bits(&b2));
    assert_eq!(bits(outer_a.velocity()), bits(outer_b.velocity()));
    // Nesterov by hand for one value of the first step: v = g, theta = s - lr * (g + mu*g).
    let (s, g) = (theta_start[5], delta[5]);
    assert_eq!(a1[5].to_bits(), (s - 0.7f32 * (g + 0.9f32 * g)).to_bits());

    // The state round-trips and a restored optimizer continues identically.
    let bytes = outer_a.to_bytes();
    let mut restored = OuterOptimizer::from_bytes(&bytes, n).unwrap();
    assert_eq!(restored, outer_a);
    let c3 = restored.step(&a2, &delta).unwrap();
    let a3 = outer_a.step(&a2, &delta).unwrap();
    assert_eq!(bits(&c3), bits(&a3));
    assert!(OuterOptimizer::from_bytes(&bytes, n + 1).is_err());
    assert!(OuterOptimizer::from_bytes(&bytes[..bytes.len() - 1], n).is_err());
    assert!(OuterOptimizer::from_bytes(b"garbage", n).is_err());
    assert!(outer_a.step(&a2, &delta[1..]).is_err());
    assert!(pseudo_gradient(&a2, &delta[1..]).is_err());

    // Setting the new weights is exact.
    r.set_flat_params(&a3).unwrap();
    assert_eq!(bits(&r.flat_params().unwrap()), bits(&a3));
    assert!(matches!(
        r.set_flat_params(&a3[1..]),
        Err(WorkerError::Mismatch(_))
    ));
}

#[test]
fn bf16_compute_trains_with_f32_masters() {
    let (_, data) = corpus();
    let train = TrainConfig {
        compute_dtype: ComputeDType::Bf16,
        batch_size: 8,
        seq_len: 32,
        ..small_train()
    };
    let mut r = Replica::new(&ModelConfig::tiny(), &train, &DeviceSpec::Cpu).unwrap();
    assert_eq!(r.model().unwrap().master_dtype(), DType::F32);
    let first = r.train_steps(&data, 0, 5).unwrap();
    let later = r.train_steps(&data, 0, 25).unwrap();
    assert!(later.mean_loss.is_finite());
    assert!(
        later.last_loss < first.mean_loss,
        "{} -> {}",
        first.mean_loss,
        later.last_loss
    );
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let err = Replica::new(&ModelConfig::tiny(), &small_train(), &DeviceSpec::Cuda(0)).unwrap_err();
    assert!(matches!(err, WorkerError::Device(_)));
    assert!(err.to_string().contains("cuda"), "{err}");
}

#[test]
fn learning_rate_schedule_warms_up_and_decays() {
    let t = TrainConfig {
        lr: 1.0,
        min_lr_ratio: 0.1,
        warmup_steps: 10,
        total_steps: 110,
        ..TrainConfig::default()
    };
    assert!((t.lr_at(0) - 0.1).abs() < 1e-6);
    assert!((t.lr_at(9) - 1.0).abs() < 1e-6);
    assert!((t.lr_at(10) - 1.0).abs() < 1e-6);
    assert!((t.lr_at(60) - 0.55).abs() < 1e-6);
    assert!((t.lr_at(110) - 0.1).abs() < 1e-6);
    assert!((t.lr_at(1000) - 0.1).abs() < 1e-6);
}

#[test]
fn invalid_configs_are_refused() {
    let ok = ModelConfig::tiny();
    for (what, cfg) in [
        (
            "heads",
            ModelConfig {
                n_heads: 3,
                ..ok.clone()
            },
        ),
        (
            "odd head dim",
            ModelConfig {
                d_model: 12,
                n_heads: 4,
                ..ok.clone()
            },
        ),
        (
            "top_k",
            ModelConfig {
                top_k: 5,
                ..ok.clone()
            },
        ),
        (
            "moe layer",
            ModelConfig {
                moe_layers: vec![0, 2],
                ..ok.clone()
            },
        ),
        (
            "unsorted",
            ModelConfig {
                moe_layers: vec![1, 0],
                ..ok.clone()
            },
        ),
        (
            "capacity",
            ModelConfig {
                capacity_factor: f32::NAN,
                ..ok.clone()
            },
        ),
        (
            "huge",
            ModelConfig {
                d_model: 1 << 16,
                n_heads: 1,
                n_layers: 4000,
                ..ok.clone()
            },
        ),
        (
            "zero vocab",
            ModelConfig {
                vocab: 0,
                ..ok.clone()
            },
        ),
    ] {
        assert!(
            matches!(cfg.validate(), Err(WorkerError::Config(_))),
            "{what} accepted"
        );
        assert!(Replica::new(&cfg, &small_train(), &DeviceSpec::Cpu).is_err());
    }
    let long = TrainConfig {
        seq_len: ok.context + 1,
        ..small_train()
    };
    assert!(Replica::new(&ok, &long, &DeviceSpec::Cpu).is_err());
    let bad_lr = TrainConfig {
        lr: -1.0,
        ..small_train()
    };
    assert!(Replica::new(&ok, &bad_lr, &DeviceSpec::Cpu).is_err());
    ModelConfig::small().validate().unwrap();
    ModelConfig::base().validate().unwrap();
}

/// The GPU check of the issue: from the same initial weights, CUDA in f32 and in bf16 first
/// computes the CPU's loss, then after a short run (long enough that the loss falls well
/// below its start, so agreement is not two untrained models agreeing) reaches the CPU's eval
/// loss within the tolerance of its dtype. Run on a GPU machine with
/// `cargo test -p potluck-worker --features cuda --test training -- --ignored cuda_`
/// (docs/GPU.md has the build recipe and the command used on the device machine).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_f32_and_bf16_reach_the_cpu_loss() {
    let (_, data) = corpus();
    let run = |device: DeviceSpec, dtype: ComputeDType| {
        let train = TrainConfig {
            compute_dtype: dtype,
            batch_size: 16,
            ..small_train()
        };
        let mut r = Replica::new(&ModelConfig::tiny(), &train, &device).unwrap();
        let before = r.eval_loss(&data, 8).unwrap();
        let stats = r.train_steps(&data, 0, 100).unwrap();
        let after = r.eval_loss(&data, 8).unwrap();
        eprintln!(
            "{device:?} {dtype:?}: eval loss {before:.5} -> {after:.5}, last train loss {:.5}, \
             dropped {}",
            stats.last_loss, stats.dropped
        );
        // The optimizer wrote the bf16 compute copies in its own pass: they must be what a
        // fresh cast of the masters gives.
        let flat = r.flat_params().unwrap();
        r.set_flat_params(&flat).unwrap();
        let resynced = r.eval_loss(&data, 8).unwrap();
        assert!(
            (resynced - after).abs() <= 1e-6 * after,
            "{device:?} {dtype:?}: eval loss {after} with the optimizer's compute copies, \
             {resynced} with the masters cast again"
        );
        (before, after)
    };
    let (cpu0, cpu) = run(DeviceSpec::Cpu, ComputeDType::F32);
    let (gpu0, gpu) = run(DeviceSpec::Cuda(0), ComputeDType::F32);
    let (bf0, gpu_bf16) = run(DeviceSpec::Cuda(0), ComputeDType::Bf16);
    eprintln!("eval loss after 100 steps: cpu {cpu}, cuda f32 {gpu}, cuda bf16 {gpu_bf16}");
    assert!(
        cpu < 0.75 * cpu0,
        "the CPU run did not learn: {cpu0} -> {cpu}"
    );
    // Same weights, same batches: the forward pass itself must agree before any training.
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
        (gpu_bf16 - cpu).abs() <= 0.05 * cpu,
        "cuda bf16 {gpu_bf16} vs cpu {cpu}"
    );
}

#[test]
fn replica_and_data_can_move_to_a_worker_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Replica>();
    assert_send::<Dataset>();
    assert_send::<OuterOptimizer>();
}
