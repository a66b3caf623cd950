//! One training replica: the model, its inner AdamW and a step counter, plus everything the
//! swarm does with it: train on a shard, evaluate on the held-out split, read and write the
//! flat parameter vector, and save/load checkpoints (safetensors + `config.json`).
//!
//! A checkpoint directory holds `config.json` and the tensor files it names; the tensor files
//! carry the step in their names and `config.json` is renamed into place last, so a crash
//! mid-save leaves the previous checkpoint intact and loadable.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::WorkerError;
use crate::adapters::{AdapterConfig, AdapterModel};
use crate::checkpoint::{
    NamedTensor, read_f32_tensors, read_limited, serialize_f32_tensors, write_atomic,
    write_f32_tensors,
};
use crate::config::{DeviceSpec, LoraConfig, ModelConfig, TrainConfig};
use crate::data::{Batch, Dataset};
use crate::model::{Model, RouteStats, TrainGrads};
use crate::optim::AdamW;

/// Name of the checkpoint's metadata file.
pub const CONFIG_FILE: &str = "config.json";
/// The `format` field of a checkpoint's `config.json`: what tells a checkpoint from a
/// Hugging Face model directory, which also has a `config.json`.
pub const FORMAT: &str = "potluck-worker-checkpoint";
const FORMAT_VERSION: u32 = 1;
const ADAPTER_FORMAT: &str = "potluck-adapter-checkpoint";
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What a call to `train_steps` did.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Tokens trained on.
    pub tokens: u64,
    /// Mean cross-entropy over the steps (nats per token).
    pub mean_loss: f32,
    /// Cross-entropy of the last step.
    pub last_loss: f32,
    /// Mean load-balancing loss (summed over MoE layers, before its coefficient).
    pub mean_aux: f32,
    /// Gradient norm of the last step, before clipping.
    pub grad_norm: f32,
    /// Learning rate of the last step.
    pub lr: f32,
    /// Tokens processed by each expert of each MoE layer, summed over the steps.
    pub expert_tokens: Vec<Vec<u64>>,
    /// Expert assignments dropped for lack of capacity, summed over the steps.
    pub dropped: u64,
}

/// What [`Replica::compute_gradients`] produced.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    /// The gradient of the objective, one f32 per trainable value in layout order.
    pub grads: Vec<f32>,
    /// Tokens of the batch it was computed on.
    pub tokens: u64,
    /// Cross-entropy of the batch (nats per token).
    pub loss: f32,
    /// Summed load-balancing loss of the batch (before its coefficient).
    pub aux: f32,
}

/// The contents of `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointMeta {
    format: String,
    version: u32,
    model: ModelConfig,
    train: TrainConfig,
    step: u64,
    weights: String,
    optimizer: Option<String>,
    optimizer_steps: u64,
    lora: Option<LoraConfig>,
    lora_base: Option<PathBuf>,
}

/// The contents of an adapter checkpoint's `config.json`: the adapters' settings and the
/// content root of the base they were trained on, no model config (the base's own
/// `config.json` is part of that root).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdapterCheckpointMeta {
    format: String,
    version: u32,
    base_root: String,
    adapters: AdapterConfig,
    train: TrainConfig,
    step: u64,
    weights: String,
    optimizer: Option<String>,
    optimizer_steps: u64,
}

/// What [`Replica::accumulate`] returns: the row-weighted cross-entropy and load-balancing
/// loss, the summed routing counts, and the batch's gradient per trainable parameter.
type Accumulated = (f32, f32, RouteStats, Vec<Option<Tensor>>);

/// A model with its inner optimizer and step counter.
#[derive(Debug)]
pub struct Replica {
    /// The native model's config; `None` for adapters on a Hugging Face base.
    model_cfg: Option<ModelConfig>,
    train_cfg: TrainConfig,
    device_spec: DeviceSpec,
    net: Net,
    opt: AdamW,
    step: u64,
    lora_base: Option<PathBuf>,
    /// Rows per forward and backward pass when a step's batch is accumulated from
    /// micro-batches (a memory cap); 0: the whole batch at once.
    micro_batch: usize,
}

impl Replica {
    /// A freshly initialised replica (weights from `train.seed`).
    pub fn new(
        model: &ModelConfig,
        train: &TrainConfig,
        device: &DeviceSpec,
    ) -> Result<Self, WorkerError> {
        model.validate()?;
        train.validate(model)?;
        let dev = device.device()?;
        let m = Model::new(model, &dev, train.compute_dtype.dtype(), train.seed)?;
        Self::from_model(m, train, device, None)
    }

    /// A LoRA replica: frozen base weights from the safetensors file `base` (the layout of
    /// `model`), trainable adapters only. Flat parameters, checkpoints and updates then cover
    /// the adapters alone.
    pub fn new_lora(
        model: &ModelConfig,
        train: &TrainConfig,
        device: &DeviceSpec,
        base: &Path,
        lora: &LoraConfig,
    ) -> Result<Self, WorkerError> {
        model.validate()?;
        train.validate(model)?;
        let dev = device.device()?;
        let m = Model::with_lora(
            model,
            &dev,
            DType::F32,
            train.compute_dtype.dtype(),
            base,
            lora,
            train.seed,
        )?;
        Self::from_model(m, train, device, Some(base.to_path_buf()))
    }

