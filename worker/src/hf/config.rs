//! `config.json` of a Hugging Face base, parsed into one checked [`HfConfig`] for the
//! architectures the worker implements. This is the gate for sizes: every dimension is
//! bounded and the parameter count is computed (in `u128`) before a single weight is read,
//! so an absurd or hostile config is refused without allocating anything. Fields a family
//! does not have take that family's `transformers` default; features the forward pass does
//! not implement (another activation, a RoPE scaling other than linear or Llama 3, a
//! quantised checkpoint) are refused by name rather than silently ignored.

use std::path::Path;

use serde_json::{Map, Value};

use super::HfError;

type Result<T> = std::result::Result<T, HfError>;

/// Largest `config.json` read (real ones are a few KB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest vocabulary accepted.
pub const MAX_VOCAB: usize = 1 << 22;
/// Largest hidden or intermediate width accepted.
pub const MAX_WIDTH: usize = 1 << 18;
/// Most decoder layers accepted.
pub const MAX_LAYERS: usize = 1024;
/// Most attention heads, and largest head dimension, accepted.
pub const MAX_HEADS: usize = 1024;
/// Most experts per MoE layer accepted.
pub const MAX_EXPERTS: usize = 1024;
/// Largest parameter count accepted (about 275 G parameters, past Mixtral 8x22B).
pub const MAX_PARAMS: u128 = 1 << 38;

/// The architecture families the worker implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (TinyLlama, Llama 2 and 3).
    Llama,
    /// `Qwen2ForCausalLM`: biases on the q/k/v projections.
    Qwen2,
    /// `MistralForCausalLM`: optional sliding-window attention.
    Mistral,
    /// `Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`, optional partial rotary.
    Phi3,
    /// `MixtralForCausalLM`: every feed-forward a top-k mixture of experts.
    Mixtral,
    /// `Qwen2MoeForCausalLM`: experts plus a shared expert behind a sigmoid gate.
    Qwen2Moe,
}

impl Arch {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "MistralForCausalLM" => Arch::Mistral,
            "Phi3ForCausalLM" => Arch::Phi3,
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            _ => return None,
        })
    }

    fn from_model_type(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            "phi3" => Arch::Phi3,
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            _ => return None,
        })
    }

    /// The family's RMSNorm epsilon when the config leaves it out.
    fn default_eps(self) -> f64 {
        match self {
            Arch::Phi3 | Arch::Mixtral => 1e-5,
            _ => 1e-6,
        }
    }
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3's band-wise scaling (`rope_type: llama3`).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pretraining.
        original_max_positions: f64,
    },
}

/// Rotary position embedding settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength.
    pub theta: f64,
    /// Leading dimensions of each head that rotate (`head_dim * partial_rotary_factor`, even).
    pub rotary_dim: usize,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The inverse frequencies, `rotary_dim / 2` of them, by `transformers`' formulas (in
    /// f64 here, where it uses f32: a difference far below the parity tolerance).
    pub fn inv_freq(&self) -> Vec<f64> {
        let dim = self.rotary_dim;
        (0..dim / 2)
            .map(|i| {
                let base = 1.0 / self.theta.powf((2 * i) as f64 / dim as f64);
                match self.scaling {
                    RopeScaling::None => base,
                    RopeScaling::Linear { factor } => base / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_positions,
                    } => {
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        let low_wavelen = original_max_positions / low_freq_factor;
                        let high_wavelen = original_max_positions / high_freq_factor;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / factor
                        } else {
                            let smooth = (original_max_positions / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * base / factor + smooth * base
                        }
                    }
                }
            })
            .collect()
    }
}

/// The mixture-of-experts part of a config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Hidden width of one expert.
    pub expert_hidden: usize,
    /// Whether the top-k gate weights are renormalised to sum to one.
    pub norm_topk: bool,
    /// Hidden width of the shared expert (Qwen2-MoE), which every token passes through,
    /// scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_hidden: Option<usize>,
    /// For each layer, whether its feed-forward is sparse (the others are dense MLPs of
    /// `intermediate_size`).
    pub sparse: Vec<bool>,
}

/// A checked config of one of the supported architectures.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Hidden width of a dense MLP.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// RoPE settings.
    pub rope: RopeConfig,
    /// Longest context the base was configured for.
    pub max_positions: usize,
    /// The output head is the token embedding.
    pub tie_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// For each layer, its sliding attention window (a key is visible from a query fewer
    /// than `window` positions after it), or `None` for full causal attention.
    pub windows: Vec<Option<usize>>,
    /// Experts, for the MoE families.
    pub moe: Option<MoeConfig>,
}

