//! The Mamba mixer: a selective state-space layer whose cost grows linearly with the
//! context, as a block type of the worker's model (`ModelConfig::layers`).
//!
//! This module holds the mixer's math and nothing about parameters' names or storage: the
//! model gathers a layer's weights into [`MixerWeights`] and calls [`mixer`] (training, the
//! whole sequence) or [`mixer_step`] (generation, one token against a constant-size
//! [`MixerState`]). The two compute the same function, which the tests check.
//!
//! The selective scan is one candle custom op each way ([`selective_scan`]), with a CPU and
//! a CUDA version behind the same graph node. The CPU version walks the sequence once
//! forward; its backward pass recomputes the states from checkpoints kept every [`CHUNK`]
//! steps, so its memory is `(L / CHUNK + CHUNK) * D * N` values per sequence instead of
//! every state. It is the reference the CUDA version (`cuda.rs`, kernels in `scan.cu`: a
//! chunked parallel scan, forward and backward) is tested against.
//! Everything around the scan (the causal depthwise convolution, SiLU, softplus, the skip
//! and the gate) is plain candle ops with candle's own backward passes. [`hf`] loads
//! `transformers`' `MambaForCausalLM` checkpoints into a model of Mamba blocks.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

pub mod hf;

/// Why a selective scan could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The inputs' shapes or dtypes do not fit together.
    #[error("selective scan: {0}")]
    Input(String),
}

#[cfg(feature = "cuda")]
mod cuda;

/// Steps between the state checkpoints of the CPU backward pass.
pub const CHUNK: usize = 64;

/// The selective scan of Mamba: for each sequence `b`, channel `d` and state index `n`,
/// `h[t] = exp(delta[t] * a[d, n]) * h[t - 1] + delta[t] * b[t, n] * u[t]` from `h[-1] = 0`,
/// and `y[t, d] = sum_n c[t, n] * h[t]`.
///
/// `u`, `delta`: `[B, L, D]`; `a`: `[D, N]`; `b`, `c`: `[B, L, N]`; all of one dtype: f32
/// or f64 on the CPU, f32 or bf16 on a GPU (the model runs it in f32 under bf16 compute). Returns `y: [B, L, D]`, differentiable with
/// respect to all five inputs. The skip term `D * u` and the gate are the caller's.
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> candle_core::Result<Tensor> {
    let (bs, l, d) = u.dims3()?;
    let (ad, n) = a.dims2()?;
    let bad = |m: String| Err(candle_core::Error::wrap(ScanError::Input(m)));
    if delta.dims() != [bs, l, d] || ad != d || b.dims() != [bs, l, n] || c.dims() != [bs, l, n] {
        return bad(format!(
            "shapes u {:?}, delta {:?}, a {:?}, b {:?}, c {:?} do not fit [B, L, D], \
             [B, L, D], [D, N], [B, L, N], [B, L, N]",
            u.dims(),
            delta.dims(),
            a.dims(),
            b.dims(),
            c.dims()
        ));
    }
    let dt = u.dtype();
    if !matches!(dt, DType::F32 | DType::F64 | DType::BF16)
        || [delta, a, b, c].iter().any(|t| t.dtype() != dt)
    {
        return bad("the inputs must all be f32, all f64 or all bf16".into());
    }
    // One input row per (sequence, step): `[u | delta | b | c]`, so that the op has two
    // arguments (candle's custom ops take at most three) and a kernel reads one row per step.
    let packed = Tensor::cat(&[u, delta, b, c], 2)?;
    packed.apply_op2(&a.contiguous()?, SelectiveScan { d, n })
}

