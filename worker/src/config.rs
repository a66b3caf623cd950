//! Model, training and device settings. These are plain serde structs so that a run manifest
//! can carry them; `validate` is the single gate that bounds every size before anything is
//! allocated, because a config may come from a peer.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::WorkerError;

/// Upper bound on the parameter count a config may ask for (16 Gi parameters).
pub const MAX_PARAMS: u64 = 1 << 34;

/// Shape of the decoder-only MoE transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size (256 for the byte tokenizer).
    pub vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads; `d_model / n_heads` must be even for RoPE.
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Longest sequence the model accepts.
    pub context: usize,
    /// Indices of the blocks whose feed-forward is a mixture of experts; the others are dense.
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer.
    pub n_experts: usize,
    /// Hidden width of one SwiGLU expert.
    pub expert_hidden: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Expert capacity is `ceil(capacity_factor * tokens * top_k / n_experts)`; assignments past
    /// it are dropped (the token keeps its residual path).
    pub capacity_factor: f32,
    /// Weight of the Switch-style load-balancing loss, summed over MoE layers.
    pub aux_loss_coef: f32,
    /// Hidden width of a dense SwiGLU feed-forward.
    pub ffn_hidden: usize,
    /// Share the token embedding with the output head.
    pub tie_embeddings: bool,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Standard deviation of the initial weights.
    pub init_std: f32,
    /// Each block's sequence mixer and feed-forward, for hybrid models (Jamba-like mixes of
    /// attention and Mamba layers). Empty means the original layout: every block attention,
    /// its feed-forward MoE where `moe_layers` says and dense elsewhere. Left out of the
    /// serialised config when empty, so the run ids and checkpoints of existing models do
    /// not change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerKind>,
    /// Shape of the Mamba layers; required when `layers` names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mamba: Option<MambaConfig>,
}

/// The sequence mixer of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mixer {
    /// Causal multi-head self-attention with RoPE.
    Attention,
    /// A Mamba (selective state-space) mixer: its cost grows linearly with the context.
    Mamba,
}

/// The feed-forward of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedForward {
    /// A dense SwiGLU of width `ffn_hidden`.
    Dense,
    /// A mixture of SwiGLU experts.
    Moe,
    /// No feed-forward (and no second norm): the block is its mixer alone, as in
    /// `MambaForCausalLM`.
    None,
}

/// What one block is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerKind {
    /// The sequence mixer.
    pub mixer: Mixer,
    /// The feed-forward after it.
    pub ffn: FeedForward,
}

/// Shape of a Mamba mixer (the names of `transformers`' `MambaConfig` where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MambaConfig {
    /// State size per channel (`N`).
    pub d_state: usize,
    /// Width of the causal depthwise convolution.
    pub d_conv: usize,
    /// Inner width as a multiple of `d_model` (`d_inner = expand * d_model`).
    pub expand: usize,
    /// Rank of the `dt` projection.
    pub dt_rank: usize,
    /// Range of the initial step sizes: `dt` starts log-uniform in `dt_min..dt_max`.
    pub dt_min: f32,
    /// See `dt_min`.
    pub dt_max: f32,
}

impl MambaConfig {
    /// The defaults of the Mamba paper for a model of width `d_model`: `N = 16`, a
    /// convolution of 4, `expand = 2`, `dt_rank = ceil(d_model / 16)`.
    pub fn for_width(d_model: usize) -> Self {
        MambaConfig {
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: d_model.div_ceil(16),
            dt_min: 0.001,
            dt_max: 0.1,
        }
    }

    /// Inner width of the mixer.
    pub fn d_inner(&self, d_model: usize) -> usize {
        self.expand * d_model
    }

    /// Parameters of one Mamba mixer with its pre-norm, or `None` on overflow.
    pub fn num_params(&self, d_model: usize) -> Option<u64> {
        let d = d_model as u64;
        let di = (self.expand as u64).checked_mul(d)?;
        let (n, k, r) = (self.d_state as u64, self.d_conv as u64, self.dt_rank as u64);
        // norm, in_proj, conv (weight and bias), x_proj, dt_proj (weight and bias), A_log,
        // D, out_proj
        let per_channel = (2 * d)
            .checked_add(k + 1)?
            .checked_add(r + 2 * n)?
            .checked_add(r + 1)?
            .checked_add(n + 1)?
            .checked_add(d)?;
        di.checked_mul(per_channel)?.checked_add(d)
    }
}

