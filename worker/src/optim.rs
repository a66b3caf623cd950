//! Optimizers. The inner AdamW keeps f32 moments next to the f32 master weights (candle's
//! own AdamW keeps them in the parameter dtype) and applies decoupled weight decay to
//! matrices only. The outer Nesterov step of the swarm runs as a plain Rust loop over f32
//! values in a fixed order: no kernel fusion, no reordering, so every replica that applies
//! the same averaged update to the same weights gets bit-identical results.
//!
//! Off the CPU (a GPU, or f64 masters) the inner step runs over all parameters at once, on
//! flat buffers: candle launches one kernel per op, and a per-parameter update of ~15 ops
//! over hundreds of parameters is thousands of small launches, which cost more than the
//! arithmetic (measured on the H100: 258 ms of a 1014 ms step of the `base` benchmark model).
//! The norm and the update are then one fused kernel each (`fused::sum_squares`,
//! `fused::adamw_flat`).

use candle_core::{DType, Tensor, Var, backprop::GradStore};

use crate::WorkerError;
use crate::config::TrainConfig;

/// AdamW over a fixed list of parameters, moments in the masters' dtype (f32 or f64).
#[derive(Debug)]
pub struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The moments of the flat path as two flat buffers; `m` and `v` are then views into
    /// them. Built on the first flat step (and again after `set_state`).
    flat: Option<FlatState>,
    t: u64,
}

