//! The decoder of every supported family: token embedding, `layers` blocks of pre-norm
//! attention and feed-forward, final RMSNorm and the output head, computing what
//! `transformers` computes for Llama, Qwen2, Mistral and Phi-3 (and, with [`super::moe`]'s
//! feed-forward, Mixtral and Qwen2-MoE). The families differ only in how their weights are
//! named and packed (Phi-3's fused `qkv_proj` and `gate_up_proj`), in biases, in sliding
//! windows and in partial rotary, so one forward pass serves them all.
//!
//! Built on the worker's fused ops (`crate::fused`: RMSNorm, the head split with RoPE, the
//! causal softmax, SwiGLU, products with their own backward passes), so it runs on the CPU
//! and on CUDA and is differentiable; the base's tensors are plain tensors (no `Var`s): it
//! is frozen, and adapters (a later layer) are the only trainable parameters. The fused ops
//! compute no gradient for a constant operand, so a backward pass costs the frozen weights
//! nothing. [`HfModel::train_grads`] runs a training step's backward pass, either keeping
//! every layer's activations or with gradient checkpointing per layer ([`Checkpointing`]):
//! layers run forward detached, keeping only their inputs, then are recomputed one at a
//! time, last first, each backpropagating `sum(out * grad_out)` for its adapters' gradients
//! and its input's.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::HfError;
use super::config::{Arch, HfConfig};
use super::load::WeightFiles;
use super::lora::{Adapter, Dropout, HfLoraConfig};
use super::moe::Moe;
use super::quant::{QuantFormat, Weight};

type Result<T> = std::result::Result<T, HfError>;

pub use crate::config::Checkpointing;

/// A projection `y = x W^T (+ b)` of the base, with its Hugging Face module path.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// `[out, in]`, dense or quantised.
    pub weight: Weight,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// The LoRA adapter, when the projection is a target.
    pub adapter: Option<Adapter>,
}

/// What one forward pass does beyond inference: the adapters' dropout while training, and
/// a record of how many tokens each expert of each sparse layer got.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    dropout: Option<RefCell<Dropout>>,
    routing: Option<RefCell<Vec<Vec<usize>>>>,
}

impl Pass {
    /// The dropout stream's state after the pass.
    fn into_dropout(self) -> Option<Dropout> {
        self.dropout.map(RefCell::into_inner)
    }

    /// A training pass whose dropout masks come from `dropout`.
    fn training(dropout: Dropout) -> Self {
        Pass {
            dropout: Some(RefCell::new(dropout)),
            routing: None,
        }
    }

    /// Notes the tokens per expert of the next sparse layer, when recording.
    pub(crate) fn record_routing(&self, counts: Vec<usize>) {
        if let Some(r) = &self.routing {
            r.borrow_mut().push(counts);
        }
    }
}

impl Linear {
    fn load(
        w: &WeightFiles,
        name: String,
        out: usize,
        inp: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weight = w.tensor(&format!("{name}.weight"), &[out, inp], dtype, device)?;
        let bias = if bias {
            Some(w.tensor(&format!("{name}.bias"), &[out], dtype, device)?)
        } else {
            None
        };
        Ok(Linear {
            name,
            weight: Weight::Dense(weight),
            bias,
            adapter: None,
        })
    }

