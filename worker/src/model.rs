//! The decoder-only MoE transformer: parameters with stable names, the forward pass, and the
//! cuts that let a later pipeline/expert-parallel layer run pieces of it elsewhere.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope` kernels have no backward pass,
//! and using them would silently stop gradients; the normalisations, RoPE, the attention
//! softmax and SwiGLU's gate are the worker's own fused ops instead (`crate::fused`), with
//! backward passes, CPU versions and CUDA kernels. Master weights are `Var`s in the master dtype
//! (f32, or f64 for gradient checks). With f32/f64 compute the pass reads the masters (with
//! f32 on a GPU, the experts' weights through stacked copies); with bf16/f16 compute it reads
//! compute copies kept as leaves of the graph (`Leaves`: one per parameter, the experts'
//! weights stacked per layer and projection), which the optimizer refreshes in its own pass,
//! and `Model::param_grads` maps their gradients to the masters.
//!
//! The training path and the stage path are the same code: a full forward is one stage that
//! holds every layer, the embedding and the head; an MoE layer always runs as
//! route -> per-expert forward -> combine, so a remote expert slots into the same seams.
//! Dispatch is a gather whose backward pass is a gather too (`GatherRows`), and the gated
//! combine one fused op (`fused::moe_combine`), whose backward is a gather and a row-wise
//! dot product: candle's CUDA index-add, the usual backward of a gather, is serial over the
//! indices.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var,
    backprop::GradStore,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Checkpointing, FeedForward, LoraConfig, MambaConfig, Mixer, ModelConfig};
use crate::fused::RowBlocks;
use crate::{WorkerError, checkpoint};

type Result<T> = std::result::Result<T, WorkerError>;

/// How a parameter starts.
#[derive(Debug, Clone, Copy)]
enum Init {
    Normal(f64),
    Ones,
    Zeros,
    /// Uniform in `-bound..bound`.
    Uniform(f64),
    /// `log(1), ..., log(N)` repeated, for a flat `A_log` of `N` values a channel.
    ALog {
        d_state: usize,
    },
    /// `dt + log(1 - exp(-dt))` (the inverse of softplus) for `dt` log-uniform in
    /// `min..max` (at least 1e-4).
    DtBias {
        min: f64,
        max: f64,
    },
}

/// One named parameter of the layout: name, shape and initialisation.
#[derive(Debug, Clone)]
struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// The base parameters of a config in their fixed order. This order is the order of
/// `param_layout`, of the flat vectors the swarm exchanges and of checkpoints.
fn base_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let d = cfg.d_model;
    let std = cfg.init_std as f64;
    // Residual-branch outputs are scaled down so the residual stream does not grow with depth.
    let out_std = std / (2.0 * cfg.n_layers as f64).sqrt();
    let spec = |name: String, shape: Vec<usize>, init: Init| ParamSpec { name, shape, init };
    let swiglu = |specs: &mut Vec<ParamSpec>, prefix: String, hidden: usize| {
        specs.push(spec(
            format!("{prefix}.w_gate.weight"),
            vec![hidden, d],
            Init::Normal(std),
        ));
        specs.push(spec(
            format!("{prefix}.w_up.weight"),
            vec![hidden, d],
            Init::Normal(std),
        ));
        specs.push(spec(
            format!("{prefix}.w_down.weight"),
            vec![d, hidden],
            Init::Normal(out_std),
        ));
    };
    let mut specs = vec![spec(
        "tok_emb.weight".into(),
        vec![cfg.vocab, d],
        Init::Normal(std),
    )];
    for l in 0..cfg.n_layers {
        let kind = cfg.layer_kind(l);
        match (kind.mixer, &cfg.mamba) {
            (Mixer::Mamba, Some(m)) => mamba_specs(&mut specs, l, d, m, std, out_std),
            // `validate` refuses a Mamba layer without its settings; an attention layer it is
            // not, so nothing is made for it rather than a wrong layer.
            (Mixer::Mamba, None) => {}
            (Mixer::Attention, _) => {
                specs.push(spec(
                    format!("layers.{l}.attn_norm.weight"),
                    vec![d],
                    Init::Ones,
                ));
                for p in ["wq", "wk", "wv"] {
                    specs.push(spec(
                        format!("layers.{l}.attn.{p}.weight"),
                        vec![d, d],
                        Init::Normal(std),
                    ));
                }
                specs.push(spec(
                    format!("layers.{l}.attn.wo.weight"),
                    vec![d, d],
                    Init::Normal(out_std),
                ));
            }
        }
        if kind.ffn == FeedForward::None {
            continue;
        }
        specs.push(spec(
            format!("layers.{l}.ffn_norm.weight"),
            vec![d],
            Init::Ones,
        ));
        if cfg.is_moe(l) {
            specs.push(spec(
                format!("layers.{l}.moe.router.weight"),
                vec![cfg.n_experts, d],
                Init::Normal(std),
            ));
            for e in 0..cfg.n_experts {
                swiglu(
                    &mut specs,
                    format!("layers.{l}.moe.experts.{e}"),
                    cfg.expert_hidden,
                );
            }
        } else {
            swiglu(&mut specs, format!("layers.{l}.ffn"), cfg.ffn_hidden);
        }
    }
    specs.push(spec("final_norm.weight".into(), vec![d], Init::Ones));
    if !cfg.tie_embeddings {
        specs.push(spec(
            "lm_head.weight".into(),
            vec![cfg.vocab, d],
            Init::Normal(std),
        ));
    }
    specs
}

/// The parameters of Mamba mixer `l` with its pre-norm, initialised as the Mamba paper does:
/// `A_log = log(1..=N)` in every channel, `D = 1`, `dt_proj`'s bias the inverse softplus of
/// step sizes log-uniform in `dt_min..dt_max`, its weight uniform in `+-dt_rank^-1/2`.
fn mamba_specs(
    specs: &mut Vec<ParamSpec>,
    l: usize,
    d: usize,
    m: &MambaConfig,
    std: f64,
    out_std: f64,
) {
    let di = m.d_inner(d);
    let (n, r) = (m.d_state, m.dt_rank);
    let p = |name: &str| format!("layers.{l}.mamba.{name}");
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { name, shape, init });
    push(format!("layers.{l}.mamba_norm.weight"), vec![d], Init::Ones);
    push(p("in_proj.weight"), vec![2 * di, d], Init::Normal(std));
    // PyTorch's default for a depthwise convolution: uniform in +-1/sqrt(fan_in).
    let conv_bound = 1.0 / (m.d_conv as f64).sqrt();
    push(
        p("conv1d.weight"),
        vec![di, m.d_conv],
        Init::Uniform(conv_bound),
    );
    push(p("conv1d.bias"), vec![di], Init::Uniform(conv_bound));
    push(p("x_proj.weight"), vec![r + 2 * n, di], Init::Normal(std));
    push(
        p("dt_proj.weight"),
        vec![di, r],
        Init::Uniform(1.0 / (r as f64).sqrt()),
    );
    push(
        p("dt_proj.bias"),
        vec![di],
        Init::DtBias {
            min: m.dt_min as f64,
            max: m.dt_max as f64,
        },
    );
    // Flat, so that the optimizer's rule (matrices decay, vectors do not) leaves it alone,
    // as Mamba's own training does: decay would pull every A towards -1.
    push(p("A_log"), vec![di * n], Init::ALog { d_state: n });
    push(p("D"), vec![di], Init::Ones);
    push(p("out_proj.weight"), vec![d, di], Init::Normal(out_std));
}

/// Whether a base weight gets a LoRA adapter: attention and feed-forward projections.
fn lora_target(name: &str) -> bool {
    name.contains(".attn.w") || name.contains(".ffn.w_") || name.contains(".experts.")
}

/// The adapters of a config, in base order: `{proj}.lora_a` is `[rank, in]` (random) and
/// `{proj}.lora_b` is `[out, rank]` (zero, so training starts at the base model).
fn lora_specs(base: &[ParamSpec], lora: &LoraConfig) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    for s in base.iter().filter(|s| lora_target(&s.name)) {
        let prefix = s.name.trim_end_matches(".weight");
        let (rows, cols) = (s.shape[0], s.shape[1]);
        out.push(ParamSpec {
            name: format!("{prefix}.lora_a"),
            shape: vec![lora.rank, cols],
            init: Init::Normal(1.0 / (cols as f64).sqrt()),
        });
        out.push(ParamSpec {
            name: format!("{prefix}.lora_b"),
            shape: vec![rows, lora.rank],
            init: Init::Zeros,
        });
    }
    out
}

/// Deterministic values for one parameter: ChaCha8 + Box-Muller in f64, identical on every
/// machine and device.
fn init_values(spec: &ParamSpec, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n: usize = spec.shape.iter().product();
    match spec.init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Uniform(bound) => (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * bound)
            .collect(),
        Init::ALog { d_state } => (0..n)
            .map(|i| ((i % d_state.max(1) + 1) as f64).ln())
            .collect(),
        Init::DtBias { min, max } => (0..n)
            .map(|_| {
                let (lo, hi) = (min.ln(), max.ln());
                let dt = (rng.random::<f64>() * (hi - lo) + lo).exp().max(1e-4);
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect(),
        Init::Normal(std) => {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let th = 2.0 * std::f64::consts::PI * u2;
                out.push(r * th.cos() * std);
                if out.len() < n {
                    out.push(r * th.sin() * std);
                }
            }
            out
        }
    }
}

fn make_var(values: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    // A fresh storage for every Var: `Var::from_tensor` would share storage with its source,
    // and `Var::set` would then write through to it.
    let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok(Var::from_tensor(&t.to_device(device)?.copy()?)?)
}

/// The accumulation dtype for norms, softmax and the loss: f32, or f64 in f64 mode.
fn acc_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The compute-dtype view of the parameters used by one forward pass.
#[derive(Debug)]
pub struct Weights {
    map: HashMap<String, Tensor>,
    /// In a model with compute leaves, the experts' own master weights: the per-expert path
    /// (a layer with an idle expert, or batching switched off) casts them on first use, so
    /// the batched path, which reads the stacked leaves, pays nothing for them.
    lazy: HashMap<String, Tensor>,
    cache: RefCell<HashMap<String, Tensor>>,
    compute: DType,
    /// The stacked expert leaves by `layers.{l}.moe.experts.{leaf}`: `w_down` as
    /// `[experts, out, in]`, the gate and up projections together as `[2 * experts, h, d]`
    /// ([`GATE_UP`]).
    stacks: HashMap<String, Tensor>,
    /// Expert weights of the stacked leaves whose expert got no tokens in this pass: their
    /// slices of the leaf's gradient are zeros, not gradients (`Model::collect_grads` leaves
    /// them out, as it does for an idle expert of the per-expert path).
    idle: RefCell<Vec<String>>,
    lora_scale: f64,
}

impl Weights {
    fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(t) = self.map.get(name) {
            return Ok(t.clone());
        }
        if let Some(t) = self.cache.borrow().get(name) {
            return Ok(t.clone());
        }
        let master = self
            .lazy
            .get(name)
            .ok_or_else(|| WorkerError::Mismatch(format!("parameter {name} is missing")))?;
        let t = master.to_dtype(self.compute)?;
        self.cache.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }

    /// The experts' weights of projection `proj` of MoE layer `layer` stacked as
    /// `[experts, out, in]`, where the model keeps them as one leaf.
    fn stack(&self, layer: usize, proj: &str) -> Option<&Tensor> {
        self.stacks.get(&stack_key(layer, proj))
    }

    /// `x @ W^T` for `x: [N, in]`, plus the LoRA path when the projection has an adapter.
    fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.get(&format!("{prefix}.weight"))?;
        let y = matmul_wt(x, &w)?;
        match (
            self.map.get(&format!("{prefix}.lora_a")),
            self.map.get(&format!("{prefix}.lora_b")),
        ) {
            (Some(a), Some(b)) => {
                let low = matmul_wt(&matmul_wt(x, a)?, b)?;
                Ok((y + low.affine(self.lora_scale, 0.0)?)?)
            }
            _ => Ok(y),
        }
    }
}