/// State of the flat (device) update.
#[derive(Debug)]
struct FlatState {
    /// The first moments of all parameters, then the second moments: `[2n]`.
    mv: Tensor,
    /// 1 for the elements of matrices (which decay), 0 for vectors (which do not).
    decay_mask: Tensor,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &[(String, Var)]) -> Result<Self, WorkerError> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for (_, p) in params {
            m.push(p.as_tensor().zeros_like()?);
            v.push(p.as_tensor().zeros_like()?);
        }
        Ok(AdamW {
            m,
            v,
            flat: None,
            t: 0,
        })
    }

    /// Steps taken so far (the bias-correction counter).
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// First and second moments, in parameter order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Replaces the state (after a restart). Shapes must match the current moments.
    pub fn set_state(&mut self, t: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<(), WorkerError> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(WorkerError::Mismatch(
                "optimizer state has the wrong length".into(),
            ));
        }
        for (new, old) in m.iter().zip(&self.m).chain(v.iter().zip(&self.v)) {
            if new.dims() != old.dims() {
                return Err(WorkerError::Mismatch(format!(
                    "optimizer moment {:?} does not match {:?}",
                    new.dims(),
                    old.dims()
                )));
            }
        }
        self.m = m;
        self.v = v;
        self.flat = None;
        self.t = t;
        Ok(())
    }

    /// Global L2 norm of the gradients of `params` (missing gradients count as zero).
    pub fn grad_norm(params: &[(String, Var)], grads: &GradStore) -> Result<f64, WorkerError> {
        let mut total = 0f64;
        // Per-parameter sums of squares stay on the device and are read back once: reading
        // each one separately costs a device synchronisation per parameter on a GPU.
        let mut on_device = Vec::new();
        for (_, p) in params {
            if let Some(g) = grads.get(p.as_tensor()) {
                if g.device().is_cpu() && g.dtype() == DType::F32 {
                    let values: Vec<f32> = g.flatten_all()?.to_vec1()?;
                    total += values.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
                    continue;
                }
                on_device.push(crate::fused::sum_squares(g)?);
            }
        }
        if !on_device.is_empty() {
            let sums: Vec<f64> = Tensor::stack(&on_device, 0)?.to_vec1()?;
            total += sums.iter().sum::<f64>();
        }
        Ok(total.sqrt())
    }

    /// One AdamW step with learning rate `lr` after clipping the global gradient norm to
    /// `cfg.grad_clip`. Returns the norm before clipping. A non-finite norm leaves the
    /// weights and state untouched and returns an error.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &GradStore,
        cfg: &TrainConfig,
        lr: f32,
    ) -> Result<f64, WorkerError> {
        let grads: Vec<Option<Tensor>> = params
            .iter()
            .map(|(_, p)| grads.get(p.as_tensor()).cloned())
            .collect();
        let copies = vec![None; params.len()];
        Ok(self.step_params(params, &grads, &copies, cfg, lr)?.0)
    }

    /// [`AdamW::step`] with the gradients given per parameter (`grads[i]` for `params[i]`,
    /// any float dtype, `None` for none) and, per parameter, a compute copy to refresh with
    /// the new weights (a tensor and the element offset of the parameter's values in it; see
    /// `fused::MultiParam`). Returns the norm before clipping and whether the copies were
    /// written: they are on a GPU with f32 masters (the multi-tensor kernels), otherwise the
    /// caller refreshes them from the masters.
    pub fn step_params(
        &mut self,
        params: &[(String, Var)],
        grads: &[Option<Tensor>],
        copies: &[Option<(Tensor, usize)>],
        cfg: &TrainConfig,
        lr: f32,
    ) -> Result<(f64, bool), WorkerError> {
        if params.len() != self.m.len() || grads.len() != params.len() {
            return Err(WorkerError::Mismatch(
                "optimizer built for other parameters".into(),
            ));
        }
        if copies.len() != params.len() {
            return Err(WorkerError::Mismatch(
                "one compute copy entry per parameter expected".into(),
            ));
        }
        let cpu_f32 = params
            .iter()
            .all(|(_, p)| p.device().is_cpu() && p.dtype() == DType::F32);
        if !cpu_f32 {
            let mut multi = Vec::with_capacity(params.len());
            for ((_, p), (g, c)) in params.iter().zip(grads.iter().zip(copies)) {
                multi.push(crate::fused::MultiParam {
                    master: p.as_tensor().clone(),
                    grad: match g {
                        Some(g) => Some(g.contiguous()?),
                        None => None,
                    },
                    copy: c.clone(),
                    decay: p.rank() >= 2,
                });
            }
            let on_gpu = params.iter().all(|(_, p)| !p.device().is_cpu());
            if on_gpu && !crate::fused::MultiTensor::supported(&multi) {
                // Gradients of mixed dtypes (an expert that ran on its own cast master next
                // to stacked leaves): one dtype, the masters', for the kernels.
                for m in &mut multi {
                    if let Some(g) = &m.grad {
                        m.grad = Some(g.to_dtype(DType::F32)?);
                    }
                }
            }
            if on_gpu && crate::fused::MultiTensor::supported(&multi) {
                return Ok((self.step_multi(params, multi, cfg, lr)?, true));
            }
            return Ok((self.step_flat(params, grads, cfg, lr)?, false));
        }
        let mut total = 0f64;
        for g in grads.iter().flatten() {
            let values: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            total += values.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        }
        let norm = total.sqrt();
        if !norm.is_finite() {
            return Err(WorkerError::NonFinite(format!("gradient norm is {norm}")));
        }
        let clip = clip_scale(cfg, norm);
        self.t += 1;
        let (b1, b2, bc1, bc2) = self.betas(cfg);
        let lr = lr as f64;
        for (i, (_, p)) in params.iter().enumerate() {
            let decay = if p.rank() >= 2 {
                1.0 - lr * cfg.weight_decay as f64
            } else {
                1.0
            };
            self.step_cpu_f32(
                i,
                p,
                grads[i].as_ref(),
                [clip, b1, b2, bc1, bc2, lr, decay, cfg.eps as f64],
            )?;
        }
        Ok((norm, false))
    }

    /// The AdamW constants of the flat and multi-tensor kernels at the current step.
    fn kernel_consts(&self, cfg: &TrainConfig, lr: f32, clip: f64) -> crate::fused::AdamWConsts {
        let (b1, b2, bc1, bc2) = self.betas(cfg);
        let lr = lr as f64;
        crate::fused::AdamWConsts {
            g1: clip * (1.0 - b1),
            b1,
            g2: clip * clip * (1.0 - b2),
            b2,
            inv_bc2: 1.0 / bc2,
            eps: cfg.eps as f64,
            step: lr / bc1,
            decay: -lr * cfg.weight_decay as f64,
        }
    }

    /// The flat state (moments as one `[2n]` buffer, `m` and `v` views into it), built from
    /// the per-parameter moments on first use.
    fn flat_state(
        &mut self,
        params: &[(String, Var)],
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<FlatState, WorkerError> {
        if let Some(state) = self.flat.take() {
            return Ok(state);
        }
        let mut parts = Vec::with_capacity(2 * params.len());
        for t in self.m.iter().chain(&self.v) {
            parts.push(t.to_dtype(dtype)?.flatten_all()?);
        }
        let mut mask = Vec::with_capacity(params.len());
        for (_, p) in params {
            let n = p.elem_count();
            let value = if p.rank() >= 2 { 1.0 } else { 0.0 };
            mask.push(Tensor::full(value, n, device)?.to_dtype(dtype)?);
        }
        Ok(FlatState {
            mv: Tensor::cat(&parts, 0)?,
            decay_mask: Tensor::cat(&mask, 0)?,
        })
    }

    /// The multi-tensor step (`fused::MultiTensor`): the norm and the update are one pass
    /// each over every parameter in place; the moments are updated in their flat buffer,
    /// which `m` and `v` view.
    fn step_multi(
        &mut self,
        params: &[(String, Var)],
        multi: Vec<crate::fused::MultiParam>,
        cfg: &TrainConfig,
        lr: f32,
    ) -> Result<f64, WorkerError> {
        let Some((_, first)) = params.first() else {
            return Ok(0.0);
        };
        let (dtype, device) = (first.dtype(), first.device().clone());
        let mt = crate::fused::MultiTensor::new(multi)?;
        let norm = mt.sum_squares()?.sqrt();
        if !norm.is_finite() {
            return Err(WorkerError::NonFinite(format!("gradient norm is {norm}")));
        }
        let fresh = self.flat.is_none();
        let state = self.flat_state(params, dtype, &device)?;
        let clip = clip_scale(cfg, norm);
        self.t += 1;
        let k = self.kernel_consts(cfg, lr, clip);
        mt.adamw(&state.mv, &k)?;
        if fresh {
            // From now on the moments live in the flat buffer, which the kernel updates in
            // place: `m` and `v` become views into it once.
            let n_all = mt.total();
            let mut offset = 0;
            for (i, (_, p)) in params.iter().enumerate() {
                let n = p.elem_count();
                self.m[i] = state.mv.narrow(0, offset, n)?.reshape(p.dims())?;
                self.v[i] = state.mv.narrow(0, n_all + offset, n)?.reshape(p.dims())?;
                offset += n;
            }
        }
        self.flat = Some(state);
        Ok(norm)
    }

    /// Betas and their bias corrections at the current step count.
    fn betas(&self, cfg: &TrainConfig) -> (f64, f64, f64, f64) {
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let t = self.t.min(i32::MAX as u64) as i32;
        (b1, b2, 1.0 - b1.powi(t), 1.0 - b2.powi(t))
    }

    /// The update of `step` for every parameter at once: parameters and gradients are
    /// concatenated into one flat buffer each, the AdamW arithmetic runs as one fused pass
    /// over them (`fused::adamw_flat`), and each parameter is then set from its slice. The
    /// gradient norm is one fused pass over the flat gradient, read back once.
    fn step_flat(
        &mut self,
        params: &[(String, Var)],
        grads: &[Option<Tensor>],
        cfg: &TrainConfig,
        lr: f32,
    ) -> Result<f64, WorkerError> {
        let Some((_, first)) = params.first() else {
            return Ok(0.0);
        };
        let dtype = first.dtype();
        let device = first.device().clone();
        let mut thetas = Vec::with_capacity(params.len());
        let mut gs = Vec::with_capacity(params.len());
        for ((name, p), grad) in params.iter().zip(grads) {
            if p.dtype() != dtype || !p.device().same_device(&device) {
                return Err(WorkerError::Mismatch(format!(
                    "parameter {name} is not on the device and dtype of the others"
                )));
            }
            let theta = p.as_tensor().detach();
            gs.push(match grad {
                Some(g) => g.detach().to_dtype(dtype)?.flatten_all()?,
                None => theta.flatten_all()?.zeros_like()?,
            });
            thetas.push(theta.flatten_all()?);
        }
        let g = Tensor::cat(&gs, 0)?;
        drop(gs);
        let norm = crate::fused::sum_squares(&g)?.to_scalar::<f64>()?.sqrt();
        if !norm.is_finite() {
            return Err(WorkerError::NonFinite(format!("gradient norm is {norm}")));
        }
        let theta = Tensor::cat(&thetas, 0)?;
        drop(thetas);
        let state = self.flat_state(params, dtype, &device)?;
        let clip = clip_scale(cfg, norm);
        self.t += 1;
        let k = self.kernel_consts(cfg, lr, clip);
        // [new weights | m | v]; the moments stay views into this buffer until the next step
        // replaces it (which keeps one parameter-sized buffer more alive than strictly needed).
        let out = crate::fused::adamw_flat(&theta, &g, &state.mv, &state.decay_mask, &k)?;
        drop((theta, g));
        let n_all = out.elem_count() / 3;
        let mut offset = 0;
        for (i, (_, p)) in params.iter().enumerate() {
            let n = p.elem_count();
            p.set(&out.narrow(0, offset, n)?.reshape(p.dims())?)?;
            self.m[i] = out.narrow(0, n_all + offset, n)?.reshape(p.dims())?;
            self.v[i] = out.narrow(0, 2 * n_all + offset, n)?.reshape(p.dims())?;
            offset += n;
        }
        self.flat = Some(FlatState {
            mv: out.narrow(0, n_all, 2 * n_all)?,
            decay_mask: state.decay_mask,
        });
        Ok(norm)
    }
}