impl ModelConfig {
    /// A model that trains in seconds on a CPU: for tests and smoke runs.
    pub fn tiny() -> Self {
        ModelConfig {
            vocab: 256,
            d_model: 64,
            n_heads: 4,
            n_layers: 2,
            context: 128,
            moe_layers: vec![0, 1],
            n_experts: 4,
            expert_hidden: 128,
            top_k: 2,
            capacity_factor: 1.5,
            aux_loss_coef: 0.01,
            ffn_hidden: 128,
            tie_embeddings: true,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            init_std: 0.02,
            layers: Vec::new(),
            mamba: None,
        }
    }

    /// The `small` config of the GPU-throughput issue: d=384, 6 layers, 6 heads, context 256,
    /// every layer MoE with 8 experts of hidden 2*d, top-2.
    pub fn small() -> Self {
        ModelConfig {
            vocab: 256,
            d_model: 384,
            n_heads: 6,
            n_layers: 6,
            context: 256,
            moe_layers: (0..6).collect(),
            n_experts: 8,
            expert_hidden: 768,
            top_k: 2,
            capacity_factor: 1.25,
            aux_loss_coef: 0.01,
            ffn_hidden: 1536,
            tie_embeddings: true,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            init_std: 0.02,
            layers: Vec::new(),
            mamba: None,
        }
    }

