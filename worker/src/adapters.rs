//! Adapter training on a frozen Hugging Face base: what a [`crate::Replica`] holds when a
//! run fine-tunes a base (`crate::hf`) instead of training the worker's own model.
//!
//! The replica's trainable parameters are then the LoRA adapters alone, in the fixed order
//! [`HfModel::lora_params`] gives (layer order, `lora_A` before `lora_B` per projection),
//! so the flat vector the swarm exchanges, compresses, reduces and hashes is the adapters'
//! and nothing else. The base's tensors are constants of the graph: no gradient, no
//! optimizer state, never sent. A checkpoint names the base by the content root its caller
//! pinned (the worker cannot hash a directory the way the swarm does; the daemon checks the
//! root of the files before it hands the directory here).
//!
//! Tokens: the data's ids are fed to the base as they are, so the run's tokenizer must be
//! the base's own (`tokenizer.json` in the base's directory), or the byte tokenizer when
//! the base's vocabulary has at least 256 entries (byte `b` is id `b`). A data vocabulary
//! larger than the base's is refused by [`crate::Replica::train_steps`] before any step.
//!
//! Determinism: an inner step is a pure function of the adapters, the optimizer state, the
//! batch (seeded by seed, shard and step, as for the native model) and the dropout stream
//! (seeded by seed and step). On the CPU with f32 adapters, replicas that start equal stay
//! bit-identical.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::WorkerError;
use crate::hf::{HfLoraConfig, HfModel, QuantFormat};

/// The adapters of a run in PEFT's terms, with how the frozen base is held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// `target_modules`, PEFT's module names (`q_proj`, `down_proj`, `all-linear`, ...).
    pub target_modules: Vec<String>,
    /// `nf4` or `int8` to hold the base's projections quantised (QLoRA); `None`: the
    /// base's own dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
}

impl AdapterConfig {
    /// The quantisation format named by `quant`.
    pub fn quant_format(&self) -> Result<Option<QuantFormat>, WorkerError> {
        match self.quant.as_deref() {
            None => Ok(None),
            Some("nf4") => Ok(Some(QuantFormat::Nf4)),
            Some("int8") => Ok(Some(QuantFormat::Int8)),
            Some(other) => Err(WorkerError::Config(format!(
                "adapters.quant {other:?} is not a format: use \"nf4\", \"int8\" or leave it out"
            ))),
        }
    }

    /// The LoRA settings, the `A` matrices started from `seed`.
    pub fn lora(&self, seed: u64) -> HfLoraConfig {
        HfLoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            seed,
        }
    }

    /// Checks every setting that does not need the base.
    pub fn validate(&self) -> Result<(), WorkerError> {
        self.quant_format()?;
        self.lora(0)
            .validate()
            .map_err(|e| WorkerError::Config(format!("adapters: {e}")))
    }
}

/// A frozen base with trainable adapters attached.
#[derive(Debug)]
pub struct AdapterModel {
    hf: HfModel,
    params: Vec<(String, Var)>,
    cfg: AdapterConfig,
    base_dir: PathBuf,
    base_root: String,
}

impl AdapterModel {
    /// Loads the base in `base_dir` (whose content root the caller has checked to be
    /// `base_root`) onto `device` in its own dtype, quantises it when `cfg` asks, and
    /// attaches fresh adapters started from `seed`.
    pub fn load(
        base_dir: &Path,
        base_root: &str,
        cfg: &AdapterConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let mut hf = match cfg.quant_format()? {
            None => crate::hf::load_model(base_dir, None, device)?,
            Some(fmt) => crate::hf::load_quantized(base_dir, None, fmt, device)?,
        };
        hf.attach_lora(&cfg.lora(seed))?;
        let params = hf.lora_params();
        Ok(AdapterModel {
            hf,
            params,
            cfg: cfg.clone(),
            base_dir: base_dir.to_path_buf(),
            base_root: base_root.to_string(),
        })
    }

    /// The base with its adapters.
    pub fn hf(&self) -> &HfModel {
        &self.hf
    }

    /// The adapter settings.
    pub fn config(&self) -> &AdapterConfig {
        &self.cfg
    }

    /// The base's directory.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// The content root of the base, as its caller named it.
    pub fn base_root(&self) -> &str {
        &self.base_root
    }

    /// The base's vocabulary size.
    pub fn vocab(&self) -> usize {
        self.hf.config().vocab
    }

