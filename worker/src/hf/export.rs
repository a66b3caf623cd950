//! Out to the ecosystem: a model's adapters as a PEFT adapter directory
//! (`adapter_model.safetensors` with PEFT's tensor names and `adapter_config.json`), and
//! the base with its adapters folded in (`W + (alpha / r) B A`) as a Hugging Face model
//! directory (`config.json` + `model.safetensors`) that `transformers`, and this crate's
//! own loader, read back with the same logits.
//!
//! [`load_peft`] reads such an adapter directory (ours, or PEFT's for a supported base) back
//! onto a model, so that a sample or a further run can start from it.
//!
//! The boundary: this module turns a model into files and back; it decides no training. A directory appears whole or not at all: the files are written into a
//! temporary sibling, each fsynced, the temporary directory fsynced, then renamed onto the
//! target (which must not exist: an export never overwrites), and the parent fsynced.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{HfConfig, HfError, HfLoraConfig, HfModel};

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
/// dequantised; experts (with their adapters merged) stacked in transformers 5's layout.
pub fn export_merged(model: &HfModel, config_json: &str, dir: &Path) -> Result<()> {
    let cfg = HfConfig::from_json(config_json)?;
    if &cfg != model.config() {
        return Err(HfError::config(
            "config.json",
            "describes a different model than the one being exported",
        ));
    }
    let tensors = model.merged_tensors()?;
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.contiguous()?)))
        .collect::<Result<_>>()?;
    write_dir(dir, |tmp| {
        save_tensors(&tensors, &tmp.join(MODEL_WEIGHTS))?;
        write_file(&tmp.join(super::CONFIG_FILE), config_json.as_bytes())
    })
}

/// Largest `adapter_config.json` read.
const MAX_ADAPTER_CONFIG_BYTES: u64 = 1 << 20;

