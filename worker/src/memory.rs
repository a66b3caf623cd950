//! How much memory one training step takes, estimated from the model and training configs
//! alone (pure arithmetic, no tensors), and the micro-batch that keeps a step under a cap.
//!
//! The estimate counts what a step holds at its peak on the device: the f32 master weights
//! (and their compute copy in bf16), their f32 gradients, AdamW's two f32 moments, and the
//! activations that the forward pass keeps for the backward pass. The backward pass of
//! candle keeps the gradient of every intermediate tensor until the step ends, so the
//! activations are counted twice. Per token and layer the counts follow the model's code:
//! attention keeps its normed input, q, k, v (before and after RoPE), output and residual,
//! plus the `heads x context` scores and probabilities; a SwiGLU keeps gate, up, their
//! activation and product; an expert layer keeps the router's logits and probabilities and a
//! SwiGLU per routed copy (top-k times the capacity factor); a Mamba mixer keeps its inner
//! projections and the `d_inner x d_state` states of its scan; the head keeps the logits in
//! the compute dtype and the f32 log-probabilities and their gradient. It is an estimate for
//! choosing a batch, not a bound: allocator slack and the runtime's own buffers come on top.
//!
//! When a batch does not fit, [`plan_batch`] picks the largest micro-batch that does; the
//! replica then accumulates the micro-batches' gradients (weighted by their rows) into one
//! optimizer step, so the effective batch, the learning-rate schedule and the data drawn are
//! those of the configured batch. Accumulation costs one more f32 gradient buffer. When not
//! even one sequence fits, the plan is refused with the figures and the setting to change.

use crate::config::{ComputeDType, FeedForward, Mixer, ModelConfig, TrainConfig};

/// The parts of one training step's memory, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepMemory {
    /// Master weights (f32) and their compute copy (bf16 compute only).
    pub weights: u64,
    /// Gradients of the trainable parameters (f32), twice when micro-batches accumulate.
    pub gradients: u64,
    /// AdamW's first and second moments (f32).
    pub optimizer: u64,
    /// Activations kept for the backward pass and their gradients, for the rows of one
    /// (micro-)batch.
    pub activations: u64,
}

impl StepMemory {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }
}

/// How a step runs under a memory cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// Rows of one forward and backward pass.
    pub micro_batch: usize,
    /// Passes per optimizer step (`ceil(batch_size / micro_batch)`); 1: no accumulation.
    pub micro_batches: usize,
    /// The estimate at that micro-batch.
    pub estimate: StepMemory,
}

/// Why no batch plan fits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error(
        "a training step needs about {need_mib} MiB even one sequence at a time \
         (weights {weights_mib} MiB, gradients {gradients_mib} MiB, optimizer {optimizer_mib} MiB, \
         activations {activations_mib} MiB for {seq_len} tokens), over the memory limit of \
         {limit_mib} MiB: raise `memory_limit_mb` to at least {need_mib}, or train a smaller \
         model or a shorter `seq_len`"
    )]
    TooLarge {
        need_mib: u64,
        limit_mib: u64,
        weights_mib: u64,
        gradients_mib: u64,
        optimizer_mib: u64,
        activations_mib: u64,
        seq_len: usize,
    },
    #[error("the model is too large to estimate its memory (the sizes overflow)")]
    Overflow,
}

/// Bytes of one value in `dtype`.
fn width(dtype: ComputeDType) -> u64 {
    match dtype {
        ComputeDType::F32 => 4,
        ComputeDType::Bf16 => 2,
    }
}

