//! LoRA adapters on a frozen Hugging Face base, configured with PEFT's names: `r`,
//! `lora_alpha`, `lora_dropout` and `target_modules` (module names such as `q_proj`,
//! `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`, Phi-3's `qkv_proj` and
//! `gate_up_proj`, Mixtral's experts' `w1`, `w2`, `w3`, an MoE router's `gate`, or
//! `all-linear`). A target matches a projection whose module path is the target or ends in
//! `.` + target, as PEFT matches; a target that matches nothing is an error, as in PEFT.
//! Experts are reached by the module paths of transformers 4 (see [`super::moe`]): `w1`
//! adapts every expert's `w1` in every layer, `experts.3.w1` expert 3's, `gate_proj` on
//! Qwen2-MoE every expert's and the shared expert's. `all-linear` is every projection but
//! the output head, as PEFT's is on transformers 4 modules: experts and routers included.
//!
//! The adapter of a projection `W: [out, in]` is `A: [r, in]` (PEFT's kaiming-uniform
//! start: uniform in `±1/sqrt(in)`, from a seeded ChaCha8 stream) and `B: [out, r]` (zero,
//! so a fresh adapter leaves the base's output unchanged), added as
//! `(alpha / r) * B A dropout(x)`. Adapters are f32 `Var`s, the only trainable tensors: the
//! base's tensors are constants of the graph and get no gradient.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::HfError;

type Result<T> = std::result::Result<T, HfError>;

/// Largest adapter rank accepted.
pub const MAX_RANK: usize = 4096;

/// The projections a target list may name, for the error message of a target that matches
/// nothing.
const KNOWN: &str = "q_proj, k_proj, v_proj, o_proj, qkv_proj, gate_proj, up_proj, down_proj, \
                     gate_up_proj, w1, w2, w3 (Mixtral's experts), gate (an MoE router), \
                     shared_expert_gate, all-linear";

/// A LoRA configuration in PEFT's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct HfLoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / r`.
    pub alpha: f64,
    /// `lora_dropout`: the probability of zeroing an input of the adapter while training.
    pub dropout: f64,
    /// `target_modules`.
    pub target_modules: Vec<String>,
    /// Seed of the `A` matrices' start.
    pub seed: u64,
}

impl HfLoraConfig {
    /// Rank 8, alpha 16, no dropout, on every attention and MLP projection.
    pub fn new(targets: &[&str]) -> Self {
        HfLoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            seed: 0,
        }
    }

    /// Checks the settings (targets are checked against the model when attached).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(HfError::config(
                "r",
                format!("{} must be in 1..={MAX_RANK}", self.rank),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(HfError::config(
                "lora_alpha",
                format!("{} must be finite and positive", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(HfError::config(
                "lora_dropout",
                format!("{} must be in [0, 1)", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(HfError::config("target_modules", "names no module"));
        }
        Ok(())
    }

    /// Whether module path `name` is a target.
    pub fn targets(&self, name: &str) -> bool {
        self.target_modules.iter().any(|t| {
            t == "all-linear"
                || name == t
                || name
                    .strip_suffix(t.as_str())
                    .is_some_and(|p| p.ends_with('.'))
        })
    }

    /// The error for targets that matched no module of a model.
    pub(crate) fn unmatched(&self, missing: &[&String]) -> HfError {
        HfError::config(
            "target_modules",
            format!(
                "{missing:?} match no projection of this base (projections are named {KNOWN}, \
                 each also reachable by a dotted suffix of its module path)"
            ),
        )
    }
}

/// The adapter of one projection.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `[r, in]`, f32.
    pub a: Var,
    /// `[out, r]`, f32.
    pub b: Var,
    /// `alpha / r`.
    pub scale: f64,
    /// Dropout probability while training.
    pub dropout: f64,
}

impl Adapter {
    /// A fresh adapter for a projection `[out, in]`: `A` from `rng`, `B` zero.
    pub(crate) fn new(
        cfg: &HfLoraConfig,
        out: usize,
        inp: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * inp)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32)
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, inp), device)?;
        let b = Tensor::zeros((out, cfg.rank), DType::F32, device)?;
        Ok(Adapter {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.alpha / cfg.rank as f64,
            dropout: cfg.dropout,
        })
    }

    /// `scale * dropout(x) A^T B^T` for `x: [N, in]` in the base's dtype; `mask` is the
    /// dropout's keep mask (already scaled by `1 / (1 - p)`), or `None` outside training.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<Tensor>) -> Result<Tensor> {
        let dt = x.dtype();
        let x = match mask {
            Some(m) => x.mul(&m.to_dtype(dt)?)?,
            None => x.clone(),
        };
        let a = self.a.as_tensor().to_dtype(dt)?;
        let b = self.b.as_tensor().to_dtype(dt)?;
        let low = crate::fused::matmul_t(&crate::fused::matmul_t(&x, &a)?, &b)?;
        Ok(low.affine(self.scale, 0.0)?)
    }
}

/// The dropout masks of one training pass, drawn in order from a seeded stream so that a
/// pass is reproducible. A copy continues the stream from the same point (gradient
/// checkpointing draws a layer's masks again from the copy taken at its start).
#[derive(Debug, Clone)]
pub(crate) struct Dropout {
    rng: ChaCha8Rng,
}

impl Dropout {
    pub(crate) fn new(seed: u64) -> Self {
        Dropout {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A keep mask shaped like `x` for probability `p`, scaled by `1 / (1 - p)`.
    pub(crate) fn mask(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let keep = (1.0 / (1.0 - p)) as f32;
        let m: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if self.rng.random::<f64>() < p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Ok(Tensor::from_vec(m, x.shape(), x.device())?)
    }
}
