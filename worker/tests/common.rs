//! Helpers shared by the worker's integration tests.
#![allow(clippy::unwrap_used)] // tests fail loudly by design
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, Tensor, Var};
use potluck_worker::{Model, ModelConfig};

/// A very small config for f64 checks.
pub fn micro(moe_layers: Vec<usize>, n_layers: usize) -> ModelConfig {
    ModelConfig {
        vocab: 24,
        d_model: 16,
        n_heads: 2,
        n_layers,
        context: 16,
        moe_layers,
        n_experts: 4,
        expert_hidden: 12,
        top_k: 2,
        capacity_factor: 4.0,
        aux_loss_coef: 0.05,
        ffn_hidden: 20,
        tie_embeddings: false,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        // Larger than usual so that attention and routing are far from uniform.
        init_std: 0.3,
        layers: Vec::new(),
        mamba: None,
    }
}

/// Deterministic token batch `[b, t]` with targets.
pub fn batch(vocab: usize, b: usize, t: usize, seed: u32) -> (Tensor, Tensor) {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s % vocab as u32
    };
    let x: Vec<u32> = (0..b * t).map(|_| next()).collect();
    let y: Vec<u32> = (0..b * t).map(|_| next()).collect();
    (
        Tensor::from_vec(x, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, (b, t), &Device::Cpu).unwrap(),
    )
}

/// Loss of the whole model as f64.
pub fn loss_f64(model: &Model, x: &Tensor, y: &Tensor) -> f64 {
    let w = model.weights(false).unwrap();
    let (loss, _) = model.loss(&w, x, y).unwrap();
    loss.to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Sets one element of a Var (f64).
pub fn set_elem(var: &Var, idx: usize, value: f64) {
    let mut v: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    v[idx] = value;
    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

/// Central finite differences against autograd for `coords` coordinates of every parameter
/// whose name contains one of `patterns`. Returns how many coordinates were checked.
pub fn gradcheck(model: &Model, x: &Tensor, y: &Tensor, patterns: &[&str], coords: usize) -> usize {
    let w = model.weights(true).unwrap();
    let (loss, _) = model.loss(&w, x, y).unwrap();
    let grads = loss.backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in model.trainable() {
        if !patterns.iter().any(|p| name.contains(p)) {
            continue;
        }
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = orig.len();
        for c in 0..coords.min(n) {
            let idx = (c * 7919 + 13) % n;
            set_elem(var, idx, orig[idx] + eps);
            let lp = loss_f64(model, x, y);
            set_elem(var, idx, orig[idx] - eps);
            let lm = loss_f64(model, x, y);
            set_elem(var, idx, orig[idx]);
            let numeric = (lp - lm) / (2.0 * eps);
            let analytic = g[idx];
            let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tol,
                "{name}[{idx}]: autograd {analytic:e} vs finite difference {numeric:e}"
            );
            checked += 1;
        }
    }
    checked
}