    /// Longest sequence the base takes (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.hf.config().max_positions
    }

    /// The adapters, in their fixed order.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The device the base lives on.
    pub fn device(&self) -> &Device {
        self.hf.device()
    }

    /// The mean next-token cross-entropy of a batch given as inputs and targets (`batch`
    /// rows of `seq` ids each, targets the inputs shifted by one), in f32: each row becomes
    /// one sequence of `seq + 1` ids for the base. With `dropout_seed` the adapters' dropout
    /// is on, its masks drawn from that seed.
    pub fn loss(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor, WorkerError> {
        let seq = inputs.len() / batch.max(1);
        if seq == 0 || inputs.len() != batch * seq || targets.len() != inputs.len() {
            return Err(WorkerError::Mismatch(format!(
                "batch of {} inputs / {} targets does not form {batch} rows",
                inputs.len(),
                targets.len()
            )));
        }
        let mut ids = Vec::with_capacity(batch * (seq + 1));
        for r in 0..batch {
            let row = &inputs[r * seq..(r + 1) * seq];
            let next = &targets[r * seq..(r + 1) * seq];
            if row[1..] != next[..seq - 1] {
                return Err(WorkerError::Data(
                    "targets are not the inputs shifted by one token".into(),
                ));
            }
            ids.extend_from_slice(row);
            ids.push(next[seq - 1]);
        }
        let ids = Tensor::from_vec(ids, (batch, seq + 1), self.hf.device())?;
        let loss = match dropout_seed {
            Some(s) => self.hf.train_loss(&ids, s)?,
            None => self.hf.loss(&ids)?,
        };
        Ok(loss.to_dtype(DType::F32)?)
    }
}

/// The shape of a Llama-format base written by [`write_random_llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    /// `vocab_size`.
    pub vocab: usize,
    /// `hidden_size`.
    pub hidden: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
}

impl LlamaShape {
    /// Parameters of the base (untied head).
    pub fn params(&self) -> usize {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let kv = h / self.heads * self.kv_heads;
        let layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h;
        2 * v * h + self.layers * layer + h
    }
}

/// Writes a Llama-format base (`config.json` and `model.safetensors`, f32, untied head)
/// of `shape` into `dir`, its weights normal with standard deviation `1/sqrt(fan_in)`
/// from a ChaCha8 stream seeded with `seed`: a base of any size without a download, for
/// tests and benchmarks. The same arguments write the same bytes.
pub fn write_random_llama(dir: &Path, shape: &LlamaShape, seed: u64) -> Result<(), WorkerError> {
    use rand::{Rng, SeedableRng};
    if shape.heads == 0
        || shape.kv_heads == 0
        || !shape.hidden.is_multiple_of(shape.heads)
        || !shape.heads.is_multiple_of(shape.kv_heads)
    {
        return Err(WorkerError::Config(format!(
            "{} heads, {} key/value heads and hidden size {} do not divide",
            shape.heads, shape.kv_heads, shape.hidden
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
    let (h, i, v) = (shape.hidden, shape.intermediate, shape.vocab);
    let head_dim = h / shape.heads;
    let kv = head_dim * shape.kv_heads;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |rows: usize, cols: usize| -> Vec<f32> {
        let std = 1.0 / (cols as f64).sqrt();
        (0..rows * cols)
            .map(|_| {
                // Box-Muller from two uniforms in (0, 1].
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    };
    let mut t: Vec<crate::checkpoint::NamedTensor> = Vec::new();
    t.push(("model.embed_tokens.weight".into(), vec![v, h], normal(v, h)));
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        let ones = vec![1f32; h];
        t.push((format!("{p}.input_layernorm.weight"), vec![h], ones.clone()));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            ones,
        ));
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            t.push((
                format!("{p}.{name}.weight"),
                vec![rows, cols],
                normal(rows, cols),
            ));
        }
    }
    t.push(("model.norm.weight".into(), vec![h], vec![1f32; h]));
    t.push(("lm_head.weight".into(), vec![v, h], normal(v, h)));
    crate::checkpoint::write_f32_tensors(&dir.join("model.safetensors"), &t)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "vocab_size": v,
        "torch_dtype": "float32",
    });
    let bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| WorkerError::Config(format!("config.json: {e}")))?;
    crate::checkpoint::write_atomic(&dir.join(crate::hf::CONFIG_FILE), &bytes)
}
