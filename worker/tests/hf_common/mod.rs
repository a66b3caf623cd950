//! Helpers shared by the tests of the Hugging Face bases (`hf_*.rs`).
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

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