/// The weights of Mamba mixer `l` as the mixer reads them.
fn mamba_weights(w: &Weights, l: usize) -> Result<crate::mamba::MixerWeights> {
    let get = |name: &str| w.get(&format!("layers.{l}.mamba.{name}"));
    Ok(crate::mamba::MixerWeights {
        in_proj: get("in_proj.weight")?,
        conv_w: get("conv1d.weight")?,
        conv_b: get("conv1d.bias")?,
        x_proj: get("x_proj.weight")?,
        dt_proj_w: get("dt_proj.weight")?,
        dt_proj_b: get("dt_proj.bias")?,
        a_log: get("A_log")?,
        d_skip: get("D")?,
        out_proj: get("out_proj.weight")?,
    })
}

/// Name of the leaf that stacks the experts' weights of one projection of one MoE layer.
fn stack_key(layer: usize, proj: &str) -> String {
    format!("layers.{layer}.moe.experts.{proj}")
}

/// The stacked leaf of the gate and up projections together: expert `e`'s gate at index
/// `2e`, its up projection at `2e + 1`, so `[2E, h, d]` is `[E, 2h, d]` with each expert's
/// `[gate; up]`, and the two are one product (`fused::swiglu_packed` then reads its rows).
const GATE_UP: &str = "w_gate_up";

/// The stacked leaf of expert `e`'s projection `proj`, and the weight's index there.
fn stack_slot(proj: &str, e: usize) -> (&'static str, usize) {
    match proj {
        "w_gate" => (GATE_UP, 2 * e),
        "w_up" => (GATE_UP, 2 * e + 1),
        _ => ("w_down", e),
    }
}

/// `(layer, expert, projection)` of an expert's base weight name.
fn expert_weight(name: &str) -> Option<(usize, usize, &str)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once(".moe.experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    let proj = rest.strip_suffix(".weight")?;
    if !matches!(proj, "w_gate" | "w_up" | "w_down") {
        return None;
    }
    Some((layer.parse().ok()?, expert.parse().ok()?, proj))
}

/// Compute-dtype copies of the trainable weights that the forward pass reads directly, as
/// leaves of the graph, when the compute dtype is not the masters' (bf16 or f16 on f32
/// masters). Casting every master each step was a graph node per parameter: a cast forward,
/// and backward a zero tensor, a cast and an add, about four launches per parameter, and
/// for the batched experts a `cat` of the eight experts' weights and its backward (about
/// 2,300 launches a step on `base`). The optimizer writes the new weights into the copies in
/// the same pass (`fused::MultiTensor`); whatever else changes the masters calls
/// `Model::sync_compute`.
///
/// With f32 compute on f32 masters only the experts' weights get leaves (`stacked_only`):
/// the stacked copies let the experts run batched without a `cat` of the eight masters per
/// projection (and its backward) each step, and the other parameters are read directly.
#[derive(Debug)]
struct Leaves {
    vars: Vec<Leaf>,
    /// For each trainable parameter: its leaf, and its position there (the expert's index
    /// in a stacked leaf, 0 otherwise); `None` for a parameter read directly.
    of_param: Vec<Option<(usize, usize)>>,
    /// For each trainable parameter: its leaf's tensor and the element offset of its values.
    copies: Vec<Option<(Tensor, usize)>>,
}

/// One compute leaf: a parameter's copy, or the stacked copies of one MoE layer's experts'
/// weights of one projection (`[experts, out, in]`), or of the gate and up projections
/// together ([`GATE_UP`]).
#[derive(Debug)]
struct Leaf {
    key: String,
    var: Var,
    members: Vec<usize>,
    stacked: bool,
}

impl Leaves {
    /// Leaves for `trainable` in dtype `compute`, filled from the masters; with
    /// `stacked_only`, for the experts' weights alone.
    fn build(trainable: &[(String, Var)], compute: DType, stacked_only: bool) -> Result<Self> {
        // (key, members, stacked) of each leaf, then the leaves themselves.
        let mut groups: Vec<(String, Vec<usize>, bool)> = Vec::new();
        let mut of_param = Vec::with_capacity(trainable.len());
        let mut stacks: HashMap<String, usize> = HashMap::new();
        for (i, (name, _)) in trainable.iter().enumerate() {
            match expert_weight(name) {
                Some((l, e, proj)) => {
                    let (leaf, pos) = stack_slot(proj, e);
                    let key = stack_key(l, leaf);
                    let li = *stacks.entry(key.clone()).or_insert_with(|| {
                        groups.push((key, Vec::new(), true));
                        groups.len() - 1
                    });
                    let members = &mut groups[li].1;
                    if members.len() != pos {
                        return Err(WorkerError::Mismatch(format!(
                            "expert weight {name} is out of order"
                        )));
                    }
                    of_param.push(Some((li, pos)));
                    members.push(i);
                }
                None if stacked_only => of_param.push(None),
                None => {
                    groups.push((name.clone(), vec![i], false));
                    of_param.push(Some((groups.len() - 1, 0)));
                }
            }
        }
        let mut vars = Vec::with_capacity(groups.len());
        for (key, members, stacked) in groups {
            let cast = |i: usize| trainable[i].1.as_tensor().to_dtype(compute);
            let t = if stacked {
                let parts = members
                    .iter()
                    .map(|&i| cast(i))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)?
            } else {
                cast(members[0])?
            };
            // A fresh storage: the optimizer writes into it in place.
            let var = Var::from_tensor(&t.detach().copy()?)?;
            vars.push(Leaf {
                key,
                var,
                members,
                stacked,
            });
        }
        let copies = trainable
            .iter()
            .zip(&of_param)
            .map(|((_, v), at): (&(String, Var), &Option<(usize, usize)>)| {
                at.map(|(li, pos)| (vars[li].var.as_tensor().clone(), pos * v.elem_count()))
            })
            .collect();
        Ok(Leaves {
            vars,
            of_param,
            copies,
        })
    }

    /// Refreshes every leaf from its masters.
    fn sync(&self, trainable: &[(String, Var)]) -> Result<()> {
        for leaf in &self.vars {
            let dt = leaf.var.dtype();
            let t = if leaf.stacked {
                let parts = leaf
                    .members
                    .iter()
                    .map(|&i| trainable[i].1.as_tensor().to_dtype(dt))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)?
            } else {
                trainable[leaf.members[0]].1.as_tensor().to_dtype(dt)?
            };
            leaf.var.set(&t)?;
        }
        Ok(())
    }
}

/// `x @ w^T` for `x: [N, in]`, `w: [out, in]`, as one graph node (`fused::matmul_t`): the
/// weight's gradient comes out in its own layout, with no transposed view whose backward is
/// a zero tensor and a strided add.
fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(crate::fused::matmul_t(x, w)?)
}

/// RMSNorm, one fused op each way (`fused::rms_norm`; the plain ops where no kernel exists).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(crate::fused::rms_norm(x, w, eps)?)
}

fn swiglu(w: &Weights, prefix: &str, x: &Tensor) -> Result<Tensor> {
    let g = w.linear(&format!("{prefix}.w_gate"), x)?;
    let u = w.linear(&format!("{prefix}.w_up"), x)?;
    w.linear(
        &format!("{prefix}.w_down"),
        &crate::fused::swiglu_gate(&g, &u)?,
    )
}

/// Vocabularies up to this size embed through a one-hot matrix product on a GPU.
const ONE_HOT_VOCAB: usize = 4096;

/// The rows of `table: [vocab, d]` for `ids: [N]`. On a GPU with a small vocabulary this is
/// a product with the one-hot matrix of the ids: the backward of a gather is an index-add,
/// which candle's CUDA backend runs serially over the ids (4 ms a step for 8192 tokens on the
/// H100, against microseconds for the `[vocab, N] x [N, d]` product). The product is exact
/// forward (one 1 per row); on the CPU the gather stays.
fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let vocab = table.dim(0)?;
    if table.device().is_cpu() || vocab > ONE_HOT_VOCAB {
        return Ok(table.index_select(ids, 0)?);
    }
    let range = Tensor::arange(0u32, vocab as u32, ids.device())?.unsqueeze(0)?;
    let one_hot = ids
        .unsqueeze(1)?
        .broadcast_eq(&range)?
        .to_dtype(table.dtype())?;
    Ok(one_hot.matmul(table)?)
}

/// Which part of the model a stage holds: blocks `first_layer..end_layer`, plus the token
/// embedding (first stage) and the final norm, head and loss (last stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// First block of the stage.
    pub first_layer: usize,
    /// One past the last block of the stage.
    pub end_layer: usize,
    /// The stage embeds tokens (its input is `[B, T]` u32 token ids).
    pub embed: bool,
    /// The stage ends in the head and returns the loss.
    pub head: bool,
}

/// Routing decisions of one MoE layer for one batch of `n_tokens` tokens.
#[derive(Debug)]
pub struct Routing {
    /// Tokens in the batch.
    pub n_tokens: usize,
    /// Width of a token.
    pub d_model: usize,
    /// For each expert, the token rows it processes (after capacity), ascending.
    pub tokens: Vec<Vec<u32>>,
    /// The load-balancing loss of this layer (a scalar, not yet multiplied by its coefficient).
    pub aux: Tensor,
    /// Expert assignments dropped for lack of capacity.
    pub dropped: u64,
    dtype: DType,
    device: Device,
    /// Where each expert's rows start in the expert-sorted order of all kept assignments.
    offsets: Vec<usize>,
    /// Kept assignments in expert order (experts ascending, tokens ascending within one):
    /// the token of each, `[A]`.
    sorted_tokens: Tensor,
    /// For each of the `top_k` slots, the sorted position of each token's assignment in that
    /// slot, or `A` where it was dropped, the slots side by side, `[top_k * N]`: the combine
    /// gather, and the backward of the dispatch gather.
    combine_ids: Tensor,
    /// For each sorted position (and one more, the zero row), the slot-major row that reads
    /// it, `[A + 1]`: the backward of the combine gather.
    combine_back: Tensor,
    /// Gate weight of each token in each slot (0 where dropped), `[N, top_k]`, in the
    /// compute dtype.
    gates_nk: Tensor,
    /// For each sorted position, its (token, slot) as `t * k + j`, `[A]`.
    sorted_slots: Tensor,
    top_k: usize,
}

impl Routing {
    /// The rows of `x: [N, d]` that the experts process, in expert order `[A, d]`; expert
    /// `e`'s block starts at its offset and holds `tokens[e].len()` rows.
    pub fn dispatch(&self, x: &Tensor) -> Result<Tensor> {
        let op = GatherRows {
            ids: self.sorted_tokens.clone(),
            back: self.combine_ids.reshape((self.top_k, self.n_tokens))?,
        };
        Ok(x.contiguous()?.apply_op1(op)?)
    }

    /// The token rows of expert `e` as a device tensor, `None` for an expert without tokens:
    /// a remote expert's input is `x.index_select(&index, 0)`, the same rows in the same
    /// order as its block of `dispatch`.
    pub fn index(&self, e: usize) -> Result<Option<Tensor>> {
        match self.expert_rows(e) {
            Some((start, len)) => Ok(Some(self.sorted_tokens.narrow(0, start, len)?)),
            None => Ok(None),
        }
    }