/// Typed access to the JSON object with errors that name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// A present, non-null field.
    fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| HfError::config(field, format!("{v} is not a whole number")))?;
                usize::try_from(n)
                    .map(Some)
                    .map_err(|_| HfError::config(field, format!("{n} does not fit this machine")))
            }
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| HfError::config(field, "missing"))
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| HfError::config(field, format!("{v} is not a finite number"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| HfError::config(field, format!("{v} is not true or false"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| HfError::config(field, format!("{v} is not a string"))),
        }
    }
}

/// Checks `value` against `limit`.
fn bounded(what: &str, value: usize, limit: usize) -> Result<usize> {
    if value > limit {
        return Err(HfError::TooLarge {
            what: what.into(),
            got: value as u64,
            limit: limit as u64,
        });
    }
    if value == 0 {
        return Err(HfError::config(what, "must not be zero"));
    }
    Ok(value)
}

impl HfConfig {
    /// Reads and checks `config.json` at `path` (at most [`MAX_CONFIG_BYTES`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| HfError::io(path, e))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(HfError::TooLarge {
                what: format!("{}'s size in bytes", path.display()),
                got: meta.len(),
                limit: MAX_CONFIG_BYTES,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| HfError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            HfError::Json { reason, .. } => HfError::Json {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and checks the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(HfError::TooLarge {
                what: "config.json's size in bytes".into(),
                got: text.len() as u64,
                limit: MAX_CONFIG_BYTES,
            });
        }
        let value: Value = serde_json::from_str(text).map_err(|e| HfError::Json {
            path: "config.json".into(),
            reason: e.to_string(),
        })?;
        let obj = value.as_object().ok_or_else(|| HfError::Json {
            path: "config.json".into(),
            reason: "the top level is not an object".into(),
        })?;
        parse(&Fields(obj))
    }

    /// The parameter count the config implies, with every product checked.
    pub fn param_count(&self) -> u128 {
        let (v, h, i) = (
            self.vocab as u128,
            self.hidden as u128,
            self.intermediate as u128,
        );
        let (q, kv) = (
            (self.heads * self.head_dim) as u128,
            (self.kv_heads * self.head_dim) as u128,
        );
        let mut attn = h * (q + 2 * kv) + q * h + 2 * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let dense = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let mut total = v * h * if self.tie_embeddings { 1 } else { 2 } + h;
        for l in 0..self.layers {
            total += attn;
            total += match &self.moe {
                Some(m) if m.sparse[l] => {
                    let e = m.experts as u128;
                    let eh = m.expert_hidden as u128;
                    let shared = m.shared_hidden.map_or(0, |s| 3 * h * s as u128 + h);
                    e * h + e * 3 * h * eh + shared
                }
                _ => dense,
            };
        }
        total
    }

    /// Whether layer `l` has a sparse (mixture-of-experts) feed-forward.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.sparse.get(l).copied().unwrap_or(false))
    }
}