    /// The weight `[out, in]` with the adapter, if any, folded in: `W + (alpha / r) B A`,
    /// summed in f32 and cast back to the weight's dtype (quantised weights dequantised).
    pub(crate) fn merged(&self) -> Result<Tensor> {
        let w = self.weight.dense()?;
        let Some(ad) = &self.adapter else {
            return Ok(w);
        };
        let delta =
            ad.b.as_tensor()
                .to_dtype(DType::F32)?
                .matmul(&ad.a.as_tensor().to_dtype(DType::F32)?)?
                .affine(ad.scale, 0.0)?;
        Ok((w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?)
    }

    /// `x: [N, in]` -> `[N, out]`.
    pub(crate) fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        // A quantised weight is dequantised here, for this product only.
        let y = crate::fused::matmul_t(x, &self.weight.dense()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.adapter {
            None => Ok(y),
            Some(ad) => {
                let mask = match &pass.dropout {
                    Some(d) if ad.dropout > 0.0 => Some(d.borrow_mut().mask(x, ad.dropout)?),
                    _ => None,
                };
                Ok(y.add(&ad.forward(x, mask)?)?)
            }
        }
    }
}

/// The attention's input projections: apart, or Phi-3's one `[q; k; v]` product.
#[derive(Debug, Clone)]
enum Qkv {
    Apart { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// A SwiGLU MLP: gate and up apart, or Phi-3's one `[gate; up]` product.
#[derive(Debug, Clone)]
pub(crate) enum Mlp {
    Apart {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Fused {
        gate_up: Linear,
        down: Linear,
    },
}

impl Mlp {
    pub(crate) fn load_apart(
        w: &WeightFiles,
        prefix: &str,
        hidden: usize,
        inner: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Mlp::Apart {
            gate: Linear::load(
                w,
                format!("{prefix}.gate_proj"),
                inner,
                hidden,
                bias,
                dtype,
                device,
            )?,
            up: Linear::load(
                w,
                format!("{prefix}.up_proj"),
                inner,
                hidden,
                bias,
                dtype,
                device,
            )?,
            down: Linear::load(
                w,
                format!("{prefix}.down_proj"),
                hidden,
                inner,
                bias,
                dtype,
                device,
            )?,
        })
    }

    /// `x: [N, hidden]` -> `[N, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        match self {
            Mlp::Apart { gate, up, down } => {
                let h = crate::fused::swiglu_gate(&gate.forward(x, pass)?, &up.forward(x, pass)?)?;
                down.forward(&h, pass)
            }
            Mlp::Fused { gate_up, down } => down.forward(
                &crate::fused::swiglu_packed(&gate_up.forward(x, pass)?)?,
                pass,
            ),
        }
    }

    /// The projections, in order.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Apart { gate, up, down } => vec![gate, up, down],
            Mlp::Fused { gate_up, down } => vec![gate_up, down],
        }
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Apart { gate, up, down } => vec![gate, up, down],
            Mlp::Fused { gate_up, down } => vec![gate_up, down],
        }
    }
}

/// The batch's shape and its RoPE tables, shared by every block of one pass.
struct Positions {
    batch: usize,
    time: usize,
    /// `[T, rotary_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Box<Mlp>),
    Sparse(Box<Moe>),
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    qkv: Qkv,
    o: Linear,
    ffn_norm: Tensor,
    ffn: FeedForward,
    window: Option<usize>,
}

/// A Hugging Face base loaded for inference or adapter training: frozen tensors in one
/// dtype on one device.
#[derive(Debug, Clone)]
pub struct HfModel {
    cfg: HfConfig,
    dtype: DType,
    device: Device,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// The output head, or `None` when it is the embedding.
    head: Option<Tensor>,
    /// The settings of the attached adapters.
    lora: Option<HfLoraConfig>,
}