    /// The gate weight of each token of expert `e`, `[n_e]` in the compute dtype (`None`
    /// for an expert without tokens); differentiable with respect to the router. Made on
    /// demand: the batched experts combine through all the gates at once.
    pub fn gates(&self, e: usize) -> Result<Option<Tensor>> {
        match self.expert_rows(e) {
            Some((start, len)) => Ok(Some(
                self.gates_nk
                    .flatten_all()?
                    .index_select(&self.sorted_slots.narrow(0, start, len)?, 0)?,
            )),
            None => Ok(None),
        }
    }

    /// Rows of expert `e` within `dispatch`'s output.
    pub fn expert_rows(&self, e: usize) -> Option<(usize, usize)> {
        let n = self.tokens.get(e)?.len();
        (n > 0).then(|| (self.offsets[e], n))
    }
}

/// The host side of one layer's routing decision, from each token's top-k choice.
struct HostRoute {
    /// Every index vector, for one upload: the layout of `fused::route_layout_host` (blocks
    /// of exactly the kept counts, so its gather part is the expert-sorted order of the kept
    /// assignments), then the (token, slot) of each sorted position as `t * k + j` (`A`),
    /// then each expert's chosen count (`E`).
    ids: Vec<u32>,
    /// Where the layout's parts lie in `ids`.
    parts: crate::fused::RouteParts,
    /// Kept assignments (`A`).
    kept: usize,
    /// For each expert, the tokens it keeps, ascending.
    tokens: Vec<Vec<u32>>,
    /// Where each expert's block starts in the sorted order.
    offsets: Vec<usize>,
    dropped: u64,
}

/// Capacity (first choices before second choices, in token order) and the expert-sorted
/// order of what is kept, from each token's top-k choice `choice: [N * top_k]` (token-major,
/// as `fused::router_topk` gives it), by the rules of the batched path's device layout
/// (`fused::route_counts_host`, `fused::route_layout_host`). On a GPU this runs with the
/// device idle, once per MoE layer and step, so it makes a few linear passes and no sort.
fn route_choices(choice: &[u32], n_exp: usize, k: usize, capacity: usize) -> HostRoute {
    let n = choice.len() / k;
    let counts = crate::fused::route_counts_host(choice, n_exp, capacity);
    let kept_counts: Vec<usize> = counts[..n_exp].iter().map(|&c| c as usize).collect();
    let kept: usize = kept_counts.iter().sum();
    let parts = crate::fused::RouteParts::new(kept, n * k);
    let mut ids = crate::fused::route_layout_host(choice, k, n_exp, capacity, &kept_counts);
    let slots: Vec<u32> = ids[parts.back.start..parts.back.start + kept]
        .iter()
        .map(|&s| {
            let (j, t) = (s as usize / n, s as usize % n);
            (t * k + j) as u32
        })
        .collect();
    let mut offsets = Vec::with_capacity(n_exp);
    let mut tokens = Vec::with_capacity(n_exp);
    let mut at = 0;
    for &c in &kept_counts {
        offsets.push(at);
        tokens.push(ids[at..at + c].to_vec());
        at += c;
    }
    ids.extend_from_slice(&slots);
    ids.extend_from_slice(&counts[n_exp..]);
    let chosen: u64 = counts[n_exp..].iter().map(|&c| u64::from(c)).sum();
    HostRoute {
        ids,
        parts,
        kept,
        tokens,
        offsets,
        dropped: chosen - kept as u64,
    }
}

/// What a batched MoE layer has of its routing before the layout: the counts on the device
/// (`fused::route_counts`: kept, then chosen), each expert's kept count and the assignments
/// dropped, read back from them, and the balance loss.
#[derive(Debug)]
struct BatchedCounts {
    counts: Tensor,
    kept: Vec<usize>,
    dropped: u64,
    aux: Tensor,
}

/// A MoE layer's router on one batch: what both routings start from.
#[derive(Debug)]
struct RouterOut {
    /// Router probabilities `[N, E]` (f32 or wider).
    probs: Tensor,
    /// Each token's top-k experts, `[N, k]` u32, best first.
    choice: Tensor,
    capacity: usize,
    n: usize,
    d: usize,
}

/// Rows of the input gathered by `ids` (`out[r] = x[ids[r]]`), with a backward that is again
/// made of gathers: `grad_x[i] = sum_b grad_ext[back[b, i]]` (`fused::gather_rows_sum`),
/// where `grad_ext` is the output gradient with one zero row appended. It is correct when
/// every input row is read by at most `back.dim(0)` output rows, listed in `back` (the zero
/// row standing in for the rest). candle 0.11's CUDA index-add, the backward of a plain
/// `index_select`, runs one thread per column and loops over the indices: 0.6 ms for 2048
/// rows against 0.02 ms for the gather (measured on the H100, see docs/GPU.md).
#[derive(Debug)]
struct GatherRows {
    ids: Tensor,
    /// `[slots, input rows]`.
    back: Tensor,
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ids, ids_l) = self.ids.storage_and_layout();
        let Storage::Cpu(ids) = &*ids else {
            candle_core::bail!("gather-rows: indices are not on the CPU");
        };
        candle_core::CustomOp2::cpu_fwd(&crate::fused::GatherRowsOp, s, l, ids, ids_l)
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ids, ids_l) = self.ids.storage_and_layout();
        let Storage::Cuda(ids) = &*ids else {
            candle_core::bail!("gather-rows: indices are not on the GPU");
        };
        candle_core::CustomOp2::cuda_fwd(&crate::fused::GatherRowsOp, s, l, ids, ids_l)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(crate::fused::gather_rows_sum(
            &grad.contiguous()?,
            &self.back,
        )?))
    }
}

/// What generation remembers of the tokens so far, for a model whose blocks are all Mamba
/// (`Model::recurrent_state`): a fixed number of values per sequence.
#[derive(Debug, Clone)]
pub struct RecurrentState {
    layers: Vec<crate::mamba::MixerState>,
    batch: usize,
}

impl RecurrentState {
    /// Values held for all sequences and blocks; it does not grow with the tokens fed.
    pub fn elem_count(&self) -> usize {
        self.layers.iter().map(|s| s.elem_count()).sum()
    }
}

/// What a forward pass reports besides its tensors.
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    /// Tokens processed by each expert of each MoE layer (in `moe_layers` order).
    pub expert_tokens: Vec<Vec<u64>>,
    /// Assignments dropped for lack of capacity, over all MoE layers.
    pub dropped: u64,
}

/// Result of running a stage.
#[derive(Debug)]
pub struct StageRun {
    /// Output hidden state `[B, T, d]` (for a head stage: the final residual stream).
    pub hidden: Tensor,
    /// Mean cross-entropy (head stage only).
    pub ce: Option<Tensor>,
    /// Sum of the MoE load-balancing losses of the stage's layers.
    pub aux: Option<Tensor>,
    /// Routing counts of the stage's MoE layers.
    pub stats: RouteStats,
}

impl StageRun {
    /// The stage's own contribution to the training objective: cross-entropy (if any) plus
    /// `aux_loss_coef` times its load-balancing losses.
    pub fn objective(&self, aux_coef: f64) -> Result<Option<Tensor>> {
        let aux = match &self.aux {
            Some(a) => Some(a.affine(aux_coef, 0.0)?),
            None => None,
        };
        Ok(match (&self.ce, aux) {
            (Some(ce), Some(a)) => Some((ce + a)?),
            (Some(ce), None) => Some(ce.clone()),
            (None, a) => a,
        })
    }
}

/// Output of `Model::stage_forward`.
#[derive(Debug)]
pub struct StageForward {
    /// The activations to send on (non-head stages), detached.
    pub hidden: Option<Tensor>,
    /// Mean cross-entropy (head stage only).
    pub ce: Option<f32>,
    /// This stage's weighted load-balancing term (`aux_loss_coef` times its MoE layers'
    /// losses). The training loss is the head's `ce` plus the `aux` of every stage.
    pub aux: f32,
}

/// Output of `Model::stage_backward`.
#[derive(Debug)]
pub struct StageBackward {
    /// Gradient of the stage's input activations (absent for the embedding stage).
    pub input_grad: Option<Tensor>,
    /// Gradients of the stage's trainable parameters that took part, by name, in layout order.
    pub param_grads: Vec<(String, Tensor)>,
    /// Mean cross-entropy (head stage only).
    pub ce: Option<f32>,
    /// This stage's weighted load-balancing term.
    pub aux: f32,
}

/// What [`Model::stage_grads`] returns: [`StageBackward`] before the stage's parameters are
/// picked out of the gradient store.
struct StageGrads {
    input_grad: Option<Tensor>,
    store: GradStore,
    ce: Option<f32>,
    /// The weighted load-balancing term.
    aux: f32,
    /// The stage's load-balancing losses, unweighted (none without MoE layers).
    aux_sum: Option<f32>,
    stats: RouteStats,
}

/// Output of [`Model::train_grads`].
#[derive(Debug)]
pub struct TrainGrads {
    /// Mean cross-entropy.
    pub ce: f32,
    /// Sum of the MoE layers' load-balancing losses, unweighted (0 without MoE layers).
    pub aux: f32,
    /// Routing counts of the MoE layers.
    pub stats: RouteStats,
    /// The gradient of each trainable parameter in layout order, as
    /// [`Model::param_grads`] gives it (`None` where it took no part).
    pub grads: Vec<Option<Tensor>>,
    /// Without checkpointing, the whole gradient store of the pass: it holds every
    /// intermediate gradient, so dropping it after the optimizer's launches rather than
    /// before lets a GPU free it while it runs them.
    _store: Option<GradStore>,
}

impl TrainGrads {
    /// A pass computed elsewhere (an adapter model's), with the store its gradients came from.
    pub(crate) fn from_parts(
        ce: f32,
        aux: f32,
        stats: RouteStats,
        grads: Vec<Option<Tensor>>,
        store: Option<GradStore>,
    ) -> Self {
        TrainGrads {
            ce,
            aux,
            stats,
            grads,
            _store: store,
        }
    }
}

fn scalar_f32(t: &Option<Tensor>) -> Result<Option<f32>> {
    match t {
        Some(t) => Ok(Some(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)),
        None => Ok(None),
    }
}

/// The transformer: trainable `Var`s in a fixed order, frozen base tensors (LoRA), and the
/// dtypes it computes in.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    device: Device,
    master_dtype: DType,
    compute_dtype: DType,
    trainable: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
    lora: Option<LoraConfig>,
    /// Whether the local experts of a layer run as batched products (see `block`); `None`
    /// chooses by the compute dtype.
    batched_experts: Option<bool>,
    /// The layout batched experts run on (see `experts_batched`).
    expert_layout: ExpertLayout,
    /// Compute-dtype copies of the trainable weights, when the compute dtype is not the
    /// masters'; with f32 compute and batched experts, stacked copies of the experts' weights.
    leaves: Option<Leaves>,
}

impl Model {
    /// A freshly initialised model with f32 master weights, computing in `compute`.
    pub fn new(cfg: &ModelConfig, device: &Device, compute: DType, seed: u64) -> Result<Self> {
        Self::with_dtypes(cfg, device, DType::F32, compute, seed)
    }