    fn from_model(
        model: Model,
        train: &TrainConfig,
        device: &DeviceSpec,
        lora_base: Option<PathBuf>,
    ) -> Result<Self, WorkerError> {
        let opt = AdamW::new(model.trainable())?;
        Ok(Replica {
            model_cfg: Some(model.config().clone()),
            train_cfg: train.clone(),
            device_spec: *device,
            net: Net::Native(model),
            opt,
            step: 0,
            lora_base,
            micro_batch: 0,
        })
    }

    /// An adapter replica: LoRA adapters (`adapters`, their `A` matrices started from
    /// `train.seed`) on the frozen Hugging Face base in `base_dir`, whose content root the
    /// caller checked to be `base_root`. Flat parameters, updates and checkpoints then cover
    /// the adapters alone (see [`crate::adapters`]).
    pub fn new_adapters(
        base_dir: &Path,
        base_root: &str,
        adapters: &AdapterConfig,
        train: &TrainConfig,
        device: &DeviceSpec,
    ) -> Result<Self, WorkerError> {
        let dev = device.device()?;
        let m = AdapterModel::load(base_dir, base_root, adapters, train.seed, &dev)?;
        validate_adapter_train(train, &m)?;
        let opt = AdamW::new(m.trainable())?;
        Ok(Replica {
            model_cfg: None,
            train_cfg: train.clone(),
            device_spec: *device,
            net: Net::Adapters(m),
            opt,
            step: 0,
            lora_base: None,
            micro_batch: 0,
        })
    }

    /// The worker's own model; `None` for an adapter replica.
    pub fn model(&self) -> Option<&Model> {
        match &self.net {
            Net::Native(m) => Some(m),
            Net::Adapters(_) => None,
        }
    }

    /// The frozen base with its adapters; `None` for a replica of the worker's own model.
    pub fn adapter_model(&self) -> Option<&AdapterModel> {
        match &self.net {
            Net::Native(_) => None,
            Net::Adapters(a) => Some(a),
        }
    }

    /// Runs each MoE layer's experts as batched products or one at a time
    /// ([`Model::set_batched_experts`]); both compute the same function. No effect on an
    /// adapter replica.
    pub fn set_batched_experts(&mut self, on: bool) -> Result<(), WorkerError> {
        match &mut self.net {
            Net::Native(m) => m.set_batched_experts(on),
            Net::Adapters(_) => Ok(()),
        }
    }

    /// The layout batched experts run on ([`Model::set_expert_layout`]); all compute the
    /// same function. No effect on an adapter replica.
    pub fn set_expert_layout(&mut self, layout: crate::model::ExpertLayout) {
        if let Net::Native(m) = &mut self.net {
            m.set_expert_layout(layout);
        }
    }

    /// The native model's config; `None` for an adapter replica.
    pub fn model_config(&self) -> Option<&ModelConfig> {
        self.model_cfg.as_ref()
    }

    /// The training config.
    pub fn train_config(&self) -> &TrainConfig {
        &self.train_cfg
    }

    /// Inner optimizer steps taken so far (drives the learning-rate schedule).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The device the replica runs on.
    pub fn device_spec(&self) -> DeviceSpec {
        self.device_spec
    }

    fn batch_tensors(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        let seq = inputs.len() / batch.max(1);
        if inputs.len() != batch * seq || targets.len() != inputs.len() || seq == 0 {
            return Err(WorkerError::Mismatch(format!(
                "batch of {} inputs / {} targets does not form {batch} rows",
                inputs.len(),
                targets.len()
            )));
        }
        if let Some(t) = inputs
            .iter()
            .chain(targets)
            .find(|&&t| t as usize >= self.net.vocab())
        {
            return Err(WorkerError::Data(format!(
                "token {t} is outside the model vocabulary {}",
                self.net.vocab()
            )));
        }
        let dev = self.net.device();
        Ok((
            Tensor::from_slice(inputs, (batch, seq), dev)?,
            Tensor::from_slice(targets, (batch, seq), dev)?,
        ))
    }

    /// Runs every step's batch as micro-batches of at most `rows` rows whose gradients are
    /// accumulated into one optimizer step (see [`crate::memory`]); 0 or at least the batch:
    /// the whole batch at once.
    pub fn set_micro_batch(&mut self, rows: usize) {
        self.micro_batch = rows;
    }