impl HfModel {
    /// Builds the model of `cfg` from `weights`, in `dtype` (`None`: the embedding's dtype
    /// in the file) on `device`. Every tensor's shape is checked against the config.
    pub fn from_weights(
        cfg: &HfConfig,
        weights: &WeightFiles,
        dtype: Option<DType>,
        device: &Device,
    ) -> Result<Self> {
        let embed_name = "model.embed_tokens.weight";
        let dtype = match dtype {
            Some(d) => d,
            None => weights.dtype(embed_name)?,
        };
        let (h, dev) = (cfg.hidden, device);
        let embed = weights.tensor(embed_name, &[cfg.vocab, h], dtype, dev)?;
        let (q_out, kv_out) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("model.layers.{l}");
            let qkv = if cfg.arch == Arch::Phi3 {
                Qkv::Fused(Linear::load(
                    weights,
                    format!("{p}.self_attn.qkv_proj"),
                    q_out + 2 * kv_out,
                    h,
                    cfg.qkv_bias,
                    dtype,
                    dev,
                )?)
            } else {
                let lin = |n: &str, out: usize| {
                    Linear::load(
                        weights,
                        format!("{p}.self_attn.{n}"),
                        out,
                        h,
                        cfg.qkv_bias,
                        dtype,
                        dev,
                    )
                };
                Qkv::Apart {
                    q: lin("q_proj", q_out)?,
                    k: lin("k_proj", kv_out)?,
                    v: lin("v_proj", kv_out)?,
                }
            };
            let o = Linear::load(
                weights,
                format!("{p}.self_attn.o_proj"),
                h,
                q_out,
                cfg.o_bias,
                dtype,
                dev,
            )?;
            let ffn = if cfg.is_sparse(l) {
                FeedForward::Sparse(Box::new(Moe::load(cfg, weights, &p, dtype, dev)?))
            } else if cfg.arch == Arch::Phi3 {
                let i = cfg.intermediate;
                FeedForward::Dense(Box::new(Mlp::Fused {
                    gate_up: Linear::load(
                        weights,
                        format!("{p}.mlp.gate_up_proj"),
                        2 * i,
                        h,
                        cfg.mlp_bias,
                        dtype,
                        dev,
                    )?,
                    down: Linear::load(
                        weights,
                        format!("{p}.mlp.down_proj"),
                        h,
                        i,
                        cfg.mlp_bias,
                        dtype,
                        dev,
                    )?,
                }))
            } else {
                FeedForward::Dense(Box::new(Mlp::load_apart(
                    weights,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate,
                    cfg.mlp_bias,
                    dtype,
                    dev,
                )?))
            };
            blocks.push(Block {
                attn_norm: weights.tensor(
                    &format!("{p}.input_layernorm.weight"),
                    &[h],
                    dtype,
                    dev,
                )?,
                qkv,
                o,
                ffn_norm: weights.tensor(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    dtype,
                    dev,
                )?,
                ffn,
                window: cfg.windows[l],
            });
        }
        let norm = weights.tensor("model.norm.weight", &[h], dtype, dev)?;
        let head = if cfg.tie_embeddings {
            None
        } else {
            Some(weights.tensor("lm_head.weight", &[cfg.vocab, h], dtype, dev)?)
        };
        Ok(HfModel {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            embed,
            blocks,
            norm,
            head,
            lora: None,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &HfConfig {
        &self.cfg
    }

    /// The dtype the weights are held and computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[B, T, vocab]` in f32 for token ids `ids: [B, T]` (u32), positions from 0
    /// (adapters, if any, without dropout).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_pass(ids, &Pass::default())
    }

    fn forward_pass(&self, ids: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = self.check_ids(ids)?;
        let (mut x, at) = self.embed_ids(ids, b, t)?;
        for block in &self.blocks {
            x = self.block(block, &x, &at, pass)?;
        }
        self.logits_of(&x, b, t)
    }

    /// The embedded tokens `[B*T, H]` of checked `ids: [B, T]` and the pass's positions.
    fn embed_ids(&self, ids: &Tensor, b: usize, t: usize) -> Result<(Tensor, Positions)> {
        let ids = ids.to_device(&self.device)?;
        let x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        let (cos, sin) = self.rope_tables(t)?;
        let at = Positions {
            batch: b,
            time: t,
            cos,
            sin,
        };
        Ok((x, at))
    }

    /// Logits `[B, T, vocab]` in f32 of the last layer's output `x: [B*T, H]`.
    fn logits_of(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let x = crate::fused::rms_norm(x, &self.norm, self.cfg.norm_eps)?;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let logits = crate::fused::matmul_t(&x, head)?.to_dtype(DType::F32)?;
        Ok(logits.reshape((b, t, self.cfg.vocab))?)
    }

    /// The mean next-token cross-entropy of `ids: [B, T]` (each position predicts the next
    /// id, as `transformers` computes with `labels = input_ids`), in f32.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.loss_pass(ids, &Pass::default())
    }