    /// A freshly initialised model with the given master and compute dtypes. f64/f64 on the
    /// CPU is what the gradient checks use; training uses f32 masters.
    pub fn with_dtypes(
        cfg: &ModelConfig,
        device: &Device,
        master: DType,
        compute: DType,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        check_dtypes(master, compute)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut trainable = Vec::new();
        for spec in base_specs(cfg) {
            let values = init_values(&spec, &mut rng);
            trainable.push((
                spec.name.clone(),
                make_var(values, &spec.shape, master, device)?,
            ));
        }
        Ok(Model {
            cfg: cfg.clone(),
            device: device.clone(),
            master_dtype: master,
            compute_dtype: compute,
            leaves: Self::leaves_for(
                &trainable,
                master,
                compute,
                default_batched(device, compute),
            )?,
            trainable,
            frozen: Vec::new(),
            lora: None,
            batched_experts: None,
            expert_layout: ExpertLayout::default(),
        })
    }

    /// A LoRA model: the base weights come from a safetensors file (f32, exactly the names and
    /// shapes of `cfg`'s layout) and stay frozen; only the adapters are trainable.
    pub fn with_lora(
        cfg: &ModelConfig,
        device: &Device,
        master: DType,
        compute: DType,
        base_file: &Path,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        lora.validate(cfg)?;
        check_dtypes(master, compute)?;
        let specs = base_specs(cfg);
        let layout: Vec<(String, Vec<usize>)> = specs
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect();
        let values = checkpoint::read_f32_tensors(base_file, &layout)?;
        let mut frozen = Vec::with_capacity(layout.len());
        for ((name, shape), v) in layout.iter().zip(values) {
            let t = Tensor::from_vec(v, shape.as_slice(), device)?.to_dtype(master)?;
            frozen.push((name.clone(), t));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut trainable = Vec::new();
        for spec in lora_specs(&specs, lora) {
            let values = init_values(&spec, &mut rng);
            trainable.push((
                spec.name.clone(),
                make_var(values, &spec.shape, master, device)?,
            ));
        }
        Ok(Model {
            cfg: cfg.clone(),
            device: device.clone(),
            master_dtype: master,
            compute_dtype: compute,
            // Adapters only: no expert weights are trainable, so no stacked leaves.
            leaves: Self::leaves_for(&trainable, master, compute, false)?,
            trainable,
            frozen,
            lora: Some(lora.clone()),
            batched_experts: None,
            expert_layout: ExpertLayout::default(),
        })
    }

    /// Whether a layer's experts run as one batched product per projection or one expert at
    /// a time; both compute the same function. By default they are batched in bf16 and f16
    /// (faster on the H100: `small` 80 -> 66 ms, `base` 213 -> 200 ms a step) and in f32 on
    /// a GPU, reading stacked f32 copies of the experts' weights (session 5 of docs/GPU.md;
    /// a `cat` of the masters each step was slower, `base` 305 -> 429 ms). Switching it on
    /// for f32 compute builds those copies. LoRA models always run one expert at a time.
    pub fn set_batched_experts(&mut self, on: bool) -> Result<()> {
        self.batched_experts = Some(on);
        if on && self.leaves.is_none() && self.lora.is_none() {
            self.leaves =
                Self::leaves_for(&self.trainable, self.master_dtype, self.compute_dtype, true)?;
        }
        Ok(())
    }

    /// Whether running a layer's experts batched pays for its padding, in f32: the batched
    /// layout gives every expert the busiest expert's row count, and with uneven routing
    /// that is f32 arithmetic on padding rows (`base` f32 on the H100, 3.5 times the routed
    /// rows: 502 ms a step batched against 274 ms one expert at a time; docs/GPU.md session
    /// 5). Batched when the padding's extra matrix work at the H100's f32 rate costs less
    /// than the host time one expert at a time adds to a layer (about 1.5 ms, `small` f32).
    /// bf16 and f16 always batch: there padding is cheap and one expert at a time was slower
    /// even at 3.5 times the rows (`base` bf16 135 against 151 ms with the slowest experts
    /// on their own). An explicit `set_batched_experts(true)` batches regardless, and the
    /// default grouped products have no padding to pay for.
    fn padding_pays(&self, counts: &[usize]) -> bool {
        if self.expert_layout != ExpertLayout::Padded
            || self.batched_experts == Some(true)
            || matches!(self.compute_dtype, DType::BF16 | DType::F16)
        {
            return true;
        }
        let cap = counts.iter().copied().max().unwrap_or(0);
        let pad = (counts.len() * cap - counts.iter().sum::<usize>()) as f64;
        // Multiply-adds of the three projections, forward (1) and backward (2), 2 FLOPs each.
        let flops = pad * 18.0 * self.cfg.d_model as f64 * self.cfg.expert_hidden as f64;
        flops / F32_FLOPS <= PER_LAYER_HOST_S
    }

    /// The layout batched experts run on ([`ExpertLayout`]). Every layout computes the same
    /// function; the others are kept to measure them side by side (`gpu_moe_bench
    /// --experts`).
    pub fn set_expert_layout(&mut self, layout: ExpertLayout) {
        self.expert_layout = layout;
    }

    fn experts_batched_here(&self) -> bool {
        self.batched_experts
            .unwrap_or(default_batched(&self.device, self.compute_dtype))
            && self.lora.is_none()
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the master weights.
    pub fn master_dtype(&self) -> DType {
        self.master_dtype
    }

    /// The dtype of the forward/backward pass.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The LoRA settings, when this is an adapter model.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// The trainable parameters in their fixed order (for a LoRA model: the adapters only).
    /// With bf16 or f16 compute (and for the experts' weights with batched f32 experts) the
    /// forward pass reads compute copies of these masters:
    /// whoever changes a master other than through `Model` or `Replica` must call
    /// [`Model::sync_compute`] before the next pass.
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.trainable
    }

    /// Compute leaves when the compute dtype differs from the masters'; stacked f32 leaves
    /// of the experts' weights when both are f32 and the experts run `batched`.
    fn leaves_for(
        trainable: &[(String, Var)],
        master: DType,
        compute: DType,
        batched: bool,
    ) -> Result<Option<Leaves>> {
        if trainable.is_empty() {
            return Ok(None);
        }
        if master != compute {
            return Ok(Some(Leaves::build(trainable, compute, false)?));
        }
        let experts = trainable.iter().any(|(n, _)| expert_weight(n).is_some());
        if batched && compute == DType::F32 && experts {
            return Ok(Some(Leaves::build(trainable, compute, true)?));
        }
        Ok(None)
    }

    /// Refreshes the compute copies from the master weights (nothing to do when the forward
    /// pass reads the masters).
    pub fn sync_compute(&self) -> Result<()> {
        match &self.leaves {
            Some(l) => l.sync(&self.trainable),
            None => Ok(()),
        }
    }

    /// The gradient of each trainable parameter in `grads`, in layout order (`None` where
    /// it took no part): the master's own gradient, or its compute copy's (in the compute
    /// dtype; for an expert's weight, its slice of the stacked leaf's gradient), or the sum
    /// of both where both exist.
    pub fn param_grads(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
        let mut out = Vec::with_capacity(self.trainable.len());
        for (i, (_, v)) in self.trainable.iter().enumerate() {
            let own = grads.get(v.as_tensor()).cloned();
            let copy = match self
                .leaves
                .as_ref()
                .and_then(|lv| Some((lv, lv.of_param[i]?)))
            {
                Some((lv, (li, pos))) => {
                    let leaf = &lv.vars[li];
                    match grads.get(leaf.var.as_tensor()) {
                        Some(g) if leaf.stacked => Some(g.get(pos)?),
                        Some(g) => Some(g.clone()),
                        None => None,
                    }
                }
                None => None,
            };
            out.push(match (own, copy) {
                (Some(a), Some(b)) => Some((&a + b.to_dtype(a.dtype())?)?),
                (a, b) => a.or(b),
            });
        }
        Ok(out)
    }

    /// One step of the inner AdamW on gradients from [`Model::param_grads`] (or any in
    /// layout order): the masters are updated and the compute copies refreshed, on a GPU in
    /// the same pass. Returns the gradient norm before clipping.
    pub fn optimizer_step(
        &self,
        opt: &mut crate::optim::AdamW,
        grads: &[Option<Tensor>],
        cfg: &crate::config::TrainConfig,
        lr: f32,
    ) -> Result<f64> {
        let (norm, written) = match &self.leaves {
            Some(l) => opt.step_params(&self.trainable, grads, &l.copies, cfg, lr)?,
            None => {
                let none = vec![None; self.trainable.len()];
                opt.step_params(&self.trainable, grads, &none, cfg, lr)?
            }
        };
        if !written {
            self.sync_compute()?;
        }
        Ok(norm)
    }

    /// Names and shapes of the trainable parameters in their fixed order.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.trainable
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect()
    }

    /// The compute view of the weights. With `track`, gradients flow back to the master `Var`s;
    /// without, the view is detached (evaluation).
    pub fn weights(&self, track: bool) -> Result<Weights> {
        let mut map = HashMap::with_capacity(self.trainable.len() + self.frozen.len());
        let mut lazy = HashMap::new();
        let mut stacks = HashMap::new();
        let view = |t: &Tensor| if track { t.clone() } else { t.detach() };
        let cast = |t: &Tensor| -> Result<Tensor> {
            if t.dtype() == self.compute_dtype {
                Ok(t.clone())
            } else {
                Ok(t.to_dtype(self.compute_dtype)?)
            }
        };
        for (name, t) in &self.frozen {
            map.insert(name.clone(), cast(&t.detach())?);
        }
        match &self.leaves {
            Some(lv) => {
                for leaf in &lv.vars {
                    let t = view(leaf.var.as_tensor());
                    if leaf.stacked {
                        stacks.insert(leaf.key.clone(), t);
                    } else {
                        map.insert(leaf.key.clone(), t);
                    }
                }
                for (i, (name, v)) in self.trainable.iter().enumerate() {
                    match lv.of_param[i] {
                        Some((li, _)) if lv.vars[li].stacked => {
                            lazy.insert(name.clone(), view(v.as_tensor()));
                        }
                        Some(_) => {}
                        // Read directly (f32 compute: only the experts have leaves).
                        None => {
                            map.insert(name.clone(), cast(&view(v.as_tensor()))?);
                        }
                    }
                }
            }
            None => {
                for (name, v) in &self.trainable {
                    map.insert(name.clone(), cast(&view(v.as_tensor()))?);
                }
            }
        }
        let lora_scale = self
            .lora
            .as_ref()
            .map(|l| l.alpha as f64 / l.rank as f64)
            .unwrap_or(0.0);
        Ok(Weights {
            map,
            lazy,
            cache: RefCell::new(HashMap::new()),
            compute: self.compute_dtype,
            stacks,
            idle: RefCell::new(Vec::new()),
            lora_scale,
        })
    }

    /// The whole model as one stage.
    pub fn full_stage(&self) -> StageSpec {
        StageSpec {
            first_layer: 0,
            end_layer: self.cfg.n_layers,
            embed: true,
            head: true,
        }
    }

    /// Splits the blocks into `n` contiguous stages of near-equal size.
    pub fn split_stages(&self, n: usize) -> Result<Vec<StageSpec>> {
        let layers = self.cfg.n_layers;
        if n == 0 || n > layers {
            return Err(WorkerError::Config(format!(
                "cannot split {layers} layers into {n} stages"
            )));
        }
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        for i in 0..n {
            let len = layers / n + usize::from(i < layers % n);
            out.push(StageSpec {
                first_layer: start,
                end_layer: start + len,
                embed: i == 0,
                head: i + 1 == n,
            });
            start += len;
        }
        Ok(out)
    }