    /// A GPU-sized model: d=768, 12 layers, 12 heads, context 1024, every layer MoE.
    pub fn base() -> Self {
        ModelConfig {
            vocab: 256,
            d_model: 768,
            n_heads: 12,
            n_layers: 12,
            context: 1024,
            moe_layers: (0..12).collect(),
            n_experts: 8,
            expert_hidden: 1536,
            top_k: 2,
            capacity_factor: 1.25,
            aux_loss_coef: 0.01,
            ffn_hidden: 3072,
            tie_embeddings: true,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            init_std: 0.02,
            layers: Vec::new(),
            mamba: None,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// A small Jamba-like hybrid for CPU tests: four blocks, Mamba, attention, Mamba, Mamba,
    /// whose feed-forwards alternate dense and MoE.
    pub fn tiny_hybrid() -> Self {
        let kind = |mixer, ffn| LayerKind { mixer, ffn };
        ModelConfig {
            n_layers: 4,
            moe_layers: vec![1, 3],
            layers: vec![
                kind(Mixer::Mamba, FeedForward::Dense),
                kind(Mixer::Attention, FeedForward::Moe),
                kind(Mixer::Mamba, FeedForward::Dense),
                kind(Mixer::Mamba, FeedForward::Moe),
            ],
            mamba: Some(MambaConfig::for_width(64)),
            ..ModelConfig::tiny()
        }
    }

    /// What block `layer` is made of: `layers[layer]`, or, for a config without `layers`,
    /// attention with the feed-forward `moe_layers` says.
    pub fn layer_kind(&self, layer: usize) -> LayerKind {
        match self.layers.get(layer) {
            Some(k) => *k,
            None => LayerKind {
                mixer: Mixer::Attention,
                ffn: if self.moe_layers.contains(&layer) {
                    FeedForward::Moe
                } else {
                    FeedForward::Dense
                },
            },
        }
    }

    /// Whether block `layer` uses the MoE feed-forward.
    pub fn is_moe(&self, layer: usize) -> bool {
        self.layer_kind(layer).ffn == FeedForward::Moe
    }

    /// Whether any block is attention (the head settings matter only then).
    pub fn has_attention(&self) -> bool {
        (0..self.n_layers).any(|l| self.layer_kind(l).mixer == Mixer::Attention)
    }

    /// Whether any block is a Mamba mixer.
    pub fn has_mamba(&self) -> bool {
        self.layers.iter().any(|k| k.mixer == Mixer::Mamba)
    }

    /// Total parameter count, or `None` on overflow.
    pub fn num_params(&self) -> Option<u64> {
        let d = self.d_model as u64;
        let v = self.vocab as u64;
        let mut total = v.checked_mul(d)?;
        if !self.tie_embeddings {
            total = total.checked_add(v.checked_mul(d)?)?;
        }
        total = total.checked_add(d)?;
        for layer in 0..self.n_layers {
            let kind = self.layer_kind(layer);
            let mixer = match kind.mixer {
                Mixer::Attention => d.checked_mul(d)?.checked_mul(4)?.checked_add(d)?,
                Mixer::Mamba => self.mamba.as_ref()?.num_params(self.d_model)?,
            };
            let ffn = match kind.ffn {
                FeedForward::Moe => {
                    let expert = d.checked_mul(self.expert_hidden as u64)?.checked_mul(3)?;
                    expert
                        .checked_mul(self.n_experts as u64)?
                        .checked_add(d.checked_mul(self.n_experts as u64)?)?
                        .checked_add(d)?
                }
                FeedForward::Dense => d
                    .checked_mul(self.ffn_hidden as u64)?
                    .checked_mul(3)?
                    .checked_add(d)?,
                FeedForward::None => 0,
            };
            total = total.checked_add(mixer)?.checked_add(ffn)?;
        }
        Some(total)
    }

    /// Checks every field and bounds the total size. Call before building a model from a
    /// config that came from outside.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: String| Err(WorkerError::Config(m));
        let positive = [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("context", self.context),
        ];
        for (name, value) in positive {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.vocab > 1 << 22 {
            return bad(format!("vocab {} is above the limit of 4Mi", self.vocab));
        }
        if self.context > 1 << 20 || self.n_layers > 4096 || self.n_heads > 4096 {
            return bad("context, n_layers or n_heads is above its limit".into());
        }
        if let Err(m) = self.validate_layers() {
            return bad(m);
        }
        let attention = self.has_attention();
        if attention && !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if attention && !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        for w in self.moe_layers.windows(2) {
            if w[0] >= w[1] {
                return bad("moe_layers must be strictly increasing".into());
            }
        }
        if let Some(&last) = self.moe_layers.last()
            && last >= self.n_layers
        {
            return bad(format!(
                "moe layer {last} is out of range for {} layers",
                self.n_layers
            ));
        }
        let moe = (0..self.n_layers).any(|l| self.is_moe(l));
        if moe {
            if self.n_experts == 0 || self.n_experts > 4096 {
                return bad(format!("n_experts {} must be in 1..=4096", self.n_experts));
            }
            if self.top_k == 0 || self.top_k > self.n_experts {
                return bad(format!(
                    "top_k {} must be in 1..=n_experts ({})",
                    self.top_k, self.n_experts
                ));
            }
            if self.expert_hidden == 0 {
                return bad("expert_hidden must be positive".into());
            }
            if !(self.capacity_factor.is_finite() && self.capacity_factor > 0.0) {
                return bad("capacity_factor must be finite and positive".into());
            }
        }
        let dense = (0..self.n_layers).any(|l| self.layer_kind(l).ffn == FeedForward::Dense);
        if dense && self.ffn_hidden == 0 {
            return bad("ffn_hidden must be positive when some layers are dense".into());
        }
        if !(self.aux_loss_coef.is_finite() && self.aux_loss_coef >= 0.0) {
            return bad("aux_loss_coef must be finite and non-negative".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad("rope_theta must be finite and above 1".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad("norm_eps must be finite and positive".into());
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return bad("init_std must be finite and positive".into());
        }
        match self.num_params() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            _ => bad(format!(
                "model is above the limit of {MAX_PARAMS} parameters"
            )),
        }
    }

    /// The per-block layout and the Mamba shape, checked before anything sized by them.
    fn validate_layers(&self) -> Result<(), String> {
        if self.layers.is_empty() {
            return match self.mamba {
                Some(_) => Err("`mamba` is set but no block is a Mamba layer".into()),
                None => Ok(()),
            };
        }
        if self.layers.len() != self.n_layers {
            return Err(format!(
                "layers lists {} blocks for n_layers {}",
                self.layers.len(),
                self.n_layers
            ));
        }
        // `moe_layers` may be left empty; when given it must say what `layers` says, so
        // that no reader of one of them sees another model.
        let moe: Vec<usize> = (0..self.n_layers)
            .filter(|&l| self.layers[l].ffn == FeedForward::Moe)
            .collect();
        if !self.moe_layers.is_empty() && self.moe_layers != moe {
            return Err(format!(
                "moe_layers {:?} disagrees with the MoE blocks of `layers` {moe:?}; leave it \
                 empty or make them agree",
                self.moe_layers
            ));
        }
        match (&self.mamba, self.has_mamba()) {
            (None, true) => Err("a Mamba layer needs the `mamba` settings".into()),
            (Some(_), false) => Err("`mamba` is set but no block is a Mamba layer".into()),
            (None, false) => Ok(()),
            (Some(m), true) => {
                let limits = [
                    ("d_state", m.d_state, 1024),
                    ("d_conv", m.d_conv, 64),
                    ("expand", m.expand, 64),
                    ("dt_rank", m.dt_rank, 1 << 16),
                ];
                for (name, value, max) in limits {
                    if value == 0 || value > max {
                        return Err(format!("mamba.{name} {value} must be in 1..={max}"));
                    }
                }
                if !(m.dt_min.is_finite() && m.dt_min > 0.0 && m.dt_max.is_finite())
                    || m.dt_max < m.dt_min
                {
                    return Err("mamba.dt_min and dt_max must be positive, dt_min <= dt_max".into());
                }
                Ok(())
            }
        }
    }
}

/// The dtype the forward and backward passes run in. Master weights and optimizer state are
/// always f32: candle's own AdamW would keep its moments in the compute dtype, which loses
/// small updates in bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    /// Full precision.
    #[default]
    F32,
    /// bfloat16 compute copy of the f32 master weights.
    Bf16,
}

impl ComputeDType {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDType::F32 => DType::F32,
            ComputeDType::Bf16 => DType::BF16,
        }
    }
}