    /// [`HfModel::loss`] in training mode: the adapters' dropout masks are drawn from a
    /// ChaCha8 stream seeded with `dropout_seed`, so a step is reproducible.
    pub fn train_loss(&self, ids: &Tensor, dropout_seed: u64) -> Result<Tensor> {
        self.loss_pass(ids, &Pass::training(Dropout::new(dropout_seed)))
    }

    /// [`HfModel::train_loss`] and its backward pass in one: the loss's value and the
    /// gradients of the adapters (`GradStore::get` with a [`HfModel::lora_params`]
    /// variable), ready for an optimizer step. With [`Checkpointing::Layers`] only each
    /// decoder layer's input is kept from the forward pass and each layer is computed again
    /// during the backward pass, one at a time: the activations held at once are one
    /// layer's instead of every layer's, for one more forward pass of compute. The two
    /// give the same gradients up to float rounding (the same dropout masks are drawn, from
    /// a copy of the stream's state at each layer's start).
    pub fn train_grads(
        &self,
        ids: &Tensor,
        dropout_seed: u64,
        checkpointing: Checkpointing,
    ) -> Result<(f32, GradStore)> {
        match checkpointing {
            Checkpointing::Off => {
                let loss = self.train_loss(ids, dropout_seed)?;
                let grads = loss.backward()?;
                Ok((loss.to_scalar::<f32>()?, grads))
            }
            Checkpointing::Layers => self.checkpointed_grads(ids, dropout_seed),
        }
    }

    fn checkpointed_grads(&self, ids: &Tensor, dropout_seed: u64) -> Result<(f32, GradStore)> {
        let (b, t) = self.check_loss_ids(ids)?;
        let (mut x, at) = self.embed_ids(ids, b, t)?;
        // Forward with no graph kept: each layer's input and the dropout stream's state at
        // its start are all that survive a layer.
        let mut dropout = Dropout::new(dropout_seed);
        let mut saved = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let pass = Pass::training(dropout.clone());
            let out = self.block(blk, &x, &at, &pass)?.detach();
            saved.push((std::mem::replace(&mut x, out), dropout.clone()));
            if let Some(next) = pass.into_dropout() {
                dropout = next;
            }
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let logits = self.logits_of(top.as_tensor(), b, t)?;
        let loss = self.loss_of(&logits, ids, b, t)?;
        drop(logits);
        let value = loss.to_scalar::<f32>()?;
        let mut grads = loss.backward()?;
        drop(loss);
        let mut grad = take_grad(&mut grads, top.as_tensor(), "the last layer's output")?;
        drop(top);
        let params = self.lora_params();
        // Backwards through the layers, each recomputed with its graph from its saved
        // input: the gradient of `sum(out * grad_out)` is the layer's share of the loss's.
        for (l, (blk, (input, dropout))) in self.blocks.iter().zip(saved).enumerate().rev() {
            // The first layer's input is the frozen embedding's: no gradient wanted.
            let input = if l == 0 {
                input
            } else {
                Var::from_tensor(&input)?.as_tensor().clone()
            };
            let out = self.block(blk, &input, &at, &Pass::training(dropout))?;
            let mut layer = (out * &grad)?.sum_all()?.backward()?;
            for (_, p) in &params {
                if let Some(g) = layer.remove(p.as_tensor()) {
                    let g = match grads.remove(p.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(p.as_tensor(), g);
                }
            }
            if l > 0 {
                grad = take_grad(&mut layer, &input, "a layer's input")?;
            }
        }
        Ok((value, grads))
    }

    /// Tokens per expert of each sparse layer, in layer order, for an inference pass over
    /// `ids: [B, T]` (adapters without dropout, so a training pass without dropout routes
    /// the same): how evenly a batch spreads over the experts, and which experts' adapters
    /// a step on it trains (an expert no token reaches gets no gradient).
    pub fn expert_load(&self, ids: &Tensor) -> Result<Vec<Vec<usize>>> {
        let pass = Pass {
            dropout: None,
            routing: Some(RefCell::new(Vec::new())),
        };
        self.forward_pass(ids, &pass)?;
        Ok(pass.routing.map(RefCell::into_inner).unwrap_or_default())
    }

    /// Checked `ids` of a loss: `(B, T)` with `T >= 2`.
    fn check_loss_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = self.check_ids(ids)?;
        if t < 2 {
            return Err(HfError::Input(
                "a loss needs sequences of at least two tokens".into(),
            ));
        }
        Ok((b, t))
    }