    /// Whether a parameter belongs to a stage. With tied embeddings the embedding belongs to
    /// both the first and the last stage; their gradients add.
    pub fn stage_owns(&self, spec: &StageSpec, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("layers.") {
            return rest
                .split('.')
                .next()
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| (spec.first_layer..spec.end_layer).contains(&l));
        }
        match name {
            "tok_emb.weight" => spec.embed || (spec.head && self.cfg.tie_embeddings),
            _ => spec.head,
        }
    }

    /// Runs a stage. `input` is `[B, T]` u32 tokens for an embedding stage, otherwise the
    /// `[B, T, d]` hidden state in the compute dtype; `targets` (`[B, T]` u32) is required
    /// for a head stage.
    pub fn run_stage(
        &self,
        w: &Weights,
        spec: &StageSpec,
        input: &Tensor,
        targets: Option<&Tensor>,
    ) -> Result<StageRun> {
        let cfg = &self.cfg;
        if spec.first_layer > spec.end_layer || spec.end_layer > cfg.n_layers {
            return Err(WorkerError::Config(format!("bad stage {spec:?}")));
        }
        let mut x = if spec.embed {
            let (b, t) = input.dims2()?;
            if t > cfg.context {
                return Err(WorkerError::Mismatch(format!(
                    "sequence of {t} tokens is longer than the context {}",
                    cfg.context
                )));
            }
            let ids = input.flatten_all()?;
            embed(&w.get("tok_emb.weight")?, &ids)?.reshape((b, t, cfg.d_model))?
        } else {
            let (_, t, d) = input.dims3()?;
            if d != cfg.d_model || t > cfg.context {
                return Err(WorkerError::Mismatch(format!(
                    "stage input {:?} does not fit d_model {} / context {}",
                    input.dims(),
                    cfg.d_model,
                    cfg.context
                )));
            }
            input.to_dtype(self.compute_dtype)?
        };
        let (_, t, _) = x.dims3()?;
        let (cos, sin) = self.attention_consts(t)?;
        let mut aux: Option<Tensor> = None;
        let mut stats = RouteStats::default();
        for l in spec.first_layer..spec.end_layer {
            let (nx, layer_aux) = self.block(w, l, &x, &cos, &sin, &mut stats)?;
            x = nx;
            if let Some(a) = layer_aux {
                aux = Some(match aux {
                    Some(acc) => (acc + a)?,
                    None => a,
                });
            }
        }
        let ce = if spec.head {
            let targets = targets
                .ok_or_else(|| WorkerError::Mismatch("a head stage needs targets".into()))?;
            Some(self.head_loss(w, &x, targets)?)
        } else {
            None
        };
        Ok(StageRun {
            hidden: x,
            ce,
            aux,
            stats,
        })
    }

    /// Loss of the whole model on a batch: cross-entropy plus the weighted load-balancing
    /// loss. This is the function training differentiates.
    pub fn loss(
        &self,
        w: &Weights,
        tokens: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, StageRun)> {
        let run = self.run_stage(w, &self.full_stage(), tokens, Some(targets))?;
        let total = run
            .objective(self.cfg.aux_loss_coef as f64)?
            .ok_or_else(|| WorkerError::Mismatch("full stage produced no loss".into()))?;
        Ok((total, run))
    }

    /// Forward of one stage on its own: returns the (detached) output activations, or the
    /// loss for the head stage.
    pub fn stage_forward(
        &self,
        spec: &StageSpec,
        input: &Tensor,
        targets: Option<&Tensor>,
    ) -> Result<StageForward> {
        let w = self.weights(false)?;
        let run = self.run_stage(&w, spec, input, targets)?;
        let aux = self.weighted_aux(&run)?;
        Ok(StageForward {
            hidden: if spec.head {
                None
            } else {
                Some(run.hidden.detach())
            },
            ce: scalar_f32(&run.ce)?,
            aux,
        })
    }

    fn weighted_aux(&self, run: &StageRun) -> Result<f32> {
        Ok(match &run.aux {
            Some(a) => a.to_dtype(DType::F64)?.to_scalar::<f64>()? as f32 * self.cfg.aux_loss_coef,
            None => 0.0,
        })
    }

    /// Backward of one stage: recomputes the forward from `input` (held as a `Var` so that its
    /// gradient exists), then back-propagates `grad_output` (the gradient of the stage's
    /// output; `None` for the head stage, whose output is the loss) plus the stage's own
    /// load-balancing term. Nothing is kept between `stage_forward` and this call.
    pub fn stage_backward(
        &self,
        spec: &StageSpec,
        input: &Tensor,
        grad_output: Option<&Tensor>,
        targets: Option<&Tensor>,
    ) -> Result<StageBackward> {
        let w = self.weights(true)?;
        let g = self.stage_grads(&w, spec, input, grad_output, targets)?;
        let param_grads =
            self.collect_grads_of(Some(&w), &g.store, |n| self.stage_owns(spec, n))?;
        Ok(StageBackward {
            input_grad: g.input_grad,
            param_grads,
            ce: g.ce,
            aux: g.aux,
        })
    }

    /// The recomputation and backward pass of [`Model::stage_backward`], returning the whole
    /// gradient store: the pipeline picks the stage's parameters out of it by name,
    /// checkpointed training ([`Model::train_grads`]) by position, as an unsplit pass does.
    fn stage_grads(
        &self,
        w: &Weights,
        spec: &StageSpec,
        input: &Tensor,
        grad_output: Option<&Tensor>,
        targets: Option<&Tensor>,
    ) -> Result<StageGrads> {
        let input_var = if spec.embed {
            None
        } else {
            Some(Var::from_tensor(
                &input.detach().to_dtype(self.compute_dtype)?.copy()?,
            )?)
        };
        let x_in = match &input_var {
            Some(v) => v.as_tensor().clone(),
            None => input.clone(),
        };
        let run = self.run_stage(w, spec, &x_in, targets)?;
        let own = run.objective(self.cfg.aux_loss_coef as f64)?;
        let acc = acc_dtype(self.compute_dtype);
        let through = match (spec.head, grad_output) {
            (true, _) => None,
            (false, Some(g)) => {
                if g.dims() != run.hidden.dims() {
                    return Err(WorkerError::Mismatch(format!(
                        "output gradient {:?} does not match stage output {:?}",
                        g.dims(),
                        run.hidden.dims()
                    )));
                }
                let g = g.to_dtype(acc)?.detach();
                Some((run.hidden.to_dtype(acc)? * g)?.sum_all()?)
            }
            (false, None) => {
                return Err(WorkerError::Mismatch(
                    "a non-head stage needs the gradient of its output".into(),
                ));
            }
        };
        let ce = scalar_f32(&run.ce)?;
        let aux = self.weighted_aux(&run)?;
        let aux_sum = scalar_f32(&run.aux)?;
        let objective = match (own, through) {
            (Some(a), Some(b)) => (a.to_dtype(acc)? + b)?,
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => {
                return Err(WorkerError::Mismatch(
                    "stage has nothing to differentiate".into(),
                ));
            }
        };
        let store = objective.backward()?;
        let input_grad = match &input_var {
            Some(v) => store.get(v.as_tensor()).cloned(),
            None => None,
        };
        Ok(StageGrads {
            input_grad,
            store,
            ce,
            aux,
            aux_sum,
            stats: run.stats,
        })
    }

    /// The blocks as stages of one layer each, the first with the embedding and the last
    /// with the head: the units of checkpointed training.
    fn layer_stages(&self) -> Result<Vec<StageSpec>> {
        match self.cfg.n_layers {
            0 => Ok(vec![self.full_stage()]),
            n => self.split_stages(n),
        }
    }

    /// A training pass on `tokens` and `targets` (`[B, T]` u32): the loss and the gradient
    /// of every trainable parameter, ready for [`Model::optimizer_step`].
    ///
    /// With [`Checkpointing::Layers`] the pass is the pipeline's, one stage per block
    /// (`split_stages(n_layers)`): [`Model::stage_forward`] runs the blocks with no graph,
    /// keeping only each block's input, then the blocks are recomputed one at a time, last
    /// first, each back-propagating the gradient of its output as
    /// [`Model::stage_backward`] does. The activations alive at once are one block's instead
    /// of every block's, for one more forward pass of every block but the last. The
    /// forward is deterministic (no dropout; MoE routing is a function of the input), so
    /// the recomputed blocks are the blocks of the forward: the same loss and the same
    /// gradients as without (on the CPU in f32 bit for bit with untied embeddings; a tied
    /// embedding's gradient, summed from the first and the last stage, within rounding).
    pub fn train_grads(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        checkpointing: Checkpointing,
    ) -> Result<TrainGrads> {
        match checkpointing {
            Checkpointing::Off => {
                let w = self.weights(true)?;
                let (total, run) = self.loss(&w, tokens, targets)?;
                let ce = scalar_f32(&run.ce)?
                    .ok_or_else(|| WorkerError::Mismatch("no loss computed".into()))?;
                let aux = scalar_f32(&run.aux)?.unwrap_or(0.0);
                let store = total.backward()?;
                Ok(TrainGrads {
                    ce,
                    aux,
                    stats: run.stats,
                    grads: self.param_grads(&store)?,
                    _store: Some(store),
                })
            }
            Checkpointing::Layers => self.checkpointed_grads(tokens, targets),
        }
    }

    fn checkpointed_grads(&self, tokens: &Tensor, targets: &Tensor) -> Result<TrainGrads> {
        let stages = self.layer_stages()?;
        let Some((_, before)) = stages.split_last() else {
            return Err(WorkerError::Config("a model with no stages".into()));
        };
        // Forward with no graph kept: each block's input is all that survives it.
        let mut inputs = Vec::with_capacity(stages.len());
        let mut x = tokens.clone();
        for spec in before {
            let out = self.stage_forward(spec, &x, None)?.hidden.ok_or_else(|| {
                WorkerError::Mismatch("a stage before the head sent nothing on".into())
            })?;
            inputs.push(std::mem::replace(&mut x, out));
        }
        inputs.push(x);
        // Backwards through the stages, each recomputed with its graph from its input; a
        // parameter's gradient is summed over the stages it takes part in (a tied
        // embedding: the first and the last).
        let mut grads: Vec<Option<Tensor>> = vec![None; self.trainable.len()];
        let mut ce = None;
        let mut per_stage = Vec::with_capacity(stages.len());
        let mut grad_output: Option<Tensor> = None;
        for (spec, input) in stages.iter().zip(inputs).rev() {
            let w = self.weights(true)?;
            let g = self.stage_grads(&w, spec, &input, grad_output.as_ref(), Some(targets))?;
            drop(input);
            for (acc, part) in grads.iter_mut().zip(self.param_grads(&g.store)?) {
                let Some(part) = part else { continue };
                *acc = Some(match acc.take() {
                    Some(prev) => (prev + part)?,
                    None => part,
                });
            }
            if spec.head {
                ce = g.ce;
            }
            grad_output = match (spec.embed, g.input_grad) {
                (true, _) => None,
                (false, Some(gi)) => Some(gi),
                (false, None) => {
                    return Err(WorkerError::Mismatch(format!(
                        "checkpointing: no gradient reached the input of {spec:?}"
                    )));
                }
            };
            per_stage.push((g.aux_sum, g.stats));
        }
        // Losses and routing counts in layer order, summed as an unsplit pass sums them.
        let mut aux: Option<f32> = None;
        let mut stats = RouteStats::default();
        for (a, s) in per_stage.into_iter().rev() {
            if let Some(a) = a {
                aux = Some(aux.map_or(a, |acc| acc + a));
            }
            stats.expert_tokens.extend(s.expert_tokens);
            stats.dropped += s.dropped;
        }
        Ok(TrainGrads {
            ce: ce.ok_or_else(|| WorkerError::Mismatch("no loss computed".into()))?,
            aux: aux.unwrap_or(0.0),
            stats,
            grads,
            _store: None,
        })
    }

    /// The gradients of the trainable parameters selected by `keep`, in layout order and
    /// the masters' dtype; parameters that took no part (an expert that got no tokens) are
    /// left out. For a model with compute leaves (bf16/f16) that ran experts batched, use
    /// the `Weights`-aware path of `stage_backward`/`expert_backward`: here an idle expert's
    /// zero slice of the stacked gradient is returned as a gradient.
    pub fn collect_grads(
        &self,
        grads: &GradStore,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, Tensor)>> {
        self.collect_grads_of(None, grads, keep)
    }

    fn collect_grads_of(
        &self,
        w: Option<&Weights>,
        grads: &GradStore,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, Tensor)>> {
        let idle = w.map(|w| w.idle.borrow().clone()).unwrap_or_default();
        let mut out = Vec::new();
        for ((n, _), g) in self.trainable.iter().zip(self.param_grads(grads)?) {
            if let Some(g) = g
                && keep(n)
                && !idle.contains(n)
            {
                out.push((n.clone(), g.to_dtype(self.master_dtype)?));
            }
        }
        Ok(out)
    }

    /// RoPE tables for sequences of `t` tokens.
    fn attention_consts(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        let theta = self.cfg.rope_theta as f64;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f64 / hd as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cd = self.compute_dtype;
        let cos = Tensor::from_vec(cos, (t, half), &self.device)?.to_dtype(cd)?;
        let sin = Tensor::from_vec(sin, (t, half), &self.device)?.to_dtype(cd)?;
        Ok((cos, sin))
    }

    fn block(
        &self,
        w: &Weights,
        l: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        stats: &mut RouteStats,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let eps = self.cfg.norm_eps as f64;
        let kind = self.cfg.layer_kind(l);
        let x = match kind.mixer {
            Mixer::Attention => {
                let h = rms_norm(x, &w.get(&format!("layers.{l}.attn_norm.weight"))?, eps)?;
                (x + self.attention(w, l, &h, cos, sin)?)?
            }
            Mixer::Mamba => {
                let h = rms_norm(x, &w.get(&format!("layers.{l}.mamba_norm.weight"))?, eps)?;
                (x + crate::mamba::mixer(&mamba_weights(w, l)?, &h)?)?
            }
        };
        if kind.ffn == FeedForward::None {
            return Ok((x, None));
        }
        self.feed_forward(w, l, x, stats)
    }

    /// The feed-forward half of block `l` with its norm and residual, on `x: [B, T, d]`.
    fn feed_forward(
        &self,
        w: &Weights,
        l: usize,
        x: Tensor,
        stats: &mut RouteStats,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = x.dims3()?;
        let eps = self.cfg.norm_eps as f64;
        let h = rms_norm(&x, &w.get(&format!("layers.{l}.ffn_norm.weight"))?, eps)?
            .reshape((b * t, d))?;
        let (f, aux) = if self.cfg.is_moe(l) {
            let router = self.router(w, l, &h)?;
            let (y, aux, kept, dropped) = match self.batched_counts(w, &router)? {
                Some(BatchedCounts {
                    counts,
                    kept,
                    dropped,
                    aux,
                }) => {
                    if !w.stacks.is_empty() {
                        for e in (0..kept.len()).filter(|&e| kept[e] == 0) {
                            for proj in ["w_gate", "w_up", "w_down"] {
                                w.idle
                                    .borrow_mut()
                                    .push(format!("layers.{l}.moe.experts.{e}.{proj}.weight"));
                            }
                        }
                    }
                    let y = self.experts_batched(w, l, &router, &counts, &kept, &h)?;
                    (y, aux, kept, dropped)
                }
                None => {
                    let routing = self.route_host(&router)?;
                    let xs = routing.dispatch(&h)?;
                    let mut outputs = Vec::with_capacity(self.cfg.n_experts);
                    for e in 0..self.cfg.n_experts {
                        outputs.push(match routing.expert_rows(e) {
                            Some((start, len)) => {
                                Some(self.expert_forward(w, l, e, &xs.narrow(0, start, len)?)?)
                            }
                            None => None,
                        });
                    }
                    let y = moe_combine(&routing, &outputs)?;
                    let kept = routing.tokens.iter().map(Vec::len).collect();
                    (y, routing.aux, kept, routing.dropped)
                }
            };
            stats
                .expert_tokens
                .push(kept.iter().map(|&c| c as u64).collect());
            stats.dropped += dropped;
            (y, Some(aux))
        } else {
            (swiglu(w, &format!("layers.{l}.ffn"), &h)?, None)
        };
        Ok(((x + f.reshape((b, t, d))?)?, aux))
    }

    fn attention(
        &self,
        w: &Weights,
        l: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let nh = self.cfg.n_heads;
        let hd = self.cfg.head_dim();
        let h2 = h.reshape((b * t, d))?;
        // Each projection's heads as [B, H, T, hd], queries and keys rotated, in one op each.
        let heads = |p: &str, rope: Option<(&Tensor, &Tensor)>| -> Result<Tensor> {
            let y = w.linear(&format!("layers.{l}.attn.{p}"), &h2)?;
            Ok(crate::fused::split_heads(&y, b, t, nh, rope)?)
        };
        let q = heads("wq", Some((cos, sin)))?;
        let k = heads("wk", Some((cos, sin)))?;
        let v = heads("wv", None)?;
        // Scale, causal mask and softmax in one kernel each way (f32 arithmetic); the plain
        // ops were about ten passes over the [B, H, T, T] scores forward and more backward.
        // The causal mask's zeros are skipped by blocks in `probs @ v` and in the backward
        // products of both (about 3/8 of their arithmetic at a context of 512).
        let scores = crate::fused::matmul_t_causal(&q, &k)?;
        let probs = crate::fused::causal_softmax(&scores, 1.0 / (hd as f64).sqrt())?;
        let o = crate::fused::merge_heads(&crate::fused::matmul_causal(&probs, &v)?)?;
        Ok(w.linear(&format!("layers.{l}.attn.wo"), &o)?
            .reshape((b, t, d))?)
    }

    /// The router of MoE layer `layer` on normalised tokens `x: [N, d]`: top-k choice per
    /// token (ties go to the lower expert index), capacity (first choices are placed before
    /// second choices, in token order), gate weights renormalised over each token's top-k,
    /// and the Switch load-balancing loss `E * sum_e f_e * P_e`.
    pub fn moe_route(&self, w: &Weights, layer: usize, x: &Tensor) -> Result<Routing> {
        self.route_host(&self.router(w, layer, x)?)
    }

    /// The router's probabilities and top-k choice on `x: [N, d]`, and the layer's capacity.
    fn router(&self, w: &Weights, layer: usize, x: &Tensor) -> Result<RouterOut> {
        let cfg = &self.cfg;
        let (n, d) = x.dims2()?;
        let k = cfg.top_k;
        let acc = acc_dtype(self.compute_dtype);
        let router = w.get(&format!("layers.{layer}.moe.router.weight"))?;
        let logits = matmul_wt(x, &router)?.to_dtype(acc)?;
        let probs = crate::fused::softmax_last_dim(&logits)?;
        let capacity = ((cfg.capacity_factor as f64 * (n * k) as f64 / cfg.n_experts as f64).ceil()
            as usize)
            .max(1);
        // The choice is made where the probabilities are (a GPU reads back 4 bytes a slot
        // instead of 4 a probability, and skips the host's compare-heavy loop).
        let choice = crate::fused::router_topk(&probs, k)?;
        Ok(RouterOut {
            probs,
            choice,
            capacity,
            n,
            d,
        })
    }

    /// The Switch load-balancing loss `E * sum_e f_e * P_e` from the probabilities and each
    /// expert's chosen count (`counts: [E]` u32, made a fraction on the device: an upload of
    /// its own from pageable memory would wait for the stream).
    fn balance_loss(&self, probs: &Tensor, counts: &Tensor) -> Result<Tensor> {
        Ok(crate::fused::balance_loss(probs, counts, self.cfg.top_k)?)
    }

    /// Routing decided on the host from the router's choice, with each expert's token list:
    /// what the one-expert-at-a-time path and remote experts need.
    fn route_host(&self, r: &RouterOut) -> Result<Routing> {
        let (n, d, capacity) = (r.n, r.d, r.capacity);
        let n_exp = self.cfg.n_experts;
        let k = self.cfg.top_k;
        let probs = &r.probs;
        let choice = r.choice.flatten_all()?.to_vec1::<u32>()?;
        let HostRoute {
            ids,
            parts,
            kept,
            tokens,
            offsets,
            dropped,
        } = route_choices(&choice, n_exp, k, capacity);
        // Every index vector of the layer goes to the device in one upload, viewed in place:
        // an upload from pageable memory waits for the stream.
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let view = |range| crate::fused::RouteParts::view(&ids, range);
        let combine_ids = view(parts.combine.clone())?;
        // Each slot's gate, renormalised over the token's top-k, in one op each way.
        let gates_nk = crate::fused::router_gates(probs, &view(parts.gate.clone())?, k)?
            .to_dtype(self.compute_dtype)?;
        let sorted = view(parts.gather.clone())?;
        let combine_back = view(parts.back.clone())?;
        let sorted_slots = view(parts.total()..parts.total() + kept)?;
        let aux = self.balance_loss(probs, &view(total - n_exp..total)?)?;
        Ok(Routing {
            n_tokens: n,
            d_model: d,
            tokens,
            aux,
            dropped,
            dtype: self.compute_dtype,
            device: self.device.clone(),
            offsets,
            sorted_tokens: sorted,
            combine_ids,
            combine_back,
            gates_nk,
            sorted_slots,
            top_k: k,
        })
    }

    /// Each expert's kept and chosen counts (on the device and read back) and the layer's
    /// balance loss when MoE layer `router` runs its experts batched: `None` when they run
    /// one at a time (not batched here, an idle expert without stacked weights, or padding
    /// that does not pay). The counts' read-back is the layer's one synchronisation (cuBLAS
    /// takes each expert's row count from the host), so the balance loss, which needs only
    /// the device's counts, is launched before it, while the GPU catches up.
    fn batched_counts(&self, w: &Weights, r: &RouterOut) -> Result<Option<BatchedCounts>> {
        if !self.experts_batched_here() {
            return Ok(None);
        }
        let n_exp = self.cfg.n_experts;
        let counts = crate::fused::route_counts(&r.choice, n_exp, r.capacity)?;
        let aux = self.balance_loss(&r.probs, &counts.narrow(0, n_exp, n_exp)?)?;
        let host = counts.to_vec1::<u32>()?;
        let kept: Vec<usize> = host[..n_exp].iter().map(|&c| c as usize).collect();
        let chosen: u64 = host[n_exp..].iter().map(|&c| u64::from(c)).sum();
        let dropped = chosen - kept.iter().sum::<usize>() as u64;
        // Batched only when every expert has tokens: an idle expert's parameters then get no
        // gradient at all, as callers of `collect_grads` expect. With stacked leaves the
        // batched path runs anyway: an idle expert's rows are all padding, its slice of the
        // leaf's gradient is zero, and it is recorded as idle.
        let all_busy = kept.iter().all(|&c| c > 0);
        let stacked = !w.stacks.is_empty();
        Ok(
            ((all_busy || stacked) && self.padding_pays(&kept)).then_some(BatchedCounts {
                counts,
                kept,
                dropped,
                aux,
            }),
        )
    }

    /// All experts of MoE layer `layer` on their tokens at once, each projection one graph
    /// node over the experts' stacked weights, on rows laid out by `fused::route_layout` on
    /// the device from the router's choice (the host only reads back the counts, in
    /// `batched_counts`): by default grouped products (`fused::grouped_matmul_t`, one matrix
    /// product per expert of its own rows, rounded up to a multiple of 128 so that cuBLAS
    /// sees a few shapes again and again), or one batched product over the padded
    /// `[experts, cap, d]` layout, whose padding costs arithmetic (3.5 times the routed rows
    /// on `base` after warm-up). Padding rows get exactly zero gradient. One expert at a
    /// time, each expert is a dozen graph nodes forward and more backward, which made the
    /// host the bottleneck on a GPU.
    fn experts_batched(
        &self,
        w: &Weights,
        layer: usize,
        r: &RouterOut,
        counts: &Tensor,
        kept: &[usize],
        x: &Tensor,
    ) -> Result<Tensor> {
        // The experts' weights of one stacked leaf as `[experts, out, in]` (`[E, 2h, d]`
        // for the gate and up projections together, each expert's `[gate; up]`).
        let n_exp = kept.len();
        let stack = |leaf: &str| -> Result<Tensor> {
            // A model with compute leaves keeps the stacked weights as one leaf.
            let s = match w.stack(layer, leaf) {
                Some(s) => s.clone(),
                None => {
                    let projs: &[&str] = match leaf {
                        GATE_UP => &["w_gate", "w_up"],
                        _ => &["w_down"],
                    };
                    let mut ws = Vec::with_capacity(n_exp * projs.len());
                    for e in 0..n_exp {
                        for p in projs {
                            let name = format!("layers.{layer}.moe.experts.{e}.{p}.weight");
                            ws.push(w.get(&name)?);
                        }
                    }
                    Tensor::stack(&ws, 0)?
                }
            };
            let (rows, out, inn) = s.dims3()?;
            Ok(s.reshape((n_exp, rows / n_exp.max(1) * out, inn))?)
        };
        let (n, d, k) = (r.n, r.d, self.cfg.top_k);
        let blocks = match self.expert_layout {
            ExpertLayout::Padded => RowBlocks::Uniform,
            ExpertLayout::Grouped { align } => RowBlocks::Aligned(align),
        };
        let sizes = blocks.sizes(kept);
        let rows: usize = sizes.iter().sum();
        let layout = crate::fused::route_layout(&r.choice, counts, kept, r.capacity, blocks)?;
        let parts = crate::fused::RouteParts::new(rows, n * k);
        let view = |range| crate::fused::RouteParts::view(&layout, range);
        let combine_ids = view(parts.combine.clone())?;
        let gates_nk = crate::fused::router_gates(&r.probs, &view(parts.gate.clone())?, k)?
            .to_dtype(self.compute_dtype)?;
        if rows == 0 {
            return Ok(Tensor::zeros((n, d), self.compute_dtype, &self.device)?);
        }
        let dispatch = GatherRows {
            ids: view(parts.gather.clone())?,
            back: combine_ids.reshape((k, n))?,
        };
        let xs = x.contiguous()?.apply_op1(dispatch)?;
        let (xs, grouped) = match blocks {
            RowBlocks::Uniform => (xs.reshape((n_exp, sizes[0], d))?, false),
            RowBlocks::Aligned(_) => (xs, true),
        };
        let mm = |a: &Tensor, leaf: &str| -> Result<Tensor> {
            let w = stack(leaf)?;
            Ok(if grouped {
                crate::fused::grouped_matmul_t(a, &w, &sizes)?
            } else {
                crate::fused::matmul_t(a, &w)?
            })
        };
        // Gate and up as one product: `x` is read (and in f32 split) once, and the backward
        // pass takes one gradient, `[rows, 2h]`, through one product each way.
        let a = crate::fused::swiglu_packed(&mm(&xs, GATE_UP)?)?;
        let y = mm(&a, "w_down")?
            .reshape((rows, d))?
            .to_dtype(self.compute_dtype)?;
        Ok(crate::fused::moe_combine(
            &y,
            &gates_nk,
            &combine_ids,
            &view(parts.back.clone())?,
        )?)
    }

    /// One expert's SwiGLU on the tokens routed to it, `x: [n_e, d]` -> `[n_e, d]`.
    pub fn expert_forward(
        &self,
        w: &Weights,
        layer: usize,
        expert: usize,
        x: &Tensor,
    ) -> Result<Tensor> {
        if !self.cfg.is_moe(layer) || expert >= self.cfg.n_experts {
            return Err(WorkerError::Mismatch(format!(
                "layer {layer} has no expert {expert}"
            )));
        }
        swiglu(w, &format!("layers.{layer}.moe.experts.{expert}"), x)
    }

    /// Backward of one expert alone, as a remote expert would run it: from its input tokens
    /// and the gradient of its output, the gradient of its input and of its own parameters.
    pub fn expert_backward(
        &self,
        layer: usize,
        expert: usize,
        x: &Tensor,
        grad_output: &Tensor,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let w = self.weights(true)?;
        let xv = Var::from_tensor(&x.detach().to_dtype(self.compute_dtype)?.copy()?)?;
        let y = self.expert_forward(&w, layer, expert, xv.as_tensor())?;
        if y.dims() != grad_output.dims() {
            return Err(WorkerError::Mismatch(format!(
                "expert output gradient {:?} does not match {:?}",
                grad_output.dims(),
                y.dims()
            )));
        }
        let acc = acc_dtype(self.compute_dtype);
        let obj = (y.to_dtype(acc)? * grad_output.to_dtype(acc)?.detach())?.sum_all()?;
        let grads = obj.backward()?;
        let gx = grads
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| WorkerError::Mismatch("expert input got no gradient".into()))?;
        let prefix = format!("layers.{layer}.moe.experts.{expert}.");
        Ok((
            gx,
            self.collect_grads_of(Some(&w), &grads, |n| n.starts_with(&prefix))?,
        ))
    }

    /// Final norm, output head and mean cross-entropy (in at least f32).
    fn head_loss(&self, w: &Weights, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        if targets.dims() != [b, t] {
            return Err(WorkerError::Mismatch(format!(
                "targets {:?} do not match the batch [{b}, {t}]",
                targets.dims()
            )));
        }
        let logits = self.head_logits(w, &x.reshape((b * t, d))?)?;
        Ok(candle_nn::loss::cross_entropy(
            &logits,
            &targets.flatten_all()?,
        )?)
    }

    /// Final norm and output head on `x: [N, d]`: logits `[N, vocab]` in at least f32.
    fn head_logits(&self, w: &Weights, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm(x, &w.get("final_norm.weight")?, self.cfg.norm_eps as f64)?;
        let head = if self.cfg.tie_embeddings {
            w.get("tok_emb.weight")?
        } else {
            w.get("lm_head.weight")?
        };
        Ok(crate::fused::matmul_t(&h, &head)?.to_dtype(acc_dtype(self.compute_dtype))?)
    }

    /// The logits of every position of `tokens: [B, T]` (u32), `[B, T, vocab]` in at least
    /// f32: the full forward pass, as training runs it.
    pub fn logits(&self, w: &Weights, tokens: &Tensor) -> Result<Tensor> {
        let run = self.run_stage(
            w,
            &StageSpec {
                head: false,
                ..self.full_stage()
            },
            tokens,
            None,
        )?;
        let (b, t, d) = run.hidden.dims3()?;
        let logits = self.head_logits(w, &run.hidden.reshape((b * t, d))?)?;
        Ok(logits.reshape((b, t, self.cfg.vocab))?)
    }

    /// The state generation starts from for `batch` sequences: one [`crate::mamba::MixerState`]
    /// per block, whose size stays the same however many tokens follow. Only models whose
    /// mixers are all Mamba generate this way: an attention block would need a KV cache,
    /// which the worker does not have.
    pub fn recurrent_state(&self, w: &Weights, batch: usize) -> Result<RecurrentState> {
        let mut layers = Vec::with_capacity(self.cfg.n_layers);
        for l in 0..self.cfg.n_layers {
            if self.cfg.layer_kind(l).mixer != Mixer::Mamba {
                return Err(WorkerError::Config(format!(
                    "block {l} is attention: recurrent generation needs every block to be \
                     Mamba (attention would need a KV cache, which the worker does not have)"
                )));
            }
            layers.push(crate::mamba::MixerState::new(
                &mamba_weights(w, l)?,
                batch,
                self.compute_dtype,
            )?);
        }
        Ok(RecurrentState { layers, batch })
    }

    /// Feeds one token per sequence (`tokens: [B]` u32) through the model, advancing
    /// `state`; returns the next-token logits `[B, vocab]` in at least f32, the same as
    /// [`Model::logits`] gives at that position.
    pub fn step_logits(
        &self,
        w: &Weights,
        state: &mut RecurrentState,
        tokens: &Tensor,
    ) -> Result<Tensor> {
        let b = tokens.dims1()?;
        if b != state.batch || state.layers.len() != self.cfg.n_layers {
            return Err(WorkerError::Mismatch(format!(
                "{b} tokens for a recurrent state of {} sequences and {} blocks",
                state.batch,
                state.layers.len()
            )));
        }
        let d = self.cfg.d_model;
        let eps = self.cfg.norm_eps as f64;
        let mut x = embed(&w.get("tok_emb.weight")?, tokens)?;
        let mut stats = RouteStats::default();
        for (l, st) in state.layers.iter_mut().enumerate() {
            let h = rms_norm(&x, &w.get(&format!("layers.{l}.mamba_norm.weight"))?, eps)?;
            x = (x + crate::mamba::mixer_step(&mamba_weights(w, l)?, &h, st)?)?;
            if self.cfg.layer_kind(l).ffn != FeedForward::None {
                let (y, _) = self.feed_forward(w, l, x.reshape((b, 1, d))?, &mut stats)?;
                x = y.reshape((b, d))?;
            }
        }
        self.head_logits(w, &x)
    }
}