/// Factor that scales the gradients so their global norm is at most `cfg.grad_clip`.
fn clip_scale(cfg: &TrainConfig, norm: f64) -> f64 {
    if cfg.grad_clip > 0.0 && norm > cfg.grad_clip as f64 {
        cfg.grad_clip as f64 / (norm + 1e-6)
    } else {
        1.0
    }
}

impl AdamW {
    /// The same update as the tensor path, fused into one pass: on the CPU each candle op is
    /// a separate single-threaded sweep over the parameter, and the optimizer would otherwise
    /// cost several times the forward pass. `k` is
    /// `[clip, beta1, beta2, bias1, bias2, lr, decay, eps]`.
    fn step_cpu_f32(
        &mut self,
        i: usize,
        p: &candle_core::Var,
        grad: Option<&Tensor>,
        k: [f64; 8],
    ) -> Result<(), WorkerError> {
        let [clip, b1, b2, bc1, bc2, lr, decay, eps] = k.map(|x| x as f32);
        let dims = p.dims().to_vec();
        let dev = p.device().clone();
        let mut theta: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
        let mut m: Vec<f32> = self.m[i].flatten_all()?.to_vec1()?;
        let mut v: Vec<f32> = self.v[i].flatten_all()?.to_vec1()?;
        let g: Vec<f32> = match grad {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            None => vec![0.0; theta.len()],
        };
        for j in 0..theta.len() {
            let gj = g[j] * clip;
            m[j] = b1 * m[j] + (1.0 - b1) * gj;
            v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
            let update = (m[j] / bc1) / ((v[j] / bc2).sqrt() + eps);
            theta[j] = theta[j] * decay - lr * update;
        }
        p.set(&Tensor::from_vec(theta, dims.as_slice(), &dev)?)?;
        self.m[i] = Tensor::from_vec(m, dims.as_slice(), &dev)?;
        self.v[i] = Tensor::from_vec(v, dims.as_slice(), &dev)?;
        Ok(())
    }
}