/// The same scan as plain candle ops, one step at a time: what the op is tested against.
pub fn selective_scan_reference(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> candle_core::Result<Tensor> {
    let (bs, l, d) = u.dims3()?;
    let n = a.dim(1)?;
    let mut h = Tensor::zeros((bs, d, n), u.dtype(), u.device())?;
    let mut ys = Vec::with_capacity(l);
    for t in 0..l {
        let (y, next) = scan_step(
            &h,
            &u.narrow(1, t, 1)?.squeeze(1)?,
            &delta.narrow(1, t, 1)?.squeeze(1)?,
            a,
            &b.narrow(1, t, 1)?.squeeze(1)?,
            &c.narrow(1, t, 1)?.squeeze(1)?,
        )?;
        h = next;
        ys.push(y.unsqueeze(1)?);
    }
    Tensor::cat(&ys, 1)
}

/// One step of the scan for every sequence: `h: [B, D, N]`, `u`, `delta`: `[B, D]`, `b`,
/// `c`: `[B, N]`. Returns `(y: [B, D], next h)`.
fn scan_step(
    h: &Tensor,
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let decay = delta.unsqueeze(2)?.broadcast_mul(&a.unsqueeze(0)?)?.exp()?;
    let input = (delta * u)?.unsqueeze(2)?.broadcast_mul(&b.unsqueeze(1)?)?;
    let h = ((decay * h)? + input)?;
    let y = h.broadcast_mul(&c.unsqueeze(1)?)?.sum(2)?;
    Ok((y, h))
}

/// Arithmetic the CPU scan needs from its element type.
trait Real:
    Copy
    + candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
{
    fn exp(self) -> Self;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The contiguous data of a CPU storage as a slice of `T`.
fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("selective scan: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Sizes of one scan: `bs` sequences of `l` steps, `d` channels, `n` state values each;
/// the packed rows are `[u | delta | b | c]`, `2d + 2n` wide.
#[derive(Debug, Clone, Copy)]
struct Dims {
    bs: usize,
    l: usize,
    d: usize,
    n: usize,
}

impl Dims {
    fn of(packed: &Layout, a: &Layout, d: usize, n: usize) -> candle_core::Result<Self> {
        let (bs, l, w) = packed.shape().dims3()?;
        if w != 2 * d + 2 * n || a.shape().elem_count() != d * n {
            candle_core::bail!("selective scan: packed rows of {w} do not fit d {d}, n {n}");
        }
        Ok(Dims { bs, l, d, n })
    }

    fn width(&self) -> usize {
        2 * self.d + 2 * self.n
    }

    /// Advances the states `h: [D, N]` of one sequence by the step in `row`.
    fn step<T: Real>(&self, h: &mut [T], row: &[T], a: &[T]) {
        let (d, n) = (self.d, self.n);
        let (b, _) = row[2 * d..].split_at(n);
        for ch in 0..d {
            let (x, dt) = (row[ch], row[d + ch]);
            let dx = dt * x;
            let hs = &mut h[ch * n..(ch + 1) * n];
            for ((hv, &av), &bv) in hs.iter_mut().zip(&a[ch * n..(ch + 1) * n]).zip(b) {
                *hv = (dt * av).exp() * *hv + dx * bv;
            }
        }
    }

    /// `y` of one step from the states after it.
    fn output<T: Real>(&self, h: &[T], row: &[T], y: &mut [T]) {
        let (d, n) = (self.d, self.n);
        let c = &row[2 * d + n..];
        for (ch, out) in y.iter_mut().enumerate().take(d) {
            let mut acc = T::from_f64(0.0);
            for (&hv, &cv) in h[ch * n..(ch + 1) * n].iter().zip(c) {
                acc += hv * cv;
            }
            *out = acc;
        }
    }

    fn forward<T: Real>(&self, p: &[T], a: &[T]) -> Vec<T> {
        let (w, d) = (self.width(), self.d);
        let mut y = vec![T::from_f64(0.0); self.bs * self.l * d];
        let mut h = vec![T::from_f64(0.0); d * self.n];
        for s in 0..self.bs {
            h.fill(T::from_f64(0.0));
            for t in 0..self.l {
                let r = s * self.l + t;
                let row = &p[r * w..(r + 1) * w];
                self.step(&mut h, row, a);
                self.output(&h, row, &mut y[r * d..(r + 1) * d]);
            }
        }
        y
    }

    /// Gradients of the packed rows (`[du | ddelta | db | dc]` per row) followed by `da`
    /// (`[D, N]`), from the output gradient `g: [B, L, D]`.
    fn backward<T: Real>(&self, p: &[T], a: &[T], g: &[T]) -> Vec<T> {
        let (w, d, n, l) = (self.width(), self.d, self.n, self.l);
        let zero = T::from_f64(0.0);
        let dn = d * n;
        let rows = self.bs * l;
        let mut out = vec![zero; rows * w + dn];
        let (gp, ga) = out.split_at_mut(rows * w);
        let chunks = l.div_ceil(CHUNK);
        // The states before each chunk's first step, then the chunk's own states.
        let mut ckpt = vec![zero; chunks * dn];
        let mut states = vec![zero; (CHUNK + 1) * dn];
        // The gradient reaching the states after the current step from the later ones.
        let mut gh = vec![zero; dn];
        for s in 0..self.bs {
            let base = s * l;
            let mut h = vec![zero; dn];
            for t in 0..l {
                if t % CHUNK == 0 {
                    ckpt[(t / CHUNK) * dn..(t / CHUNK + 1) * dn].copy_from_slice(&h);
                }
                self.step(&mut h, &p[(base + t) * w..(base + t + 1) * w], a);
            }
            gh.fill(zero);
            for ci in (0..chunks).rev() {
                let (t0, t1) = (ci * CHUNK, ((ci + 1) * CHUNK).min(l));
                states[..dn].copy_from_slice(&ckpt[ci * dn..(ci + 1) * dn]);
                for t in t0..t1 {
                    let k = t - t0;
                    let (before, after) = states.split_at_mut((k + 1) * dn);
                    after[..dn].copy_from_slice(&before[k * dn..]);
                    self.step(&mut after[..dn], &p[(base + t) * w..(base + t + 1) * w], a);
                }
                for t in (t0..t1).rev() {
                    let k = t - t0;
                    let prev = &states[k * dn..(k + 1) * dn];
                    let cur = &states[(k + 1) * dn..(k + 2) * dn];
                    let r = base + t;
                    let row = &p[r * w..(r + 1) * w];
                    let grow = &mut gp[r * w..(r + 1) * w];
                    let gy = &g[r * d..(r + 1) * d];
                    let (b, c) = row[2 * d..].split_at(n);
                    let (g_ud, g_bc) = grow.split_at_mut(2 * d);
                    let (g_b, g_c) = g_bc.split_at_mut(n);
                    for ch in 0..d {
                        let (x, dt, gyc) = (row[ch], row[d + ch], gy[ch]);
                        let (mut gx, mut gdt) = (zero, zero);
                        let at = ch * n..(ch + 1) * n;
                        for j in 0..n {
                            let i = at.start + j;
                            // y[t] = sum c * h[t]
                            let gv = gh[i] + gyc * c[j];
                            g_c[j] += gyc * cur[i];
                            // h[t] = e * h[t-1] + dt * b * x, with e = exp(dt * a)
                            let av = a[i];
                            let e = (dt * av).exp();
                            gdt += gv * (av * e * prev[i] + b[j] * x);
                            ga[i] += gv * dt * e * prev[i];
                            g_b[j] += gv * dt * x;
                            gx += gv * dt * b[j];
                            gh[i] = gv * e;
                        }
                        g_ud[ch] = gx;
                        g_ud[d + ch] = gdt;
                    }
                }
            }
        }
        out
    }
}

/// The scan's forward op: `(packed [B, L, 2D + 2N], a [D, N]) -> y [B, L, D]`.
#[derive(Debug, Clone, Copy)]
struct SelectiveScan {
    d: usize,
    n: usize,
}

impl CustomOp2 for SelectiveScan {
    fn name(&self) -> &'static str {
        "selective-scan"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(pl, al, self.d, self.n)?;
        let y = match (ps, as_) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(dims.forward::<f32>(slice(ps, pl)?, slice(as_, al)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(dims.forward::<f64>(slice(ps, pl)?, slice(as_, al)?))
            }
            _ => candle_core::bail!("selective scan: the CPU version takes f32 or f64"),
        };
        Ok((y, Shape::from((dims.bs, dims.l, dims.d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self.d, self.n, ps, pl, as_, al)
    }

    fn bwd(
        &self,
        packed: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let all =
            packed.apply_op3_no_bwd(a, &grad.contiguous()?, &SelectiveScanBwd { fwd: *self })?;
        let np = packed.elem_count();
        let gp = all.narrow(0, 0, np)?.reshape(packed.dims())?;
        let ga = all.narrow(0, np, self.d * self.n)?.reshape(a.dims())?;
        Ok((Some(gp), Some(ga)))
    }
}

/// The scan's backward op: `(packed, a, grad y) -> [grad packed (flat) | grad a (flat)]`.
#[derive(Debug, Clone, Copy)]
struct SelectiveScanBwd {
    fwd: SelectiveScan,
}

impl CustomOp3 for SelectiveScanBwd {
    fn name(&self) -> &'static str {
        "selective-scan-bwd"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = Dims::of(pl, al, self.fwd.d, self.fwd.n)?;
        if gl.shape().dims() != [dims.bs, dims.l, dims.d] {
            candle_core::bail!("selective scan: output gradient {:?}", gl.shape());
        }
        let out = match (ps, as_, gs) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                dims.backward::<f32>(slice(ps, pl)?, slice(as_, al)?, slice(gs, gl)?),
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                dims.backward::<f64>(slice(ps, pl)?, slice(as_, al)?, slice(gs, gl)?),
            ),
            _ => candle_core::bail!("selective scan: the CPU version takes f32 or f64"),
        };
        let len = pl.shape().elem_count() + dims.d * dims.n;
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self.fwd.d, self.fwd.n, (ps, pl), (as_, al), (gs, gl))
    }
}

/// The weights of one Mamba mixer, in `transformers`' layout except where noted.
#[derive(Debug, Clone)]
pub struct MixerWeights {
    /// `[2 * D, d_model]`: the first `D` rows make `x`, the rest the gate `z`.
    pub in_proj: Tensor,
    /// `[D, d_conv]` (`transformers` keeps `[D, 1, d_conv]`).
    pub conv_w: Tensor,
    /// `[D]`.
    pub conv_b: Tensor,
    /// `[dt_rank + 2 * N, D]`: rows make `dt`, `B`, `C` in that order.
    pub x_proj: Tensor,
    /// `[D, dt_rank]`.
    pub dt_proj_w: Tensor,
    /// `[D]`.
    pub dt_proj_b: Tensor,
    /// `[D * N]`, flat (`transformers`: `[D, N]`); `A = -exp(a_log)`.
    pub a_log: Tensor,
    /// `[D]`: the skip `D * u`.
    pub d_skip: Tensor,
    /// `[d_model, D]`.
    pub out_proj: Tensor,
}

impl MixerWeights {
    fn dims(&self) -> candle_core::Result<(usize, usize, usize, usize)> {
        let d = self.conv_w.dim(0)?;
        let k = self.conv_w.dim(1)?;
        let r = self.dt_proj_w.dim(1)?;
        let n = (self.x_proj.dim(0)? - r) / 2;
        Ok((d, k, r, n))
    }

    /// `A = -exp(A_log)` as `[D, N]`, in `dtype`.
    fn a(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let (d, _, _, n) = self.dims()?;
        self.a_log.to_dtype(dtype)?.exp()?.neg()?.reshape((d, n))
    }
}

/// `log(1 + exp(x))` without overflow: `max(x, 0) + log(1 + exp(-|x|))`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// The dtype the scan runs in: f64 for f64, f32 otherwise (bf16 compute keeps its states in
/// f32, as the reference implementations do).
fn scan_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The mixer on a whole sequence: `h: [B, L, d_model]` (already normalised) -> `[B, L,
/// d_model]`, differentiable with respect to `h` and every weight.
pub fn mixer(w: &MixerWeights, h: &Tensor) -> candle_core::Result<Tensor> {
    let (bs, l, dm) = h.dims3()?;
    let (d, k, r, n) = w.dims()?;
    let rows = bs * l;
    let xz = crate::fused::matmul_t(&h.reshape((rows, dm))?, &w.in_proj)?;
    let x = xz.narrow(1, 0, d)?.reshape((bs, l, d))?;
    let z = xz.narrow(1, d, d)?;
    // Causal depthwise convolution: out[t] = bias + sum_j w[j] * x[t - (k - 1) + j].
    let xp = x.pad_with_zeros(1, k - 1, 0)?;
    let mut conv = w.conv_b.reshape((1, 1, d))?.broadcast_as((bs, l, d))?;
    for j in 0..k {
        let tap = w.conv_w.narrow(1, j, 1)?.reshape((1, 1, d))?;
        conv = (conv + xp.narrow(1, j, l)?.broadcast_mul(&tap)?)?;
    }
    let u = conv.silu()?;
    let dbl = crate::fused::matmul_t(&u.reshape((rows, d))?, &w.x_proj)?;
    let dt = dbl.narrow(1, 0, r)?.contiguous()?;
    let b = dbl.narrow(1, r, n)?.reshape((bs, l, n))?;
    let c = dbl.narrow(1, r + n, n)?.reshape((bs, l, n))?;
    let delta = softplus(&crate::fused::matmul_t(&dt, &w.dt_proj_w)?.broadcast_add(&w.dt_proj_b)?)?
        .reshape((bs, l, d))?;
    let sd = scan_dtype(h.dtype());
    let y = selective_scan(
        &u.to_dtype(sd)?,
        &delta.to_dtype(sd)?,
        &w.a(sd)?,
        &b.to_dtype(sd)?,
        &c.to_dtype(sd)?,
    )?
    .to_dtype(h.dtype())?;
    let y = (y + u.broadcast_mul(&w.d_skip.reshape((1, 1, d))?)?)?;
    let y = (y.reshape((rows, d))? * z.silu()?)?;
    crate::fused::matmul_t(&y, &w.out_proj)?.reshape((bs, l, dm))
}

/// What one sequence's mixer remembers between tokens during generation: the last
/// `d_conv - 1` inputs of the convolution and the scan's states. Its size does not depend on
/// how many tokens were generated.
#[derive(Debug, Clone)]
pub struct MixerState {
    /// `[B, d_conv - 1, D]`, oldest first.
    conv: Tensor,
    /// `[B, D, N]`, in the scan dtype.
    ssm: Tensor,
}

impl MixerState {
    /// The state before the first token, for `batch` sequences.
    pub fn new(w: &MixerWeights, batch: usize, dtype: DType) -> candle_core::Result<Self> {
        let (d, k, _, n) = w.dims()?;
        let device = w.in_proj.device();
        Ok(MixerState {
            conv: Tensor::zeros((batch, k - 1, d), dtype, device)?,
            ssm: Tensor::zeros((batch, d, n), scan_dtype(dtype), device)?,
        })
    }

    /// Values held, whatever the number of tokens seen.
    pub fn elem_count(&self) -> usize {
        self.conv.elem_count() + self.ssm.elem_count()
    }
}

/// The mixer on one token per sequence, `h: [B, d_model]` -> `[B, d_model]`, advancing
/// `state`: the same function as [`mixer`] at that position.
pub fn mixer_step(
    w: &MixerWeights,
    h: &Tensor,
    state: &mut MixerState,
) -> candle_core::Result<Tensor> {
    let (bs, _) = h.dims2()?;
    let (d, k, r, n) = w.dims()?;
    let xz = crate::fused::matmul_t(h, &w.in_proj)?;
    let x = xz.narrow(1, 0, d)?;
    let z = xz.narrow(1, d, d)?;
    let window = Tensor::cat(&[&state.conv, &x.unsqueeze(1)?], 1)?;
    let conv = window
        .broadcast_mul(&w.conv_w.t()?.unsqueeze(0)?)?
        .sum(1)?
        .broadcast_add(&w.conv_b)?;
    state.conv = window.narrow(1, 1, k - 1)?.contiguous()?;
    let u = conv.silu()?;
    let dbl = crate::fused::matmul_t(&u, &w.x_proj)?;
    let dt = dbl.narrow(1, 0, r)?.contiguous()?;
    let b = dbl.narrow(1, r, n)?;
    let c = dbl.narrow(1, r + n, n)?;
    let delta = softplus(&crate::fused::matmul_t(&dt, &w.dt_proj_w)?.broadcast_add(&w.dt_proj_b)?)?;
    let sd = state.ssm.dtype();
    let (y, ssm) = scan_step(
        &state.ssm,
        &u.to_dtype(sd)?,
        &delta.to_dtype(sd)?,
        &w.a(sd)?,
        &b.to_dtype(sd)?,
        &c.to_dtype(sd)?,
    )?;
    state.ssm = ssm;
    let y = (y.to_dtype(h.dtype())? + u.broadcast_mul(&w.d_skip.unsqueeze(0)?)?)?;
    let y = (y * z.silu()?)?;
    debug_assert_eq!(y.dims(), [bs, d]);
    crate::fused::matmul_t(&y, &w.out_proj)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `(u, delta, a, b, c)` in f64 for `bs` sequences of `l` steps.
    fn inputs(bs: usize, l: usize, d: usize, n: usize, seed: u64) -> [Tensor; 5] {
        [
            rand(&[bs, l, d], -1.0, 1.0, seed),
            rand(&[bs, l, d], 0.01, 0.5, seed + 1),
            rand(&[d, n], -2.0, -0.1, seed + 2),
            rand(&[bs, l, n], -1.0, 1.0, seed + 3),
            rand(&[bs, l, n], -1.0, 1.0, seed + 4),
        ]
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn scan_matches_the_step_by_step_reference_across_chunks() {
        // Lengths below, at and past the checkpoint chunk, not multiples of it.
        for (l, seed) in [
            (1, 1),
            (7, 2),
            (CHUNK, 3),
            (CHUNK + 5, 4),
            (2 * CHUNK + 1, 5),
        ] {
            let [u, dl, a, b, c] = inputs(2, l, 3, 4, seed * 10);
            let got = selective_scan(&u, &dl, &a, &b, &c).unwrap();
            let want = selective_scan_reference(&u, &dl, &a, &b, &c).unwrap();
            assert!(max_diff(&got, &want) < 1e-12, "l = {l}");
        }
    }

    #[test]
    fn scan_gradients_match_the_reference_autograd() {
        for l in [5, CHUNK + 3, 2 * CHUNK + 7] {
            let vars: Vec<candle_core::Var> = inputs(2, l, 3, 4, l as u64)
                .iter()
                .map(|t| candle_core::Var::from_tensor(t).unwrap())
                .collect();
            let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let weight = rand(&[2, l, 3], -1.0, 1.0, 99);
            let loss = |y: Tensor| (y * &weight).unwrap().sum_all().unwrap();
            let g1 = loss(selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4]).unwrap())
                .backward()
                .unwrap();
            let g2 = loss(selective_scan_reference(&t[0], &t[1], &t[2], &t[3], &t[4]).unwrap())
                .backward()
                .unwrap();
            for (i, v) in t.iter().enumerate() {
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                assert!(max_diff(a, b) < 1e-10, "input {i}, l = {l}");
            }
        }
    }

    #[test]
    fn scan_gradients_match_finite_differences() {
        let (bs, l, d, n) = (2, 9, 3, 2);
        let base = inputs(bs, l, d, n, 7);
        let weight = rand(&[bs, l, d], -1.0, 1.0, 8);
        let f = |xs: &[Tensor]| -> f64 {
            (selective_scan(&xs[0], &xs[1], &xs[2], &xs[3], &xs[4]).unwrap() * &weight)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let vars: Vec<candle_core::Var> = base
            .iter()
            .map(|t| candle_core::Var::from_tensor(t).unwrap())
            .collect();
        let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = (selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4]).unwrap() * &weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for i in 0..5 {
            let g: Vec<f64> = grads
                .get(&t[i])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let orig: Vec<f64> = base[i].flatten_all().unwrap().to_vec1().unwrap();
            for idx in (0..orig.len()).step_by(3) {
                let shifted = |delta: f64| {
                    let mut v = orig.clone();
                    v[idx] += delta;
                    let mut xs = base.clone();
                    xs[i] = Tensor::from_vec(v, base[i].dims(), &Device::Cpu).unwrap();
                    f(&xs)
                };
                let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                let tol = 1e-7 + 1e-6 * numeric.abs();
                assert!(
                    (numeric - g[idx]).abs() <= tol,
                    "input {i}[{idx}]: autograd {} vs finite difference {numeric}",
                    g[idx]
                );
                checked += 1;
            }
        }
        assert!(checked > 40);
    }

    #[test]
    fn scan_in_f32_agrees_with_f64() {
        let [u, dl, a, b, c] = inputs(2, CHUNK + 9, 4, 3, 31);
        let want = selective_scan(&u, &dl, &a, &b, &c).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let got = selective_scan(&f(&u), &f(&dl), &f(&a), &f(&b), &f(&c)).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert!(max_diff(&got.to_dtype(DType::F64).unwrap(), &want) < 1e-4);
    }

    #[test]
    fn scan_refuses_mismatched_inputs() {
        let [u, dl, a, b, c] = inputs(1, 4, 3, 2, 1);
        let wrong_a = rand(&[4, 2], -1.0, -0.1, 2);
        let err = selective_scan(&u, &dl, &wrong_a, &b, &c).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let err = selective_scan(&u, &dl.to_dtype(DType::F32).unwrap(), &a, &b, &c).unwrap_err();
        assert!(err.to_string().contains("all f64 or all bf16"), "{err}");
        // bf16 is a GPU dtype: the CPU version says which it takes.
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let err =
            selective_scan(&half(&u), &half(&dl), &half(&a), &half(&b), &half(&c)).unwrap_err();
        assert!(
            err.to_string().contains("CPU version takes f32 or f64"),
            "{err}"
        );
    }
}