/// Sums the gated expert outputs back into token order. `outputs[e]` is `None` for an expert
/// that did not answer (a remote call past its deadline): its tokens simply lose that
/// expert's contribution and keep their residual path and other experts, so the result and
/// its gradients stay valid.
pub fn moe_combine(routing: &Routing, outputs: &[Option<Tensor>]) -> Result<Tensor> {
    if outputs.len() != routing.tokens.len() {
        return Err(WorkerError::Mismatch(format!(
            "{} expert outputs for {} experts",
            outputs.len(),
            routing.tokens.len()
        )));
    }
    let mut rows = Vec::with_capacity(outputs.len() + 1);
    for (e, y) in outputs.iter().enumerate() {
        let n_e = routing.tokens[e].len();
        if n_e == 0 {
            continue;
        }
        let want = [n_e, routing.d_model];
        match y {
            Some(y) if y.dims() == want => rows.push(y.to_dtype(routing.dtype)?),
            Some(y) => {
                return Err(WorkerError::Mismatch(format!(
                    "expert {e} answered {:?}, expected {want:?}",
                    y.dims()
                )));
            }
            // An expert that did not answer contributes nothing: zero rows, no gradient.
            None => rows.push(Tensor::zeros(
                (n_e, routing.d_model),
                routing.dtype,
                &routing.device,
            )?),
        }
    }
    if rows.is_empty() {
        // Every assignment was dropped: every gate is 0.
        return Ok(Tensor::zeros(
            (routing.n_tokens, routing.d_model),
            routing.dtype,
            &routing.device,
        )?);
    }
    let sorted = Tensor::cat(&rows, 0)?;
    Ok(crate::fused::moe_combine(
        &sorted,
        &routing.gates_nk,
        &routing.combine_ids,
        &routing.combine_back,
    )?)
}