/// Where the tensors live; chosen at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal; needs the `cuda` cargo feature.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device, with a clear error when CUDA is asked for and not available.
    pub fn device(&self) -> Result<Device, WorkerError> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(WorkerError::Device(format!(
                        "CUDA device {ordinal} was requested but potluck-worker was built \
                         without the `cuda` feature; rebuild with `--features cuda` or use the CPU"
                    )));
                }
                let device = Device::new_cuda(ordinal).map_err(|e| {
                    WorkerError::Device(format!(
                        "CUDA device {ordinal} could not be opened ({e}); check the driver and \
                         that the GPU exists, or use the CPU"
                    ))
                })?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &device {
                    crate::cuda::keep_freed_memory(d)?;
                    crate::cuda::skip_event_tracking(d);
                }
                Ok(device)
            }
        }
    }
}

/// How a training pass keeps what its backward pass needs: the worker's own model
/// (`Model::train_grads`, through [`TrainConfig::checkpointing`]) and the Hugging Face bases
/// (`HfModel::train_grads`) take the same setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every layer's activations stay alive until the backward pass: the fastest.
    #[default]
    Off,
    /// Gradient checkpointing per layer (a decoder layer, or a block of the worker's model:
    /// mixer plus feed-forward): only each layer's input is kept, and the layer is
    /// recomputed in the backward pass.
    Layers,
}

impl Checkpointing {
    /// Whether every activation is kept (the default).
    pub fn is_off(&self) -> bool {
        *self == Checkpointing::Off
    }
}