    /// Rows per forward and backward pass (0: the whole batch).
    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// One optimizer step on a given batch (`batch` rows, row-major). Returns the
    /// cross-entropy, the summed load-balancing loss, routing counts and the gradient norm.
    pub fn train_on_batch(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<(f32, f32, RouteStats, f64), WorkerError> {
        if self.micro_batch > 0 && self.micro_batch < batch {
            let (ce, aux, stats, grads) = self.accumulate(inputs, targets, batch)?;
            let lr = self.train_cfg.lr_at(self.step);
            let norm = self
                .net
                .optimizer_step(&mut self.opt, &grads, &self.train_cfg, lr)?;
            self.step += 1;
            return Ok((ce, aux, stats, norm));
        }
        let pass = self.forward_backward(inputs, targets, batch)?;
        let lr = self.train_cfg.lr_at(self.step);
        let norm = self
            .net
            .optimizer_step(&mut self.opt, &pass.grads, &self.train_cfg, lr)?;
        // Without checkpointing the pass holds its gradient store (every intermediate
        // gradient), freed after the optimizer's launches, while the GPU runs them, not
        // before them.
        let TrainGrads { ce, aux, stats, .. } = pass;
        self.step += 1;
        Ok((ce, aux, stats, norm))
    }
    /// The gradients of a batch computed micro-batch by micro-batch: each pass's gradients
    /// are weighted by its share of the rows and summed in f32 (the masters' dtype), so the
    /// result is the gradient of the batch's mean loss, up to the per-micro-batch expert
    /// capacity and load-balancing loss of MoE layers. Only one micro-batch's graph is alive
    /// at a time. The losses are the row-weighted means; the routing counts are summed.
    fn accumulate(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<Accumulated, WorkerError> {
        let seq = inputs.len() / batch.max(1);
        if inputs.len() != batch * seq || targets.len() != inputs.len() {
            return Err(WorkerError::Mismatch(format!(
                "batch of {} inputs / {} targets does not form {batch} rows",
                inputs.len(),
                targets.len()
            )));
        }
        let mut sum: Vec<Option<Tensor>> = Vec::new();
        let (mut ce, mut aux) = (0f64, 0f64);
        let mut stats = RouteStats::default();
        let mut row = 0;
        while row < batch {
            let rows = self.micro_batch.min(batch - row);
            let span = row * seq..(row + rows) * seq;
            let TrainGrads {
                ce: c,
                aux: a,
                stats: s,
                grads,
                ..
            } = self.forward_backward(&inputs[span.clone()], &targets[span], rows)?;
            let w = rows as f64 / batch as f64;
            if sum.is_empty() {
                sum = vec![None; grads.len()];
            }
            for (acc, g) in sum.iter_mut().zip(grads) {
                let Some(g) = g else { continue };
                let g = g.to_dtype(DType::F32)?.affine(w, 0.0)?;
                *acc = Some(match acc.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
            ce += f64::from(c) * w;
            aux += f64::from(a) * w;
            stats.dropped += s.dropped;
            if stats.expert_tokens.is_empty() {
                stats.expert_tokens = s.expert_tokens;
            } else {
                for (acc, layer) in stats.expert_tokens.iter_mut().zip(s.expert_tokens) {
                    for (x, n) in acc.iter_mut().zip(layer) {
                        *x += n;
                    }
                }
            }
            row += rows;
        }
        Ok((ce as f32, aux as f32, stats, sum))
    }

    /// The forward and backward pass of one batch, with or without gradient checkpointing as
    /// the training config says: the cross-entropy and the summed load-balancing loss (both
    /// refused when not finite), the routing counts, and the gradient of every trainable
    /// parameter.
    fn forward_backward(
        &self,
        inputs: &[u32],
        targets: &[u32],
        batch: usize,
    ) -> Result<TrainGrads, WorkerError> {
        let (x, y) = self.batch_tensors(inputs, targets, batch)?;
        let model = match &self.net {
            Net::Native(m) => m,
            Net::Adapters(a) => {
                let seed = dropout_seed(self.train_cfg.seed, self.step, inputs);
                let loss = a.loss(inputs, targets, batch, Some(seed))?;
                let ce = loss.to_scalar::<f32>()?;
                if !ce.is_finite() {
                    return Err(WorkerError::NonFinite(format!(
                        "loss {ce} at step {}",
                        self.step
                    )));
                }
                let store = loss.backward()?;
                let grads = self.net.param_grads(&store)?;
                return Ok(TrainGrads::from_parts(
                    ce,
                    0.0,
                    RouteStats::default(),
                    grads,
                    Some(store),
                ));
            }
        };
        let pass = model.train_grads(&x, &y, self.train_cfg.checkpointing)?;
        if !pass.ce.is_finite() || !pass.aux.is_finite() {
            return Err(WorkerError::NonFinite(format!(
                "loss {}, aux {} at step {}",
                pass.ce, pass.aux, self.step
            )));
        }
        Ok(pass)
    }

    /// Runs `steps` inner steps on shard `shard` of `data`. Batches are drawn from a stream
    /// seeded by (seed, shard, step), so a run is reproducible and a resumed replica draws the
    /// batches it would have drawn without the restart.
    pub fn train_steps(
        &mut self,
        data: &Dataset,
        shard: u64,
        steps: usize,
    ) -> Result<StepStats, WorkerError> {
        self.check_vocab(data)?;
        let (batch, seq) = (self.train_cfg.batch_size, self.train_cfg.seq_len);
        let mut stats = StepStats::default();
        let (mut loss_sum, mut aux_sum) = (0f64, 0f64);
        for _ in 0..steps {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&self.train_cfg.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&shard.to_le_bytes());
            seed[16..24].copy_from_slice(&self.step.to_le_bytes());
            let mut rng = ChaCha8Rng::from_seed(seed);
            let (inputs, targets) = data.sample_batch(shard, batch, seq, &mut rng)?;
            stats.lr = self.train_cfg.lr_at(self.step);
            let (ce, aux, route, norm) = self.train_on_batch(&inputs, &targets, batch)?;
            loss_sum += ce as f64;
            aux_sum += aux as f64;
            stats.last_loss = ce;
            stats.grad_norm = norm as f32;
            stats.steps += 1;
            stats.tokens += (batch * seq) as u64;
            stats.dropped += route.dropped;
            if stats.expert_tokens.is_empty() {
                stats.expert_tokens = route.expert_tokens;
            } else {
                for (acc, layer) in stats.expert_tokens.iter_mut().zip(route.expert_tokens) {
                    for (a, c) in acc.iter_mut().zip(layer) {
                        *a += c;
                    }
                }
            }
        }
        if stats.steps > 0 {
            stats.mean_loss = (loss_sum / stats.steps as f64) as f32;
            stats.mean_aux = (aux_sum / stats.steps as f64) as f32;
        }
        Ok(stats)
    }

    /// The batch of inner step `step` on shard `shard`: drawn from a stream seeded by
    /// (seed, shard, step), the batch `train_steps` trains on at that step.
    fn batch_at(&self, data: &Dataset, shard: u64, step: u64) -> Result<Batch, WorkerError> {
        self.check_vocab(data)?;
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.train_cfg.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&shard.to_le_bytes());
        seed[16..24].copy_from_slice(&step.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(seed);
        let (batch, seq) = (self.train_cfg.batch_size, self.train_cfg.seq_len);
        data.sample_batch(shard, batch, seq, &mut rng)
    }

    /// The gradient of the training objective (cross-entropy plus the weighted
    /// load-balancing loss) on the batch that `train_steps` would train on at the current
    /// step of shard `shard`, as one f32 vector in layout order (a parameter without a
    /// gradient contributes zeros). Nothing changes: no step is taken, and the step counter
    /// stays. This is the first half of a plain data-parallel step; the swarm averages the
    /// replicas' gradients and each replica applies the mean with [`Replica::apply_gradients`].
    pub fn compute_gradients(&self, data: &Dataset, shard: u64) -> Result<Gradients, WorkerError> {
        let (inputs, targets) = self.batch_at(data, shard, self.step)?;
        let batch = self.train_cfg.batch_size;
        let TrainGrads { ce, aux, grads, .. } = self.forward_backward(&inputs, &targets, batch)?;
        let mut flat = Vec::with_capacity(self.num_params());
        for ((_, v), g) in self.net.trainable().iter().zip(&grads) {
            match g {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, v.elem_count())),
            }
        }
        Ok(Gradients {
            grads: flat,
            tokens: inputs.len() as u64,
            loss: ce,
            aux,
        })
    }

    /// Applies a gradient (one f32 vector in layout order, e.g. the swarm's mean of the
    /// replicas' [`Replica::compute_gradients`]) with the inner AdamW, exactly as
    /// `train_steps` applies its own: the learning rate of the current step, the global norm
    /// clipped to `grad_clip`, weight decay on matrices; then the step counter advances.
    /// Replicas holding the same weights and optimizer state that apply the same gradient
    /// end bit-identical (on the CPU with f32 masters, where the update is a scalar loop in
    /// index order). Returns the gradient norm before clipping; a non-finite gradient is
    /// refused and changes nothing.
    pub fn apply_gradients(&mut self, flat: &[f32]) -> Result<f64, WorkerError> {
        if flat.len() != self.num_params() {
            return Err(WorkerError::Mismatch(format!(
                "gradient has {} values, the model has {}",
                flat.len(),
                self.num_params()
            )));
        }
        let mut grads = Vec::with_capacity(self.net.trainable().len());
        let mut off = 0;
        for (_, v) in self.net.trainable() {
            let n = v.elem_count();
            let g = Tensor::from_slice(&flat[off..off + n], v.dims(), self.net.device())?
                .to_dtype(self.net.master_dtype())?;
            grads.push(Some(g));
            off += n;
        }
        let lr = self.train_cfg.lr_at(self.step);
        let norm = self
            .net
            .optimizer_step(&mut self.opt, &grads, &self.train_cfg, lr)?;
        self.step += 1;
        Ok(norm)
    }

    /// Mean cross-entropy (nats per token) on up to `max_batches` held-out batches of the
    /// training batch shape.
    pub fn eval_loss(&self, data: &Dataset, max_batches: usize) -> Result<f32, WorkerError> {
        let (batch, seq) = (self.train_cfg.batch_size, self.train_cfg.seq_len);
        let batches = data.eval_batches(batch, seq, max_batches)?;
        let model = match &self.net {
            Net::Native(m) => m,
            Net::Adapters(a) => {
                self.check_vocab(data)?;
                let mut sum = 0f64;
                for (inputs, targets) in &batches {
                    let ce = a.loss(inputs, targets, batch, None)?;
                    sum += f64::from(ce.to_scalar::<f32>()?);
                }
                return Ok((sum / batches.len() as f64) as f32);
            }
        };
        let w = model.weights(false)?;
        let mut sum = 0f64;
        for (inputs, targets) in &batches {
            let (x, y) = self.batch_tensors(inputs, targets, batch)?;
            let run = model.run_stage(&w, &model.full_stage(), &x, Some(&y))?;
            let ce = run
                .ce
                .ok_or_else(|| WorkerError::Mismatch("no loss computed".into()))?;
            sum += ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok((sum / batches.len() as f64) as f32)
    }

    /// Names and shapes of the trainable parameters, in the fixed order of `flat_params`.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.net.param_layout()
    }

    /// Number of trainable values (the length of `flat_params`).
    pub fn num_params(&self) -> usize {
        self.net
            .trainable()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// A deep copy of the trainable parameters as one f32 vector in layout order. This is
    /// the snapshot the swarm keeps as `theta_start`; later training does not change it.
    pub fn flat_params(&self) -> Result<Vec<f32>, WorkerError> {
        let mut out = Vec::with_capacity(self.num_params());
        for (_, v) in self.net.trainable() {
            out.extend(
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }

    /// Overwrites the trainable parameters from a flat vector in layout order. The inner
    /// optimizer state is kept (DiLoCo keeps it across rounds).
    pub fn set_flat_params(&mut self, flat: &[f32]) -> Result<(), WorkerError> {
        if flat.len() != self.num_params() {
            return Err(WorkerError::Mismatch(format!(
                "flat vector has {} values, the model has {}",
                flat.len(),
                self.num_params()
            )));
        }
        let mut off = 0;
        for (_, v) in self.net.trainable() {
            let n = v.elem_count();
            let t = Tensor::from_slice(&flat[off..off + n], v.dims(), self.net.device())?
                .to_dtype(self.net.master_dtype())?;
            v.set(&t)?;
            off += n;
        }
        self.net.sync_compute()?;
        Ok(())
    }

    /// The inner AdamW state, flattened in layout order like [`Self::flat_params`]: the
    /// optimizer's step count, then the first and the second moments. Data-parallel replicas
    /// share it as part of a round's state, so that one that joins or resyncs applies the
    /// swarm's gradients with the swarm's moments.
    pub fn flat_optimizer_state(&self) -> Result<(u64, Vec<f32>, Vec<f32>), WorkerError> {
        let (m, v) = self.opt.moments();
        let flat = |ts: &[Tensor]| -> Result<Vec<f32>, WorkerError> {
            let mut out = Vec::with_capacity(self.num_params());
            for t in ts {
                out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        Ok((self.opt.steps(), flat(m)?, flat(v)?))
    }

    /// Replaces the inner AdamW state with one from [`Self::flat_optimizer_state`].
    pub fn set_flat_optimizer_state(
        &mut self,
        steps: u64,
        m: &[f32],
        v: &[f32],
    ) -> Result<(), WorkerError> {
        let n = self.num_params();
        if m.len() != n || v.len() != n {
            return Err(WorkerError::Mismatch(format!(
                "optimizer state has {} and {} values, the model has {n}",
                m.len(),
                v.len()
            )));
        }
        let dev = self.net.device().clone();
        let master = self.net.master_dtype();
        let split = |flat: &[f32]| -> Result<Vec<Tensor>, WorkerError> {
            let mut out = Vec::new();
            let mut off = 0;
            for (_, var) in self.net.trainable() {
                let k = var.elem_count();
                out.push(
                    Tensor::from_slice(&flat[off..off + k], var.dims(), &dev)?.to_dtype(master)?,
                );
                off += k;
            }
            Ok(out)
        };
        let (m, v) = (split(m)?, split(v)?);
        self.opt.set_state(steps, m, v)
    }

    fn tensors_of(
        &self,
        tensors: &[Tensor],
        prefix: &str,
    ) -> Result<Vec<NamedTensor>, WorkerError> {
        let mut out = Vec::with_capacity(tensors.len());
        for ((name, _), t) in self.net.trainable().iter().zip(tensors) {
            out.push((
                format!("{prefix}{name}"),
                t.dims().to_vec(),
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            ));
        }
        Ok(out)
    }

    /// Saves the trainable weights (and, with `with_optimizer`, the AdamW moments) to
    /// safetensors in `dir`, with `config.json` written last so the save is atomic.
    pub fn save_checkpoint(&self, dir: &Path, with_optimizer: bool) -> Result<(), WorkerError> {
        std::fs::create_dir_all(dir).map_err(|e| WorkerError::io(dir, e))?;
        let weights: Vec<Tensor> = self
            .net
            .trainable()
            .iter()
            .map(|(_, v)| v.as_tensor().detach())
            .collect();
        let weights_name = format!("weights-{:012}.safetensors", self.step);
        write_f32_tensors(&dir.join(&weights_name), &self.tensors_of(&weights, "")?)?;
        let optimizer_name = if with_optimizer {
            let name = format!("optimizer-{:012}.safetensors", self.step);
            let (m, v) = self.opt.moments();
            let mut all = self.tensors_of(m, "m.")?;
            all.extend(self.tensors_of(v, "v.")?);
            write_f32_tensors(&dir.join(&name), &all)?;
            Some(name)
        } else {
            None
        };
        let json = self.meta_json(
            dir,
            self.step,
            &weights_name,
            optimizer_name.clone(),
            if with_optimizer { self.opt.steps() } else { 0 },
        )?;
        write_atomic(&dir.join(CONFIG_FILE), &json)?;
        // Older tensor files are no longer referenced; removing them is best-effort.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with("weights-") || name.starts_with("optimizer-");
                let live = name == weights_name || Some(&name) == optimizer_name.as_ref();
                if ours && name.ends_with(".safetensors") && !live {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn meta_json(
        &self,
        dir: &Path,
        step: u64,
        weights: &str,
        optimizer: Option<String>,
        optimizer_steps: u64,
    ) -> Result<Vec<u8>, WorkerError> {
        let model = match (&self.net, &self.model_cfg) {
            (Net::Adapters(a), _) => {
                let meta = AdapterCheckpointMeta {
                    format: ADAPTER_FORMAT.into(),
                    version: FORMAT_VERSION,
                    base_root: a.base_root().to_string(),
                    adapters: a.config().clone(),
                    train: self.train_cfg.clone(),
                    step,
                    weights: weights.to_string(),
                    optimizer,
                    optimizer_steps,
                };
                return serde_json::to_vec_pretty(&meta)
                    .map_err(|e| WorkerError::checkpoint(dir, format!("serialise config: {e}")));
            }
            (Net::Native(_), Some(cfg)) => cfg.clone(),
            (Net::Native(_), None) => {
                return Err(WorkerError::checkpoint(
                    dir,
                    "a native replica without its config",
                ));
            }
        };
        let meta = CheckpointMeta {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            model,
            train: self.train_cfg.clone(),
            step,
            weights: weights.to_string(),
            optimizer,
            optimizer_steps,
            lora: self.net.lora().cloned(),
            lora_base: self.lora_base.clone(),
        };
        serde_json::to_vec_pretty(&meta)
            .map_err(|e| WorkerError::checkpoint(dir, format!("serialise config: {e}")))
    }

    /// The files of a weights-only checkpoint of `flat` (in layout order) at `step`, in
    /// memory: byte for byte what `save_checkpoint(dir, false)` writes for the same weights
    /// at the same step. Replicas holding the same weights at the same step get the same
    /// bytes, so the swarm hashes these files to name a round's state.
    pub fn checkpoint_files(
        &self,
        flat: &[f32],
        step: u64,
    ) -> Result<Vec<(String, Vec<u8>)>, WorkerError> {
        if flat.len() != self.num_params() {
            return Err(WorkerError::Mismatch(format!(
                "flat vector has {} values, the model has {}",
                flat.len(),
                self.num_params()
            )));
        }
        let mut tensors: Vec<NamedTensor> = Vec::new();
        let mut off = 0;
        for (name, shape) in self.param_layout() {
            let n: usize = shape.iter().product();
            tensors.push((name, shape, flat[off..off + n].to_vec()));
            off += n;
        }
        let weights_name = format!("weights-{step:012}.safetensors");
        let here = Path::new(&weights_name);
        let weights = serialize_f32_tensors(here, &tensors)?;
        let json = self.meta_json(Path::new(CONFIG_FILE), step, &weights_name, None, 0)?;
        Ok(vec![
            (weights_name, weights),
            (CONFIG_FILE.to_string(), json),
        ])
    }

    /// Sets the step counter (the learning-rate schedule follows it): a replica that joins
    /// a run, or resyncs, takes the swarm's step.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Loads a checkpoint written by `save_checkpoint` onto `device`. The weights come back
    /// bit-exact; the optimizer state too when it was saved (otherwise it starts at zero).
    pub fn load_checkpoint(dir: &Path, device: &DeviceSpec) -> Result<Self, WorkerError> {
        let cfg_path = dir.join(CONFIG_FILE);
        let bytes = read_limited(&cfg_path, MAX_CONFIG_BYTES)?;
        if peek_format(&cfg_path, &bytes)? == ADAPTER_FORMAT {
            return Err(WorkerError::checkpoint(
                &cfg_path,
                "this is an adapter checkpoint: load it with its base \
                 (Replica::load_adapter_checkpoint)",
            ));
        }
        let meta: CheckpointMeta = serde_json::from_slice(&bytes).map_err(|e| {
            WorkerError::checkpoint(&cfg_path, format!("malformed config.json: {e}"))
        })?;
        check_format(&cfg_path, &meta.format, meta.version, FORMAT)?;
        meta.model
            .validate()
            .and_then(|_| meta.train.validate(&meta.model))
            .map_err(|e| WorkerError::checkpoint(&cfg_path, e.to_string()))?;
        let mut replica = match (&meta.lora, &meta.lora_base) {
            (None, None) => Self::new(&meta.model, &meta.train, device)?,
            (Some(lora), Some(base)) => {
                Self::new_lora(&meta.model, &meta.train, device, base, lora)?
            }
            _ => {
                return Err(WorkerError::checkpoint(
                    &cfg_path,
                    "lora and lora_base must be given together",
                ));
            }
        };
        replica.restore(
            dir,
            &meta.weights,
            meta.optimizer.as_deref(),
            meta.optimizer_steps,
        )?;
        replica.step = meta.step;
        Ok(replica)
    }

    /// Loads an adapter checkpoint written by `save_checkpoint` of an adapter replica, on
    /// the base in `base_dir`, whose content root the caller checked to be `base_root`: a
    /// checkpoint of another base is refused, naming both roots.
    pub fn load_adapter_checkpoint(
        dir: &Path,
        base_dir: &Path,
        base_root: &str,
        device: &DeviceSpec,
    ) -> Result<Self, WorkerError> {
        let meta = read_adapter_meta(dir)?;
        let cfg_path = dir.join(CONFIG_FILE);
        if meta.base_root != base_root {
            return Err(WorkerError::checkpoint(
                &cfg_path,
                format!(
                    "the adapters were trained on the base of root {}, not on {base_root}: \
                     give the base they name",
                    meta.base_root
                ),
            ));
        }
        let mut replica =
            Self::new_adapters(base_dir, base_root, &meta.adapters, &meta.train, device)?;
        replica.restore(
            dir,
            &meta.weights,
            meta.optimizer.as_deref(),
            meta.optimizer_steps,
        )?;
        replica.step = meta.step;
        Ok(replica)
    }

    /// Reads the weights (and the optimizer state, when named) of a checkpoint in `dir`
    /// into this replica, whose layout they must have.
    fn restore(
        &mut self,
        dir: &Path,
        weights: &str,
        optimizer: Option<&str>,
        optimizer_steps: u64,
    ) -> Result<(), WorkerError> {
        let cfg_path = dir.join(CONFIG_FILE);
        let layout = self.param_layout();
        let weights = read_f32_tensors(&dir.join(checked_file_name(&cfg_path, weights)?), &layout)?;
        let flat: Vec<f32> = weights.into_iter().flatten().collect();
        self.set_flat_params(&flat)?;
        if let Some(opt_name) = optimizer {
            let mut opt_layout: Vec<(String, Vec<usize>)> = layout
                .iter()
                .map(|(n, s)| (format!("m.{n}"), s.clone()))
                .collect();
            opt_layout.extend(layout.iter().map(|(n, s)| (format!("v.{n}"), s.clone())));
            let values = read_f32_tensors(
                &dir.join(checked_file_name(&cfg_path, opt_name)?),
                &opt_layout,
            )?;
            let dev = self.net.device().clone();
            let master = self.net.master_dtype();
            let mut tensors = Vec::with_capacity(values.len());
            for ((_, shape), v) in opt_layout.iter().zip(values) {
                tensors.push(Tensor::from_vec(v, shape.as_slice(), &dev)?.to_dtype(master)?);
            }
            let v = tensors.split_off(layout.len());
            self.opt.set_state(optimizer_steps, tensors, v)?;
        }
        Ok(())
    }

    fn check_vocab(&self, data: &Dataset) -> Result<(), WorkerError> {
        if data.vocab() <= self.net.vocab() {
            return Ok(());
        }
        let hint = match &self.net {
            Net::Native(_) => "raise the model's vocab",
            Net::Adapters(_) => {
                "train on the base's own tokenizer.json (or bytes, when the base has at least \
                 256 tokens)"
            }
        };
        Err(WorkerError::Data(format!(
            "data vocabulary {} is larger than the model's {}: {hint}",
            data.vocab(),
            self.net.vocab()
        )))
    }
}

/// The base root and adapter settings an adapter checkpoint in `dir` names (its
/// `config.json`, size-limited), without loading anything else.
pub fn adapter_checkpoint_base(dir: &Path) -> Result<(String, AdapterConfig), WorkerError> {
    let meta = read_adapter_meta(dir)?;
    Ok((meta.base_root, meta.adapters))
}

fn read_adapter_meta(dir: &Path) -> Result<AdapterCheckpointMeta, WorkerError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let bytes = read_limited(&cfg_path, MAX_CONFIG_BYTES)?;
    let meta: AdapterCheckpointMeta = serde_json::from_slice(&bytes).map_err(|e| {
        WorkerError::checkpoint(&cfg_path, format!("malformed adapter config.json: {e}"))
    })?;
    check_format(&cfg_path, &meta.format, meta.version, ADAPTER_FORMAT)?;
    Ok(meta)
}

/// Refuses a checkpoint whose `config.json` names another format than `want` or another
/// version than this build writes.
fn check_format(
    cfg_path: &Path,
    format: &str,
    version: u32,
    want: &str,
) -> Result<(), WorkerError> {
    if format != want || version != FORMAT_VERSION {
        return Err(WorkerError::checkpoint(
            cfg_path,
            format!("format {format} v{version} is not {want} v{FORMAT_VERSION}"),
        ));
    }
    Ok(())
}

/// The `format` of a checkpoint's `config.json`.
fn peek_format(cfg_path: &Path, bytes: &[u8]) -> Result<String, WorkerError> {
    #[derive(Deserialize)]
    struct Peek {
        format: String,
    }
    serde_json::from_slice::<Peek>(bytes)
        .map(|p| p.format)
        .map_err(|e| WorkerError::checkpoint(cfg_path, format!("malformed config.json: {e}")))
}

/// The seed of an adapter step's dropout masks: the run's seed, the step and the batch's
/// first ids (so the micro-batches of one step draw different masks), mixed with
/// splitmix64's constants: every replica derives the same one.
fn dropout_seed(seed: u64, step: u64, inputs: &[u32]) -> u64 {
    let mut x = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &t in inputs.iter().take(4) {
        x = (x ^ u64::from(t)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

/// The step settings an adapter replica needs from its base: sequences that fit its
/// positions.
fn validate_adapter_train(train: &TrainConfig, m: &AdapterModel) -> Result<(), WorkerError> {
    if train.batch_size == 0 || train.seq_len < 2 {
        return Err(WorkerError::Config(format!(
            "batch_size {} and seq_len {} must be at least 1 and 2",
            train.batch_size, train.seq_len
        )));
    }
    if train.seq_len + 1 > m.max_positions() {
        return Err(WorkerError::Config(format!(
            "seq_len {} needs {} positions; the base has {} (max_position_embeddings)",
            train.seq_len,
            train.seq_len + 1,
            m.max_positions()
        )));
    }
    Ok(())
}

/// What a replica trains: the worker's own model, or adapters on a frozen Hugging Face
/// base. Everything the swarm sees (flat parameters, optimizer state, checkpoints) goes
/// through the trainable list, so the rest of the replica is one path for both.
#[derive(Debug)]
enum Net {
    Native(Model),
    Adapters(AdapterModel),
}

impl Net {
    fn trainable(&self) -> &[(String, Var)] {
        match self {
            Net::Native(m) => m.trainable(),
            Net::Adapters(a) => a.trainable(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Net::Native(m) => m.device(),
            Net::Adapters(a) => a.device(),
        }
    }

    fn master_dtype(&self) -> DType {
        match self {
            Net::Native(m) => m.master_dtype(),
            Net::Adapters(_) => DType::F32,
        }
    }

    fn vocab(&self) -> usize {
        match self {
            Net::Native(m) => m.config().vocab,
            Net::Adapters(a) => a.vocab(),
        }
    }

    fn lora(&self) -> Option<&LoraConfig> {
        match self {
            Net::Native(m) => m.lora(),
            Net::Adapters(_) => None,
        }
    }

    fn sync_compute(&self) -> Result<(), WorkerError> {
        match self {
            Net::Native(m) => m.sync_compute(),
            Net::Adapters(_) => Ok(()),
        }
    }

    fn param_grads(&self, store: &GradStore) -> Result<Vec<Option<Tensor>>, WorkerError> {
        match self {
            Net::Native(m) => m.param_grads(store),
            Net::Adapters(a) => Ok(a
                .trainable()
                .iter()
                .map(|(_, v)| store.get(v.as_tensor()).cloned())
                .collect()),
        }
    }

    fn optimizer_step(
        &self,
        opt: &mut AdamW,
        grads: &[Option<Tensor>],
        cfg: &TrainConfig,
        lr: f32,
    ) -> Result<f64, WorkerError> {
        match self {
            Net::Native(m) => m.optimizer_step(opt, grads, cfg, lr),
            Net::Adapters(a) => {
                let none = vec![None; a.trainable().len()];
                Ok(opt.step_params(a.trainable(), grads, &none, cfg, lr)?.0)
            }
        }
    }

    fn param_layout(&self) -> Vec<(String, Vec<usize>)> {
        self.trainable()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect()
    }
}

/// A file name from `config.json` must name a plain file inside the checkpoint directory.
fn checked_file_name<'a>(cfg_path: &Path, name: &'a str) -> Result<&'a str, WorkerError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(name)
    } else {
        Err(WorkerError::checkpoint(
            cfg_path,
            format!("file name {name:?} is not allowed"),
        ))
    }
}