/// The pseudo-gradient of a round, `theta_start - theta_now`, element by element in order.
pub fn pseudo_gradient(theta_start: &[f32], theta_now: &[f32]) -> Result<Vec<f32>, WorkerError> {
    if theta_start.len() != theta_now.len() {
        return Err(WorkerError::Mismatch(format!(
            "theta_start has {} values, theta_now {}",
            theta_start.len(),
            theta_now.len()
        )));
    }
    Ok(theta_start
        .iter()
        .zip(theta_now)
        .map(|(s, n)| s - n)
        .collect())
}

/// Magic prefix of the serialised outer-optimizer state.
const OUTER_MAGIC: &[u8; 8] = b"PLOUTER1";

/// The outer Nesterov optimizer of the swarm (DiLoCo): with `g` the averaged pseudo-gradient,
/// `v = momentum * v + g` and `theta = theta_start - lr * (g + momentum * v)`.
#[derive(Debug, Clone, PartialEq)]
pub struct OuterOptimizer {
    /// Outer learning rate.
    pub lr: f32,
    /// Nesterov momentum.
    pub momentum: f32,
    velocity: Vec<f32>,
}

impl OuterOptimizer {
    /// A fresh optimizer for `n` parameters with zero velocity.
    pub fn new(lr: f32, momentum: f32, n: usize) -> Self {
        OuterOptimizer {
            lr,
            momentum,
            velocity: vec![0.0; n],
        }
    }

