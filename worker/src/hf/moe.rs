//! The sparse feed-forward of Mixtral and Qwen2-MoE as `transformers` computes it: a linear
//! router, softmax in f32 over all experts, the top-k kept (renormalised to sum to one for
//! Mixtral, and for Qwen2-MoE when `norm_topk_prob`), each token's chosen experts' SwiGLU
//! outputs weighted and summed, plus Qwen2-MoE's shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`. No capacity limit and no dropped tokens: that is the
//! reference's behaviour, unlike the worker's own MoE (`crate::model`). Mixtral's
//! `router_jitter_noise` (a training-time perturbation, 0 in the released configs) is not
//! applied.
//!
//! Experts are held stacked (`gate_up: [E, 2I, H]` with each expert's `[gate; up]`,
//! `down: [E, H, I]`), the layout transformers 5 keeps in memory; the per-expert tensors of
//! the files on the Hub (`experts.{e}.w1/w3/w2` for Mixtral, `experts.{e}.gate_proj/...`
//! for Qwen2-MoE) are stacked into it at load. The gate weights are a differentiable
//! function of the router's output (a masked softmax), so gradients reach the tokens
//! through them as they do in `transformers`.

use candle_core::{DType, Device, Tensor};

use super::HfError;
use super::config::{Arch, HfConfig};
use super::decoder::{Linear, Mlp, Pass};
use super::load::WeightFiles;
use super::quant::Weight;

type Result<T> = std::result::Result<T, HfError>;

/// One sparse feed-forward layer.
#[derive(Debug, Clone)]
pub struct Moe {
    /// `[E, H]`.
    router: Tensor,
    /// `[E, 2I, H]`: expert `e`'s gate rows, then its up rows.
    gate_up: Tensor,
    /// `[E, H, I]`.
    down: Tensor,
    top_k: usize,
    norm_topk: bool,
    /// Qwen2-MoE's shared expert and its gate `[1, H]`.
    shared: Option<(Mlp, Linear)>,
}

impl Moe {
    /// Loads the sparse layer under `prefix` (`model.layers.{l}`), from either layout.
    pub(crate) fn load(
        cfg: &HfConfig,
        w: &WeightFiles,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let m = cfg
            .moe
            .as_ref()
            .ok_or_else(|| HfError::config("num_experts", "a sparse layer in a dense config"))?;
        let (e, h, i) = (m.experts, cfg.hidden, m.expert_hidden);
        // Hub files name Mixtral's block `block_sparse_moe`; transformers 5 renames it `mlp`.
        let block = match cfg.arch {
            Arch::Mixtral if w.contains(&format!("{prefix}.block_sparse_moe.gate.weight")) => {
                format!("{prefix}.block_sparse_moe")
            }
            _ => format!("{prefix}.mlp"),
        };
        let router = w.tensor(&format!("{block}.gate.weight"), &[e, h], dtype, device)?;
        let stacked = format!("{block}.experts.gate_up_proj");
        let (gate_up, down) = if w.contains(&stacked) {
            (
                w.tensor(&stacked, &[e, 2 * i, h], dtype, device)?,
                w.tensor(
                    &format!("{block}.experts.down_proj"),
                    &[e, h, i],
                    dtype,
                    device,
                )?,
            )
        } else {
            let (g, u, d) = match cfg.arch {
                Arch::Mixtral => ("w1", "w3", "w2"),
                _ => ("gate_proj", "up_proj", "down_proj"),
            };
            let mut gu = Vec::with_capacity(e);
            let mut dn = Vec::with_capacity(e);
            for x in 0..e {
                let p = format!("{block}.experts.{x}");
                let gate = w.tensor(&format!("{p}.{g}.weight"), &[i, h], dtype, device)?;
                let up = w.tensor(&format!("{p}.{u}.weight"), &[i, h], dtype, device)?;
                gu.push(Tensor::cat(&[gate, up], 0)?);
                dn.push(w.tensor(&format!("{p}.{d}.weight"), &[h, i], dtype, device)?);
            }
            (Tensor::stack(&gu, 0)?, Tensor::stack(&dn, 0)?)
        };
        let shared = match m.shared_hidden {
            None => None,
            Some(s) => Some((
                Mlp::load_apart(
                    w,
                    &format!("{block}.shared_expert"),
                    h,
                    s,
                    false,
                    dtype,
                    device,
                )?,
                Linear {
                    name: format!("{block}.shared_expert_gate"),
                    weight: Weight::Dense(w.tensor(
                        &format!("{block}.shared_expert_gate.weight"),
                        &[1, h],
                        dtype,
                        device,
                    )?),
                    bias: None,
                    adapter: None,
                },
            )),
        };
        Ok(Moe {
            router,
            gate_up,
            down,
            top_k: m.top_k,
            norm_topk: m.norm_topk,
            shared,
        })
    }

    /// The shared expert's projections and its gate, in order (the experts are not
    /// `Linear`s: see the module's note).
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        match &self.shared {
            Some((mlp, gate)) => {
                let mut v = mlp.linears();
                v.push(gate);
                v
            }
            None => Vec::new(),
        }
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.shared {
            Some((mlp, gate)) => {
                let mut v = mlp.linears_mut();
                v.push(gate);
                v
            }
            None => Vec::new(),
        }
    }

    /// The router and the stacked experts' tensors under block prefix `p`
    /// (`model.layers.{l}`), named as transformers 5 names them.
    pub(crate) fn stacked(&self, p: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{p}.mlp.gate.weight"), self.router.clone()),
            (
                format!("{p}.mlp.experts.gate_up_proj"),
                self.gate_up.clone(),
            ),
            (format!("{p}.mlp.experts.down_proj"), self.down.clone()),
        ]
    }

    /// `x: [N, H]` -> `[N, H]`.
    pub(crate) fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let e = self.router.dim(0)?;
        let logits = crate::fused::matmul_t(x, &self.router)?;
        let probs = candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, 1)?;
        let choice =
            crate::fused::topk_host(&probs.flatten_all()?.to_vec1::<f32>()?, e, self.top_k);
        // The chosen experts as a 0/1 mask, and each expert's tokens.
        let mut mask = vec![0f32; n * e];
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); e];
        for (row, picks) in choice.chunks_exact(self.top_k).enumerate() {
            for &c in picks {
                mask[row * e + c as usize] = 1.0;
                tokens[c as usize].push(row as u32);
            }
        }
        let mask = Tensor::from_vec(mask, (n, e), x.device())?;
        let mut gates = (probs * mask)?;
        if self.norm_topk {
            gates = gates.broadcast_div(&gates.sum_keepdim(1)?)?;
        }
        let gates = gates.to_dtype(x.dtype())?;
        let mut out = x.zeros_like()?;
        for (ex, rows) in tokens.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let act =
                crate::fused::swiglu_packed(&crate::fused::matmul_t(&xs, &self.gate_up.get(ex)?)?)?;
            let y = crate::fused::matmul_t(&act, &self.down.get(ex)?)?;
            let g = gates
                .narrow(1, ex, 1)?
                .contiguous()?
                .index_select(&idx, 0)?;
            out = out.index_add(&idx, &y.broadcast_mul(&g)?, 0)?;
        }
        if let Some((mlp, gate)) = &self.shared {
            let s = mlp.forward(x, pass)?;
            let g = gate.forward(x, pass)?;
            // sigmoid as plain ops (differentiable): 1 / (1 + exp(-g)).
            let g = (g.neg()?.exp()? + 1.0)?.recip()?;
            out = (out + s.broadcast_mul(&g)?)?;
        }
        Ok(out)
    }
}
