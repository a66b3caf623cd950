//! Autograd against central finite differences in f64, on the forward path training uses.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{batch, gradcheck, micro};
use potluck_worker::checkpoint::write_f32_tensors;
use potluck_worker::{LoraConfig, Model};

#[test]
fn attention_and_dense_gradients_match_finite_differences() {
    let cfg = micro(vec![], 2);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 3).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 7, 1);
    let n = gradcheck(
        &model,
        &x,
        &y,
        &[
            "attn.wq", "attn.wk", "attn.wv", "attn.wo", "norm", "ffn.w_", "tok_emb", "lm_head",
        ],
        4,
    );
    assert!(n >= 40, "only {n} coordinates checked");
}

#[test]
fn moe_gradients_match_finite_differences() {
    let cfg = micro(vec![0, 1], 2);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 5).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 8, 2);
    let n = gradcheck(&model, &x, &y, &["router", "experts", "attn.wq"], 3);
    assert!(n >= 50, "only {n} coordinates checked");
}

#[test]
fn moe_gradients_with_capacity_drops_match_finite_differences() {
    let mut cfg = micro(vec![0], 1);
    cfg.capacity_factor = 0.5;
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 9).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 8, 4);
    let w = model.weights(false).unwrap();
    let (_, run) = model.loss(&w, &x, &y).unwrap();
    assert!(run.stats.dropped > 0, "the test needs dropped assignments");
    gradcheck(&model, &x, &y, &["router", "experts.1", "attn.wv"], 3);
}

#[test]
fn lora_gradients_match_finite_differences() {
    let cfg = micro(vec![1], 2);
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.safetensors");
    let base = Model::new(&cfg, &Device::Cpu, DType::F32, 11).unwrap();
    let tensors: Vec<_> = base
        .trainable()
        .iter()
        .map(|(n, v)| {
            let vals: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (n.clone(), v.dims().to_vec(), vals)
        })
        .collect();
    write_f32_tensors(&base_path, &tensors).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
    };
    let model = Model::with_lora(
        &cfg,
        &Device::Cpu,
        DType::F64,
        DType::F64,
        &base_path,
        &lora,
        1,
    )
    .unwrap();
    assert!(model.trainable().iter().all(|(n, _)| n.contains(".lora_")));
    // B starts at zero, which would make every gradient of A zero: give it values first.
    for (name, var) in model.trainable() {
        if name.ends_with("lora_b") {
            let n = var.elem_count();
            let vals: Vec<f64> = (0..n)
                .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.05)
                .collect();
            var.set(&Tensor::from_vec(vals, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let (x, y) = batch(cfg.vocab, 2, 6, 3);
    let n = gradcheck(&model, &x, &y, &["lora_a", "lora_b"], 2);
    assert!(n >= 40, "only {n} coordinates checked");
}
