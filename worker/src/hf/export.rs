//! Out to the ecosystem: a model's adapters as a PEFT adapter directory
//! (`adapter_model.safetensors` with PEFT's tensor names and `adapter_config.json`), and
//! the base with its adapters folded in (`W + (alpha / r) B A`) as a Hugging Face model
//! directory (`config.json` + `model.safetensors`) that `transformers`, and this crate's
//! own loader, read back with the same logits.
//!
//! The boundary: this module turns a model into files and writes them; it decides no
//! training. A directory appears whole or not at all: the files are written into a
//! temporary sibling, each fsynced, the temporary directory fsynced, then renamed onto the
//! target (which must not exist: an export never overwrites), and the parent fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{HfConfig, HfError, HfModel};

type Result<T> = std::result::Result<T, HfError>;

/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The merged model's weights file.
pub const MODEL_WEIGHTS: &str = "model.safetensors";

/// The PEFT name of adapter tensor `{module}.lora_A.weight`: PEFT saves under its
/// wrapper's prefix and without the adapter's name.
pub fn peft_name(param: &str) -> String {
    format!("base_model.model.{param}")
}

/// Writes the adapters of `model` to a new directory `dir` in PEFT's format, naming
/// `base` (a Hub id or path) as `base_model_name_or_path`. The adapters are written in f32.
pub fn export_peft(model: &HfModel, base: &str, dir: &Path) -> Result<()> {
    let cfg = model
        .lora_config()
        .ok_or_else(|| HfError::Input("the model has no adapters to export".into()))?;
    let mut tensors = HashMap::new();
    let mut modules = Vec::new();
    for (name, var) in model.lora_params() {
        if let Some(m) = name.strip_suffix(".lora_A.weight") {
            modules.push(m.to_string());
        }
        let t = var.as_tensor().to_dtype(DType::F32)?.contiguous()?;
        tensors.insert(peft_name(&name), t);
    }
    // The adapted modules by full path: PEFT matches a target equal to a module's path
    // exactly, so the file says which projections carry adapters whatever the targets
    // were (PEFT's own `all-linear` would also differ from ours on the head).
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| HfError::Json {
        path: ADAPTER_CONFIG.into(),
        reason: e.to_string(),
    })?;
    write_dir(dir, |tmp| {
        save_tensors(&tensors, &tmp.join(ADAPTER_WEIGHTS))?;
        write_file(&tmp.join(ADAPTER_CONFIG), text.as_bytes())
    })
}

/// Writes `model` with its adapters folded into the base weights to a new directory
/// `dir`: `config_json` (the base's `config.json`, which must describe this model) and
/// `model.safetensors` in the compute dtype. Quantised projections are written
/// dequantised; stacked experts in transformers 5's layout.
pub fn export_merged(model: &HfModel, config_json: &str, dir: &Path) -> Result<()> {
    let cfg = HfConfig::from_json(config_json)?;
    if &cfg != model.config() {
        return Err(HfError::config(
            "config.json",
            "describes a different model than the one being exported",
        ));
    }
    let dt = model.dtype();
    let mut tensors: HashMap<String, Tensor> = model.base_tensors()?.into_iter().collect();
    for (lin, ad) in model.adapted() {
        let key = format!("{}.weight", lin.name);
        let w = lin.weight.dense()?.to_dtype(DType::F32)?;
        let delta =
            ad.b.as_tensor()
                .to_dtype(DType::F32)?
                .matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)?
                .affine(ad.scale, 0.0)?;
        tensors.insert(key, (w + delta)?.to_dtype(dt)?);
    }
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    write_dir(dir, |tmp| {
        save_tensors(&tensors, &tmp.join(MODEL_WEIGHTS))?;
        write_file(&tmp.join(super::CONFIG_FILE), config_json.as_bytes())
    })
}

fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)?;
    let f = File::open(path).map_err(|e| HfError::io(path, e))?;
    f.sync_all().map_err(|e| HfError::io(path, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| HfError::io(path, e))?;
    f.write_all(bytes).map_err(|e| HfError::io(path, e))?;
    f.sync_all().map_err(|e| HfError::io(path, e))
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| HfError::io(path, e))
}

/// Fills a temporary sibling of `dir` with `fill`, then renames it onto `dir`.
fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        return Err(HfError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "an export never overwrites: remove it or choose another directory",
            ),
        ));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| HfError::Input(format!("{} names no directory", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    let done = fill(&tmp)
        .and_then(|()| sync_dir(&tmp))
        .and_then(|()| std::fs::rename(&tmp, dir).map_err(|e| HfError::io(dir, e)));
    if let Err(e) = done {
        // Best effort: the partial directory is named as such if it cannot be removed.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir(&parent)
}
