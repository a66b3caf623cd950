//! The MoE layer's gather-only dispatch and combine (`Routing::dispatch`, `moe_combine`)
//! against the plain formulation with one `index_select` and one `index_add` per expert:
//! the same output and the same gradients for the tokens, the router and every expert, with
//! and without dropped assignments and with an expert that did not answer. And the batched
//! expert paths (`Model::set_batched_experts`, on each `ExpertLayout`) against one expert
//! at a time, through the whole model's loss and every gradient.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{batch, micro};
use potluck_worker::Model;
use potluck_worker::model::{ExpertLayout, moe_combine};

fn tokens(n: usize, d: usize, seed: u64) -> Var {
    let vals: Vec<f64> = (0..n * d)
        .map(|i| (((i as u64 * 7919 + seed * 104_729) % 211) as f64 / 105.0) - 1.0)
        .collect();
    Var::from_tensor(&Tensor::from_vec(vals, (n, d), &Device::Cpu).unwrap()).unwrap()
}

/// `|a - b| / |b|` in the L2 norm, in f64 whatever the tensors' dtype.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap().max(1e-300)).sqrt()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn check(capacity_factor: f32, missing: Option<usize>, seed: u64) {
    let cfg = micro(vec![0], 1);
    let cfg = potluck_worker::ModelConfig {
        capacity_factor,
        ..cfg
    };
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, seed).unwrap();
    let w = model.weights(true).unwrap();
    let n = 37;
    let x = tokens(n, cfg.d_model, seed);
    let routing = model.moe_route(&w, 0, x.as_tensor()).unwrap();
    if capacity_factor < 1.0 {
        assert!(routing.dropped > 0, "this case must drop assignments");
    }
    // A fixed, non-uniform output weighting so every output element matters differently.
    let weight = tokens(n, cfg.d_model, seed + 1);

    // Gather-only path, as the model runs it.
    let xs = routing.dispatch(x.as_tensor()).unwrap();
    let mut outputs = Vec::new();
    for e in 0..cfg.n_experts {
        outputs.push(match (routing.expert_rows(e), missing == Some(e)) {
            (Some((start, len)), false) => Some(
                model
                    .expert_forward(&w, 0, e, &xs.narrow(0, start, len).unwrap())
                    .unwrap(),
            ),
            _ => None,
        });
    }
    let fast = moe_combine(&routing, &outputs).unwrap();

    // Plain path: gather and scatter-add per expert.
    let mut plain = Tensor::zeros((n, cfg.d_model), DType::F64, &Device::Cpu).unwrap();
    for e in 0..cfg.n_experts {
        let (Some(idx), Some(gate)) = (routing.index(e).unwrap(), routing.gates(e).unwrap()) else {
            continue;
        };
        if missing == Some(e) {
            continue;
        }
        let xe = x.as_tensor().index_select(&idx, 0).unwrap();
        let ye = model.expert_forward(&w, 0, e, &xe).unwrap();
        let contrib = ye.broadcast_mul(&gate.unsqueeze(1).unwrap()).unwrap();
        plain = plain.index_add(&idx, &contrib, 0).unwrap();
    }
    assert!(max_diff(&fast, &plain) < 1e-12, "outputs differ");

    let objective = |y: &Tensor| (y * weight.as_tensor()).unwrap().sum_all().unwrap();
    let g_fast = objective(&fast).backward().unwrap();
    let g_plain = objective(&plain).backward().unwrap();
    let gx_fast = g_fast.get(x.as_tensor()).unwrap();
    let gx_plain = g_plain.get(x.as_tensor()).unwrap();
    assert!(
        max_diff(gx_fast, gx_plain) < 1e-12,
        "token gradients differ"
    );
    let mut compared = 0;
    for (name, var) in model.trainable() {
        match (g_fast.get(var.as_tensor()), g_plain.get(var.as_tensor())) {
            (Some(a), Some(b)) => {
                assert!(max_diff(a, b) < 1e-12, "{name}: gradients differ");
                compared += 1;
            }
            (None, None) => {}
            (a, b) => panic!(
                "{name}: gradient present on one path only ({} vs {})",
                a.is_some(),
                b.is_some()
            ),
        }
    }
    // The router and every answering expert's three matrices at least.
    let answering = (0..cfg.n_experts)
        .filter(|&e| routing.expert_rows(e).is_some() && missing != Some(e))
        .count();
    assert!(compared > 3 * answering, "{compared} gradients compared");
}