    /// An optimizer resuming from a momentum buffer (a replica restoring committed state).
    pub fn with_velocity(lr: f32, momentum: f32, velocity: Vec<f32>) -> Self {
        OuterOptimizer {
            lr,
            momentum,
            velocity,
        }
    }

    /// The momentum buffer.
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Applies one outer step and returns the new weights. Every value is computed by the
    /// same scalar f32 expression in index order, so the result is bit-identical wherever it
    /// runs.
    pub fn step(
        &mut self,
        theta_start: &[f32],
        avg_delta: &[f32],
    ) -> Result<Vec<f32>, WorkerError> {
        let n = self.velocity.len();
        if theta_start.len() != n || avg_delta.len() != n {
            return Err(WorkerError::Mismatch(format!(
                "outer step for {n} parameters got theta_start {} and delta {}",
                theta_start.len(),
                avg_delta.len()
            )));
        }
        let (lr, mu) = (self.lr, self.momentum);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let g = avg_delta[i];
            let v = mu * self.velocity[i] + g;
            self.velocity[i] = v;
            out.push(theta_start[i] - lr * (g + mu * v));
        }
        Ok(out)
    }

    /// Serialises lr, momentum and velocity (little-endian, with a magic prefix).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 4 * self.velocity.len());
        out.extend_from_slice(OUTER_MAGIC);
        out.extend_from_slice(&self.lr.to_le_bytes());
        out.extend_from_slice(&self.momentum.to_le_bytes());
        out.extend_from_slice(&(self.velocity.len() as u64).to_le_bytes());
        for v in &self.velocity {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses `to_bytes` output for a model of `expected_len` parameters.
    pub fn from_bytes(bytes: &[u8], expected_len: usize) -> Result<Self, WorkerError> {
        let bad = |m: String| WorkerError::Mismatch(format!("outer optimizer state: {m}"));
        if bytes.len() < 24 || &bytes[..8] != OUTER_MAGIC {
            return Err(bad("missing header".into()));
        }
        let f = |i: usize| f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let (lr, momentum) = (f(8), f(12));
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[16..24]);
        let len = u64::from_le_bytes(len_bytes);
        if len != expected_len as u64 {
            return Err(bad(format!(
                "holds {len} values, the model has {expected_len}"
            )));
        }
        if (bytes.len() - 24) as u64 != len * 4 {
            return Err(bad(format!(
                "{} bytes of values for {len} values",
                bytes.len() - 24
            )));
        }
        if !(lr.is_finite() && momentum.is_finite()) {
            return Err(bad("non-finite lr or momentum".into()));
        }
        let velocity = bytes[24..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(OuterOptimizer {
            lr,
            momentum,
            velocity,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;
    use candle_core::Device;

    /// Both ways of summing the gradient norm (the CPU-f32 host loop and the tensor path the
    /// GPU and f64 masters take, read back once) give the exact global L2 norm, skip
    /// parameters without a gradient, and see a non-finite gradient.
    #[test]
    fn grad_norm_sums_every_gradient_once() {
        for dtype in [DType::F32, DType::F64] {
            let a = Var::from_tensor(
                &Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &Tensor::new(&[[0.5f32, -1.5], [2.0, 0.25]], &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let unused = Var::from_tensor(&Tensor::ones(4, dtype, &Device::Cpu).unwrap()).unwrap();
            // loss = sum(a^2) + 3 * sum(b): grads 2a and 3.
            let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
                + b.as_tensor().affine(3.0, 0.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let params = vec![
                ("a".to_string(), a.clone()),
                ("unused".to_string(), unused),
                ("b".to_string(), b.clone()),
            ];
            let norm = AdamW::grad_norm(&params, &grads).unwrap();
            let want = (4.0f64 + 16.0 + 36.0 + 4.0 * 9.0).sqrt();
            assert!((norm - want).abs() < 1e-9, "{dtype:?}: {norm} vs {want}");

            let nan = (a
                .as_tensor()
                .affine(f64::NAN, 0.0)
                .unwrap()
                .sum_all()
                .unwrap()
                + b.as_tensor().sum_all().unwrap())
            .unwrap();
            let grads = nan.backward().unwrap();
            assert!(!AdamW::grad_norm(&params, &grads).unwrap().is_finite());
        }
    }

    /// The fused sum of squares is exact for lengths around multiples of a block's work
    /// (small integers, so every partial sum is exact in f64), in f32 and f64.
    #[test]
    fn sum_of_squares_covers_every_element() {
        for n in [0, 1, 7, 255, 256, 257, 65_536, 3 * 65_536 + 5] {
            let values: Vec<f32> = (0..n).map(|i| ((i % 13) as f32) - 6.0).collect();
            let want: f64 = values.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let t = Tensor::from_vec(values, n, &Device::Cpu).unwrap();
            for dt in [DType::F32, DType::F64] {
                let t = t.to_dtype(dt).unwrap();
                let got = crate::fused::sum_squares(&t)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(got, want, "length {n} {dt:?}");
            }
        }
        let m = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        assert_eq!(
            crate::fused::sum_squares(&m)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            30.0
        );
    }

    fn by_param(ps: &[(String, Var)], grads: &GradStore) -> Vec<Option<Tensor>> {
        ps.iter()
            .map(|(_, p)| grads.get(p.as_tensor()).cloned())
            .collect()
    }

    fn var(values: &[f32], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The flat update (what a GPU runs) matches the fused CPU loop step by step: a matrix
    /// that decays, a vector that does not, a parameter without a gradient (its moments still
    /// move it), gradient clipping active, and the moments left behind per parameter.
    #[test]
    fn flat_update_matches_the_per_parameter_update() {
        let make = || {
            vec![
                (
                    "w".to_string(),
                    var(&[0.5, -0.25, 1.0, 2.0, -1.5, 0.75], &[2, 3]),
                ),
                ("g".to_string(), var(&[1.0, 0.9, 1.1], &[3])),
                ("idle".to_string(), var(&[0.3, -0.3], &[2])),
            ]
        };
        let cfg = TrainConfig {
            weight_decay: 0.1,
            grad_clip: 0.5,
            ..TrainConfig::default()
        };
        let (a, b) = (make(), make());
        let mut opt_a = AdamW::new(&a).unwrap();
        let mut opt_b = AdamW::new(&b).unwrap();
        for step in 0..4 {
            // Step 0 trains every parameter; later steps leave `idle` without a gradient.
            let objective = |ps: &[(String, Var)]| {
                let w = ps[0].1.as_tensor();
                let g = ps[1].1.as_tensor();
                let mut loss = (w.sqr().unwrap().sum_all().unwrap()
                    + (g.affine(3.0, -1.0)
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()))
                .unwrap();
                if step == 0 {
                    loss = (loss + ps[2].1.as_tensor().sum_all().unwrap()).unwrap();
                }
                loss.backward().unwrap()
            };
            let lr = 0.05 * (step + 1) as f32;
            let na = opt_a.step(&a, &objective(&a), &cfg, lr).unwrap();
            let nb = opt_b
                .step_flat(&b, &by_param(&b, &objective(&b)), &cfg, lr)
                .unwrap();
            assert!(
                (na - nb).abs() <= 1e-6 * na,
                "step {step}: norm {na} vs {nb}"
            );
            assert!(na > cfg.grad_clip as f64, "clipping must be exercised");
            for ((name, pa), (_, pb)) in a.iter().zip(&b) {
                for (x, y) in values(pa).iter().zip(values(pb)) {
                    assert!((x - y).abs() <= 1e-6, "step {step} {name}: {x} vs {y}");
                }
            }
        }
        assert_eq!(opt_a.steps(), opt_b.steps());
        let (ma, va) = opt_a.moments();
        let (mb, vb) = opt_b.moments();
        for (x, y) in ma.iter().chain(va).zip(mb.iter().chain(vb)) {
            assert_eq!(x.dims(), y.dims());
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for (p, q) in x.iter().zip(&y) {
                assert!(
                    (p - q).abs() <= 1e-6 * p.abs().max(1e-3),
                    "moment {p} vs {q}"
                );
            }
        }
        // The idle vector moved only by momentum and did not decay; the matrix decayed.
        assert!(values(&b[2].1) != [0.3, -0.3]);
    }

    /// A restored state replaces the flat buffers, and a non-finite gradient leaves weights
    /// and state untouched on the flat path too.
    #[test]
    fn flat_update_after_restore_and_on_non_finite_gradients() {
        let ps = vec![("w".to_string(), var(&[1.0, 2.0, 3.0, 4.0], &[2, 2]))];
        let cfg = TrainConfig::default();
        let mut opt = AdamW::new(&ps).unwrap();
        let grads = ps[0].1.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step_flat(&ps, &by_param(&ps, &grads), &cfg, 0.1)
            .unwrap();
        let before = values(&ps[0].1);
        let bad = ps[0]
            .1
            .as_tensor()
            .affine(f64::NAN, 0.0)
            .unwrap()
            .sum_all()
            .unwrap();
        let err = opt.step_flat(&ps, &by_param(&ps, &bad.backward().unwrap()), &cfg, 0.1);
        assert!(matches!(err, Err(WorkerError::NonFinite(_))));
        assert_eq!(values(&ps[0].1), before);
        assert_eq!(opt.steps(), 1);

        let m = Tensor::full(0.5f32, (2, 2), &Device::Cpu).unwrap();
        let v = Tensor::full(0.25f32, (2, 2), &Device::Cpu).unwrap();
        opt.set_state(7, vec![m.clone()], vec![v.clone()]).unwrap();
        let mut reference = AdamW::new(&ps).unwrap();
        reference.set_state(7, vec![m], vec![v]).unwrap();
        let twin = vec![("w".to_string(), var(&before, &[2, 2]))];
        let g1 = ps[0].1.as_tensor().sum_all().unwrap().backward().unwrap();
        let g2 = twin[0].1.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step_flat(&ps, &by_param(&ps, &g1), &cfg, 0.1).unwrap();
        reference.step(&twin, &g2, &cfg, 0.1).unwrap();
        for (x, y) in values(&ps[0].1).iter().zip(values(&twin[0].1)) {
            assert!((x - y).abs() <= 1e-6, "{x} vs {y}");
        }
    }
}