    fn loss_pass(&self, ids: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (b, t) = self.check_loss_ids(ids)?;
        let logits = self.forward_pass(ids, pass)?;
        self.loss_of(&logits, ids, b, t)
    }

    /// The mean next-token cross-entropy of `logits: [B, T, vocab]` for `ids: [B, T]`.
    fn loss_of(&self, logits: &Tensor, ids: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let v = self.cfg.vocab;
        let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let targets = ids
            .to_device(&self.device)?
            .narrow(1, 1, t - 1)?
            .flatten_all()?;
        Ok(candle_nn::loss::cross_entropy(&pred, &targets)?)
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2().map_err(|_| {
            HfError::Input(format!("ids must be [batch, time], got {:?}", ids.dims()))
        })?;
        if b == 0 || t == 0 {
            return Err(HfError::Input("an empty batch".into()));
        }
        if t > self.cfg.max_positions {
            return Err(HfError::Input(format!(
                "{t} tokens per sequence; the base was configured for at most {} \
                 (max_position_embeddings)",
                self.cfg.max_positions
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(HfError::Input(format!(
                "ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab {
            return Err(HfError::Input(format!(
                "token id {max} is past the vocabulary ({})",
                self.cfg.vocab
            )));
        }
        Ok((b, t))
    }

    /// `cos, sin: [T, rotary_dim / 2]` in the model's dtype, from f64 angles.
    fn rope_tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let inv = self.cfg.rope.inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for f in &inv {
                // transformers computes the angle in f32 before its cos and sin.
                let angle = (pos as f32 * *f as f32) as f64;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    fn block(&self, blk: &Block, x: &Tensor, at: &Positions, pass: &Pass) -> Result<Tensor> {
        let eps = self.cfg.norm_eps;
        let h = crate::fused::rms_norm(x, &blk.attn_norm, eps)?;
        let x = (x + self.attention(blk, &h, at, pass)?)?;
        let h = crate::fused::rms_norm(&x, &blk.ffn_norm, eps)?;
        let f = match &blk.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&h, pass)?,
            FeedForward::Sparse(moe) => moe.forward(&h, pass)?,
        };
        Ok((x + f)?)
    }

    /// Heads `[B, H, T, hd]` of projection output `y: [B*T, H*hd]`, rotated when `rope`.
    fn heads(
        &self,
        y: &Tensor,
        b: usize,
        t: usize,
        n: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let hd = self.cfg.head_dim;
        let rot = self.cfg.rope.rotary_dim;
        match rope {
            Some(tables) if rot == hd => Ok(crate::fused::split_heads(y, b, t, n, Some(tables))?),
            Some((cos, sin)) => {
                // Partial rotary: the leading `rot` dimensions of each head rotate (in the
                // rotate-half form over those alone), the rest pass through.
                let y = crate::fused::split_heads(y, b, t, n, None)?;
                let r = crate::fused::rope_reference(&y.narrow(D::Minus1, 0, rot)?, cos, sin)?;
                Ok(Tensor::cat(
                    &[r, y.narrow(D::Minus1, rot, hd - rot)?],
                    D::Minus1,
                )?)
            }
            None => Ok(crate::fused::split_heads(y, b, t, n, None)?),
        }
    }

    fn attention(&self, blk: &Block, h: &Tensor, at: &Positions, pass: &Pass) -> Result<Tensor> {
        let (b, t) = (at.batch, at.time);
        let (cos, sin) = (&at.cos, &at.sin);
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (q, k, v) = match &blk.qkv {
            Qkv::Apart { q, k, v } => (
                q.forward(h, pass)?,
                k.forward(h, pass)?,
                v.forward(h, pass)?,
            ),
            Qkv::Fused(lin) => {
                let y = lin.forward(h, pass)?;
                (
                    y.narrow(1, 0, nh * hd)?,
                    y.narrow(1, nh * hd, nkv * hd)?,
                    y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let rope = Some((cos, sin));
        let q = self.heads(&q.contiguous()?, b, t, nh, rope)?;
        let k = repeat_kv(&self.heads(&k.contiguous()?, b, t, nkv, rope)?, nh / nkv)?;
        let v = repeat_kv(&self.heads(&v.contiguous()?, b, t, nkv, None)?, nh / nkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let probs = match blk.window {
            Some(w) if w < t => {
                // Sliding window: key j is visible from query i when i - w < j <= i. Plain
                // ops with an additive mask (the fused softmax knows only the causal mask).
                let mask: Vec<f32> = (0..t)
                    .flat_map(|i| {
                        (0..t).map(move |j| {
                            if j <= i && i - j < w {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
                let scores = crate::fused::matmul_t(&q, &k)?
                    .to_dtype(DType::F32)?
                    .affine(scale, 0.0)?
                    .broadcast_add(&mask)?;
                candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(self.dtype)?
            }
            _ => crate::fused::causal_softmax(&crate::fused::matmul_t_causal(&q, &k)?, scale)?,
        };
        // Both masks leave the probabilities lower-triangular, what the causal product needs.
        let o = crate::fused::merge_heads(&crate::fused::matmul_causal(&probs, &v)?)?;
        blk.o.forward(&o, pass)
    }

    /// Logits `[B, t, vocab]` in f32 for `ids: [B, t]` placed after the `cache.len()`
    /// tokens already in `cache`, whose keys and values this appends (inference: adapters
    /// without dropout, no gradient wanted). The same arithmetic as [`HfModel::forward`]
    /// except that scores go through candle's plain softmax with an explicit mask.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = self.check_ids(ids)?;
        let start = cache.len;
        if cache.layers.len() != self.blocks.len() {
            return Err(HfError::Input(format!(
                "a cache for {} layers, the model has {}",
                cache.layers.len(),
                self.blocks.len()
            )));
        }
        if start > 0 && cache.batch != b {
            return Err(HfError::Input(format!(
                "the cache holds {} sequences, the ids {b}",
                cache.batch
            )));
        }
        if start + t > self.cfg.max_positions {
            return Err(HfError::Input(format!(
                "{} tokens; the base was configured for at most {} (max_position_embeddings)",
                start + t,
                self.cfg.max_positions
            )));
        }
        let pass = Pass::default();
        let ids = ids.to_device(&self.device)?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        let (cos, sin) = self.rope_tables(start + t)?;
        let at = Positions {
            batch: b,
            time: t,
            cos: cos.narrow(0, start, t)?.contiguous()?,
            sin: sin.narrow(0, start, t)?.contiguous()?,
        };
        let eps = self.cfg.norm_eps;
        for (blk, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = crate::fused::rms_norm(&x, &blk.attn_norm, eps)?;
            let a = self.attention_cached(blk, &h, &at, start, kv, &pass)?;
            x = (x + a)?;
            let h = crate::fused::rms_norm(&x, &blk.ffn_norm, eps)?;
            let f = match &blk.ffn {
                FeedForward::Dense(mlp) => mlp.forward(&h, &pass)?,
                FeedForward::Sparse(moe) => moe.forward(&h, &pass)?,
            };
            x = (x + f)?;
        }
        cache.len = start + t;
        cache.batch = b;
        let x = crate::fused::rms_norm(&x, &self.norm, eps)?;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let logits = crate::fused::matmul_t(&x, head)?.to_dtype(DType::F32)?;
        Ok(logits.reshape((b, t, self.cfg.vocab))?)
    }

    /// An empty key/value cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
            batch: 0,
        }
    }

    fn attention_cached(
        &self,
        blk: &Block,
        h: &Tensor,
        at: &Positions,
        start: usize,
        kv: &mut Option<(Tensor, Tensor)>,
        pass: &Pass,
    ) -> Result<Tensor> {
        let (b, t) = (at.batch, at.time);
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let (q, k, v) = match &blk.qkv {
            Qkv::Apart { q, k, v } => (
                q.forward(h, pass)?,
                k.forward(h, pass)?,
                v.forward(h, pass)?,
            ),
            Qkv::Fused(lin) => {
                let y = lin.forward(h, pass)?;
                (
                    y.narrow(1, 0, nh * hd)?,
                    y.narrow(1, nh * hd, nkv * hd)?,
                    y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let rope = Some((&at.cos, &at.sin));
        let q = self.heads(&q.contiguous()?, b, t, nh, rope)?;
        let k_new = self.heads(&k.contiguous()?, b, t, nkv, rope)?;
        let v_new = self.heads(&v.contiguous()?, b, t, nkv, None)?;
        // Keys and values are cached before the grouped-query repeat: `kv` heads, not `nh`.
        let (k_all, v_all) = match kv.take() {
            Some((k0, v0)) => (
                Tensor::cat(&[&k0, &k_new], 2)?,
                Tensor::cat(&[&v0, &v_new], 2)?,
            ),
            None => (k_new, v_new),
        };
        *kv = Some((k_all.clone(), v_all.clone()));
        let total = start + t;
        let k = repeat_kv(&k_all, nh / nkv)?;
        let v = repeat_kv(&v_all, nh / nkv)?;
        // Query `i` sits at position `start + i` and sees key `j` when `j <= start + i` and,
        // under a sliding window `w`, `start + i - j < w`.
        let w = blk.window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                let p = start + i;
                (0..total).map(move |j| {
                    if j <= p && p - j < w {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q
            .contiguous()?
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(self.dtype)?;
        let o = probs.matmul(&v.contiguous()?)?;
        blk.o.forward(&crate::fused::merge_heads(&o)?, pass)
    }

    /// Every projection of the base, in layer order (attention, then feed-forward).
    fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for blk in &self.blocks {
            match &blk.qkv {
                Qkv::Apart { q, k, v } => out.extend([q, k, v]),
                Qkv::Fused(l) => out.push(l),
            }
            out.push(&blk.o);
            match &blk.ffn {
                FeedForward::Dense(m) => out.extend(m.linears()),
                FeedForward::Sparse(moe) => out.extend(moe.linears()),
            }
        }
        out
    }

    /// [`HfModel::linears`], mutable; without the MoE routers when `router` is false.
    fn linears_mut(&mut self, router: bool) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for blk in &mut self.blocks {
            match &mut blk.qkv {
                Qkv::Apart { q, k, v } => out.extend([q, k, v]),
                Qkv::Fused(l) => out.push(l),
            }
            out.push(&mut blk.o);
            match &mut blk.ffn {
                FeedForward::Dense(m) => out.extend(m.linears_mut()),
                FeedForward::Sparse(moe) => out.extend(moe.linears_mut(router)),
            }
        }
        out
    }

    /// Puts fresh LoRA adapters (replacing any) on the projections `cfg` targets, in
    /// layer order from one ChaCha8 stream seeded with `cfg.seed`. Each target must match
    /// at least one projection. Returns how many projections got one.
    pub fn attach_lora(&mut self, cfg: &HfLoraConfig) -> Result<usize> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let device = self.device.clone();
        let mut hit = vec![false; cfg.target_modules.len()];
        let mut n = 0;
        for lin in self.linears_mut(true) {
            lin.adapter = None;
            if !cfg.targets(&lin.name) {
                continue;
            }
            for (i, t) in cfg.target_modules.iter().enumerate() {
                let one = HfLoraConfig {
                    target_modules: vec![t.clone()],
                    ..cfg.clone()
                };
                hit[i] |= one.targets(&lin.name);
            }
            let (out, inp) = lin.weight.dims2()?;
            lin.adapter = Some(Adapter::new(cfg, out, inp, &mut rng, &device)?);
            n += 1;
        }
        let missing: Vec<&String> = cfg
            .target_modules
            .iter()
            .zip(&hit)
            .filter(|(_, h)| !**h)
            .map(|(t, _)| t)
            .collect();
        if !missing.is_empty() {
            for lin in self.linears_mut(true) {
                lin.adapter = None;
            }
            self.lora = None;
            return Err(cfg.unmatched(&missing));
        }
        self.lora = Some(cfg.clone());
        Ok(n)
    }

    /// The adapters' parameters, `{module}.lora_A.weight` and `{module}.lora_B.weight` per
    /// adapted projection in layer order: the only trainable tensors.
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(ad) = &lin.adapter {
                out.push((format!("{}.lora_A.weight", lin.name), ad.a.clone()));
                out.push((format!("{}.lora_B.weight", lin.name), ad.b.clone()));
            }
        }
        out
    }

    /// The base's own tensors (frozen), by their Hugging Face names, a sparse layer's
    /// router and experts as transformers 5 names and stacks them
    /// (`model.layers.{l}.mlp.gate.weight`, `.mlp.experts.gate_up_proj`, `.down_proj`).
    /// Quantised projections come back dequantised.
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors_with(&|lin: &Linear| lin.weight.dense())
    }

    /// [`HfModel::base_tensors`] with every adapter folded into its projection's weight
    /// (`W + (alpha / r) B A`, summed in f32, then cast to the compute dtype).
    pub(crate) fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors_with(&|lin: &Linear| lin.merged())
    }

    fn tensors_with(
        &self,
        weight: &dyn Fn(&Linear) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, blk) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), blk.attn_norm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                blk.ffn_norm.clone(),
            ));
            let mut lins: Vec<&Linear> = match &blk.qkv {
                Qkv::Apart { q, k, v } => vec![q, k, v],
                Qkv::Fused(l) => vec![l],
            };
            lins.push(&blk.o);
            match &blk.ffn {
                FeedForward::Dense(m) => lins.extend(m.linears()),
                FeedForward::Sparse(moe) => out.extend(moe.tensors_with(&p, weight)?),
            }
            for lin in lins {
                out.push((format!("{}.weight", lin.name), weight(lin)?));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.name), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        Ok(out)
    }

    /// Quantises every projection of the base (attention, dense MLP, experts, shared
    /// expert) into `fmt`, one at a time; the embedding, norms, head and MoE routers stay in
    /// the compute dtype. Adapters are kept.
    pub fn quantize(&mut self, fmt: QuantFormat) -> Result<()> {
        for lin in self.linears_mut(false) {
            lin.weight.quantize(fmt)?;
        }
        Ok(())
    }

    /// Resident bytes of the base's weights as held (quantised ones in their format),
    /// adapters not counted.
    pub fn base_bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let mut n = size(&self.embed) + size(&self.norm);
        n += self.head.as_ref().map_or(0, size);
        for blk in &self.blocks {
            n += size(&blk.attn_norm) + size(&blk.ffn_norm);
        }
        for lin in self.linears() {
            n += lin.weight.bytes() + lin.bias.as_ref().map_or(0, size);
        }
        n
    }

    /// The settings of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&HfLoraConfig> {
        self.lora.as_ref()
    }
}

/// The keys and values of the tokens a model has seen, per layer `[B, kv_heads, T, hd]`
/// (after RoPE), for generation one token at a time.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    batch: usize,
}

impl KvCache {
    /// Tokens cached per sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Removes the gradient of `t` from `grads`; `what` names `t` in the error of a missing one
/// (a bug: every layer's output depends on its input).
fn take_grad(grads: &mut GradStore, t: &Tensor, what: &str) -> Result<Tensor> {
    grads.remove(t).ok_or_else(|| {
        HfError::Tensor(candle_core::Error::Msg(format!(
            "checkpointing: no gradient reached {what}"
        )))
    })
}

/// Grouped-query attention: each of the `kv` heads of `x: [B, kv, T, hd]` serves `rep`
/// consecutive query heads, as `transformers`' `repeat_kv`.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, hd))?
        .contiguous()?
        .reshape((b, kv * rep, t, hd))?)
}