#[test]
fn gather_path_matches_index_add_path() {
    check(4.0, None, 3);
}

#[test]
fn gather_path_matches_with_dropped_assignments() {
    check(0.5, None, 5);
}

#[test]
fn gather_path_matches_with_a_missing_expert() {
    check(4.0, Some(1), 9);
    check(0.5, Some(0), 11);
}

/// The whole model's loss and gradients with the experts batched and one at a time.
fn batched_matches_single(capacity_factor: f32, seed: u64) {
    let cfg = potluck_worker::ModelConfig {
        capacity_factor,
        ..micro(vec![0, 1], 2)
    };
    let mut model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, seed).unwrap();
    let (x, y) = batch(cfg.vocab, 3, cfg.context, seed as u32);
    let mut run = |batched: bool, layout: ExpertLayout| {
        model.set_batched_experts(batched).unwrap();
        model.set_expert_layout(layout);
        let w = model.weights(true).unwrap();
        let (loss, stats) = model.loss(&w, &x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let g = model.collect_grads(&grads, |_| true).unwrap();
        (loss.to_scalar::<f64>().unwrap(), stats.stats, g)
    };
    let (l0, s0, g0) = run(false, ExpertLayout::default());
    for layout in [
        ExpertLayout::default(),
        ExpertLayout::Grouped { align: 1 },
        ExpertLayout::Grouped { align: 5 },
        ExpertLayout::Padded,
    ] {
        let (l1, s1, g1) = run(true, layout);
        assert!((l1 - l0).abs() < 1e-12, "{layout:?}: loss {l1} vs {l0}");
        assert_eq!(s1.expert_tokens, s0.expert_tokens);
        assert_eq!(s1.dropped, s0.dropped);
        if capacity_factor < 1.0 {
            assert!(s1.dropped > 0, "this case must drop assignments");
        }
        assert_eq!(g1.len(), g0.len());
        for ((n1, a), (n0, b)) in g1.iter().zip(&g0) {
            assert_eq!(n1, n0);
            assert!(max_diff(a, b) < 1e-12, "{layout:?}, {n1}: gradients differ");
        }
    }
}

#[test]
fn batched_experts_match_one_at_a_time() {
    batched_matches_single(4.0, 3);
    batched_matches_single(0.5, 7);
}

/// With bf16 compute the forward pass reads compute leaves (the experts' weights stacked,
/// one leaf per layer and projection): each parameter's gradient from `param_grads` (its
/// slice of the stacked leaf's gradient) matches the one-expert-at-a-time path, which casts
/// the experts' masters; and after optimizer steps the leaves hold exactly the masters cast
/// to bf16 (a fresh model given the same masters computes the same loss, bit for bit).
#[test]
fn compute_leaves_match_casting_the_masters() {
    batched_copies_match_one_at_a_time(DType::BF16, 2e-2, 5e-2);
}

/// f32 compute with the experts batched reads stacked f32 copies of the experts' weights
/// (the default on a GPU; switched on here on the CPU): every parameter's gradient matches
/// the one-expert-at-a-time path, which reads the masters, and after optimizer steps (the
/// CPU optimizer, then a resync of the copies) a fresh model given the same masters
/// computes the same loss bit for bit.
#[test]
fn stacked_f32_experts_match_one_at_a_time() {
    batched_copies_match_one_at_a_time(DType::F32, 1e-5, 1e-4);
}