/// Values the forward pass keeps per token for one block (in the compute dtype), and per
/// token of the head in f32. `None` on overflow or a Mamba block without its config.
fn kept_per_token(model: &ModelConfig, seq: u64) -> Option<(u64, u64)> {
    let d = model.d_model as u64;
    let mut per_token = d; // the embedding's output
    for layer in 0..model.n_layers {
        let kind = model.layer_kind(layer);
        let mixer = match kind.mixer {
            // norm in and out, q, k, v, rotated q and k, attention output, projection,
            // residual; scores and probabilities over the sequence for every head.
            Mixer::Attention => {
                (11 * d).checked_add((model.n_heads as u64).checked_mul(seq)?.checked_mul(2)?)?
            }
            Mixer::Mamba => {
                let m = model.mamba.as_ref()?;
                let di = (m.expand as u64).checked_mul(d)?;
                let (n, r) = (m.d_state as u64, m.dt_rank as u64);
                // projections, convolution, activations, dt, output gate, then the scan's
                // states: one `d_state` vector per inner channel and token.
                di.checked_mul(8)?
                    .checked_add(di.checked_mul(n)?)?
                    .checked_add(r + 2 * n)?
                    .checked_add(4 * d)?
            }
        };
        let ffn = match kind.ffn {
            FeedForward::Dense => (4 * d).checked_add(4 * model.ffn_hidden as u64)?,
            FeedForward::Moe => {
                let e = model.n_experts as u64;
                let copies =
                    (model.top_k as f64 * f64::from(model.capacity_factor.max(1.0))).ceil() as u64;
                let per_copy = (2 * d).checked_add(4 * model.expert_hidden as u64)?;
                (4 * d)
                    .checked_add(2 * e)?
                    .checked_add(copies.checked_mul(per_copy)?)?
            }
            FeedForward::None => 0,
        };
        per_token = per_token.checked_add(mixer)?.checked_add(ffn)?;
    }
    let v = model.vocab as u64;
    // Final norm and logits in the compute dtype; log-probabilities and their gradient in f32.
    per_token = per_token.checked_add(2 * d)?.checked_add(v)?;
    Some((per_token, 2 * v))
}

/// The memory of one training step over `rows` sequences of `train.seq_len` tokens, for a
/// model whose every parameter trains. With `accumulating`, one more f32 gradient buffer
/// (micro-batches add into it). `None` when the sizes overflow.
pub fn estimate_step(
    model: &ModelConfig,
    train: &TrainConfig,
    rows: usize,
    accumulating: bool,
) -> Option<StepMemory> {
    let p = model.num_params()?;
    let e = width(train.compute_dtype);
    let copy = match train.compute_dtype {
        ComputeDType::F32 => 0,
        ComputeDType::Bf16 => 2,
    };
    let seq = train.seq_len as u64;
    let tokens = (rows as u64).checked_mul(seq)?;
    let (kept, head_f32) = kept_per_token(model, seq)?;
    let per_token = kept.checked_mul(e)?.checked_add(head_f32.checked_mul(4)?)?;
    Some(StepMemory {
        weights: p.checked_mul(4 + copy)?,
        gradients: p.checked_mul(if accumulating { 8 } else { 4 })?,
        optimizer: p.checked_mul(8)?,
        // Kept for the backward pass, and the gradient of each kept tensor.
        activations: tokens.checked_mul(per_token)?.checked_mul(2)?,
    })
}

