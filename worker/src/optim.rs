//! Optimizers. The inner AdamW keeps f32 moments next to the f32 master weights (candle's
//! own AdamW keeps them in the parameter dtype) and applies decoupled weight decay to
//! matrices only. The outer Nesterov step of the swarm runs as a plain Rust loop over f32
//! values in a fixed order: no kernel fusion, no reordering, so every replica that applies
//! the same averaged update to the same weights gets bit-identical results.

use candle_core::{DType, Tensor, Var, backprop::GradStore};

use crate::WorkerError;
use crate::config::TrainConfig;

/// AdamW over a fixed list of parameters, moments in the masters' dtype (f32 or f64).
#[derive(Debug)]
pub struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u64,
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
        Ok(AdamW { m, v, t: 0 })
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
                on_device.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
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
        if params.len() != self.m.len() {
            return Err(WorkerError::Mismatch(
                "optimizer built for other parameters".into(),
            ));
        }
        let norm = Self::grad_norm(params, grads)?;
        if !norm.is_finite() {
            return Err(WorkerError::NonFinite(format!("gradient norm is {norm}")));
        }
        let clip = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip as f64 {
            cfg.grad_clip as f64 / (norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        let bc1 = 1.0 - b1.powi(self.t.min(i32::MAX as u64) as i32);
        let bc2 = 1.0 - b2.powi(self.t.min(i32::MAX as u64) as i32);
        let lr = lr as f64;
        for (i, (_, p)) in params.iter().enumerate() {
            let theta = p.as_tensor().detach();
            let grad = grads.get(p.as_tensor());
            let decay = if theta.rank() >= 2 {
                1.0 - lr * cfg.weight_decay as f64
            } else {
                1.0
            };
            if theta.device().is_cpu() && theta.dtype() == DType::F32 {
                self.step_cpu_f32(
                    i,
                    p,
                    grad,
                    [clip, b1, b2, bc1, bc2, lr, decay, cfg.eps as f64],
                )?;
                continue;
            }
            let g = match grad {
                Some(g) => g.detach().to_dtype(theta.dtype())?.affine(clip, 0.0)?,
                None => theta.zeros_like()?,
            };
            let m = (self.m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (self.v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = (v.affine(1.0 / bc2, 0.0)?.sqrt()? + cfg.eps as f64)?;
            let update = m.affine(1.0 / bc1, 0.0)?.div(&denom)?;
            let new = (theta.affine(decay, 0.0)? - update.affine(lr, 0.0)?)?;
            p.set(&new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
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
}