/// The layout a layer's batched experts run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One batched product per projection over `[experts, cap, d]`, `cap` the busiest
    /// expert's token count: every expert computes `cap` rows.
    Padded,
    /// One matrix product per expert (`fused::grouped_matmul_t`) over its own block of rows,
    /// its token count rounded up to a multiple of `align`.
    Grouped { align: usize },
}

/// The default is grouped products at a 128-row granularity (docs/GPU.md, session 6, same
/// call on the H100: `base` bf16 101.6 ms a step against 127.4 padded and 154.1 at exact
/// counts, `small` bf16 28.0 against 32.9 and 56.0). At exact counts every step brings new
/// shapes, and each cuBLAS call paid about 30 us of host time choosing a kernel for its
/// shape; rounded counts repeat and the choice is cached.
impl Default for ExpertLayout {
    fn default() -> Self {
        ExpertLayout::Grouped { align: 128 }
    }
}

/// The rate of a batched f32 expert product on the H100 (about 48 TFLOP/s, `--micro` in
/// docs/GPU.md session 5) and the host time that running a layer's experts one at a time
/// adds (`small` f32: 9 ms a step over 6 layers). They only steer `Model::padding_pays`.
const F32_FLOPS: f64 = 48e12;
const PER_LAYER_HOST_S: f64 = 1.5e-3;

