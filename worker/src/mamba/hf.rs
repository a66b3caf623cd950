//! Hugging Face `MambaForCausalLM` checkpoints from disk: `config.json` and one
//! `model.safetensors`, as `save_pretrained` writes them, turned into a worker [`Model`] whose
//! blocks are all Mamba with no feed-forward.
//!
//! Everything read is untrusted: the config is size-limited and checked by
//! `ModelConfig::validate` before any tensor is allocated, the weights file may not be larger
//! than the parameters the config implies, and every tensor's name, shape and dtype is
//! checked. Variants the worker's mixer does not compute (projection biases, no convolution
//! bias, another activation) are refused rather than loaded wrong. The file is read into
//! memory under that bound, not memory-mapped: mapping needs `unsafe`, which the workspace
//! denies.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::{FeedForward, LayerKind, MambaConfig, Mixer, ModelConfig};
use crate::{Model, WorkerError, checkpoint};

/// Upper bound on `config.json`.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Room for a safetensors header on top of the tensors' bytes.
const MAX_HEADER_BYTES: u64 = 16 << 20;
/// The context a loaded model accepts: Mamba has no positional limit, so the worker's own.
pub const CONTEXT: usize = 1 << 20;

/// The fields of `transformers`' `MambaConfig` the worker reads; the defaults are
/// `transformers`' own.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    state_size: usize,
    num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_expand")]
    expand: usize,
    /// `expand * hidden_size` when present.
    #[serde(default)]
    intermediate_size: Option<usize>,
    #[serde(default = "default_conv")]
    conv_kernel: usize,
    #[serde(default)]
    use_bias: bool,
    #[serde(default = "yes")]
    use_conv_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_init")]
    initializer_range: f64,
    /// An integer, or `"auto"` for `ceil(hidden_size / 16)`.
    #[serde(default)]
    time_step_rank: Option<serde_json::Value>,
    #[serde(default = "default_dt_min")]
    time_step_min: f64,
    #[serde(default = "default_dt_max")]
    time_step_max: f64,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_expand() -> usize {
    2
}
fn default_conv() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.1
}
fn default_dt_min() -> f64 {
    0.001
}
fn default_dt_max() -> f64 {
    0.1
}

/// The worker's config of the `MambaForCausalLM` whose `config.json` is at `path`.
pub fn read_config(path: &Path) -> Result<ModelConfig, WorkerError> {
    let bytes = checkpoint::read_limited(path, MAX_CONFIG_BYTES)?;
    let hf: HfConfig = serde_json::from_slice(&bytes).map_err(|e| {
        WorkerError::checkpoint(path, format!("not a MambaForCausalLM config.json: {e}"))
    })?;
    let refuse = |m: String| Err(WorkerError::checkpoint(path, m));
    if let Some(t) = hf.model_type.as_deref()
        && t != "mamba"
    {
        return refuse(format!("model_type is {t:?}, not \"mamba\""));
    }
    if hf.use_bias {
        return refuse("use_bias = true (biased in/out projections) is not supported".into());
    }
    if !hf.use_conv_bias {
        return refuse("use_conv_bias = false is not supported".into());
    }
    if hf.hidden_act != "silu" {
        return refuse(format!(
            "hidden_act {:?} is not supported (only silu)",
            hf.hidden_act
        ));
    }
    if let Some(inner) = hf.intermediate_size
        && Some(inner) != hf.expand.checked_mul(hf.hidden_size)
    {
        return refuse(format!(
            "intermediate_size {inner} is not expand ({}) * hidden_size ({})",
            hf.expand, hf.hidden_size
        ));
    }
    let dt_rank = match &hf.time_step_rank {
        None => hf.hidden_size.div_ceil(16),
        Some(serde_json::Value::String(s)) if s == "auto" => hf.hidden_size.div_ceil(16),
        Some(v) => match v.as_u64() {
            Some(r) => usize::try_from(r).unwrap_or(usize::MAX),
            None => return refuse(format!("time_step_rank {v} is not a count or \"auto\"")),
        },
    };
    let cfg = ModelConfig {
        vocab: hf.vocab_size,
        d_model: hf.hidden_size,
        // No attention block: the head settings are not read.
        n_heads: 1,
        n_layers: hf.num_hidden_layers,
        context: CONTEXT,
        moe_layers: Vec::new(),
        n_experts: 0,
        expert_hidden: 0,
        top_k: 0,
        capacity_factor: 1.0,
        aux_loss_coef: 0.0,
        ffn_hidden: 0,
        tie_embeddings: hf.tie_word_embeddings,
        rope_theta: 10_000.0,
        norm_eps: hf.layer_norm_epsilon as f32,
        init_std: hf.initializer_range as f32,
        layers: vec![
            LayerKind {
                mixer: Mixer::Mamba,
                ffn: FeedForward::None,
            };
            hf.num_hidden_layers.min(1 << 16)
        ],
        mamba: Some(MambaConfig {
            d_state: hf.state_size,
            d_conv: hf.conv_kernel,
            expand: hf.expand,
            dt_rank,
            dt_min: hf.time_step_min as f32,
            dt_max: hf.time_step_max as f32,
        }),
    };
    cfg.validate()
        .map_err(|e| WorkerError::checkpoint(path, e.to_string()))?;
    Ok(cfg)
}