fn parse(f: &Fields<'_>) -> Result<HfConfig> {
    let arch = architecture(f)?;
    if f.get("quantization_config").is_some() {
        return Err(HfError::config(
            "quantization_config",
            "pre-quantised checkpoints (GPTQ, AWQ, bitsandbytes) are not supported; use the \
             base's f32, bf16 or f16 weights",
        ));
    }
    let act = f
        .str_opt("hidden_act")?
        .or(f.str_opt("hidden_activation")?)
        .unwrap_or("silu");
    if act != "silu" {
        return Err(HfError::config(
            "hidden_act",
            format!("{act:?} is not supported (only silu)"),
        ));
    }
    let vocab = bounded("vocab_size", f.usize("vocab_size")?, MAX_VOCAB)?;
    let hidden = bounded("hidden_size", f.usize("hidden_size")?, MAX_WIDTH)?;
    let layers = bounded(
        "num_hidden_layers",
        f.usize("num_hidden_layers")?,
        MAX_LAYERS,
    )?;
    let heads = bounded(
        "num_attention_heads",
        f.usize("num_attention_heads")?,
        MAX_HEADS,
    )?;
    let kv_heads = bounded(
        "num_key_value_heads",
        f.usize_opt("num_key_value_heads")?.unwrap_or(heads),
        MAX_HEADS,
    )?;
    if !heads.is_multiple_of(kv_heads) {
        return Err(HfError::config(
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads ({heads})"),
        ));
    }
    let head_dim = match f.usize_opt("head_dim")? {
        Some(d) => d,
        None => {
            if !hidden.is_multiple_of(heads) {
                return Err(HfError::config(
                    "num_attention_heads",
                    format!(
                        "{heads} does not divide hidden_size ({hidden}) and head_dim is not given"
                    ),
                ));
            }
            hidden / heads
        }
    };
    let head_dim = bounded("head_dim", head_dim, MAX_HEADS)?;
    let max_positions = f.usize_opt("max_position_embeddings")?.unwrap_or(2048);
    let norm_eps = f
        .f64_opt("rms_norm_eps")?
        .unwrap_or_else(|| arch.default_eps());
    if norm_eps <= 0.0 {
        return Err(HfError::config("rms_norm_eps", "must be positive"));
    }
    let rope = rope(f, head_dim, max_positions)?;
    let (qkv_bias, o_bias, mlp_bias) = match arch {
        Arch::Llama => {
            let attn = f.bool_or("attention_bias", false)?;
            (attn, attn, f.bool_or("mlp_bias", false)?)
        }
        Arch::Qwen2 => (true, false, false),
        Arch::Qwen2Moe => (f.bool_or("qkv_bias", true)?, false, false),
        Arch::Mistral | Arch::Phi3 | Arch::Mixtral => (false, false, false),
    };
    let moe = moe(f, arch, layers)?;
    let intermediate = match (&moe, f.usize_opt("intermediate_size")?) {
        (_, Some(i)) => bounded("intermediate_size", i, MAX_WIDTH)?,
        // A MoE config whose every layer is sparse needs no dense width.
        (Some(m), None) if m.sparse.iter().all(|&s| s) => 0,
        (_, None) => return Err(HfError::config("intermediate_size", "missing")),
    };
    let windows = windows(f, arch, layers)?;
    let cfg = HfConfig {
        arch,
        vocab,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        norm_eps,
        rope,
        max_positions,
        tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
        qkv_bias,
        o_bias,
        mlp_bias,
        windows,
        moe,
    };
    let params = cfg.param_count();
    if params > MAX_PARAMS {
        return Err(HfError::TooLarge {
            what: "the parameter count".into(),
            got: u64::try_from(params).unwrap_or(u64::MAX),
            limit: MAX_PARAMS as u64,
        });
    }
    Ok(cfg)
}

fn architecture(f: &Fields<'_>) -> Result<Arch> {
    if let Some(v) = f.get("architectures") {
        let names = v.as_array().ok_or_else(|| HfError::Unsupported {
            architectures: v.to_string(),
        })?;
        return match names.as_slice() {
            [one] => one
                .as_str()
                .and_then(Arch::from_class)
                .ok_or_else(|| HfError::Unsupported {
                    architectures: v.to_string(),
                }),
            _ => Err(HfError::Unsupported {
                architectures: v.to_string(),
            }),
        };
    }
    match f.get("model_type") {
        Some(v) => v
            .as_str()
            .and_then(Arch::from_model_type)
            .ok_or_else(|| HfError::Unsupported {
                architectures: format!("model_type {v}"),
            }),
        None => Err(HfError::Unsupported {
            architectures: "(neither architectures nor model_type is given)".into(),
        }),
    }
}

/// RoPE from either spelling: `rope_parameters` (transformers 5) or `rope_theta` plus
/// `rope_scaling` (the files on the Hub).
fn rope(f: &Fields<'_>, head_dim: usize, max_positions: usize) -> Result<RopeConfig> {
    let params =
        match f.get("rope_parameters").or(f.get("rope_scaling")) {
            None => None,
            Some(v) => Some(v.as_object().ok_or_else(|| {
                HfError::config("rope_parameters", format!("{v} is not an object"))
            })?),
        };
    let p = params.map(Fields);
    let theta = match p
        .as_ref()
        .map(|p| p.f64_opt("rope_theta"))
        .transpose()?
        .flatten()
    {
        Some(t) => t,
        None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
    };
    if theta <= 1.0 {
        return Err(HfError::config(
            "rope_theta",
            format!("{theta} must be above 1"),
        ));
    }
    let partial = match p
        .as_ref()
        .map(|p| p.f64_opt("partial_rotary_factor"))
        .transpose()?
        .flatten()
    {
        Some(x) => x,
        None => f.f64_opt("partial_rotary_factor")?.unwrap_or(1.0),
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(HfError::config(
            "partial_rotary_factor",
            format!("{partial} is not in (0, 1]"),
        ));
    }
    let rotary_dim = (head_dim as f64 * partial) as usize;
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
        return Err(HfError::config(
            "partial_rotary_factor",
            format!(
                "rotates {rotary_dim} of {head_dim} head dimensions; that must be even and not zero"
            ),
        ));
    }
    let kind = match &p {
        None => "default".to_string(),
        Some(p) => p
            .str_opt("rope_type")?
            .or(p.str_opt("type")?)
            .unwrap_or("default")
            .to_string(),
    };
    let need = |field: &str| -> Result<f64> {
        p.as_ref()
            .map(|p| p.f64_opt(field))
            .transpose()?
            .flatten()
            .ok_or_else(|| HfError::config(format!("rope_parameters.{field}"), "missing"))
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => {
            let original = match p
                .as_ref()
                .map(|p| p.f64_opt("original_max_position_embeddings"))
                .transpose()?
                .flatten()
            {
                Some(o) => o,
                None => max_positions as f64,
            };
            let s = RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_positions: original,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = s
                && high_freq_factor <= low_freq_factor
            {
                return Err(HfError::config(
                    "rope_parameters.high_freq_factor",
                    "must be above low_freq_factor",
                ));
            }
            s
        }
        other => {
            return Err(HfError::config(
                "rope_parameters.rope_type",
                format!("{other:?} is not supported (default, linear and llama3 are)"),
            ));
        }
    };
    if let RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } = scaling
        && factor <= 0.0
    {
        return Err(HfError::config(
            "rope_parameters.factor",
            "must be positive",
        ));
    }
    Ok(RopeConfig {
        theta,
        rotary_dim,
        scaling,
    })
}