/// Whether the experts run batched unless `Model::set_batched_experts` says otherwise: in
/// bf16 and f16, and in f32 on a GPU (on the CPU one expert at a time is as fast and needs no
/// stacked copies).
fn default_batched(device: &Device, compute: DType) -> bool {
    match compute {
        DType::BF16 | DType::F16 => true,
        DType::F32 => !device.is_cpu(),
        _ => false,
    }
}

fn check_dtypes(master: DType, compute: DType) -> Result<()> {
    match (master, compute) {
        (DType::F32, DType::F32 | DType::BF16 | DType::F16) | (DType::F64, DType::F64) => Ok(()),
        _ => Err(WorkerError::Config(format!(
            "unsupported dtypes: master {master:?}, compute {compute:?} (use f32 masters with \
             f32/bf16 compute, or f64/f64 for gradient checks)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the plain rule decides.
    struct PlainRoute {
        /// Each (token, slot)'s expert, `[N * top_k]`, token-major.
        choice: Vec<u32>,
        /// Assignments chosen per expert, before capacity.
        chosen_count: Vec<u64>,
        /// For each expert, the tokens it keeps, ascending.
        tokens: Vec<Vec<u32>>,
        /// Where each expert's block starts in the sorted order.
        offsets: Vec<usize>,
        /// Kept assignments in expert order, tokens ascending within an expert.
        sorted_tokens: Vec<u32>,
        /// Each (token, slot)'s sorted position, `u32::MAX` where dropped.
        position: Vec<u32>,
        dropped: u64,
    }

    /// The routing rule written the plain way: repeated arg-max per token (the first of equal
    /// values wins), then capacity slot by slot in token order, then each expert's tokens
    /// sorted.
    fn route_plain(p: &[f64], n_exp: usize, k: usize, capacity: usize) -> PlainRoute {
        let n = p.len() / n_exp;
        let mut choice = vec![0u32; n * k];
        let mut chosen_count = vec![0u64; n_exp];
        for tok in 0..n {
            let row = &p[tok * n_exp..(tok + 1) * n_exp];
            let mut taken = vec![false; n_exp];
            for j in 0..k {
                let mut best = None;
                for e in (0..n_exp).filter(|&e| !taken[e]) {
                    if best.is_none_or(|b: usize| row[e] > row[b]) {
                        best = Some(e);
                    }
                }
                let e = best.unwrap();
                taken[e] = true;
                choice[tok * k + j] = e as u32;
                chosen_count[e] += 1;
            }
        }
        let mut tokens = vec![Vec::new(); n_exp];
        let mut dropped = 0;
        for j in 0..k {
            for tok in 0..n {
                let e = choice[tok * k + j] as usize;
                if tokens[e].len() < capacity {
                    tokens[e].push(tok as u32);
                } else {
                    dropped += 1;
                }
            }
        }
        let mut kept_slot = vec![false; n * k];
        let mut seen = vec![0usize; n_exp];
        for j in 0..k {
            for tok in 0..n {
                let e = choice[tok * k + j] as usize;
                seen[e] += 1;
                kept_slot[tok * k + j] = seen[e] <= capacity;
            }
        }
        tokens.iter_mut().for_each(|t| t.sort_unstable());
        let mut offsets = Vec::new();
        let mut sorted_tokens = Vec::new();
        let mut position = vec![u32::MAX; n * k];
        for (e, list) in tokens.iter().enumerate() {
            offsets.push(sorted_tokens.len());
            for &tok in list {
                let q = (0..k)
                    .map(|j| tok as usize * k + j)
                    .find(|&q| choice[q] as usize == e && kept_slot[q])
                    .unwrap();
                position[q] = sorted_tokens.len() as u32;
                sorted_tokens.push(tok);
            }
        }
        PlainRoute {
            choice,
            chosen_count,
            tokens,
            offsets,
            sorted_tokens,
            position,
            dropped,
        }
    }

    /// Whether the host routing of `choice` (`[N * k]`) is the plain rule's `want`: lists,
    /// offsets, drops, the sorted order, and every index vector of its upload.
    fn same(got: &HostRoute, want: &PlainRoute, choice: &[u32], n_exp: usize, k: usize) -> bool {
        let n = choice.len() / k;
        let kept = want.sorted_tokens.len();
        let ids = &got.ids;
        let p = &got.parts;
        let (combine, back, gate) = (
            &ids[p.combine.clone()],
            &ids[p.back.clone()],
            &ids[p.gate.clone()],
        );
        let slots = &ids[p.total()..p.total() + kept];
        let chosen: Vec<u64> = ids[p.total() + kept..]
            .iter()
            .map(|&c| u64::from(c))
            .collect();
        let lists = choice == want.choice.as_slice()
            && got.kept == kept
            && got.tokens == want.tokens
            && got.offsets == want.offsets
            && got.dropped == want.dropped
            && ids[p.gather.clone()] == want.sorted_tokens[..]
            && chosen == want.chosen_count
            && back[kept] == (n * k) as u32;
        lists
            && (0..n * k).all(|q| {
                let (t, j) = (q / k, q % k);
                let slot = j * n + t;
                match want.position[q] {
                    u32::MAX => combine[slot] == kept as u32 && gate[q] == choice[q] + n_exp as u32,
                    at => {
                        combine[slot] == at
                            && back[at as usize] == slot as u32
                            && slots[at as usize] == q as u32
                            && gate[q] == choice[q]
                    }
                }
            })
    }

    /// A routing case: experts, top-k, router probabilities `[N, E]` drawn from four values
    /// (so rows hold many ties) and a capacity from 5% to twice the mean load.
    fn routing_case() -> impl Strategy<Value = (usize, usize, Vec<f64>, usize)> {
        let shape = (1usize..10)
            .prop_flat_map(|e| (Just(e), 1..=e, prop::collection::vec(0u8..4, e..e * 40)));
        (shape, 0.05f64..2.0).prop_map(|((n_exp, k, p), cap_frac)| {
            let n = p.len() / n_exp;
            let p: Vec<f64> = p[..n * n_exp].iter().map(|&v| f64::from(v) / 4.0).collect();
            let capacity = ((cap_frac * (n * k) as f64 / n_exp as f64).ceil() as usize).max(1);
            (n_exp, k, p, capacity)
        })
    }

    proptest! {
        /// The top-k op and the linear capacity passes decide exactly as the plain rule, ties
        /// and drops included (probabilities come from a few values, so rows hold many ties).
        #[test]
        fn host_routing_matches_the_plain_rule((n_exp, k, p, capacity) in routing_case()) {
            let n = p.len() / n_exp;
            let want = route_plain(&p, n_exp, k, capacity);
            let check = |choice: Vec<u32>| {
                same(&route_choices(&choice, n_exp, k, capacity), &want, &choice, n_exp, k)
            };
            prop_assert!(
                check(crate::fused::topk_host(&p, n_exp, k)),
                "n {n} experts {n_exp} top {k} capacity {capacity}"
            );
            let f32s: Vec<f32> = p.iter().map(|&v| v as f32).collect();
            prop_assert!(check(crate::fused::topk_host(&f32s, n_exp, k)));
            // The op, as the forward pass calls it.
            let probs = Tensor::from_vec(f32s, (n, n_exp), &Device::Cpu).unwrap();
            let choice = crate::fused::router_topk(&probs, k).unwrap();
            prop_assert_eq!(choice.dims(), &[n, k]);
            prop_assert!(check(choice.flatten_all().unwrap().to_vec1().unwrap()));
        }

        /// The batched experts' routing, laid out where the choice is (`fused::route_counts`
        /// and `fused::route_layout`, here their CPU versions, which the GPU test holds the
        /// kernels to), puts every kept assignment where the plain rule does, in blocks of
        /// either rule, with padding rows that read the zero row and feed no slot.
        #[test]
        fn device_routing_layout_matches_the_plain_rule(
            (n_exp, k, p, capacity) in routing_case(),
            align in 0usize..6,
        ) {
            let n = p.len() / n_exp;
            let want = route_plain(&p, n_exp, k, capacity);
            let choice = Tensor::from_vec(crate::fused::topk_host(&p, n_exp, k), (n, k), &Device::Cpu)
                .unwrap();
            let counts = crate::fused::route_counts(&choice, n_exp, capacity).unwrap();
            let host = counts.to_vec1::<u32>().unwrap();
            let kept: Vec<usize> = want.tokens.iter().map(Vec::len).collect();
            let got_kept: Vec<usize> = host[..n_exp].iter().map(|&c| c as usize).collect();
            prop_assert_eq!(&got_kept, &kept);
            let chosen: Vec<u64> = host[n_exp..].iter().map(|&c| u64::from(c)).collect();
            prop_assert_eq!(&chosen, &want.chosen_count);
            let blocks = if align == 0 { RowBlocks::Uniform } else { RowBlocks::Aligned(align) };
            let sizes = blocks.sizes(&kept);
            let rows: usize = sizes.iter().sum();
            let m = n * k;
            let out = crate::fused::route_layout(&choice, &counts, &kept, capacity, blocks)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            prop_assert_eq!(out.len(), 2 * rows + 1 + 2 * m);
            let (gather, rest) = out.split_at(rows);
            let (combine, rest) = rest.split_at(m);
            let (back, gate) = rest.split_at(rows + 1);
            let mut start = 0;
            for e in 0..n_exp {
                prop_assert!(sizes[e] >= kept[e]);
                for i in 0..sizes[e] {
                    let r = start + i;
                    match want.tokens[e].get(i) {
                        Some(&tok) => prop_assert_eq!(gather[r], tok),
                        None => {
                            prop_assert_eq!(gather[r], n as u32);
                            prop_assert_eq!(back[r], m as u32);
                        }
                    }
                }
                start += sizes[e];
            }
            prop_assert_eq!(back[rows], m as u32);
            let block_start: Vec<usize> = sizes
                .iter()
                .scan(0, |at, &s| { let b = *at; *at += s; Some(b) })
                .collect();
            for tok in 0..n {
                for j in 0..k {
                    let q = tok * k + j;
                    let e = want.choice[q] as usize;
                    let slot = j * n + tok;
                    if want.position[q] == u32::MAX {
                        prop_assert_eq!(combine[slot], rows as u32);
                        prop_assert_eq!(gate[q] as usize, e + n_exp);
                    } else {
                        let r = block_start[e] + want.position[q] as usize - want.offsets[e];
                        prop_assert_eq!(combine[slot], r as u32);
                        prop_assert_eq!(back[r], slot as u32);
                        prop_assert_eq!(gate[q] as usize, e);
                    }
                }
            }
        }
    }
}
