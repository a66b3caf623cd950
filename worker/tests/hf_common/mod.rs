//! Helpers shared by the tests of the Hugging Face bases (`hf_*.rs`).
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::HfModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The committed fixture `name` under `tests/fixtures/hf/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A tensor's values as f32, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// Gives every adapter's `B` random values in [-0.1, 0.1) from the ChaCha8 stream of
/// `seed` (CPU models), so that the adapters change the output and get gradients.
pub fn randomize_lora_b(model: &HfModel, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (n, p) in model.lora_params() {
        if n.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..p.elem_count())
                .map(|_| (rng.random::<f32>() - 0.5) * 0.2)
                .collect();
            p.set(&Tensor::from_vec(v, p.shape(), &Device::Cpu).expect("b"))
                .expect("set");
        }
    }
}