/// The `transformers` name of the worker's parameter `name`, and the shape it has there
/// (the convolution keeps a channel axis of 1, `A_log` is `[D, N]`).
fn hf_name(name: &str, shape: &[usize], cfg: &ModelConfig) -> Option<(String, Vec<usize>)> {
    let same = shape.to_vec();
    match name {
        "tok_emb.weight" => return Some(("backbone.embeddings.weight".into(), same)),
        "final_norm.weight" => return Some(("backbone.norm_f.weight".into(), same)),
        "lm_head.weight" => return Some(("lm_head.weight".into(), same)),
        _ => {}
    }
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if rest == "mamba_norm.weight" {
        return Some((format!("backbone.layers.{layer}.norm.weight"), same));
    }
    let param = rest.strip_prefix("mamba.")?;
    let shape = match param {
        "conv1d.weight" => vec![shape[0], 1, shape[1]],
        "A_log" => {
            let n = cfg.mamba.as_ref()?.d_state;
            vec![shape[0] / n, n]
        }
        _ => same,
    };
    Some((format!("backbone.layers.{layer}.mixer.{param}"), shape))
}

/// Loads the `MambaForCausalLM` in directory `dir` (`config.json`, `model.safetensors`) as a
/// model with `master` weights and `compute` dtype on `device`.
pub fn load(
    dir: &Path,
    device: &Device,
    master: DType,
    compute: DType,
) -> Result<Model, WorkerError> {
    let cfg = read_config(&dir.join("config.json"))?;
    let path = dir.join("model.safetensors");
    if !path.exists() && dir.join("model.safetensors.index.json").exists() {
        return Err(WorkerError::checkpoint(
            &path,
            "sharded checkpoints (model.safetensors.index.json) are not supported yet",
        ));
    }
    // At most 8 bytes a parameter (f64), plus a tied head that was saved anyway.
    let params = cfg.num_params().unwrap_or(u64::MAX);
    let head = (cfg.vocab as u64) * (cfg.d_model as u64);
    let limit = params
        .saturating_add(head)
        .saturating_mul(8)
        .saturating_add(MAX_HEADER_BYTES);
    let bytes = checkpoint::read_limited(&path, limit)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        WorkerError::checkpoint(&path, format!("not a valid safetensors file: {e}"))
    })?;
    let model = Model::with_dtypes(&cfg, device, master, compute, 0)?;
    let mut used = 0;
    for (name, var) in model.trainable() {
        let (hf, shape) = hf_name(name, var.dims(), &cfg).ok_or_else(|| {
            WorkerError::checkpoint(&path, format!("no transformers name for {name}"))
        })?;
        let view = st
            .tensor(&hf)
            .map_err(|_| WorkerError::checkpoint(&path, format!("tensor {hf} is missing")))?;
        if view.shape() != shape.as_slice() {
            return Err(WorkerError::checkpoint(
                &path,
                format!(
                    "tensor {hf} has shape {:?}, the config implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            other => {
                return Err(WorkerError::checkpoint(
                    &path,
                    format!("tensor {hf} is {other:?}; expected a float dtype"),
                ));
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, &shape, &Device::Cpu)?
            .to_dtype(master)?
            .reshape(var.dims())?
            .to_device(device)?;
        var.set(&t)?;
        used += 1;
    }
    // Anything else in the file is a model the config does not describe. An untied head was
    // read above; a tied head saved beside the embedding anyway is ignored.
    let extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("backbone.") && *n != "lm_head.weight")
        .map(str::to_string)
        .collect();
    let backbone = st
        .names()
        .iter()
        .filter(|n| n.starts_with("backbone."))
        .count();
    let expected_backbone = used - usize::from(!cfg.tie_embeddings);
    if !extra.is_empty() || backbone != expected_backbone {
        return Err(WorkerError::checkpoint(
            &path,
            format!(
                "holds tensors the config does not describe ({} backbone tensors for {}, \
                 others: {:?})",
                backbone,
                expected_backbone,
                extra.iter().take(3).collect::<Vec<_>>()
            ),
        ));
    }
    model.sync_compute()?;
    Ok(model)
}