/// Puts the adapters of the PEFT directory `dir` on `model` (replacing any): LoRA only,
/// `target_modules` a list (or the string `all-linear`), every tensor present with the
/// shape the model's projection implies. The weights file's header is checked against `r`
/// before any adapter is allocated, and its size against what the config implies before
/// its tensors are read.
pub fn load_peft(model: &mut HfModel, dir: &Path) -> Result<()> {
    let cpath = dir.join(ADAPTER_CONFIG);
    let meta = std::fs::metadata(&cpath).map_err(|e| HfError::io(&cpath, e))?;
    if meta.len() > MAX_ADAPTER_CONFIG_BYTES {
        return Err(HfError::TooLarge {
            what: format!("{}'s size in bytes", cpath.display()),
            got: meta.len(),
            limit: MAX_ADAPTER_CONFIG_BYTES,
        });
    }
    let text = std::fs::read_to_string(&cpath).map_err(|e| HfError::io(&cpath, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HfError::Json {
        path: cpath.clone(),
        reason: e.to_string(),
    })?;
    let field = |k: &str| json.get(k).filter(|v| !v.is_null());
    if field("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        return Err(HfError::config("peft_type", "only LORA adapters load"));
    }
    for (k, default) in [
        ("use_dora", false),
        ("use_rslora", false),
        ("fan_in_fan_out", false),
    ] {
        if field(k).and_then(|v| v.as_bool()).unwrap_or(default) {
            return Err(HfError::config(k, "is not supported"));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if field(k)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(HfError::config(k, "per-module ranks are not supported"));
        }
    }
    let rank = field("r")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| HfError::config("r", "missing or not a whole number"))?;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| HfError::config("lora_alpha", "missing or not a number"))?;
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| HfError::config("lora_dropout", "not a number"))?,
    };
    let targets: Vec<String> = match field("target_modules") {
        Some(serde_json::Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| HfError::config("target_modules", "a non-string entry"))
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(HfError::config(
                "target_modules",
                "must be a list of module names or \"all-linear\" (regexes are not supported)",
            ));
        }
    };
    let wpath = dir.join(ADAPTER_WEIGHTS);
    check_ranks(&wpath, rank)?;
    let cfg = HfLoraConfig {
        rank: usize::try_from(rank).map_err(|_| HfError::config("r", "too large"))?,
        alpha,
        dropout,
        target_modules: targets,
        seed: 0,
    };
    model.attach_lora(&cfg)?;
    let params = model.lora_params();
    let want: u64 = params.iter().map(|(_, v)| v.elem_count() as u64 * 4).sum();
    let len = std::fs::metadata(&wpath)
        .map_err(|e| HfError::io(&wpath, e))?
        .len();
    // f32 tensors plus a header (names and shapes): a file much larger is not these.
    let limit = want + 64 * 1024 + 256 * params.len() as u64;
    if len > limit {
        return Err(HfError::TooLarge {
            what: format!("{}'s size in bytes", wpath.display()),
            got: len,
            limit,
        });
    }
    let loaded = candle_core::safetensors::load(&wpath, model.device()).map_err(|e| {
        HfError::Safetensors {
            path: wpath.clone(),
            reason: e.to_string(),
        }
    })?;
    if loaded.len() != params.len() {
        return Err(HfError::Safetensors {
            path: wpath.clone(),
            reason: format!(
                "{} tensors, the adapters of this config on this base have {}",
                loaded.len(),
                params.len()
            ),
        });
    }
    for (name, var) in &params {
        let key = peft_name(name);
        let t = loaded
            .get(&key)
            .ok_or_else(|| HfError::MissingTensor { name: key.clone() })?;
        if t.dims() != var.dims() {
            return Err(HfError::Shape {
                name: key,
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    Ok(())
}

/// Largest header of an adapter weights file read (its tensors' names, dtypes, shapes and
/// offsets).
const MAX_ADAPTER_HEADER_BYTES: u64 = 16 << 20;

/// Checks, from the header of the adapter weights file at `path` alone, that every
/// `lora_A` is `[r, _]` and every `lora_B` `[_, r]` for the config's `r`, each tensor's
/// bytes within the file. Run before [`HfModel::attach_lora`]: the adapters it allocates
/// are then of the rank of tensors really on disk, not of whatever rank a config claims.
fn check_ranks(path: &Path, rank: u64) -> Result<()> {
    let bad = |reason: String| HfError::Safetensors {
        path: path.into(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| HfError::io(path, e))?;
    let len = f.metadata().map_err(|e| HfError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_ADAPTER_HEADER_BYTES || n > len.saturating_sub(8) {
        return Err(bad(format!(
            "its header claims {n} bytes, past the file ({len} bytes) or the limit of \
             {MAX_ADAPTER_HEADER_BYTES}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| HfError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
    let data = len - 8 - n;
    for (name, t) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let nums = |key: &str| -> Option<Vec<u64>> {
            t.get(key)?.as_array()?.iter().map(|d| d.as_u64()).collect()
        };
        let shape = nums("shape").ok_or_else(|| bad(format!("{name} has no shape")))?;
        let elem: u64 = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => 4,
            Some("BF16" | "F16") => 2,
            Some("F64") => 8,
            other => {
                return Err(bad(format!(
                    "{name} has dtype {other:?}; adapters are F32, BF16, F16 or F64"
                )));
            }
        };
        let bytes = shape.iter().try_fold(elem, |acc, d| acc.checked_mul(*d));
        match nums("data_offsets").as_deref() {
            Some(&[start, end]) if start <= end && end <= data && Some(end - start) == bytes => {}
            _ => {
                return Err(bad(format!(
                    "{name}'s data offsets do not hold its shape {shape:?} within the file"
                )));
            }
        }
        let rank_dim = if name.ends_with("lora_A.weight") {
            Some(0)
        } else if name.ends_with("lora_B.weight") {
            Some(1)
        } else {
            None
        };
        if let Some(i) = rank_dim
            && (shape.len() != 2 || shape[i] != rank)
        {
            return Err(HfError::config(
                "r",
                format!(
                    "is {rank}, but {name} in {} has shape {shape:?}: the adapter config \
                     does not describe these weights",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
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