/// Inner-loop optimisation settings of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate, reached at the end of warmup.
    pub lr: f32,
    /// Final learning rate as a fraction of `lr` at the end of the cosine decay.
    pub min_lr_ratio: f32,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Steps over which the cosine decays; past it the rate stays at its minimum.
    pub total_steps: u64,
    /// Decoupled AdamW weight decay, applied to matrices only.
    pub weight_decay: f32,
    /// AdamW beta1.
    pub beta1: f32,
    /// AdamW beta2.
    pub beta2: f32,
    /// AdamW epsilon.
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f32,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence (at most the model context).
    pub seq_len: usize,
    /// Seed of the initial weights and of batch sampling.
    pub seed: u64,
    /// Dtype of the forward/backward pass.
    pub compute_dtype: ComputeDType,
    /// Whether a step keeps every layer's activations for the backward pass or only each
    /// layer's input, recomputing the layer there (gradient checkpointing): the same
    /// gradients for about one more forward pass of compute. Absent from older configs: off;
    /// and left out when off, so a run's canonical bytes (its id: the daemon hashes the
    /// serialised config) are those of before the setting existed.
    #[serde(default, skip_serializing_if = "Checkpointing::is_off")]
    pub checkpointing: Checkpointing,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            total_steps: 1000,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            batch_size: 16,
            seq_len: 64,
            seed: 0,
            compute_dtype: ComputeDType::F32,
            checkpointing: Checkpointing::Off,
        }
    }
}

impl TrainConfig {
    /// Checks the settings against the model they will train.
    pub fn validate(&self, model: &ModelConfig) -> Result<(), WorkerError> {
        let bad = |m: &str| Err(WorkerError::Config(m.to_string()));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be finite and positive");
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return bad("min_lr_ratio must be in 0..=1");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be finite and non-negative");
        }
        for b in [self.beta1, self.beta2] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return bad("beta1 and beta2 must be in 0..1");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps must be finite and positive");
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad("grad_clip must be finite and non-negative");
        }
        if self.batch_size == 0 || self.batch_size > 1 << 16 {
            return bad("batch_size must be in 1..=65536");
        }
        if self.seq_len == 0 || self.seq_len > model.context {
            return Err(WorkerError::Config(format!(
                "seq_len {} must be in 1..=context ({})",
                self.seq_len, model.context
            )));
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based): linear warmup, then cosine decay to
    /// `min_lr_ratio * lr` at `total_steps`.
    pub fn lr_at(&self, step: u64) -> f32 {
        let peak = self.lr as f64;
        if step < self.warmup_steps {
            return (peak * (step + 1) as f64 / self.warmup_steps as f64) as f32;
        }
        let min = peak * self.min_lr_ratio as f64;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (min + (peak - min) * cos) as f32
    }
}

/// Low-rank adapters on the attention and feed-forward projections of a frozen base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank.
    pub rank: usize,
    /// Scale numerator: the adapter output is multiplied by `alpha / rank`.
    pub alpha: f32,
}

impl LoraConfig {
    /// Checks the rank against the model.
    pub fn validate(&self, model: &ModelConfig) -> Result<(), WorkerError> {
        if self.rank == 0 || self.rank > model.d_model {
            return Err(WorkerError::Config(format!(
                "lora rank {} must be in 1..=d_model ({})",
                self.rank, model.d_model
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(WorkerError::Config(
                "lora alpha must be finite and positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;

    #[test]
    fn train_configs_from_before_checkpointing_still_parse() {
        // Off is not written: the serialised default is what it was before the setting.
        let mut old = serde_json::to_value(TrainConfig::default()).unwrap();
        assert!(old.get("checkpointing").is_none(), "{old}");
        let parsed: TrainConfig = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(parsed, TrainConfig::default());

        old["checkpointing"] = "layers".into();
        let on: TrainConfig = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(on.checkpointing, Checkpointing::Layers);
        let toml_text = toml::to_string(&on).unwrap();
        assert!(
            toml_text.contains("checkpointing = \"layers\""),
            "{toml_text}"
        );
        assert_eq!(toml::from_str::<TrainConfig>(&toml_text).unwrap(), on);

        old["checkpointing"] = "off".into();
        let off: TrainConfig = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(off, TrainConfig::default());
        old["checkpointing"] = "on".into();
        assert!(serde_json::from_value::<TrainConfig>(old).is_err());
    }
}
