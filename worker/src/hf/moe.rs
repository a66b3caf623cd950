//! The sparse feed-forward of Mixtral and Qwen2-MoE as `transformers` computes it: a linear
//! router, softmax in f32 over all experts, the top-k kept (renormalised to sum to one for
//! Mixtral, and for Qwen2-MoE when `norm_topk_prob`), each token's chosen experts' SwiGLU
//! outputs weighted and summed, plus Qwen2-MoE's shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`. No capacity limit and no dropped tokens: that is the
//! reference's behaviour, unlike the worker's own MoE (`crate::model`). Mixtral's
//! `router_jitter_noise` (a training-time perturbation, 0 in the released configs) is not
//! applied.
//!
//! Every expert is three [`Linear`]s with the module paths of transformers 4, the layout
//! PEFT's `target_modules` reaches experts through: Mixtral's
//! `model.layers.{l}.block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down) and
//! router `block_sparse_moe.gate`; Qwen2-MoE's `model.layers.{l}.mlp.experts.{e}.gate_proj`,
//! `up_proj`, `down_proj` and router `mlp.gate`. So experts carry LoRA adapters and are
//! quantised like any projection. Files in transformers 5's stacked layout
//! (`experts.gate_up_proj: [E, 2I, H]`, `experts.down_proj: [E, H, I]`) load as views of the
//! stacked tensors (no copy), under the same module paths; merged exports write that
//! stacked layout back. The gate weights are a differentiable function of the router's
//! output (a masked softmax), so gradients reach the tokens (and a router's adapter) through
//! them as they do in `transformers`; an expert no token was routed to is not in the graph
//! and gets no gradient.

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
    /// `{block}.gate`: `[E, H]`, kept in the compute dtype when the base is quantised.
    router: Linear,
    /// Each expert's SwiGLU: gate (`w1`), up (`w3`), down (`w2`).
    experts: Vec<Mlp>,
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
        // The module paths of transformers 4 (see the module's note), whatever the files.
        let module = match cfg.arch {
            Arch::Mixtral => format!("{prefix}.block_sparse_moe"),
            _ => format!("{prefix}.mlp"),
        };
        let (g, u, d) = match cfg.arch {
            Arch::Mixtral => ("w1", "w3", "w2"),
            _ => ("gate_proj", "up_proj", "down_proj"),
        };
        let dense = |name: String, weight: Tensor| Linear {
            name,
            weight: Weight::Dense(weight),
            bias: None,
            adapter: None,
        };
        let router = dense(
            format!("{module}.gate"),
            w.tensor(&format!("{block}.gate.weight"), &[e, h], dtype, device)?,
        );
        let stacked = format!("{block}.experts.gate_up_proj");
        let mut experts = Vec::with_capacity(e);
        if w.contains(&stacked) {
            let gate_up = w.tensor(&stacked, &[e, 2 * i, h], dtype, device)?;
            let down = w.tensor(
                &format!("{block}.experts.down_proj"),
                &[e, h, i],
                dtype,
                device,
            )?;
            for x in 0..e {
                let p = format!("{module}.experts.{x}");
                let gu = gate_up.get(x)?;
                experts.push(Mlp::Apart {
                    gate: dense(format!("{p}.{g}"), gu.narrow(0, 0, i)?),
                    up: dense(format!("{p}.{u}"), gu.narrow(0, i, i)?),
                    down: dense(format!("{p}.{d}"), down.get(x)?),
                });
            }
        } else {
            for x in 0..e {
                let file = format!("{block}.experts.{x}");
                let p = format!("{module}.experts.{x}");
                let t = |n: &str, shape: &[usize]| {
                    w.tensor(&format!("{file}.{n}.weight"), shape, dtype, device)
                };
                experts.push(Mlp::Apart {
                    gate: dense(format!("{p}.{g}"), t(g, &[i, h])?),
                    up: dense(format!("{p}.{u}"), t(u, &[i, h])?),
                    down: dense(format!("{p}.{d}"), t(d, &[h, i])?),
                });
            }
        }
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
            experts,
            top_k: m.top_k,
            norm_topk: m.norm_topk,
            shared,
        })
    }

    /// Every projection, in order: the router, each expert's gate, up and down, then the
    /// shared expert's projections and its gate.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.router];
        for ex in &self.experts {
            v.extend(ex.linears());
        }
        if let Some((mlp, gate)) = &self.shared {
            v.extend(mlp.linears());
            v.push(gate);
        }
        v
    }

    /// [`Moe::linears`], mutable; without the router when `router` is false.
    pub(crate) fn linears_mut(&mut self, router: bool) -> Vec<&mut Linear> {
        let mut v = Vec::new();
        if router {
            v.push(&mut self.router);
        }
        for ex in &mut self.experts {
            v.extend(ex.linears_mut());
        }
        if let Some((mlp, gate)) = &mut self.shared {
            v.extend(mlp.linears_mut());
            v.push(gate);
        }
        v
    }

    /// The layer's tensors as transformers 5 names them under block prefix `p`
    /// (`model.layers.{l}`): router, stacked experts, then the shared expert's projections
    /// and gate by their module paths. `weight` gives each projection's weight (the base's,
    /// or one with its adapter merged in).
    pub(crate) fn tensors_with(
        &self,
        p: &str,
        weight: &dyn Fn(&Linear) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut gate_up = Vec::with_capacity(self.experts.len());
        let mut down = Vec::with_capacity(self.experts.len());
        for ex in &self.experts {
            match ex.linears().as_slice() {
                [g, u, d] => {
                    gate_up.push(Tensor::cat(&[weight(g)?, weight(u)?], 0)?);
                    down.push(weight(d)?);
                }
                _ => return Err(HfError::Input("an expert is not gate, up and down".into())),
            }
        }
        let mut out = vec![
            (format!("{p}.mlp.gate.weight"), weight(&self.router)?),
            (
                format!("{p}.mlp.experts.gate_up_proj"),
                Tensor::stack(&gate_up, 0)?,
            ),
            (
                format!("{p}.mlp.experts.down_proj"),
                Tensor::stack(&down, 0)?,
            ),
        ];
        if let Some((mlp, gate)) = &self.shared {
            for lin in mlp.linears().into_iter().chain([gate]) {
                out.push((format!("{}.weight", lin.name), weight(lin)?));
            }
        }
        Ok(out)
    }

    /// `x: [N, H]` -> `[N, H]`.
    pub(crate) fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let e = self.experts.len();
        let logits = self.router.forward(x, pass)?;
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
        pass.record_routing(tokens.iter().map(Vec::len).collect());
        let mask = Tensor::from_vec(mask, (n, e), x.device())?;
        let mut gates = (probs * mask)?;
        if self.norm_topk {
            gates = gates.broadcast_div(&gates.sum_keepdim(1)?)?;
        }
        let gates = gates.to_dtype(x.dtype())?;
        let mut out = x.zeros_like()?;
        for (ex, (expert, rows)) in self.experts.iter().zip(&tokens).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let y = expert.forward(&x.index_select(&idx, 0)?, pass)?;
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
