//! Bases people already have: Hugging Face format model directories on disk (`config.json`,
//! `model.safetensors` or a sharded index), loaded with no network access and run with the
//! forward pass `transformers` defines, checked against it by committed fixtures
//! (`worker/tests/hf_parity.rs`).
//!
//! The boundary: this module reads a base's files and computes its logits and loss; it
//! does not know the worker's own MoE transformer (`crate::model`), runs or swarms.
//! [`config`] checks `config.json` (and refuses unsupported architectures by name),
//! [`load`] maps the weights, [`decoder`] and [`moe`] compute (and train, with optional
//! gradient checkpointing), [`lora`] adds trainable adapters on the frozen base (experts
//! included), [`quant`] holds the frozen projections in int8 or NF4
//! (QLoRA), [`export`] writes PEFT adapters and merged models, [`generate`] samples text
//! with a key/value cache, [`parity`] compares with a reference.

pub mod config;
pub mod decoder;
mod error;
pub mod export;
pub mod generate;
pub mod load;
pub mod lora;
pub mod moe;
pub mod parity;
pub mod quant;

use std::path::Path;

use candle_core::{DType, Device};

pub use config::{Arch, HfConfig};
pub use decoder::{Checkpointing, HfModel, KvCache};
pub use error::HfError;
pub use load::WeightFiles;
pub use lora::HfLoraConfig;
pub use quant::QuantFormat;

/// The config file's name in a base's directory.
pub const CONFIG_FILE: &str = "config.json";

/// Loads the base in `dir` onto `device`, in `dtype` (`None`: the weights' own dtype).
pub fn load_model(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<HfModel, HfError> {
    let cfg = HfConfig::from_file(&dir.join(CONFIG_FILE))?;
    let weights = WeightFiles::open(dir)?;
    HfModel::from_weights(&cfg, &weights, dtype, device)
}

/// Loads the base in `dir` as [`load_model`] does, then quantises its projections into
/// `fmt` (they dequantise to `dtype`, the compute dtype).
pub fn load_quantized(
    dir: &Path,
    dtype: Option<DType>,
    fmt: QuantFormat,
    device: &Device,
) -> Result<HfModel, HfError> {
    let mut model = load_model(dir, dtype, device)?;
    model.quantize(fmt)?;
    Ok(model)
}