fn moe(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<Option<MoeConfig>> {
    let cfg = match arch {
        Arch::Mixtral => {
            let experts = bounded(
                "num_local_experts",
                f.usize("num_local_experts")?,
                MAX_EXPERTS,
            )?;
            MoeConfig {
                experts,
                top_k: f.usize_opt("num_experts_per_tok")?.unwrap_or(2),
                expert_hidden: bounded(
                    "intermediate_size",
                    f.usize("intermediate_size")?,
                    MAX_WIDTH,
                )?,
                norm_topk: true,
                shared_hidden: None,
                sparse: vec![true; layers],
            }
        }
        Arch::Qwen2Moe => {
            let experts = bounded("num_experts", f.usize("num_experts")?, MAX_EXPERTS)?;
            let step = f.usize_opt("decoder_sparse_step")?.unwrap_or(1);
            if step == 0 {
                return Err(HfError::config("decoder_sparse_step", "must not be zero"));
            }
            let dense: Vec<usize> = match f.get("mlp_only_layers") {
                None => Vec::new(),
                Some(v) => v
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        HfError::config("mlp_only_layers", format!("{v} is not a list of layers"))
                    })?,
            };
            MoeConfig {
                experts,
                top_k: f.usize_opt("num_experts_per_tok")?.unwrap_or(4),
                expert_hidden: bounded(
                    "moe_intermediate_size",
                    f.usize("moe_intermediate_size")?,
                    MAX_WIDTH,
                )?,
                norm_topk: f.bool_or("norm_topk_prob", false)?,
                shared_hidden: Some(bounded(
                    "shared_expert_intermediate_size",
                    f.usize("shared_expert_intermediate_size")?,
                    MAX_WIDTH,
                )?),
                sparse: (0..layers)
                    .map(|l| !dense.contains(&l) && (l + 1).is_multiple_of(step))
                    .collect(),
            }
        }
        _ => return Ok(None),
    };
    if cfg.top_k == 0 || cfg.top_k > cfg.experts {
        return Err(HfError::config(
            "num_experts_per_tok",
            format!("{} must be in 1..={}", cfg.top_k, cfg.experts),
        ));
    }
    Ok(Some(cfg))
}

/// Each layer's sliding window, following each family's `transformers` rules.
fn windows(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = match f.usize_opt("sliding_window")? {
        Some(0) => None,
        w => w,
    };
    Ok(match arch {
        Arch::Llama => vec![None; layers],
        Arch::Mistral | Arch::Mixtral | Arch::Phi3 => vec![window; layers],
        Arch::Qwen2 | Arch::Qwen2Moe => {
            if !f.bool_or("use_sliding_window", false)? || window.is_none() {
                return Ok(vec![None; layers]);
            }
            let types: Option<Vec<String>> = match f.get("layer_types") {
                None => None,
                Some(v) => Some(
                    v.as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|x| x.as_str().map(str::to_string))
                                .collect::<Option<Vec<_>>>()
                        })
                        .filter(|t| t.len() == layers)
                        .ok_or_else(|| {
                            HfError::config(
                                "layer_types",
                                format!("{v} is not one attention type per layer"),
                            )
                        })?,
                ),
            };
            let max_window_layers = f.usize_opt("max_window_layers")?.unwrap_or(28);
            (0..layers)
                .map(|l| {
                    let sliding = match &types {
                        Some(t) => t[l] == "sliding_attention",
                        // The two families' own defaults differ.
                        None if arch == Arch::Qwen2 => l >= max_window_layers,
                        None => l % 2 == 0 && l < max_window_layers,
                    };
                    if sliding { window } else { None }
                })
                .collect()
        }
    })
}