/// The batched experts on their stacked copies in `dtype` against one expert at a time on
/// the masters: the same routing, the loss within `loss_tol` and every parameter's gradient
/// within `grad_tol` (relative); then, after two optimizer steps, a fresh model given the
/// same masters computes the same loss bit for bit (the copies follow the masters).
fn batched_copies_match_one_at_a_time(dtype: DType, loss_tol: f64, grad_tol: f64) {
    let cfg = micro(vec![0, 1], 2);
    let mut model = Model::new(&cfg, &Device::Cpu, dtype, 5).unwrap();
    let (x, y) = batch(cfg.vocab, 4, cfg.context, 5);
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let mut run = |batched: bool| {
        model.set_batched_experts(batched).unwrap();
        let w = model.weights(true).unwrap();
        let (loss, stats) = model.loss(&w, &x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let g = model.param_grads(&grads).unwrap();
        (scalar(&loss), stats.stats, g)
    };
    let (l0, s0, g0) = run(false);
    let (l1, s1, g1) = run(true);
    assert!(
        s1.expert_tokens.iter().flatten().all(|&c| c > 0),
        "every expert must be busy for the two paths to give the same gradients"
    );
    assert_eq!(s1.expert_tokens, s0.expert_tokens);
    assert!((l1 - l0).abs() < loss_tol * l0.abs(), "loss {l1} vs {l0}");
    for (((name, _), a), b) in model.trainable().iter().zip(&g1).zip(&g0) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        if dtype == DType::F32 {
            assert_eq!(a.dtype(), DType::F32, "{name}");
        }
        let e = rel_diff(a, b);
        assert!(e < grad_tol, "{name}: relative gradient difference {e}");
    }

    let train = potluck_worker::TrainConfig::default();
    let mut opt = potluck_worker::optim::AdamW::new(model.trainable()).unwrap();
    for _ in 0..2 {
        let w = model.weights(true).unwrap();
        let (loss, _) = model.loss(&w, &x, &y).unwrap();
        let g = model.param_grads(&loss.backward().unwrap()).unwrap();
        model.optimizer_step(&mut opt, &g, &train, 1e-2).unwrap();
    }
    let mut fresh = Model::new(&cfg, &Device::Cpu, dtype, 99).unwrap();
    fresh.set_batched_experts(true).unwrap();
    for ((_, a), (_, b)) in fresh.trainable().iter().zip(model.trainable()) {
        a.set(&b.as_tensor().copy().unwrap()).unwrap();
    }
    fresh.sync_compute().unwrap();
    let loss_of = |m: &Model| {
        let w = m.weights(false).unwrap();
        scalar(&m.loss(&w, &x, &y).unwrap().0)
    };
    assert_eq!(loss_of(&model), loss_of(&fresh));
    assert_ne!(loss_of(&model), l1, "the steps changed nothing");
}

/// With stacked bf16 leaves a layer whose expert got no tokens still runs batched: the busy
/// experts' gradients match the one-expert-at-a-time path, the idle expert's slice of the
/// stacked gradient is zero, and `stage_backward` leaves the idle expert's weights out, as
/// the per-expert path does.
#[test]
fn batched_leaves_handle_an_idle_expert() {
    let cfg = micro(vec![0], 1);
    let found = (0..64u64).find_map(|seed| {
        let model = Model::new(&cfg, &Device::Cpu, DType::BF16, seed).unwrap();
        let (x, y) = batch(cfg.vocab, 1, 3, seed as u32);
        let w = model.weights(false).unwrap();
        let (_, run) = model.loss(&w, &x, &y).unwrap();
        let idle = run.stats.expert_tokens[0].iter().position(|&c| c == 0)?;
        Some((model, x, y, idle))
    });
    let (mut model, x, y, idle) = found.expect("some seed leaves an expert idle");
    let idle_prefix = format!("layers.0.moe.experts.{idle}.");
    let mut grads = |batched: bool| {
        model.set_batched_experts(batched).unwrap();
        let w = model.weights(true).unwrap();
        let (loss, _) = model.loss(&w, &x, &y).unwrap();
        model.param_grads(&loss.backward().unwrap()).unwrap()
    };
    let (g1, g0) = (grads(true), grads(false));
    for (((name, _), a), b) in model.trainable().iter().zip(&g1).zip(&g0) {
        if name.starts_with(&idle_prefix) {
            assert!(
                b.is_none(),
                "{name}: the per-expert path gave an idle expert a gradient"
            );
            let a = a.as_ref().unwrap().to_dtype(DType::F64).unwrap();
            let s = a
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(s, 0.0, "{name}: the idle slice is not zero");
            continue;
        }
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let e = rel_diff(a, b);
        assert!(e < 5e-2, "{name}: relative gradient difference {e}");
    }
    for batched in [true, false] {
        model.set_batched_experts(batched).unwrap();
        let back = model
            .stage_backward(&model.full_stage(), &x, None, Some(&y))
            .unwrap();
        assert!(
            back.param_grads
                .iter()
                .all(|(n, _)| !n.starts_with(&idle_prefix)),
            "batched {batched}: the idle expert got a gradient"
        );
        assert!(
            back.param_grads
                .iter()
                .any(|(n, _)| n.contains(".experts."))
        );
    }
}