/// The largest micro-batch (at most `train.batch_size`) whose step fits `limit` bytes.
pub fn plan_batch(
    model: &ModelConfig,
    train: &TrainConfig,
    limit: u64,
) -> Result<BatchPlan, MemoryError> {
    let batch = train.batch_size.max(1);
    let whole = estimate_step(model, train, batch, false).ok_or(MemoryError::Overflow)?;
    if whole.total() <= limit {
        return Ok(BatchPlan {
            micro_batch: batch,
            micro_batches: 1,
            estimate: whole,
        });
    }
    // Memory grows with the rows: search down from the batch for the first that fits.
    let mut best = None;
    let (mut lo, mut hi) = (1usize, batch - 1);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let est = estimate_step(model, train, mid, true).ok_or(MemoryError::Overflow)?;
        if est.total() <= limit {
            best = Some((mid, est));
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    match best {
        Some((micro_batch, estimate)) => Ok(BatchPlan {
            micro_batch,
            micro_batches: batch.div_ceil(micro_batch),
            estimate,
        }),
        None => {
            let one = estimate_step(model, train, 1, batch > 1).ok_or(MemoryError::Overflow)?;
            let mib = |b: u64| b.div_ceil(1 << 20);
            Err(MemoryError::TooLarge {
                need_mib: mib(one.total()),
                limit_mib: limit >> 20,
                weights_mib: mib(one.weights),
                gradients_mib: mib(one.gradients),
                optimizer_mib: mib(one.optimizer),
                activations_mib: mib(one.activations),
                seq_len: train.seq_len,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn train(batch: usize, seq: usize) -> TrainConfig {
        TrainConfig {
            batch_size: batch,
            seq_len: seq,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn the_state_is_sixteen_bytes_a_parameter_and_activations_grow_with_rows() {
        let m = ModelConfig::small();
        let p = m.num_params().unwrap();
        let one = estimate_step(&m, &train(1, 256), 1, false).unwrap();
        let eight = estimate_step(&m, &train(8, 256), 8, false).unwrap();
        assert_eq!(one.weights + one.gradients + one.optimizer, 16 * p);
        assert_eq!(eight.activations, 8 * one.activations);
        // bf16 adds a 2-byte copy of the weights and halves what the graph keeps (but not
        // the f32 log-probabilities).
        let mut bf = train(8, 256);
        bf.compute_dtype = ComputeDType::Bf16;
        let b = estimate_step(&m, &bf, 8, false).unwrap();
        assert_eq!(b.weights, 6 * p);
        assert!(b.activations < eight.activations && b.activations > eight.activations / 2);
        // Attention's scores grow with the square of the sequence: per token, longer
        // sequences cost more.
        let long = estimate_step(&m, &train(1, 1024), 1, false).unwrap();
        assert!(long.activations > 4 * one.activations);
    }

    #[test]
    fn a_batch_that_fits_runs_whole() {
        let m = ModelConfig::tiny();
        let t = train(8, 64);
        let need = estimate_step(&m, &t, 8, false).unwrap().total();
        let plan = plan_batch(&m, &t, need).unwrap();
        assert_eq!((plan.micro_batch, plan.micro_batches), (8, 1));
    }

    #[test]
    fn a_batch_over_the_cap_is_split_into_the_largest_micro_batch_that_fits() {
        let m = ModelConfig::small();
        let t = train(16, 256);
        let whole = estimate_step(&m, &t, 16, false).unwrap().total();
        let limit = whole * 2 / 3;
        let plan = plan_batch(&m, &t, limit).unwrap();
        assert!(plan.micro_batch < 16 && plan.micro_batch >= 1, "{plan:?}");
        assert!(plan.estimate.total() <= limit);
        assert_eq!(plan.micro_batches, 16usize.div_ceil(plan.micro_batch));
        // The accumulation buffer is counted, and one more row would not fit.
        assert_eq!(plan.estimate.gradients, 8 * m.num_params().unwrap());
        let more = estimate_step(&m, &t, plan.micro_batch + 1, true).unwrap();
        assert!(more.total() > limit);
    }

    #[test]
    fn a_step_that_does_not_fit_one_sequence_is_refused_with_what_it_needs() {
        let m = ModelConfig::small();
        let t = train(4, 256);
        let limit = 16 << 20;
        let err = plan_batch(&m, &t, limit).unwrap_err();
        let MemoryError::TooLarge {
            need_mib,
            limit_mib,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!(*limit_mib, 16);
        let one = estimate_step(&m, &t, 1, true).unwrap().total();
        assert_eq!(*need_mib, one.div_ceil(1 << 20));
        let text = err.to_string();
        assert!(
            text.contains("memory_limit_mb") && text.contains("16 MiB"),
            "{text}"
        );
    }

    #[test]
    fn absurd_configs_overflow_instead_of_wrapping() {
        let mut m = ModelConfig::tiny();
        m.d_model = usize::MAX / 2;
        assert_eq!(
            plan_batch(&m, &train(4, 64), 1 << 30).unwrap_err(),
            MemoryError::Overflow
        );
    }
}
