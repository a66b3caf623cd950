//! Fused ops: one kernel where plain candle ops would take several passes over memory and
//! one launch per pass. Each op has a CPU version (what CI tests against the plain candle
//! formulation) and, with the `cuda` feature, a CUDA kernel from `kernels.cu` (compiled to
//! PTX by build.rs with the nvcc of `../shared/gpu/build-cuda.sh`), checked against the plain
//! ops on the GPU by the worker's ignored `cuda_` tests.
//!
//! - [`causal_softmax`]: the attention softmax with its scale and causal mask, and a
//!   backward pass that is one kernel too. As plain ops it is a scale, a cast to f32, a mask
//!   add and five softmax ops forward, and about twice that backward, each a pass over the
//!   `[B, H, T, T]` scores.
//! - [`softmax_last_dim`]: the same kernels without the mask, for the MoE router.
//! - [`sum_squares`] and [`adamw_flat`]: the optimizer's gradient norm and its update over
//!   flat buffers, one pass each instead of about fifteen.
//! - [`grouped_matmul_t`]: the MoE experts' projections over their blocks of rows, one
//!   matrix-library call per expert inside one graph node.
//! - [`matmul_t`] and [`matmul`]: matrix products as one graph node each, whose gradients
//!   are products of the same op. On a GPU their f32 products, and the experts', run split
//!   into TF32 parts ([`F32Products`]).
//! - [`split_heads`] and [`merge_heads`]: attention's head split (with RoPE for queries and
//!   keys) and merge, one kernel each way instead of a transpose, candle's strided copy and
//!   the rotation.
//! - [`router_topk`], [`gather_rows`] and [`gather_rows_sum`]: the MoE router's choice on the
//!   device, and row gathers in whole words (the dispatch, and its backward summed over the
//!   top-k slots in one pass).
//! - [`route_counts`] and [`route_layout`]: a batched MoE layer's routing laid out on the
//!   device, so that the host reads back only each expert's counts.
//!
//! Memory-bound kernels move four elements a thread where rows and addresses allow
//! (`cuda::fours`), and one otherwise.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

#[cfg(feature = "cuda")]
use candle_core::{CudaStorage, backend::BackendStorage};

/// The PTX of `kernels.cu`, built for the compute capability in `CUDA_COMPUTE_CAP`.
#[cfg(feature = "cuda")]
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/potluck_kernels.ptx"));

/// Name of the custom module in candle's per-device cache.
#[cfg(feature = "cuda")]
const MODULE: &str = "potluck_kernels";

/// Softmax over the last dimension of `scores * scale` with a causal mask: `scores` is
/// `[.., T, T]` (query rows, key columns) and key `j` is visible from query `i` when
/// `j <= i`; masked entries come out exactly 0. The result has the dtype of `scores`; the
/// arithmetic runs in f32 (f64 for f64 input). Differentiable with respect to `scores`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dims = scores.dims();
    let rank = dims.len();
    if rank < 2 || dims[rank - 1] != dims[rank - 2] {
        candle_core::bail!("causal-softmax: scores {dims:?} are not [.., T, T]");
    }
    if native(scores) {
        scores.contiguous()?.apply_op1(CausalSoftmax {
            scale,
            causal: true,
        })
    } else {
        causal_softmax_reference(scores, scale)
    }
}

/// Softmax over the last dimension of `x` (any rank of at least 1), in one kernel each way:
/// the result has the dtype of `x`, the arithmetic runs in f32 (f64 for f64 input). The plain
/// formulation (`candle_nn::ops::softmax`: max, subtract, exp, sum, divide, with broadcasts)
/// is seven graph nodes, each a launch forward and several backward; this is the MoE router's.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.rank() == 0 {
        candle_core::bail!("softmax: a scalar has no last dimension");
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    if native(x) {
        x.contiguous()?.apply_op1(CausalSoftmax {
            scale: 1.0,
            causal: false,
        })
    } else {
        // Other dtypes (bf16 on the CPU): the plain ops, in f32 as the kernels compute.
        let acc = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        candle_nn::ops::softmax(&x.to_dtype(acc)?, candle_core::D::Minus1)?.to_dtype(x.dtype())
    }
}

/// The same function as [`causal_softmax`] as plain candle ops (scale, additive `-inf` mask,
/// softmax in f32 or f64): the reference the fused version is tested against.
pub fn causal_softmax_reference(scores: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let t = scores.dim(candle_core::D::Minus1)?;
    let dt = scores.dtype();
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut mask = vec![0f64; t * t];
    for i in 0..t {
        for j in (i + 1)..t {
            mask[i * t + j] = f64::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (t, t), scores.device())?.to_dtype(acc)?;
    let s = (scores * scale)?.to_dtype(acc)?.broadcast_add(&mask)?;
    candle_nn::ops::softmax(&s, candle_core::D::Minus1)?.to_dtype(dt)
}

/// Rows of a `[.., T, T]` layout: (rows, T), or an error when it is not contiguous.
fn rows_of(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("fused op: input is not contiguous");
    };
    let t = l.dims()[l.dims().len() - 1];
    Ok((start, end, (end - start) / t.max(1), t))
}

/// Float types the CPU versions run on: f32 rows compute in f32, as the kernels do.
trait Real:
    Copy
    + candle_core::WithDType
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
{
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}
impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}
impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// CPU softmax of one row: `p[j] = exp(scale * s[j] - max) / sum` for `j <= i`, 0 after
/// (`i = t - 1` for a plain softmax).
fn softmax_row<T: Real>(s: &[T], p: &mut [T], i: usize, scale: T) {
    let mut mx = s[0] * scale;
    for &x in &s[1..=i] {
        if x * scale > mx {
            mx = x * scale;
        }
    }
    let mut sum = T::from_f64(0.0);
    for (d, &x) in p[..=i].iter_mut().zip(&s[..=i]) {
        *d = (x * scale - mx).exp();
        sum += *d;
    }
    let inv = T::from_f64(1.0) / sum;
    for d in p[..=i].iter_mut() {
        *d *= inv;
    }
    for d in p[i + 1..].iter_mut() {
        *d = T::from_f64(0.0);
    }
}

/// The causal softmax as a custom op (see [`causal_softmax`]); with `causal` false every
/// entry of a row is visible and rows need not be square ([`softmax_last_dim`]).
#[derive(Debug, Clone, Copy)]
struct CausalSoftmax {
    scale: f64,
    causal: bool,
}

/// The last visible column of row `r` of rows of length `t`.
fn visible(causal: bool, r: usize, t: usize) -> usize {
    if causal { r % t } else { t - 1 }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            src: &[T],
            l: &Layout,
            scale: f64,
            causal: bool,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (start, end, _, t) = rows_of(l)?;
            let src = &src[start..end];
            let scale = T::from_f64(scale);
            let mut dst = vec![T::from_f64(0.0); src.len()];
            for (r, (s, p)) in src.chunks(t).zip(dst.chunks_mut(t)).enumerate() {
                softmax_row(s, p, visible(causal, r, t), scale);
            }
            Ok((T::to_cpu_storage_owned(dst), l.shape().clone()))
        }
        match s {
            CpuStorage::F32(v) => run(v, l, self.scale, self.causal),
            CpuStorage::F64(v) => run(v, l, self.scale, self.causal),
            _ => candle_core::bail!("causal-softmax: the CPU version takes f32 or f64"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (_, _, rows, t) = rows_of(l)?;
        let out = cuda::alloc_like(s, l.shape().elem_count())?;
        let args = [
            cuda::input(s, l)?,
            cuda::output(&out)?,
            cuda::Arg::I64(rows as i64),
            cuda::Arg::I32(t as i32),
            cuda::Arg::F32(self.scale as f32),
            cuda::Arg::I32(i32::from(self.causal)),
        ];
        cuda::launch(
            &s.device,
            "causal_softmax_fwd",
            s.dtype(),
            cuda::rows(rows),
            &args,
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let ds = res.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &CausalSoftmaxBwd {
                scale: self.scale,
                causal: self.causal,
            },
        )?;
        Ok(Some(ds))
    }
}

/// Backward of [`CausalSoftmax`] from its output `p` and the output gradient `dp`:
/// `ds[j] = scale * p[j] * (dp[j] - sum_k p[k] dp[k])`.
#[derive(Debug, Clone, Copy)]
struct CausalSoftmaxBwd {
    scale: f64,
    causal: bool,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            p: &[T],
            pl: &Layout,
            dp: &[T],
            dl: &Layout,
            scale: f64,
            causal: bool,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (ps, pe, _, t) = rows_of(pl)?;
            let (ds, de, _, _) = rows_of(dl)?;
            let (p, dp) = (&p[ps..pe], &dp[ds..de]);
            let scale = T::from_f64(scale);
            let mut out = vec![T::from_f64(0.0); p.len()];
            for (r, ((pr, gr), o)) in p
                .chunks(t)
                .zip(dp.chunks(t))
                .zip(out.chunks_mut(t))
                .enumerate()
            {
                let i = visible(causal, r, t);
                let mut dot = T::from_f64(0.0);
                for (&a, &b) in pr[..=i].iter().zip(&gr[..=i]) {
                    dot += a * b;
                }
                for j in 0..=i {
                    o[j] = scale * pr[j] * (gr[j] - dot);
                }
            }
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        }
        if pl.dims() != dl.dims() {
            candle_core::bail!(
                "causal-softmax-bwd: gradient {:?} for output {:?}",
                dl.dims(),
                pl.dims()
            );
        }
        match (p, dp) {
            (CpuStorage::F32(p), CpuStorage::F32(dp)) => {
                run(p, pl, dp, dl, self.scale, self.causal)
            }
            (CpuStorage::F64(p), CpuStorage::F64(dp)) => {
                run(p, pl, dp, dl, self.scale, self.causal)
            }
            _ => candle_core::bail!("causal-softmax-bwd: unsupported dtypes on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        pl: &Layout,
        dp: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if pl.dims() != dl.dims() {
            candle_core::bail!(
                "causal-softmax-bwd: gradient {:?} for output {:?}",
                dl.dims(),
                pl.dims()
            );
        }
        let (_, _, rows, t) = rows_of(pl)?;
        let out = cuda::alloc_like(p, pl.shape().elem_count())?;
        let args = [
            cuda::input(p, pl)?,
            cuda::input(dp, dl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(rows as i64),
            cuda::Arg::I32(t as i32),
            cuda::Arg::F32(self.scale as f32),
            cuda::Arg::I32(i32::from(self.causal)),
        ];
        cuda::launch(
            &p.device,
            "causal_softmax_bwd",
            p.dtype(),
            cuda::rows(rows),
            &args,
        )?;
        Ok((out, pl.shape().clone()))
    }
}

/// Sum of the squares of all elements of `t` as an f64 scalar tensor, left on the device:
/// one pass, accumulated in f64.
pub fn sum_squares(t: &Tensor) -> candle_core::Result<Tensor> {
    let dt = t.dtype();
    let native = match t.device() {
        candle_core::Device::Cpu => matches!(dt, DType::F32 | DType::F64),
        _ => matches!(dt, DType::F32 | DType::F64 | DType::BF16),
    };
    let flat = t.flatten_all()?.contiguous()?;
    if !native {
        return flat.to_dtype(DType::F64)?.sqr()?.sum_all();
    }
    flat.apply_op1_no_bwd(&SumSquares)?.sum_all()
}

/// Partial sums of squares in f64 (one per thread block on a GPU, one on the CPU).
#[derive(Debug, Clone, Copy)]
struct SumSquares;

impl CustomOp1 for SumSquares {
    fn name(&self) -> &'static str {
        "sum-squares"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("sum-squares: input is not contiguous");
        };
        let total = match s {
            CpuStorage::F32(v) => v[start..end].iter().map(|&x| (x as f64) * (x as f64)).sum(),
            CpuStorage::F64(v) => v[start..end].iter().map(|&x| x * x).sum(),
            _ => candle_core::bail!("sum-squares: the CPU version takes f32 or f64"),
        };
        Ok((CpuStorage::F64(vec![total]), Shape::from(1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let cfg = cuda::flat(n);
        let blocks = cfg.grid_dim.0 as usize;
        let out = cuda::alloc_acc(&s.device, blocks, true)?;
        let args = [
            cuda::input(s, l)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
        ];
        cuda::launch(&s.device, "sum_squares", s.dtype(), cfg, &args)?;
        Ok((out, Shape::from(blocks)))
    }
}

/// AdamW constants of one step, in the order the kernel takes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConsts {
    /// `clip * (1 - beta1)`: the gradient's weight in the first moment.
    pub g1: f64,
    /// `beta1`.
    pub b1: f64,
    /// `clip^2 * (1 - beta2)`: the squared gradient's weight in the second moment.
    pub g2: f64,
    /// `beta2`.
    pub b2: f64,
    /// `1 / (1 - beta2^t)`.
    pub inv_bc2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// `lr / (1 - beta1^t)`.
    pub step: f64,
    /// `-lr * weight_decay`.
    pub decay: f64,
}

impl AdamWConsts {
    fn array(&self) -> [f64; 8] {
        [
            self.g1,
            self.b1,
            self.g2,
            self.b2,
            self.inv_bc2,
            self.eps,
            self.step,
            self.decay,
        ]
    }
}

/// One AdamW step over flat buffers in one pass: `theta`, `g` and `decay_mask` are `[n]`,
/// `mv` is the two moments one after the other (`[2n]`). Returns `[3n]`: the new weights, then
/// the new first and second moments. `decay_mask` is 1 where weight decay applies.
/// Arithmetic in the dtype of the inputs (f32 or f64), in the order of the plain formulation
/// `theta * (1 + mask * decay) - step * m / (sqrt(v * inv_bc2) + eps)`.
pub fn adamw_flat(
    theta: &Tensor,
    g: &Tensor,
    mv: &Tensor,
    decay_mask: &Tensor,
    k: &AdamWConsts,
) -> candle_core::Result<Tensor> {
    let n = theta.elem_count();
    if g.elem_count() != n || decay_mask.elem_count() != n || mv.elem_count() != 2 * n {
        candle_core::bail!(
            "adamw-flat: theta {n}, gradient {}, moments {}, mask {}",
            g.elem_count(),
            mv.elem_count(),
            decay_mask.elem_count()
        );
    }
    let dt = theta.dtype();
    if !matches!(dt, DType::F32 | DType::F64)
        || g.dtype() != dt
        || mv.dtype() != dt
        || decay_mask.dtype() != dt
    {
        candle_core::bail!("adamw-flat: all buffers must be f32 or all f64");
    }
    theta.contiguous()?.apply_op3_no_bwd(
        &g.contiguous()?,
        &mv.contiguous()?,
        &AdamWFlat {
            decay_mask: decay_mask.contiguous()?,
            k: k.array(),
        },
    )
}

/// The flat AdamW step as a custom op; the decay mask rides along as a fourth input.
#[derive(Debug)]
struct AdamWFlat {
    decay_mask: Tensor,
    k: [f64; 8],
}

impl CustomOp3 for AdamWFlat {
    fn name(&self) -> &'static str {
        "adamw-flat"
    }

    fn cpu_fwd(
        &self,
        theta: &CpuStorage,
        tl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        mv: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            theta: &[T],
            g: &[T],
            mv: &[T],
            mask: &[T],
            k: [f64; 8],
        ) -> (CpuStorage, Shape) {
            let n = theta.len();
            let k = k.map(T::from_f64);
            let mut out = vec![T::from_f64(0.0); 3 * n];
            for j in 0..n {
                let gj = g[j];
                let m = mv[j] * k[1] + gj * k[0];
                let v = mv[n + j] * k[3] + (gj * gj) * k[2];
                let denom = (v * k[4]).sqrt() + k[5];
                let update = (m / denom) * k[6];
                let dec = mask[j] * k[7] + T::from_f64(1.0);
                out[j] = theta[j] * dec - update;
                out[n + j] = m;
                out[2 * n + j] = v;
            }
            (T::to_cpu_storage_owned(out), Shape::from(3 * n))
        }
        let (mask, ml2) = self.decay_mask.storage_and_layout();
        let candle_core::Storage::Cpu(mask) = &*mask else {
            candle_core::bail!("adamw-flat: the decay mask is not on the CPU");
        };
        let slice = |l: &Layout| -> candle_core::Result<(usize, usize)> {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("adamw-flat: not contiguous".into()))
        };
        let (a, b) = slice(tl)?;
        let (c, d) = slice(gl)?;
        let (e, f) = slice(ml)?;
        let (h, i) = slice(ml2)?;
        Ok(match (theta, g, mv, mask) {
            (CpuStorage::F32(t), CpuStorage::F32(g), CpuStorage::F32(m), CpuStorage::F32(k)) => {
                run(&t[a..b], &g[c..d], &m[e..f], &k[h..i], self.k)
            }
            (CpuStorage::F64(t), CpuStorage::F64(g), CpuStorage::F64(m), CpuStorage::F64(k)) => {
                run(&t[a..b], &g[c..d], &m[e..f], &k[h..i], self.k)
            }
            _ => candle_core::bail!("adamw-flat: unsupported dtypes"),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        theta: &CudaStorage,
        tl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
        mv: &CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (mask, mask_l) = self.decay_mask.storage_and_layout();
        let candle_core::Storage::Cuda(mask) = &*mask else {
            candle_core::bail!("adamw-flat: the decay mask is not on the GPU");
        };
        let n = tl.shape().elem_count();
        let dt = theta.dtype();
        if g.dtype() != dt || mv.dtype() != dt || mask.dtype() != dt {
            candle_core::bail!("adamw-flat: all buffers must be f32 or all f64");
        }
        let out = cuda::alloc_like(theta, 3 * n)?;
        let mut args = vec![
            cuda::input(theta, tl)?,
            cuda::input(g, gl)?,
            cuda::input(mv, ml)?,
            cuda::input(mask, mask_l)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
        ];
        args.extend(self.k.iter().map(|&x| cuda::real(dt, x)));
        cuda::launch(&theta.device, "adamw_flat", dt, cuda::flat(n), &args)?;
        Ok((out, Shape::from(3 * n)))
    }
}

/// One parameter of a multi-tensor optimizer step (see [`MultiTensor`]).
#[derive(Debug, Clone)]
pub struct MultiParam {
    /// The master weights (f32; f64 on the CPU), contiguous, updated in place.
    pub master: Tensor,
    /// Its gradient: contiguous, as many elements, any float dtype. `None` reads as zeros.
    pub grad: Option<Tensor>,
    /// A compute copy to refresh with the new weights: a contiguous tensor and the element
    /// offset of this parameter's values in it.
    pub copy: Option<(Tensor, usize)>,
    /// Whether weight decay applies (matrices).
    pub decay: bool,
}

/// The parameters of one optimizer step, laid out back to back in one global index space
/// (the layout of the flat moments). The norm of the gradients and the AdamW update are one
/// pass each over every parameter in place, without concatenating them into flat buffers
/// and scattering the result back: on a GPU the buffers' addresses go to the device once, as
/// a table, and each pass is one launch (a parameter of a flat update cost about four
/// launches, ~1,500 a step on `base`). On the CPU the same arithmetic runs parameter by
/// parameter; that version is what CI tests against [`adamw_flat`].
#[derive(Debug)]
pub struct MultiTensor {
    params: Vec<MultiParam>,
    total: usize,
    /// The device table of addresses (`MT_FIELDS` i64 per parameter), on a GPU.
    table: Option<Tensor>,
}

/// Fields per parameter in the device table (`MT_FIELDS` in kernels.cu).
#[cfg(feature = "cuda")]
const MT_FIELDS: usize = 6;

impl MultiTensor {
    /// Checks the parameters and, on a GPU, uploads their table. Fails when a tensor is not
    /// contiguous, a gradient or a copy does not fit its parameter, or the dtypes are not
    /// ones the device kernels take (see [`MultiTensor::supported`]).
    pub fn new(params: Vec<MultiParam>) -> candle_core::Result<Self> {
        if !Self::supported(&params) {
            candle_core::bail!("multi-tensor step: unsupported devices, dtypes or layouts");
        }
        let mut total = 0;
        for p in &params {
            let n = p.master.elem_count();
            if let Some(g) = &p.grad
                && g.elem_count() != n
            {
                candle_core::bail!(
                    "multi-tensor step: gradient {:?} for a parameter {:?}",
                    g.dims(),
                    p.master.dims()
                );
            }
            if let Some((c, off)) = &p.copy
                && off + n > c.elem_count()
            {
                candle_core::bail!("multi-tensor step: the compute copy is too small");
            }
            total += n;
        }
        let table = match params.first().map(|p| p.master.device().clone()) {
            #[cfg(feature = "cuda")]
            Some(dev @ candle_core::Device::Cuda(_)) => {
                let mut tab = Vec::with_capacity(params.len() * MT_FIELDS);
                let mut off = 0usize;
                for p in &params {
                    let n = p.master.elem_count();
                    let copy = match &p.copy {
                        Some((c, o)) => cuda::tensor_address(c, *o)?,
                        None => 0,
                    };
                    let grad = match &p.grad {
                        Some(g) => cuda::tensor_address(g, 0)?,
                        None => 0,
                    };
                    tab.extend([
                        cuda::tensor_address(&p.master, 0)? as i64,
                        grad as i64,
                        copy as i64,
                        n as i64,
                        off as i64,
                        i64::from(p.decay),
                    ]);
                    off += n;
                }
                let len = tab.len();
                Some(Tensor::from_vec(tab, len, &dev)?)
            }
            _ => None,
        };
        Ok(MultiTensor {
            params,
            total,
            table,
        })
    }

    /// Whether [`MultiTensor::new`] takes these parameters: all on one device, contiguous;
    /// on the CPU f32 or f64 masters; on a GPU f32 masters, gradients all f32 or all bf16,
    /// compute copies all f32 or all bf16.
    pub fn supported(params: &[MultiParam]) -> bool {
        let Some(first) = params.first() else {
            return true;
        };
        let dev = first.master.device();
        let contiguous = |t: &Tensor| t.is_contiguous() && t.device().same_device(dev);
        let layouts = params.iter().all(|p| {
            contiguous(&p.master)
                && p.grad.as_ref().is_none_or(contiguous)
                && p.copy.as_ref().is_none_or(|(c, _)| contiguous(c))
        });
        if !layouts {
            return false;
        }
        if dev.is_cpu() {
            let dt = first.master.dtype();
            return matches!(dt, DType::F32 | DType::F64)
                && params.iter().all(|p| p.master.dtype() == dt);
        }
        let one_of = |mut it: Box<dyn Iterator<Item = DType> + '_>| match it.next() {
            None => true,
            Some(d) => matches!(d, DType::F32 | DType::BF16) && it.all(|x| x == d),
        };
        cfg!(feature = "cuda")
            && params.iter().all(|p| p.master.dtype() == DType::F32)
            && one_of(Box::new(
                params
                    .iter()
                    .filter_map(|p| p.grad.as_ref().map(Tensor::dtype)),
            ))
            && one_of(Box::new(
                params
                    .iter()
                    .filter_map(|p| p.copy.as_ref().map(|(c, _)| c.dtype())),
            ))
    }

    /// Number of values over all parameters.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Sum of the squared gradients, in f64 (one pass; read back once).
    pub fn sum_squares(&self) -> candle_core::Result<f64> {
        if self.total == 0 {
            return Ok(0.0);
        }
        let Some(table) = &self.table else {
            let mut acc = 0f64;
            for g in self.params.iter().filter_map(|p| p.grad.as_ref()) {
                let v: Vec<f64> = g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
                acc += v.iter().map(|x| x * x).sum::<f64>();
            }
            return Ok(acc);
        };
        let op = MtSumSquares {
            ntens: self.params.len(),
            total: self.total,
            grad_dtype: self.grad_dtype(),
        };
        table.apply_op1_no_bwd(&op)?.sum_all()?.to_scalar::<f64>()
    }

    fn grad_dtype(&self) -> DType {
        self.params
            .iter()
            .find_map(|p| p.grad.as_ref().map(Tensor::dtype))
            .unwrap_or(DType::F32)
    }

    fn copy_dtype(&self) -> DType {
        self.params
            .iter()
            .find_map(|p| p.copy.as_ref().map(|(c, _)| c.dtype()))
            .unwrap_or(DType::F32)
    }

    /// One AdamW step in place: the masters, the moments `mv` (`[2 * total]`, first moments
    /// then second, at each value's global index) and the compute copies. The arithmetic and
    /// its order are those of [`adamw_flat`].
    pub fn adamw(&self, mv: &Tensor, k: &AdamWConsts) -> candle_core::Result<()> {
        if mv.elem_count() != 2 * self.total || !mv.is_contiguous() {
            candle_core::bail!(
                "multi-tensor AdamW: moments of {} values for {} parameters' values",
                mv.elem_count(),
                self.total
            );
        }
        if self.total == 0 {
            return Ok(());
        }
        if let Some(table) = &self.table {
            return mv.inplace_op1(&MtAdamW {
                table: table.clone(),
                ntens: self.params.len(),
                total: self.total,
                grad_dtype: self.grad_dtype(),
                copy_dtype: self.copy_dtype(),
                k: k.array(),
            });
        }
        match self.params[0].master.dtype() {
            DType::F64 => self.adamw_cpu::<f64>(mv, k),
            _ => self.adamw_cpu::<f32>(mv, k),
        }
    }

    /// The CPU version: parameter by parameter, the arithmetic of `AdamWFlat::cpu_fwd`.
    fn adamw_cpu<T: Real>(&self, mv: &Tensor, k: &AdamWConsts) -> candle_core::Result<()> {
        let dt = T::DTYPE;
        let k = k.array().map(T::from_f64);
        let mut off = 0;
        for p in &self.params {
            let n = p.master.elem_count();
            let theta: Vec<T> = p.master.flatten_all()?.to_vec1()?;
            let g: Vec<T> = match &p.grad {
                Some(g) => g.flatten_all()?.to_dtype(dt)?.to_vec1()?,
                None => vec![T::from_f64(0.0); n],
            };
            let mut m: Vec<T> = mv.narrow(0, off, n)?.to_dtype(dt)?.to_vec1()?;
            let mut v: Vec<T> = mv.narrow(0, self.total + off, n)?.to_dtype(dt)?.to_vec1()?;
            let mask = T::from_f64(if p.decay { 1.0 } else { 0.0 });
            let mut out = theta;
            for j in 0..n {
                let gj = g[j];
                m[j] = m[j] * k[1] + gj * k[0];
                v[j] = v[j] * k[3] + (gj * gj) * k[2];
                let denom = (v[j] * k[4]).sqrt() + k[5];
                let update = (m[j] / denom) * k[6];
                let dec = mask * k[7] + T::from_f64(1.0);
                out[j] = out[j] * dec - update;
            }
            let dev = p.master.device();
            let new = Tensor::from_vec(out, n, dev)?;
            p.master.flatten_all()?.slice_set(&new, 0, 0)?;
            let mvt = mv.dtype();
            mv.slice_set(&Tensor::from_vec(m, n, dev)?.to_dtype(mvt)?, 0, off)?;
            mv.slice_set(
                &Tensor::from_vec(v, n, dev)?.to_dtype(mvt)?,
                0,
                self.total + off,
            )?;
            if let Some((c, o)) = &p.copy {
                c.flatten_all()?
                    .slice_set(&new.to_dtype(c.dtype())?, 0, *o)?;
            }
            off += n;
        }
        Ok(())
    }
}

/// Blocks of the multi-tensor kernels, and the values each covers.
#[cfg(feature = "cuda")]
fn mt_grid(total: usize) -> (usize, usize) {
    let blocks = total.div_ceil(4096).clamp(1, 132 * 8);
    (blocks, total.div_ceil(blocks))
}

/// Blocks of the multi-tensor AdamW, and the values each covers: many short blocks, so
/// that the last wave is a small part of the kernel (with at most 1,056 long ones, a
/// `base` step's 370M values left part of the last wave idle).
#[cfg(feature = "cuda")]
fn mt_adamw_grid(total: usize) -> (usize, usize) {
    const PER: usize = 16 * 1024;
    (total.div_ceil(PER).max(1), PER)
}

/// The multi-tensor sum of squares, launched on the table: partial sums per block.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct MtSumSquares {
    ntens: usize,
    total: usize,
    grad_dtype: DType,
}

impl CustomOp1 for MtSumSquares {
    fn name(&self) -> &'static str {
        "mt-sum-squares"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("mt-sum-squares runs on a GPU only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (blocks, per) = mt_grid(self.total);
        let out = cuda::alloc_acc(&s.device, blocks, true)?;
        let args = [
            cuda::input(s, l)?,
            cuda::Arg::I32(self.ntens as i32),
            cuda::Arg::I64(self.total as i64),
            cuda::Arg::I64(per as i64),
            cuda::output(&out)?,
        ];
        let name = format!("mt_sum_squares_{}", cuda::suffix(self.grad_dtype)?);
        cuda::launch_named(&s.device, &name, cuda::blocks(blocks), &args)?;
        Ok((out, Shape::from(blocks)))
    }
}

/// The multi-tensor AdamW, applied in place to the moments.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct MtAdamW {
    table: Tensor,
    ntens: usize,
    total: usize,
    grad_dtype: DType,
    copy_dtype: DType,
    k: [f64; 8],
}

impl candle_core::InplaceOp1 for MtAdamW {
    fn name(&self) -> &'static str {
        "mt-adamw"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("mt-adamw runs on a GPU only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, mv: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let (blocks, per) = mt_adamw_grid(self.total);
        let mut args = vec![
            cuda::Arg::P(cuda::tensor_address(&self.table, 0)?),
            cuda::Arg::I32(self.ntens as i32),
            cuda::Arg::I64(self.total as i64),
            cuda::Arg::I64(per as i64),
            cuda::input(mv, l)?,
        ];
        args.extend(self.k.iter().map(|&x| cuda::Arg::F32(x as f32)));
        let name = format!(
            "mt_adamw_{}_{}",
            cuda::suffix(self.grad_dtype)?,
            cuda::suffix(self.copy_dtype)?
        );
        cuda::launch_named(&mv.device, &name, cuda::blocks(blocks), &args)?;
        Ok(())
    }
}

/// Whether the fused kernels take `dt` on the device of `t`: f32 and f64 on the CPU, f32
/// and bf16 on a GPU. Other combinations run the plain reference ops.
fn native(t: &Tensor) -> bool {
    let dt = t.dtype();
    if t.device().is_cpu() {
        matches!(dt, DType::F32 | DType::F64)
    } else {
        matches!(dt, DType::F32 | DType::BF16)
    }
}

/// RMSNorm over the last dimension: `x * w / sqrt(mean(x^2) + eps)`, `w: [d]` in the dtype
/// of `x`, f32 arithmetic (f64 for f64). Differentiable with respect to `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] || w.dtype() != x.dtype() {
        candle_core::bail!(
            "rms-norm: weight {:?} {:?} for input {:?} {:?}",
            w.dims(),
            w.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    if native(x) {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
    } else {
        rms_norm_reference(x, w, eps)
    }
}

/// [`rms_norm`] as plain candle ops (normalised in f32 or f64, then cast and scaled).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xa = x.to_dtype(acc)?;
    let ms = xa.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    xa.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(w)
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms<T: Real>(x: &[T], eps: T) -> T {
    let mut ss = T::from_f64(0.0);
    for &v in x {
        ss += v * v;
    }
    T::from_f64(1.0) / (ss / T::from_f64(x.len() as f64) + eps).sqrt()
}

/// Contiguous data of a CPU storage as a slice of `T`.
fn cpu_slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused op: input is not contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

#[derive(Debug, Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            xs: &CpuStorage,
            xl: &Layout,
            ws: &CpuStorage,
            wl: &Layout,
            eps: f64,
        ) -> candle_core::Result<CpuStorage> {
            let (x, w) = (cpu_slice::<T>(xs, xl)?, cpu_slice::<T>(ws, wl)?);
            let eps = T::from_f64(eps);
            let mut y = vec![T::from_f64(0.0); x.len()];
            for (xr, yr) in x.chunks(w.len()).zip(y.chunks_mut(w.len())) {
                let r = inv_rms(xr, eps);
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * g;
                }
            }
            Ok(T::to_cpu_storage_owned(y))
        }
        let out = match xs {
            CpuStorage::F32(_) => run::<f32>(xs, xl, ws, wl, self.eps)?,
            CpuStorage::F64(_) => run::<f64>(xs, xl, ws, wl, self.eps)?,
            _ => candle_core::bail!("rms-norm: the CPU version takes f32 or f64"),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let d = wl.shape().elem_count();
        let out = cuda::alloc_like(xs, n)?;
        let args = [
            cuda::input(xs, xl)?,
            cuda::input(ws, wl)?,
            cuda::output(&out)?,
            cuda::Arg::I64((n / d) as i64),
            cuda::Arg::I32(d as i32),
            cuda::Arg::F32(self.eps as f32),
        ];
        cuda::launch(
            &xs.device,
            "rms_norm_fwd",
            xs.dtype(),
            cuda::rows(n / d),
            &args,
        )?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let dx = x.apply_op3_no_bwd(&w.contiguous()?, &grad, &RmsNormBwdX { eps: self.eps })?;
        // A frozen weight (a constant of the graph, as a Hugging Face base's norms are) gets
        // no gradient: nothing would read it.
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        // Per-row terms of the weight gradient (partial sums over groups of rows on a GPU),
        // summed over rows by a matrix product.
        let part = x.apply_op2_no_bwd(&grad, &RmsNormBwdW { eps: self.eps })?;
        let rows = part.dim(0)?;
        let ones = Tensor::ones((1, rows), part.dtype(), part.device())?;
        let dw = ones.matmul(&part)?.reshape(w.dims())?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Gradient of [`RmsNorm`] with respect to `x`, from `x`, `w` and the output gradient.
#[derive(Debug, Clone, Copy)]
struct RmsNormBwdX {
    eps: f64,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-x"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> candle_core::Result<CpuStorage> {
            let d = w.len();
            let eps = T::from_f64(eps);
            let mut dx = vec![T::from_f64(0.0); x.len()];
            for ((xr, gr), o) in x.chunks(d).zip(g.chunks(d)).zip(dx.chunks_mut(d)) {
                let r = inv_rms(xr, eps);
                let mut dot = T::from_f64(0.0);
                for j in 0..d {
                    dot += gr[j] * w[j] * xr[j];
                }
                let c = r * r * dot / T::from_f64(d as f64);
                for j in 0..d {
                    o[j] = r * (gr[j] * w[j] - xr[j] * c);
                }
            }
            Ok(T::to_cpu_storage_owned(dx))
        }
        let out = match xs {
            CpuStorage::F32(_) => run::<f32>(
                cpu_slice(xs, xl)?,
                cpu_slice(ws, wl)?,
                cpu_slice(gs, gl)?,
                self.eps,
            )?,
            CpuStorage::F64(_) => run::<f64>(
                cpu_slice(xs, xl)?,
                cpu_slice(ws, wl)?,
                cpu_slice(gs, gl)?,
                self.eps,
            )?,
            _ => candle_core::bail!("rms-norm-bwd: the CPU version takes f32 or f64"),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = xl.shape().elem_count();
        let d = wl.shape().elem_count();
        let out = cuda::alloc_like(xs, n)?;
        let args = [
            cuda::input(xs, xl)?,
            cuda::input(ws, wl)?,
            cuda::input(gs, gl)?,
            cuda::output(&out)?,
            cuda::Arg::I64((n / d) as i64),
            cuda::Arg::I32(d as i32),
            cuda::Arg::F32(self.eps as f32),
        ];
        cuda::launch(
            &xs.device,
            "rms_norm_bwd_x",
            xs.dtype(),
            cuda::rows(n / d),
            &args,
        )?;
        Ok((out, xl.shape().clone()))
    }
}

/// Rows a block of the GPU's `rms_norm_bwd_w` sums (`RMS_W_GROUP` in `kernels.cu`).
#[cfg(feature = "cuda")]
const RMS_W_GROUP: usize = 16;

/// Per-row terms of the weight gradient of [`RmsNorm`]: `dy * x / rms(x)`, `[rows, d]` in f32
/// (f64 for f64 input); on a GPU their sums over groups of `RMS_W_GROUP` rows,
/// `[ceil(rows / RMS_W_GROUP), d]`, so that the terms are not written out in f32 and read
/// back for the sum (on `base`, the kernel and the sum over rows together 0.3 ms a step
/// less; docs/GPU.md, session 8).
#[derive(Debug, Clone, Copy)]
struct RmsNormBwdW {
    eps: f64,
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-w"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], g: &[T], d: usize, eps: f64) -> CpuStorage {
            let eps = T::from_f64(eps);
            let mut out = vec![T::from_f64(0.0); x.len()];
            for ((xr, gr), o) in x.chunks(d).zip(g.chunks(d)).zip(out.chunks_mut(d)) {
                let r = inv_rms(xr, eps);
                for j in 0..d {
                    o[j] = gr[j] * xr[j] * r;
                }
            }
            T::to_cpu_storage_owned(out)
        }
        let d = xl.dims()[xl.dims().len() - 1];
        let n = xl.shape().elem_count();
        let out = match xs {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(xs, xl)?, cpu_slice(gs, gl)?, d, self.eps),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(xs, xl)?, cpu_slice(gs, gl)?, d, self.eps),
            _ => candle_core::bail!("rms-norm-bwd: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from((n / d.max(1), d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = xl.dims()[xl.dims().len() - 1];
        let rows = xl.shape().elem_count() / d;
        let groups = rows.div_ceil(RMS_W_GROUP);
        let out = cuda::alloc_acc(&xs.device, groups * d, false)?;
        let args = [
            cuda::input(xs, xl)?,
            cuda::input(gs, gl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(rows as i64),
            cuda::Arg::I32(d as i32),
            cuda::Arg::F32(self.eps as f32),
        ];
        cuda::launch(
            &xs.device,
            "rms_norm_bwd_w",
            xs.dtype(),
            cuda::blocks(groups),
            &args,
        )?;
        Ok((out, Shape::from((groups, d))))
    }
}

/// Splits the attention heads of `x: [B * T, H * hd]` (a projection's output, tokens in
/// batch-major order) into `[B, H, T, hd]`, rotating each head by RoPE at its position when
/// `rope` holds the tables `cos, sin: [T, hd/2]` (constants, no gradient; rotate-half form
/// `[x1 cos - x2 sin, x1 sin + x2 cos]`). One kernel each way: as plain ops this was a
/// reshape, a transpose, candle's strided copy and the rotation, and their backward passes
/// (the strided copies alone were 12% of a `base` bf16 step's kernel time on the H100).
pub fn split_heads(
    x: &Tensor,
    b: usize,
    t: usize,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let d = x.elem_count() / (b * t).max(1);
    let hd = d / heads.max(1);
    if x.elem_count() != b * t * d || heads * hd != d || heads == 0 {
        candle_core::bail!(
            "split_heads: {:?} is not {b}x{t} tokens of {heads} heads",
            x.dims()
        );
    }
    let rope = match rope {
        Some((cos, sin)) => {
            if !hd.is_multiple_of(2) || cos.dims() != [t, hd / 2] || sin.dims() != [t, hd / 2] {
                candle_core::bail!(
                    "rope: tables {:?}/{:?} for {heads} heads of {hd} at {t} positions",
                    cos.dims(),
                    sin.dims()
                );
            }
            Some((cos, sin))
        }
        None => None,
    };
    let fits = rope.is_none_or(|(c, s)| c.dtype() == x.dtype() && s.dtype() == x.dtype());
    // The kernel indexes in 32 bits.
    let small = x.elem_count() / 2 < i32::MAX as usize;
    if native(x) && hd.is_multiple_of(2) && fits && small {
        x.contiguous()?.apply_op1(Heads {
            dims: [b, heads, t, hd],
            merge: false,
            rope: match rope {
                Some((c, s)) => Some((c.contiguous()?.detach(), s.contiguous()?.detach(), 1.0)),
                None => None,
            },
        })
    } else {
        split_heads_reference(x, b, t, heads, rope)
    }
}

/// [`split_heads`] as plain candle ops.
pub fn split_heads_reference(
    x: &Tensor,
    b: usize,
    t: usize,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let hd = x.elem_count() / (b * t * heads);
    let y = x
        .reshape((b, t, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    match rope {
        Some((cos, sin)) => rope_reference(&y, cos, sin),
        None => Ok(y),
    }
}

/// Merges attention heads `x: [B, H, T, hd]` back into `[B * T, H * hd]`, the inverse of
/// [`split_heads`] without rotation; one kernel each way.
pub fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    if native(x) && hd.is_multiple_of(2) && x.elem_count() / 2 < i32::MAX as usize {
        x.contiguous()?.apply_op1(Heads {
            dims: [b, h, t, hd],
            merge: true,
            rope: None,
        })
    } else {
        x.transpose(1, 2)?.reshape((b * t, h * hd))
    }
}

/// RoPE in the rotate-half form on `x: [B, H, T, hd]` with `cos, sin: [T, hd/2]`, as plain
/// candle ops.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(candle_core::D::Minus1)? / 2;
    let x1 = x.narrow(candle_core::D::Minus1, 0, half)?;
    let x2 = x.narrow(candle_core::D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
    Tensor::cat(&[r1, r2], candle_core::D::Minus1)
}

/// The head split (`[B, T, H, hd]` rows to `[B, H, T, hd]`) or merge (the reverse), with an
/// optional rotation of each head by its position (`rope`: the tables and the angle's sign).
/// The backward of one is the other with the opposite angle (a rotation's transpose is the
/// rotation back).
#[derive(Debug, Clone)]
struct Heads {
    /// `[B, H, T, hd]`.
    dims: [usize; 4],
    merge: bool,
    rope: Option<(Tensor, Tensor, f64)>,
}

impl Heads {
    /// For output row `r` (of `hd` values), the input row it reads and its position.
    fn source(&self, r: usize) -> (usize, usize) {
        let [_, h, t, _] = self.dims;
        if self.merge {
            // Output [b, t, h], input [b, h, t].
            let (hh, rest) = (r % h, r / h);
            let (tt, bb) = (rest % t, rest / t);
            ((bb * h + hh) * t + tt, tt)
        } else {
            // Output [b, h, t], input [b, t, h].
            let (tt, rest) = (r % t, r / t);
            let (hh, bb) = (rest % h, rest / h);
            ((bb * t + tt) * h + hh, tt)
        }
    }

    fn out_shape(&self) -> Shape {
        let [b, h, t, hd] = self.dims;
        if self.merge {
            Shape::from((b * t, h * hd))
        } else {
            Shape::from((b, h, t, hd))
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(op: &Heads, x: &[T], tables: Option<(&[T], &[T], f64)>) -> CpuStorage {
            let hd = op.dims[3];
            let half = hd / 2;
            let mut y = vec![T::from_f64(0.0); x.len()];
            for (r, yr) in y.chunks_mut(hd).enumerate() {
                let (src, pos) = op.source(r);
                let xr = &x[src * hd..(src + 1) * hd];
                match tables {
                    None => yr.copy_from_slice(xr),
                    Some((cos, sin, sign)) => {
                        let sign = T::from_f64(sign);
                        for i in 0..half {
                            let (c, s) = (cos[pos * half + i], sin[pos * half + i] * sign);
                            let (x1, x2) = (xr[i], xr[half + i]);
                            yr[i] = x1 * c - x2 * s;
                            yr[half + i] = x1 * s + x2 * c;
                        }
                    }
                }
            }
            T::to_cpu_storage_owned(y)
        }
        let tables = self
            .rope
            .as_ref()
            .map(|(c, s, sign)| (c.storage_and_layout(), s.storage_and_layout(), *sign));
        let out = match (s, &tables) {
            (CpuStorage::F32(_), None) => run::<f32>(self, cpu_slice(s, l)?, None),
            (CpuStorage::F64(_), None) => run::<f64>(self, cpu_slice(s, l)?, None),
            (_, Some(((cs, cl), (ss, sl), sign))) => {
                let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(ss)) = (&**cs, &**ss)
                else {
                    candle_core::bail!("rope: tables are not on the CPU");
                };
                match s {
                    CpuStorage::F32(_) => run::<f32>(
                        self,
                        cpu_slice(s, l)?,
                        Some((cpu_slice(cs, cl)?, cpu_slice(ss, sl)?, *sign)),
                    ),
                    CpuStorage::F64(_) => run::<f64>(
                        self,
                        cpu_slice(s, l)?,
                        Some((cpu_slice(cs, cl)?, cpu_slice(ss, sl)?, *sign)),
                    ),
                    _ => candle_core::bail!("heads: the CPU version takes f32 or f64"),
                }
            }
            _ => candle_core::bail!("heads: the CPU version takes f32 or f64"),
        };
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let [_, h, t, hd] = self.dims;
        let n = l.shape().elem_count();
        let out = cuda::alloc_like(s, n)?;
        let tables = self
            .rope
            .as_ref()
            .map(|(c, s, sign)| (c.storage_and_layout(), s.storage_and_layout(), *sign));
        let (cos, sin, sign) = match &tables {
            Some(((cs, cl), (ss, sl), sign)) => {
                let (candle_core::Storage::Cuda(cs), candle_core::Storage::Cuda(ss)) =
                    (&**cs, &**ss)
                else {
                    candle_core::bail!("rope: tables are not on the GPU");
                };
                (cuda::input(cs, cl)?, cuda::input(ss, sl)?, *sign)
            }
            // Not read without rotation; any valid address will do.
            None => (cuda::input(s, l)?, cuda::input(s, l)?, 0.0),
        };
        let (x, y) = (cuda::input(s, l)?, cuda::output(&out)?);
        // Two pairs a thread where every address is aligned to two elements (always, for
        // the tensors the attention makes).
        let pair_bytes = 2 * s.dtype().size_in_bytes() as u64;
        let aligned = [&x, &y, &cos, &sin]
            .iter()
            .all(|a| matches!(a, cuda::Arg::P(p) if p.is_multiple_of(pair_bytes)));
        let wide = (hd / 2).is_multiple_of(2) && aligned;
        let (kernel, per_thread) = if wide { ("heads2", 4) } else { ("heads", 2) };
        let args = [
            x,
            cos,
            sin,
            y,
            cuda::Arg::I64((n / per_thread) as i64),
            cuda::Arg::I32(h as i32),
            cuda::Arg::I32(t as i32),
            cuda::Arg::I32((hd / 2) as i32),
            cuda::Arg::I32(i32::from(self.merge)),
            cuda::Arg::I32(i32::from(self.rope.is_some())),
            cuda::Arg::F32(sign as f32),
        ];
        cuda::launch(
            &s.device,
            kernel,
            s.dtype(),
            cuda::flat(n / per_thread),
            &args,
        )?;
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let back = Heads {
            dims: self.dims,
            merge: !self.merge,
            rope: self.rope.clone().map(|(c, s, sign)| (c, s, -sign)),
        };
        let g = grad.contiguous()?.apply_op1_no_bwd(&back)?;
        Ok(Some(g.reshape(arg.dims())?))
    }
}

/// Rows of `x: [r, ...]` picked by `ids: [m]` (u32, each at most `r`): `out[i] = x[ids[i]]`,
/// and a row of zeros where `ids[i] == r`. No gradient (the MoE dispatch builds its
/// backward from gathers too). On a GPU one kernel copies whole rows in 16-byte words where
/// the rows' width allows; candle's CUDA `index_select` computes each element's indices
/// with 64-bit divisions and ran at about a third of the memory bandwidth, and the zero row
/// cost a concatenation (a full copy of `x`) first.
pub fn gather_rows(x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    if ids.dtype() != DType::U32 || ids.rank() != 1 || x.rank() == 0 {
        candle_core::bail!(
            "gather_rows: ids {:?} {:?} for rows of {:?}",
            ids.dtype(),
            ids.dims(),
            x.dims()
        );
    }
    x.contiguous()?
        .apply_op2_no_bwd(&ids.contiguous()?, &GatherRowsOp)
}

/// The sum of the rows that several index lists pick: `ids: [j, m]` (u32, each at most `r`)
/// gives `out[i] = sum_j x[ids[j, i]]`, index `r` reading zeros. No gradient. One kernel on
/// a GPU for f32 and bf16 (summed in f32): the MoE dispatch's backward gathered each top-k
/// slot's rows into a tensor of its own and added those tensors up.
pub fn gather_rows_sum(x: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (j, _) = ids.dims2()?;
    if ids.dtype() != DType::U32 || x.rank() == 0 || j == 0 {
        candle_core::bail!(
            "gather_rows_sum: ids {:?} {:?} for rows of {:?}",
            ids.dtype(),
            ids.dims(),
            x.dims()
        );
    }
    if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&ids.contiguous()?, &GatherRowsSum);
    }
    let mut acc = gather_rows(x, &ids.get(0)?)?;
    for i in 1..j {
        acc = (acc + gather_rows(x, &ids.get(i)?)?)?;
    }
    Ok(acc)
}

/// [`gather_rows_sum`] on a GPU.
#[derive(Debug)]
struct GatherRowsSum;

impl CustomOp2 for GatherRowsSum {
    fn name(&self) -> &'static str {
        "gather-rows-sum"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("gather-rows-sum: the CPU takes the plain ops")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (j, m) = il.shape().dims2()?;
        let (r, width, shape) = gathered(xl, m);
        let out = cuda::alloc_like(x, m * width)?;
        let (src, dst) = (cuda::input(x, xl)?, cuda::output(&out)?);
        let (kernel, _) = cuda::fours("gather_sum", x.dtype(), width, &[&src, &dst]);
        let args = [
            src,
            cuda::input(ids, il)?,
            dst,
            cuda::Arg::I64(m as i64),
            cuda::Arg::I64(r as i64),
            cuda::Arg::I64(width as i64),
            cuda::Arg::I32(j as i32),
        ];
        cuda::launch(&x.device, &kernel, x.dtype(), cuda::row_groups(m), &args)?;
        Ok((out, shape))
    }
}

/// [`gather_rows`] as an op (also the forward of the MoE dispatch's own gather op).
#[derive(Debug)]
pub(crate) struct GatherRowsOp;

impl CustomOp2 for GatherRowsOp {
    fn name(&self) -> &'static str {
        "gather-rows"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        /// Whole rows of `x` (of `width` each), a zero row for an index past them.
        fn rows<T: Copy + Default>(x: &[T], width: usize, ids: &[u32]) -> Vec<T> {
            let mut out = Vec::with_capacity(ids.len() * width);
            for &i in ids {
                match x.get(i as usize * width..(i as usize + 1) * width) {
                    Some(row) => out.extend_from_slice(row),
                    None => out.resize(out.len() + width, T::default()),
                }
            }
            out
        }
        let ids = cpu_u32(ids, il)?;
        let Some((a, b)) = xl.contiguous_offsets() else {
            candle_core::bail!("gather-rows: the input is not contiguous");
        };
        let (_, width, shape) = gathered(xl, ids.len());
        let out = match x {
            CpuStorage::F32(v) => CpuStorage::F32(rows(&v[a..b], width, ids)),
            CpuStorage::F64(v) => CpuStorage::F64(rows(&v[a..b], width, ids)),
            CpuStorage::BF16(v) => CpuStorage::BF16(rows(&v[a..b], width, ids)),
            CpuStorage::F16(v) => CpuStorage::F16(rows(&v[a..b], width, ids)),
            CpuStorage::U32(v) => CpuStorage::U32(rows(&v[a..b], width, ids)),
            other => candle_core::bail!(
                "gather-rows: no gather for {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let m = il.shape().elem_count();
        let (r, width, shape) = gathered(xl, m);
        let out = cuda::alloc_like(x, m * width)?;
        let row_bytes = width * x.dtype().size_in_bytes();
        let (src, dst) = (cuda::input(x, xl)?, cuda::output(&out)?);
        let (cuda::Arg::P(sa), cuda::Arg::P(da)) = (&src, &dst) else {
            candle_core::bail!("gather-rows: addresses expected");
        };
        // The widest word that divides a row and both addresses.
        let word = [16usize, 8, 4, 2, 1]
            .into_iter()
            .find(|&w| {
                row_bytes.is_multiple_of(w)
                    && sa.is_multiple_of(w as u64)
                    && da.is_multiple_of(w as u64)
            })
            .unwrap_or(1);
        let args = [
            src,
            cuda::input(ids, il)?,
            dst,
            cuda::Arg::I64(m as i64),
            cuda::Arg::I64(r as i64),
            cuda::Arg::I64((row_bytes / word) as i64),
        ];
        cuda::launch_named(
            &x.device,
            &format!("gather_rows_w{word}"),
            cuda::row_groups(m),
            &args,
        )?;
        Ok((out, shape))
    }
}

/// For a gather of `m` rows from `x`: its row count, a row's width in elements, and the
/// output's shape (`x`'s with `m` rows).
fn gathered(xl: &Layout, m: usize) -> (usize, usize, Shape) {
    let mut dims = xl.dims().to_vec();
    let r = dims[0];
    let width = xl.shape().elem_count() / r.max(1);
    dims[0] = m;
    (r, width, Shape::from(dims))
}

/// The u32 values of a contiguous index tensor on the CPU.
fn cpu_ids(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    t.flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<u32>()
}

/// The MoE combine: `out[t] = sum_j gates[t, j] * y[ids[j * n + t]]` for the `k` slots of
/// each of the `n` tokens, a slot whose id is `>= r` (dropped, or reading nothing) adding
/// nothing. `y: [r, d]` holds the experts' outputs (sorted or padded rows), `gates: [n, k]`
/// in the dtype of `y`, `ids: [k * n]` slot-major, and `back: [>= r]` lists for each row of
/// `y` the slot-major position `j * n + t` that reads it (`>= k * n`: none; a row is read by
/// at most one slot). Differentiable with respect to `y` and `gates`, one kernel each way
/// (the gradient of `y` is a gather through `back`). As plain ops this was a concatenation
/// with a zero row, a gather, and per slot a narrow, a broadcast product and a sum: about
/// ten graph nodes, each with a zero tensor and an add in the backward pass.
pub fn moe_combine(
    y: &Tensor,
    gates: &Tensor,
    ids: &Tensor,
    back: &Tensor,
) -> candle_core::Result<Tensor> {
    let (r, _) = y.dims2()?;
    let (n, k) = gates.dims2()?;
    if ids.dims() != [k * n] || back.elem_count() < r || gates.dtype() != y.dtype() {
        candle_core::bail!(
            "moe-combine: y {:?}, gates {:?} {:?}, ids {:?}, back {:?}",
            y.dims(),
            gates.dims(),
            gates.dtype(),
            ids.dims(),
            back.dims()
        );
    }
    if !native(y) || r == 0 || n == 0 {
        return moe_combine_reference(y, gates, ids);
    }
    let op = MoeCombine {
        ids: ids.contiguous()?,
        back: back.narrow(0, 0, r)?.contiguous()?,
        n,
        k,
    };
    y.contiguous()?.apply_op2(&gates.contiguous()?, op)
}

/// [`moe_combine`] as plain candle ops: the reference it is tested against.
pub fn moe_combine_reference(
    y: &Tensor,
    gates: &Tensor,
    ids: &Tensor,
) -> candle_core::Result<Tensor> {
    let (r, d) = y.dims2()?;
    let (n, k) = gates.dims2()?;
    // Every id >= r reads the appended zero row.
    let clamped: Vec<u32> = cpu_ids(ids)?.iter().map(|&i| i.min(r as u32)).collect();
    let ids = Tensor::from_vec(clamped, k * n, y.device())?;
    let zero = Tensor::zeros((1, d), y.dtype(), y.device())?;
    let rows = Tensor::cat(&[y, &zero], 0)?.index_select(&ids, 0)?;
    let mut out = Tensor::zeros((n, d), y.dtype(), y.device())?;
    for j in 0..k {
        let part = rows
            .narrow(0, j * n, n)?
            .broadcast_mul(&gates.narrow(1, j, 1)?)?;
        out = (out + part)?;
    }
    Ok(out)
}

/// [`moe_combine`] as a custom op.
#[derive(Debug, Clone)]
struct MoeCombine {
    ids: Tensor,
    back: Tensor,
    n: usize,
    k: usize,
}

impl CustomOp2 for MoeCombine {
    fn name(&self) -> &'static str {
        "moe-combine"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            y: &[T],
            g: &[T],
            ids: &[u32],
            (n, k, d): (usize, usize, usize),
        ) -> CpuStorage {
            let r = y.len() / d.max(1);
            let mut out = vec![T::from_f64(0.0); n * d];
            for (t, o) in out.chunks_mut(d).enumerate() {
                for j in 0..k {
                    let id = ids[j * n + t] as usize;
                    if id < r {
                        let gate = g[t * k + j];
                        for (x, &v) in o.iter_mut().zip(&y[id * d..(id + 1) * d]) {
                            *x += gate * v;
                        }
                    }
                }
            }
            T::to_cpu_storage_owned(out)
        }
        let d = yl.dims()[1];
        let ids = cpu_ids(&self.ids)?;
        let dims = (self.n, self.k, d);
        let out = match ys {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(ys, yl)?, cpu_slice(gs, gl)?, &ids, dims),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(ys, yl)?, cpu_slice(gs, gl)?, &ids, dims),
            _ => candle_core::bail!("moe-combine: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from((self.n, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (r, d) = (yl.dims()[0], yl.dims()[1]);
        let out = cuda::alloc_like(ys, self.n * d)?;
        let (y, o) = (cuda::input(ys, yl)?, cuda::output(&out)?);
        let (kernel, _) = cuda::fours("moe_combine_fwd", ys.dtype(), d, &[&y, &o]);
        let args = [
            y,
            cuda::input(gs, gl)?,
            cuda::Arg::P(cuda::tensor_address(&self.ids, 0)?),
            o,
            cuda::Arg::I64(self.n as i64),
            cuda::Arg::I32(self.k as i32),
            cuda::Arg::I32(d as i32),
            cuda::Arg::I64(r as i64),
        ];
        cuda::launch(&ys.device, &kernel, ys.dtype(), cuda::rows(self.n), &args)?;
        Ok((out, Shape::from((self.n, d))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dy = grad.apply_op2_no_bwd(
            g,
            &MoeCombineBwd {
                of_y: true,
                op: self.clone(),
                rows: y.dim(0)?,
            },
        )?;
        let dg = grad.apply_op2_no_bwd(
            y,
            &MoeCombineBwd {
                of_y: false,
                op: self.clone(),
                rows: y.dim(0)?,
            },
        )?;
        Ok((Some(dy), Some(dg)))
    }
}

/// Backward of [`MoeCombine`] from the output gradient and the other input: the gradient of
/// `y` (`of_y`, from the gates: `dy[i] = g[t, j] * dout[t]` for the slot that reads row `i`)
/// or of the gates (from `y`: `dg[t, j] = dout[t] . y[ids[j * n + t]]`).
#[derive(Debug, Clone)]
struct MoeCombineBwd {
    of_y: bool,
    op: MoeCombine,
    rows: usize,
}

impl CustomOp2 for MoeCombineBwd {
    fn name(&self) -> &'static str {
        "moe-combine-bwd"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            dout: &[T],
            other: &[T],
            idx: &[u32],
            of_y: bool,
            (n, k, d, r): (usize, usize, usize, usize),
        ) -> CpuStorage {
            let zero = T::from_f64(0.0);
            if of_y {
                let mut dy = vec![zero; r * d];
                for (i, row) in dy.chunks_mut(d).enumerate() {
                    let b = idx[i] as usize;
                    if b < k * n {
                        let (t, j) = (b % n, b / n);
                        let gate = other[t * k + j];
                        for (x, &v) in row.iter_mut().zip(&dout[t * d..(t + 1) * d]) {
                            *x = gate * v;
                        }
                    }
                }
                T::to_cpu_storage_owned(dy)
            } else {
                let mut dg = vec![zero; n * k];
                for t in 0..n {
                    for j in 0..k {
                        let id = idx[j * n + t] as usize;
                        if id < r {
                            let mut acc = zero;
                            for (&a, &b) in dout[t * d..(t + 1) * d]
                                .iter()
                                .zip(&other[id * d..(id + 1) * d])
                            {
                                acc += a * b;
                            }
                            dg[t * k + j] = acc;
                        }
                    }
                }
                T::to_cpu_storage_owned(dg)
            }
        }
        let d = dl.dims()[1];
        let (n, k, r) = (self.op.n, self.op.k, self.rows);
        let idx = cpu_ids(if self.of_y {
            &self.op.back
        } else {
            &self.op.ids
        })?;
        let dims = (n, k, d, r);
        let out = match ds {
            CpuStorage::F32(_) => run::<f32>(
                cpu_slice(ds, dl)?,
                cpu_slice(os, ol)?,
                &idx,
                self.of_y,
                dims,
            ),
            CpuStorage::F64(_) => run::<f64>(
                cpu_slice(ds, dl)?,
                cpu_slice(os, ol)?,
                &idx,
                self.of_y,
                dims,
            ),
            _ => candle_core::bail!("moe-combine-bwd: the CPU version takes f32 or f64"),
        };
        let shape = if self.of_y {
            Shape::from((r, d))
        } else {
            Shape::from((n, k))
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ds: &CudaStorage,
        dl: &Layout,
        os: &CudaStorage,
        ol: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = dl.dims()[1];
        let (n, k, r) = (self.op.n, self.op.k, self.rows);
        let (len, shape, kernel, idx, warps) = if self.of_y {
            (
                r * d,
                Shape::from((r, d)),
                "moe_combine_bwd_y",
                &self.op.back,
                r,
            )
        } else {
            (
                n * k,
                Shape::from((n, k)),
                "moe_combine_bwd_g",
                &self.op.ids,
                n * k,
            )
        };
        let out = cuda::alloc_like(ds, len)?;
        let (dout, o) = (cuda::input(ds, dl)?, cuda::output(&out)?);
        let kernel = if self.of_y {
            cuda::fours(kernel, ds.dtype(), d, &[&dout, &o]).0
        } else {
            kernel.to_string()
        };
        let args = [
            dout,
            cuda::input(os, ol)?,
            cuda::Arg::P(cuda::tensor_address(idx, 0)?),
            o,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(k as i32),
            cuda::Arg::I32(d as i32),
            cuda::Arg::I64(r as i64),
        ];
        cuda::launch(&ds.device, &kernel, ds.dtype(), cuda::rows(warps), &args)?;
        Ok((out, shape))
    }
}

/// The MoE router's gate of each token's `k` slots from the router probabilities
/// `probs: [n, e]`: `choice: [n * k]` (u32, token-major) holds the expert of each slot, plus
/// `e` where the assignment was dropped. `gates[t, j] = p[t, c] / S_t` for a kept slot, 0
/// for a dropped one, `S_t` the sum of `p` over all `k` chosen experts (kept or not): the
/// top-k renormalisation. Differentiable with respect to `probs`; one kernel each way in
/// f32 on a GPU (other dtypes run [`router_gates_reference`]). As plain ops this was a
/// masked product, a sum and per slot a one-hot product, a sum and a division, about ten
/// graph nodes with a zero tensor and an add each in the backward pass.
pub fn router_gates(probs: &Tensor, choice: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, e) = probs.dims2()?;
    if choice.dims() != [n * k] || k == 0 || k > e {
        candle_core::bail!(
            "router-gates: probs {:?}, choice {:?}, k {k}",
            probs.dims(),
            choice.dims()
        );
    }
    let fused = match probs.device() {
        candle_core::Device::Cpu => matches!(probs.dtype(), DType::F32 | DType::F64),
        _ => probs.dtype() == DType::F32,
    };
    if !fused || n == 0 {
        return router_gates_reference(probs, choice, k);
    }
    probs.contiguous()?.apply_op1(RouterGates {
        choice: choice.contiguous()?,
        k,
    })
}

/// Each token's `k` experts by router probability, `probs: [N, E]` -> `[N, k]` u32, best
/// first; of equal probabilities the lower expert wins (an arg-max `k` times, each skipping
/// the experts already taken). No gradient: the gates carry it ([`router_gates`]). One
/// kernel on a GPU (f32), so that routing's read-back is the choice or, for batched
/// experts, the counts ([`route_counts`]), never the probabilities.
pub fn router_topk(probs: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, e) = probs.dims2()?;
    if k == 0 || k > e {
        candle_core::bail!("router-topk: top {k} of {e} experts");
    }
    let device = probs.device();
    if device.is_cuda() && probs.dtype() == DType::F32 {
        return probs.contiguous()?.apply_op1_no_bwd(&RouterTopk { k });
    }
    let flat = probs.flatten_all()?;
    let choice = match probs.dtype() {
        DType::F32 => topk_host(&flat.to_vec1::<f32>()?, e, k),
        _ => topk_host(&flat.to_dtype(DType::F64)?.to_vec1::<f64>()?, e, k),
    };
    Tensor::from_vec(choice, (n, k), device)
}

/// [`router_topk`] on host values `p: [N, E]` (row-major): `[N * k]`, token-major.
pub fn topk_host<T: Copy + PartialOrd>(p: &[T], e: usize, k: usize) -> Vec<u32> {
    let n = p.len() / e;
    let mut choice = Vec::with_capacity(n * k);
    let mut taken = vec![false; e];
    for row in p.chunks_exact(e) {
        let first = choice.len();
        for _ in 0..k {
            let mut best: Option<usize> = None;
            for (x, &px) in row.iter().enumerate() {
                if !taken[x] && best.is_none_or(|b| px > row[b]) {
                    best = Some(x);
                }
            }
            let x = best.unwrap_or(0);
            taken[x] = true;
            choice.push(x as u32);
        }
        for &x in &choice[first..] {
            taken[x as usize] = false;
        }
    }
    choice
}

/// [`router_topk`] on a GPU.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RouterTopk {
    k: usize,
}

impl CustomOp1 for RouterTopk {
    fn name(&self) -> &'static str {
        "router-topk"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("router-topk: the CPU takes the host loop")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, e) = l.shape().dims2()?;
        let out = cuda::alloc_u32(&s.device, n * self.k)?;
        let args = [
            cuda::input(s, l)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(e as i32),
            cuda::Arg::I32(self.k as i32),
        ];
        cuda::launch_named(&s.device, "router_topk_f32", cuda::flat_exact(n), &args)?;
        Ok((out, Shape::from((n, self.k))))
    }
}

/// How a MoE layer's batched experts lay out their rows: expert `e`'s block holds its kept
/// rows first and padding after, blocks follow one another in expert order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowBlocks {
    /// Each block is the expert's kept count rounded up to a multiple of this (at least 1).
    Aligned(usize),
    /// Every block is the largest kept count (at least 1): a `[E, cap, d]` batch.
    Uniform,
}

impl RowBlocks {
    /// Each expert's block size for the kept counts `kept`.
    pub fn sizes(self, kept: &[usize]) -> Vec<usize> {
        match self {
            RowBlocks::Aligned(a) => {
                let a = a.max(1);
                kept.iter().map(|c| c.div_ceil(a) * a).collect()
            }
            RowBlocks::Uniform => {
                let widest = kept.iter().copied().max().unwrap_or(0).max(1);
                vec![widest; kept.len()]
            }
        }
    }

    /// The kernel's encoding: the alignment, 0 for uniform blocks.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn code(self) -> usize {
        match self {
            RowBlocks::Aligned(a) => a.max(1),
            RowBlocks::Uniform => 0,
        }
    }
}

/// Where the parts of a routing layout of `rows` rows and `m = N * k` slots lie in
/// [`route_layout`]'s output (and in `route_layout_host`'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteParts {
    /// The token each row reads (`rows`).
    pub gather: std::ops::Range<usize>,
    /// The row of each slot, slot-major (`m`).
    pub combine: std::ops::Range<usize>,
    /// The slot that reads each row, and the zero row's entry (`rows + 1`).
    pub back: std::ops::Range<usize>,
    /// Each slot's expert, token-major (`m`).
    pub gate: std::ops::Range<usize>,
}

impl RouteParts {
    /// The parts for `rows` rows and `m` slots.
    pub fn new(rows: usize, m: usize) -> Self {
        let combine = rows..rows + m;
        let back = combine.end..combine.end + rows + 1;
        let gate = back.end..back.end + m;
        RouteParts {
            gather: 0..rows,
            combine,
            back,
            gate,
        }
    }

    /// The whole layout's length.
    pub fn total(&self) -> usize {
        self.gate.end
    }

    /// The part `range` of a layout tensor, as a view.
    pub fn view(t: &Tensor, range: std::ops::Range<usize>) -> candle_core::Result<Tensor> {
        t.narrow(0, range.start, range.len())
    }
}

/// The Switch load-balancing loss `E * sum_e f_e * P_e` of one MoE layer, a scalar, from the
/// router's probabilities `probs: [N, E]` and each expert's chosen count `counts: [E]` (u32,
/// as [`route_counts`] gives it, `f_e = counts[e] / (N k)`, `P_e` the mean of `probs[.., e]`).
/// One kernel each way where the plain ops were seven small ones forward (a cast, two
/// scalings, a mean, a product, a sum) and as many backward, in every MoE layer of every
/// step. Differentiable with respect to `probs`.
pub fn balance_loss(probs: &Tensor, counts: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, e) = probs.dims2()?;
    if counts.dims() != [e] || counts.dtype() != DType::U32 || k == 0 {
        candle_core::bail!(
            "balance loss: counts {:?} {:?} for {e} experts, top-{k}",
            counts.dims(),
            counts.dtype()
        );
    }
    // The kernels count in f32 and index the counts in 32 bits.
    let kernel = if probs.device().is_cpu() {
        native(probs)
    } else {
        probs.dtype() == DType::F32 && n * e < u32::MAX as usize
    };
    if kernel && n > 0 && e > 0 {
        let scale = e as f64 / ((n * n) as f64 * k as f64);
        probs
            .contiguous()?
            .apply_op2(&counts.contiguous()?, BalanceLoss { scale })
    } else {
        balance_loss_reference(probs, counts, k)
    }
}

/// [`balance_loss`] as plain candle ops.
pub fn balance_loss_reference(
    probs: &Tensor,
    counts: &Tensor,
    k: usize,
) -> candle_core::Result<Tensor> {
    let (n, e) = probs.dims2()?;
    let frac = counts
        .to_dtype(probs.dtype())?
        .affine(1.0 / (n * k) as f64, 0.0)?;
    (probs.mean(0)? * frac)?.sum_all()?.affine(e as f64, 0.0)
}

/// [`balance_loss`] as `scale * sum_{t,e} probs[t, e] * counts[e]`, `scale = E / (N^2 k)`.
#[derive(Debug, Clone, Copy)]
struct BalanceLoss {
    scale: f64,
}

impl CustomOp2 for BalanceLoss {
    fn name(&self) -> &'static str {
        "balance-loss"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(p: &[T], c: &[u32], scale: f64) -> CpuStorage {
            let e = c.len().max(1);
            let sum = p.iter().enumerate().fold(T::from_f64(0.0), |acc, (i, &v)| {
                acc + v * T::from_f64(c[i % e] as f64)
            });
            T::to_cpu_storage_owned(vec![sum * T::from_f64(scale)])
        }
        let counts = cpu_u32(cs, cl)?;
        let out = match ps {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(ps, pl)?, counts, self.scale),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(ps, pl)?, counts, self.scale),
            _ => candle_core::bail!("balance loss: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, e) = (pl.dims()[0], pl.dims()[1]);
        let out = cuda::alloc_like(ps, 1)?;
        let args = [
            cuda::input(ps, pl)?,
            cuda::input(cs, cl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(e as i32),
            cuda::Arg::F32(self.scale as f32),
        ];
        cuda::launch(
            &ps.device,
            "balance_loss_fwd",
            ps.dtype(),
            cuda::blocks(1),
            &args,
        )?;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        probs: &Tensor,
        counts: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dp = grad.contiguous()?.apply_op2_no_bwd(
            counts,
            &BalanceLossBwd {
                scale: self.scale,
                n: probs.dim(0)?,
            },
        )?;
        Ok((Some(dp), None))
    }
}

/// The gradient of [`BalanceLoss`] for `probs`: `grad * scale * counts[e]` in every row.
#[derive(Debug, Clone, Copy)]
struct BalanceLossBwd {
    scale: f64,
    n: usize,
}

impl CustomOp2 for BalanceLossBwd {
    fn name(&self) -> &'static str {
        "balance-loss-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(g: &[T], c: &[u32], n: usize, scale: f64) -> CpuStorage {
            let gs = g[0] * T::from_f64(scale);
            let row: Vec<T> = c.iter().map(|&v| gs * T::from_f64(v as f64)).collect();
            T::to_cpu_storage_owned(row.repeat(n))
        }
        let counts = cpu_u32(cs, cl)?;
        let out = match gs {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(gs, gl)?, counts, self.n, self.scale),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(gs, gl)?, counts, self.n, self.scale),
            _ => candle_core::bail!("balance loss: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from((self.n, counts.len()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let e = cl.shape().elem_count();
        let total = self.n * e;
        let out = cuda::alloc_like(gs, total)?;
        let args = [
            cuda::input(gs, gl)?,
            cuda::input(cs, cl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(self.n as i64),
            cuda::Arg::I32(e as i32),
            cuda::Arg::F32(self.scale as f32),
        ];
        cuda::launch(
            &gs.device,
            "balance_loss_bwd",
            gs.dtype(),
            cuda::flat(total),
            &args,
        )?;
        Ok((out, Shape::from((self.n, e))))
    }
}

/// Each expert's kept and chosen assignment counts from the router's choice
/// (`choice: [N, k]` u32, as [`router_topk`] gives it): `[2E]` u32, `[kept | chosen]`, kept
/// being `min(chosen, capacity)`. Read back, it is all the host needs of a layer's routing
/// to size its expert products ([`route_layout`] builds the rest on the device). No gradient.
pub fn route_counts(choice: &Tensor, n_exp: usize, capacity: usize) -> candle_core::Result<Tensor> {
    check_choice(choice, n_exp)?;
    choice
        .contiguous()?
        .apply_op1_no_bwd(&RouteCounts { n_exp, capacity })
}

/// The index vectors of a MoE layer's batched experts, built where the choice is: from
/// `choice: [N, k]` and [`route_counts`]'s `counts` (the same choice and capacity), and the
/// kept counts `kept` read back from them, `[R + N*k + (R + 1) + N*k]` u32 where `R` is the sum
/// of `blocks`' sizes:
/// - gather (`R`): the token each row reads, `N` (a zero row) for padding;
/// - combine (`N * k`, slot-major `j * N + t`): the row of each slot, `R` where dropped;
/// - back (`R + 1`): the slot `j * N + t` that reads each row, `N * k` for padding and for
///   the zero row `R`;
/// - gate (`N * k`, token-major): each slot's expert, plus `E` where dropped.
///
/// Capacity keeps an expert's first `capacity` assignments in slot-major order (every
/// token's first choice before any second choice), and a block lists its tokens ascending:
/// the rule of `Model::moe_route`. One block-wide kernel on a GPU, so that the host does no
/// routing work while the GPU waits. `kept` must be the kept counts read back from
/// `counts`: the CPU refuses others; the GPU, which cannot check without a read-back, then
/// gives a wrong layout but writes nothing outside it.
pub fn route_layout(
    choice: &Tensor,
    counts: &Tensor,
    kept: &[usize],
    capacity: usize,
    blocks: RowBlocks,
) -> candle_core::Result<Tensor> {
    let n_exp = kept.len();
    check_choice(choice, n_exp)?;
    if counts.dims() != [2 * n_exp] || counts.dtype() != DType::U32 {
        candle_core::bail!(
            "route-layout: counts {:?} {:?} for {n_exp} experts",
            counts.dtype(),
            counts.dims()
        );
    }
    let rows = blocks.sizes(kept).iter().sum();
    choice.contiguous()?.apply_op2_no_bwd(
        &counts.contiguous()?,
        &RouteLayout {
            capacity,
            blocks,
            rows,
        },
    )
}

fn check_choice(choice: &Tensor, n_exp: usize) -> candle_core::Result<()> {
    let (_, k) = choice.dims2()?;
    if choice.dtype() != DType::U32 || k == 0 || n_exp == 0 || n_exp > ROUTE_MAX_EXPERTS {
        candle_core::bail!(
            "routing: choice {:?} {:?} for {n_exp} experts (at most {ROUTE_MAX_EXPERTS})",
            choice.dtype(),
            choice.dims()
        );
    }
    Ok(())
}

/// The most experts the routing kernels hold in shared memory (`ROUTE_MAX_EXPERTS` in
/// `kernels.cu`; the model config's limit too).
const ROUTE_MAX_EXPERTS: usize = 4096;

/// Threads of the routing kernels' single block.
#[cfg(feature = "cuda")]
const ROUTE_THREADS: u32 = 1024;

/// [`route_counts`] on host values.
pub(crate) fn route_counts_host(choice: &[u32], n_exp: usize, capacity: usize) -> Vec<u32> {
    let mut chosen = vec![0u32; n_exp];
    for &c in choice {
        if let Some(x) = chosen.get_mut(c as usize) {
            *x += 1;
        }
    }
    let cap = u32::try_from(capacity).unwrap_or(u32::MAX);
    chosen
        .iter()
        .map(|&c| c.min(cap))
        .chain(chosen.iter().copied())
        .collect()
}

/// [`route_layout`] on host values, in the plain order: capacity slot by slot in token
/// order, then each kept assignment in token order takes its expert's next row. With
/// blocks of exactly the kept counts (`sizes`), the gather part is the expert-sorted order
/// of the kept assignments that the host routing (`Model::moe_route`) uses too.
pub(crate) fn route_layout_host(
    choice: &[u32],
    k: usize,
    n_exp: usize,
    capacity: usize,
    sizes: &[usize],
) -> Vec<u32> {
    let n = choice.len() / k;
    let m = n * k;
    let rows: usize = sizes.iter().sum();
    let mut gate: Vec<u32> = choice
        .iter()
        .map(|&c| {
            if (c as usize) < n_exp {
                c
            } else {
                2 * n_exp as u32
            }
        })
        .collect();
    let mut taken = vec![0usize; n_exp];
    for j in 0..k {
        for t in 0..n {
            let c = gate[t * k + j] as usize;
            if c < n_exp {
                if taken[c] < capacity {
                    taken[c] += 1;
                } else {
                    gate[t * k + j] += n_exp as u32;
                }
            }
        }
    }
    let mut next: Vec<usize> = sizes
        .iter()
        .scan(0, |at, &s| {
            let start = *at;
            *at += s;
            Some(start)
        })
        .collect();
    let mut out = vec![n as u32; rows];
    let mut combine = vec![rows as u32; m];
    let mut back = vec![m as u32; rows + 1];
    for (q, &g) in gate.iter().enumerate() {
        let (t, j) = (q / k, q % k);
        if let Some(r) = next.get_mut(g as usize) {
            out[*r] = t as u32;
            combine[j * n + t] = *r as u32;
            back[*r] = (j * n + t) as u32;
            *r += 1;
        }
    }
    out.extend(combine);
    out.extend(back);
    out.extend(gate);
    out
}

/// [`route_counts`] as an op.
#[derive(Debug)]
struct RouteCounts {
    n_exp: usize,
    capacity: usize,
}

impl CustomOp1 for RouteCounts {
    fn name(&self) -> &'static str {
        "route-counts"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let choice = cpu_u32(s, l)?;
        let out = route_counts_host(choice, self.n_exp, self.capacity);
        Ok((CpuStorage::U32(out), Shape::from(2 * self.n_exp)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = cuda::alloc_u32(&s.device, 2 * self.n_exp)?;
        let args = [
            cuda::input(s, l)?,
            cuda::output(&out)?,
            cuda::Arg::I64(l.shape().elem_count() as i64),
            cuda::Arg::I32(self.n_exp as i32),
            cuda::Arg::I64(self.capacity.min(i64::MAX as usize) as i64),
        ];
        cuda::launch_named(
            &s.device,
            "route_counts",
            cuda::one_block(ROUTE_THREADS),
            &args,
        )?;
        Ok((out, Shape::from(2 * self.n_exp)))
    }
}

/// [`route_layout`] as an op.
#[derive(Debug)]
struct RouteLayout {
    capacity: usize,
    blocks: RowBlocks,
    /// The sum of the blocks, from the kept counts read back.
    rows: usize,
}

impl CustomOp2 for RouteLayout {
    fn name(&self) -> &'static str {
        "route-layout"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, k) = l.shape().dims2()?;
        let choice = cpu_u32(s, l)?;
        let counts = cpu_u32(cs, cl)?;
        let n_exp = counts.len() / 2;
        let kept: Vec<usize> = counts[..n_exp].iter().map(|&c| c as usize).collect();
        let sizes = self.blocks.sizes(&kept);
        if sizes.iter().sum::<usize>() != self.rows {
            candle_core::bail!("route-layout: the counts are not the ones read back");
        }
        let out = route_layout_host(choice, k, n_exp, self.capacity, &sizes);
        let out_len = out.len();
        Ok((CpuStorage::U32(out), Shape::from(out_len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, k) = l.shape().dims2()?;
        let n_exp = cl.shape().elem_count() / 2;
        let len = RouteParts::new(self.rows, n * k).total();
        let out = cuda::alloc_u32(&s.device, len)?;
        let args = [
            cuda::input(s, l)?,
            cuda::input(cs, cl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(k as i32),
            cuda::Arg::I32(n_exp as i32),
            cuda::Arg::I64(self.capacity.min(i64::MAX as usize) as i64),
            cuda::Arg::I64(self.blocks.code() as i64),
            cuda::Arg::I64(self.rows as i64),
        ];
        // Up to 32 experts, a tile of assignments at a time with warp-level ranks (30 us a
        // call on `base`); past that, a block-wide scan per expert (110 us; docs/GPU.md,
        // session 8).
        let kernel = if n_exp <= 32 {
            "route_layout_few"
        } else {
            "route_layout"
        };
        cuda::launch_named(&s.device, kernel, cuda::one_block(ROUTE_THREADS), &args)?;
        Ok((out, Shape::from(len)))
    }
}

/// The u32 values of a contiguous CPU storage.
fn cpu_u32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let (CpuStorage::U32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("routing: expected contiguous u32 values");
    };
    Ok(&v[a..b])
}

/// [`router_gates`] as plain candle ops (masked products and sums): the reference.
pub fn router_gates_reference(
    probs: &Tensor,
    choice: &Tensor,
    k: usize,
) -> candle_core::Result<Tensor> {
    let (n, e) = probs.dims2()?;
    let c = cpu_ids(choice)?;
    let mut chosen = vec![0f64; n * e];
    let mut onehot = vec![0f64; k * n * e];
    for t in 0..n {
        for j in 0..k {
            let x = c[t * k + j] as usize;
            chosen[t * e + x % e] = 1.0;
            if x < e {
                onehot[j * n * e + t * e + x] = 1.0;
            }
        }
    }
    let dt = probs.dtype();
    let dev = probs.device();
    let chosen = Tensor::from_vec(chosen, (n, e), dev)?.to_dtype(dt)?;
    let denom = (probs * chosen)?.sum_keepdim(1)?;
    let mut cols = Vec::with_capacity(k);
    for j in 0..k {
        let oh = Tensor::from_vec(onehot[j * n * e..(j + 1) * n * e].to_vec(), (n, e), dev)?
            .to_dtype(dt)?;
        cols.push((probs * oh)?.sum_keepdim(1)?.div(&denom)?);
    }
    Tensor::cat(&cols, 1)
}

/// [`router_gates`] as a custom op.
#[derive(Debug, Clone)]
struct RouterGates {
    choice: Tensor,
    k: usize,
}

/// CPU gates of one token (see `router_gates_fwd` in kernels.cu).
fn gates_row<T: Real>(p: &[T], c: &[u32], g: &mut [T]) {
    let e = p.len();
    let mut s = T::from_f64(0.0);
    for &x in c {
        s += p[x as usize % e];
    }
    for (gj, &x) in g.iter_mut().zip(c) {
        *gj = if (x as usize) < e {
            p[x as usize] / s
        } else {
            T::from_f64(0.0)
        };
    }
}

/// CPU gradient of one token's probabilities (see `router_gates_bwd` in kernels.cu).
fn gates_row_bwd<T: Real>(p: &[T], c: &[u32], dg: &[T], dp: &mut [T]) {
    let e = p.len();
    let (mut s, mut a) = (T::from_f64(0.0), T::from_f64(0.0));
    for (&x, &d) in c.iter().zip(dg) {
        s += p[x as usize % e];
        if (x as usize) < e {
            a += d * p[x as usize];
        }
    }
    dp.fill(T::from_f64(0.0));
    let inv = T::from_f64(1.0) / s;
    for (&x, &d) in c.iter().zip(dg) {
        let mut v = T::from_f64(0.0) - a * inv * inv;
        if (x as usize) < e {
            v += d * inv;
        }
        dp[x as usize % e] += v;
    }
}

impl CustomOp1 for RouterGates {
    fn name(&self) -> &'static str {
        "router-gates"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(p: &[T], c: &[u32], e: usize, k: usize) -> CpuStorage {
            let mut g = vec![T::from_f64(0.0); c.len()];
            for ((pr, cr), gr) in p.chunks(e).zip(c.chunks(k)).zip(g.chunks_mut(k)) {
                gates_row(pr, cr, gr);
            }
            T::to_cpu_storage_owned(g)
        }
        let (n, e) = (l.dims()[0], l.dims()[1]);
        let c = cpu_ids(&self.choice)?;
        let out = match s {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(s, l)?, &c, e, self.k),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(s, l)?, &c, e, self.k),
            _ => candle_core::bail!("router-gates: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from((n, self.k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, e) = (l.dims()[0], l.dims()[1]);
        let out = cuda::alloc_like(s, n * self.k)?;
        let args = [
            cuda::input(s, l)?,
            cuda::Arg::P(cuda::tensor_address(&self.choice, 0)?),
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(e as i32),
            cuda::Arg::I32(self.k as i32),
        ];
        cuda::launch(
            &s.device,
            "router_gates_fwd",
            s.dtype(),
            cuda::flat_exact(n),
            &args,
        )?;
        Ok((out, Shape::from((n, self.k))))
    }

    fn bwd(
        &self,
        probs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dp = probs.apply_op2_no_bwd(&grad.contiguous()?, &RouterGatesBwd(self.clone()))?;
        Ok(Some(dp))
    }
}

/// Backward of [`RouterGates`] from the probabilities and the gates' gradient.
#[derive(Debug, Clone)]
struct RouterGatesBwd(RouterGates);

impl CustomOp2 for RouterGatesBwd {
    fn name(&self) -> &'static str {
        "router-gates-bwd"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(p: &[T], c: &[u32], dg: &[T], e: usize, k: usize) -> CpuStorage {
            let mut dp = vec![T::from_f64(0.0); p.len()];
            for (((pr, cr), gr), dr) in p
                .chunks(e)
                .zip(c.chunks(k))
                .zip(dg.chunks(k))
                .zip(dp.chunks_mut(e))
            {
                gates_row_bwd(pr, cr, gr, dr);
            }
            T::to_cpu_storage_owned(dp)
        }
        let e = pl.dims()[1];
        let c = cpu_ids(&self.0.choice)?;
        let k = self.0.k;
        let out = match ps {
            CpuStorage::F32(_) => run::<f32>(cpu_slice(ps, pl)?, &c, cpu_slice(gs, gl)?, e, k),
            CpuStorage::F64(_) => run::<f64>(cpu_slice(ps, pl)?, &c, cpu_slice(gs, gl)?, e, k),
            _ => candle_core::bail!("router-gates-bwd: the CPU version takes f32 or f64"),
        };
        Ok((out, pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, e) = (pl.dims()[0], pl.dims()[1]);
        let out = cuda::alloc_like(ps, n * e)?;
        let args = [
            cuda::input(ps, pl)?,
            cuda::Arg::P(cuda::tensor_address(&self.0.choice, 0)?),
            cuda::input(gs, gl)?,
            cuda::output(&out)?,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I32(e as i32),
            cuda::Arg::I32(self.0.k as i32),
        ];
        cuda::launch(
            &ps.device,
            "router_gates_bwd",
            ps.dtype(),
            cuda::flat_exact(n),
            &args,
        )?;
        Ok((out, pl.shape().clone()))
    }
}

/// `a @ b^T` over the last two dimensions: `a: [.., m, k]`, `b: [.., n, k]` with the same
/// batch dimensions -> `[.., m, n]` (a linear layer `x @ w^T`, the experts' batched
/// projections against their stacked `[experts, out, in]` weights, attention scores
/// `q @ k^T`, the output head). The same product as `a.matmul(&b.t())`, as one graph node:
/// there `b.t()` is a node of its own, whose backward allocates a zero tensor and adds the
/// gradient of `b^T` into it through a strided (transposing) pass, then the product's
/// backward does the same for the view. Here the gradients are `g @ b` and `g^T @ a`,
/// computed in their final layouts by the matrix library. f32 products on a GPU follow
/// [`f32_products`].
pub fn matmul_t(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    product(a, b, false, true)
}

/// `a @ b` over the last two dimensions: `a: [.., m, k]`, `b: [.., k, n]` with the same
/// batch dimensions -> `[.., m, n]` (attention's `probs @ v`). Like [`matmul_t`], one graph
/// node whose gradients are products of the same kind, and f32 follows [`f32_products`].
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    product(a, b, false, false)
}

/// Attention's `probs @ v` where `probs: [.., t, t]` is causal (zero above the diagonal, as
/// [`causal_softmax`] leaves it) and `v: [.., t, n]`: the product and its gradient for `v`
/// (`probs^T @ dout`, upper triangular on the left) skip the blocks of `probs` that are
/// zero ([`TRI_BLOCK`] rows at a time), about 3/8 of the arithmetic at `t = 512`, where
/// the product runs on a GPU's f32 units (f32 products that do not split; on the H100,
/// `base` f32 1.1 to 2.8 ms a step faster) and on the CPU. Elsewhere the product runs whole.
/// Values above the diagonal of `probs` must be zero: they may or may not be read. The
/// gradient for `probs` is the plain `dout @ v^T`.
pub fn matmul_causal(probs: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    causal_product(probs, v, false, false, Causal::Tri(Tri::Lower))
}

/// Attention's scores `q @ k^T` (`q, k: [.., t, d]`) when the scores' gradient is causal:
/// [`causal_softmax`]'s backward writes exact zeros above the diagonal, so the backward
/// products `dscores @ k` and `dscores^T @ q` skip those blocks (see [`matmul_causal`]).
/// The forward product is the plain [`matmul_t`].
pub fn matmul_t_causal(q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
    let (qd, kd) = (q.dims(), k.dims());
    let r = qd.len();
    if r < 2 || kd.len() != r || qd[r - 2] != kd[r - 2] {
        candle_core::bail!("causal scores: queries {qd:?} and keys {kd:?} differ in length");
    }
    causal_product(q, k, false, true, Causal::GradLower)
}

/// How f32 matrix products run on a GPU with TF32 tensor cores (compute capability 8.0 and
/// later); the CPU, bf16 and f64 are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Products {
    /// Split TF32, the default: each operand's values are split into a TF32 part and an f32
    /// remainder ([`tf32_split`]) and laid out three times along the inner dimension, so
    /// that one tensor-core product over three times the inner dimension sums
    /// `lo·hi + hi·lo + hi·hi` with f32 accumulation, dropping only `lo·lo`. Against f64 on
    /// the H100, at `base`'s shapes, its error was 3.7 times a plain f32 product's (1.8e-6
    /// against 5.0e-7, relative) and 160 times smaller than one TF32 product's (2.9e-4);
    /// the worker's CUDA test of the fused ops measures all three on every run. Products
    /// with an output side under 128 or an inner dimension under 64 stay on the f32 units
    /// (`SPLIT_MIN_DIM`, `SPLIT_MIN_K`).
    Split,
    /// The f32 units (`CUBLAS_COMPUTE_32F`), as candle does by default.
    Exact,
}

static F32_PRODUCTS_EXACT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Chooses how f32 matrix products run on a GPU from now on, for the whole process.
pub fn set_f32_products(p: F32Products) {
    F32_PRODUCTS_EXACT.store(
        p == F32Products::Exact,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// How f32 matrix products run on a GPU (see [`set_f32_products`]).
pub fn f32_products() -> F32Products {
    if F32_PRODUCTS_EXACT.load(std::sync::atomic::Ordering::Relaxed) {
        F32Products::Exact
    } else {
        F32Products::Split
    }
}

/// The most CUDA streams the experts' products of one grouped product run on
/// ([`set_expert_streams`]).
pub const MAX_EXPERT_STREAMS: usize = 8;

static EXPERT_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(2);

/// Chooses on how many CUDA streams the experts' products of one grouped product
/// ([`grouped_matmul_t`] and its gradients) run side by side, for the whole process: `n`
/// clamped to `1..=MAX_EXPERT_STREAMS`; 1 runs them one after another on the device's
/// stream. One expert's product at `base`'s shapes (about 2,000 of the step's 16,384 rows)
/// is a wave or two of output tiles, the last one partial, on the H100's 132 SMs (an
/// expert's weight gradient, 72 tiles of 128 x 128, less than one); side by side the
/// experts' products fill the GPU. The CPU is unaffected.
pub fn set_expert_streams(n: usize) {
    EXPERT_STREAMS.store(
        n.clamp(1, MAX_EXPERT_STREAMS),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// On how many CUDA streams the experts' products run (see [`set_expert_streams`]); 2
/// unless the process chose otherwise. On the H100, `base` f32 took 141 ms a step on 2 or 4
/// streams against 146-147 ms on one; bf16, bound by its host, was the same on 1, 2 and 4.
pub fn expert_streams() -> usize {
    EXPERT_STREAMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this build's f32 products on a GPU run split (see [`F32Products`]): the kernels
/// are built for a GPU with TF32 tensor cores (`CUDA_COMPUTE_CAP` 80 or more, and the PTX
/// runs on no older GPU), candle's own TF32 switch is off (with it on, a product is one
/// TF32 product, as the caller asked), and the process did not choose exact products.
#[cfg(feature = "cuda")]
fn split_f32_products() -> bool {
    cfg!(potluck_tf32)
        && !candle_core::cuda_backend::gemm_reduced_precision_f32()
        && f32_products() == F32Products::Split
}

/// The smallest `m` and `n` of a product that runs split. With a narrower output (attention's
/// `probs @ v` and its gradients, `n` = the head dimension of 64) the product reads its
/// operands more than it computes: splitting the `[T, T]` operand writes it three times and
/// the product reads it three times, which costs more than the f32 units' one pass.
#[cfg(feature = "cuda")]
const SPLIT_MIN_DIM: usize = 128;

/// The smallest `k` of a product that runs split. Over a short inner dimension (attention's
/// scores `q @ k^T` and their gradient `do @ v^T`, `k` = 64) the operands are small and the
/// `[T, T]` output is written once either way. Measured on the H100 at `base`, the tensor
/// cores' three terms over 192 plus the splits took about as long as the f32 units' one pass
/// over 64 (docs/GPU.md, session 10); the split's error there was 1.3 times plain f32's.
#[cfg(feature = "cuda")]
const SPLIT_MIN_K: usize = 64;

/// Whether a product of `dt` values and these sizes runs split: f32 only (see
/// [`SPLIT_MIN_DIM`], [`SPLIT_MIN_K`]).
#[cfg(feature = "cuda")]
fn splits(dt: DType, m: usize, n: usize, k: usize) -> bool {
    dt == DType::F32 && m.min(n) >= SPLIT_MIN_DIM && k >= SPLIT_MIN_K && split_f32_products()
}

/// `x` as the sum of a TF32 value and an f32 remainder, `hi + lo == x` exactly: `hi` is `x`
/// rounded to TF32's 10-bit mantissa (to nearest, ties away from zero; truncated where
/// rounding would overflow to infinity), so `|lo|` is at most half a TF32 step: `2^-11 |x|`
/// for normal `x`, `2^-137` for subnormals. Infinities and NaNs are
/// their own `hi`, with `lo` zero. The host twin of `tf32_split_one` in `kernels.cu`.
pub fn tf32_split(x: f32) -> (f32, f32) {
    let u = x.to_bits();
    let special = |u: u32| u & 0x7f80_0000 == 0x7f80_0000;
    if special(u) {
        return (x, 0.0);
    }
    let mut r = u.wrapping_add(0x1000) & 0xffff_e000;
    if special(r) {
        r = u & 0xffff_e000;
    }
    let hi = f32::from_bits(r);
    (hi, x - hi)
}

/// `op(a) @ op(b)` over the last two dimensions, where `op` transposes the operand when its
/// flag is set: `a` is stored `[.., m, k]` (`[.., k, m]` with `ta`) and `b` `[.., k, n]`
/// (`[.., n, k]` with `tb`), with the same batch dimensions.
fn product(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> candle_core::Result<Tensor> {
    check_fits(a, b, ta, tb)?;
    let r = a.rank();
    if a.elem_count() == 0 || b.elem_count() == 0 {
        let (a, b) = (
            if ta {
                a.transpose(r - 2, r - 1)?
            } else {
                a.clone()
            },
            if tb {
                b.transpose(r - 2, r - 1)?
            } else {
                b.clone()
            },
        );
        return a.matmul(&b);
    }
    causal_product(a, b, ta, tb, Causal::No)
}

/// Whether `op(a) @ op(b)` is a product of one dtype over the same batch dimensions.
fn check_fits(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> candle_core::Result<()> {
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    let fits = r >= 2 && bd.len() == r && ad[..r - 2] == bd[..r - 2] && {
        let k_a = if ta { ad[r - 2] } else { ad[r - 1] };
        let k_b = if tb { bd[r - 1] } else { bd[r - 2] };
        k_a == k_b
    };
    if !fits {
        candle_core::bail!("matmul: {ad:?} and {bd:?} do not fit (transposed: {ta}, {tb})");
    }
    if a.dtype() != b.dtype() {
        candle_core::bail!("matmul: {:?} with {:?}", a.dtype(), b.dtype());
    }
    Ok(())
}

/// Copies a block's rows, `part: [batch, rows, n]`, into rows `r0..` of `out: [batch, m, n]`.
fn place_rows(
    part: &CpuStorage,
    out: &mut CpuStorage,
    (m, n): (usize, usize),
    (r0, rows): (usize, usize),
) -> candle_core::Result<()> {
    fn put<T: Copy>(src: &[T], out: &mut [T], (m, n): (usize, usize), (r0, rows): (usize, usize)) {
        for (bi, blk) in src.chunks((rows * n).max(1)).enumerate() {
            let at = bi * m * n + r0 * n;
            out[at..at + blk.len()].copy_from_slice(blk);
        }
    }
    match (part, out) {
        (CpuStorage::F32(p), CpuStorage::F32(o)) => put(p, o, (m, n), (r0, rows)),
        (CpuStorage::F64(p), CpuStorage::F64(o)) => put(p, o, (m, n), (r0, rows)),
        (CpuStorage::BF16(p), CpuStorage::BF16(o)) => put(p, o, (m, n), (r0, rows)),
        (CpuStorage::F16(p), CpuStorage::F16(o)) => put(p, o, (m, n), (r0, rows)),
        _ => candle_core::bail!("triangular matmul: no CPU product for this dtype"),
    }
    Ok(())
}

/// [`product`] with what the op knows of triangular operands ([`Causal`]).
fn causal_product(
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
    causal: Causal,
) -> candle_core::Result<Tensor> {
    if causal != Causal::No {
        check_fits(a, b, ta, tb)?;
        let ad = a.dims();
        let r = ad.len();
        if matches!(causal, Causal::Tri(_)) && (ad[r - 1] != ad[r - 2] || tb) {
            candle_core::bail!("triangular matmul: {ad:?} is not square (transposed: {ta}, {tb})");
        }
        if a.elem_count() == 0 || b.elem_count() == 0 {
            return product(a, b, ta, tb);
        }
    }
    // The split products read their operands as dense row-major matrices, and so do the
    // triangular ones.
    let dense = |t: &Tensor| {
        if (t.device().is_cuda() && t.dtype() == DType::F32) || causal != Causal::No {
            t.contiguous()
        } else {
            Ok(t.clone())
        }
    };
    dense(a)?.apply_op2(&dense(b)?, Product { ta, tb, causal })
}

/// Which side of the diagonal of a square `op(a)` holds its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    /// Row `i` has values in columns `0..=i` (a causal mask's probabilities).
    Lower,
    /// Row `i` has values in columns `i..` (their transpose).
    Upper,
}

impl Tri {
    fn flip(self) -> Tri {
        match self {
            Tri::Lower => Tri::Upper,
            Tri::Upper => Tri::Lower,
        }
    }
}

/// What a [`Product`] knows of its operands' zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Causal {
    /// Nothing: the plain product.
    No,
    /// `op(a)` is square and zero on the other side of the diagonal: the product runs by
    /// blocks of [`TRI_BLOCK`] output rows, each over the inner range that can hold values.
    Tri(Tri),
    /// `a @ b^T` whose output's gradient is lower triangular (causal scores): the backward
    /// products are triangular.
    GradLower,
}

/// The output rows of one block of a triangular product.
pub const TRI_BLOCK: usize = 128;

/// One block of a triangular product `op(a)[m, m] @ b[m, n]`: output rows `r0..r0 + rows`
/// over inner indices `k0..k0 + k`, and the element offsets of its first values in one
/// matrix of `a`, `b` and the output (`a`'s rows are `m` long, `b`'s and the output's `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TriBlock {
    r0: usize,
    rows: usize,
    k: usize,
    a_off: usize,
    b_off: usize,
    c_off: usize,
}

/// The blocks of a triangular product: lower, row block `[r0, r1)` reads inner `[0, r1)`;
/// upper, `[r0, m)`.
fn tri_blocks(m: usize, n: usize, ta: bool, tri: Tri) -> Vec<TriBlock> {
    (0..m)
        .step_by(TRI_BLOCK)
        .map(|r0| {
            let r1 = (r0 + TRI_BLOCK).min(m);
            let (k0, k1) = match tri {
                Tri::Lower => (0, r1),
                Tri::Upper => (r0, m),
            };
            TriBlock {
                r0,
                rows: r1 - r0,
                k: k1 - k0,
                // `op(a)[r, k]` is `a[r, k]`, or `a[k, r]` when transposed.
                a_off: if ta { k0 * m + r0 } else { r0 * m + k0 },
                b_off: k0 * n,
                c_off: r0 * n,
            }
        })
        .collect()
}

/// A row-major product `c = op(a) @ op(b)` over `batch` dense matrices stored one after
/// another: `a` is `[m, k]` (`[k, m]` when `ta`), `b` `[k, n]` (`[n, k]` when `tb`) and `c`
/// `[m, n]`.
#[cfg(any(feature = "cuda", test))] // the CUDA path, and its CPU emulation in `tests`
#[derive(Debug, Clone, Copy)]
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    batch: usize,
}

#[cfg(any(feature = "cuda", test))] // the CUDA path, and its CPU emulation in `tests`
impl Gemm {
    /// The leading dimensions of `a` and `b` as stored (`c`'s is `n`).
    fn leading(&self) -> (usize, usize) {
        (
            if self.ta { self.m } else { self.k },
            if self.tb { self.k } else { self.n },
        )
    }

    /// The elements from one matrix of the batch to the next, for `a`, `b` and `c`.
    fn strides(&self) -> (usize, usize, usize) {
        (self.m * self.k, self.k * self.n, self.m * self.n)
    }

    /// The run lengths in which a split product splits `a` and `b` (`tf32_split3`'s
    /// `inner`): each operand's extent along K, a row of `k` values where K runs along the
    /// stored rows (`a: [m, k]`, `b: [n, k]`), a whole matrix where it runs down the
    /// columns (`a: [k, m]`, `b: [k, n]`). Each run becomes three in a row, so a matrix of
    /// the split operand is the original with K three times as long.
    fn runs(&self) -> (usize, usize) {
        (
            if self.ta { self.k * self.m } else { self.k },
            if self.tb { self.k } else { self.k * self.n },
        )
    }

    /// The product over the split operands: K three times as long.
    fn tripled(&self) -> Gemm {
        Gemm {
            k: 3 * self.k,
            ..*self
        }
    }
}

/// `(batch, m, n, k)` of a batched matrix product.
type Bmnk = (usize, usize, usize, usize);

/// `op(a) @ op(b)` as a custom op (see [`product`]).
#[derive(Debug, Clone, Copy)]
struct Product {
    ta: bool,
    tb: bool,
    causal: Causal,
}

impl Product {
    /// `(batch, m, n, k)`, the layouts of `op(a)` and `op(b)`, and the output shape.
    fn dims(&self, al: &Layout, bl: &Layout) -> candle_core::Result<(Bmnk, Layout, Layout, Shape)> {
        let ad = al.dims();
        let r = ad.len();
        let la = if self.ta {
            al.transpose(r - 2, r - 1)?
        } else {
            al.clone()
        };
        let lb = if self.tb {
            bl.transpose(r - 2, r - 1)?
        } else {
            bl.clone()
        };
        let (m, k, n) = (la.dims()[r - 2], la.dims()[r - 1], lb.dims()[r - 1]);
        let batch = ad[..r - 2].iter().product();
        let mut out = ad.to_vec();
        out[r - 2] = m;
        out[r - 1] = n;
        Ok(((batch, m, n, k), la, lb, Shape::from(out)))
    }
}

#[cfg(feature = "cuda")]
impl Product {
    /// The triangular product by blocks ([`tri_blocks`]), one strided batched cuBLAS call
    /// each, side by side on the lanes (they write disjoint rows of the output).
    fn cuda_tri(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        tri: Tri,
        (batch, m, n, _): Bmnk,
    ) -> candle_core::Result<CudaStorage> {
        let (Some((a0, _)), Some((b0, _))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("triangular matmul: operands must be contiguous");
        };
        let out = cuda::alloc_like(a, batch * m * n)?;
        let blocks = tri_blocks(m, n, self.ta, tri);
        let run = |blk: &TriBlock, blas: &cuda::Blas| -> candle_core::Result<()> {
            let g = Gemm {
                m: blk.rows,
                n,
                k: blk.k,
                ta: self.ta,
                tb: false,
                batch,
            };
            let at = (a0 + blk.a_off, b0 + blk.b_off, blk.c_off);
            cuda::gemm_strided(blas, (a, b, &out), at, &g, (m, n), (m * m, m * n, m * n))
        };
        cuda::spread(&a.device, blocks.len(), |i, blas| run(&blocks[i], blas))?;
        Ok(out)
    }
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (bmnk, la, lb, shape) = self.dims(al, bl)?;
        let Causal::Tri(tri) = self.causal else {
            return Ok((a.matmul(b, bmnk, &la, &lb)?, shape));
        };
        // Block by block through candle's CPU product on strided views, as the GPU runs
        // them, then each block's rows put in place.
        let (batch, m, n, _) = bmnk;
        let (a0, b0) = (al.start_offset(), bl.start_offset());
        let mut out = {
            use candle_core::backend::BackendDevice;
            candle_core::cpu_backend::CpuDevice.zeros_impl(&shape, a.dtype())?
        };
        for blk in tri_blocks(m, n, self.ta, tri) {
            let (ra, ca) = if self.ta { (1, m) } else { (m, 1) };
            let lhs = Layout::new(
                Shape::from((batch, blk.rows, blk.k)),
                vec![m * m, ra, ca],
                a0 + blk.a_off,
            );
            let rhs = Layout::new(
                Shape::from((batch, blk.k, n)),
                vec![m * n, n, 1],
                b0 + blk.b_off,
            );
            let part = a.matmul(b, (batch, blk.rows, n, blk.k), &lhs, &rhs)?;
            place_rows(&part, &mut out, (m, n), (blk.r0, blk.rows))?;
        }
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (bmnk, la, lb, shape) = self.dims(al, bl)?;
        let (batch, m, n, k) = bmnk;
        if let Causal::Tri(tri) = self.causal {
            // f32 on the f32 units only. A product that would split runs whole, and so does
            // bf16, whose attention products are cheap while its step waits on the host
            // (the blocks' extra calls cost `small` bf16 about 1.7 ms a step on the H100 for
            // no gain): the zeros make it the same product.
            if a.dtype() == DType::F32 && !splits(a.dtype(), m, n, k) {
                return Ok((self.cuda_tri(a, al, b, bl, tri, bmnk)?, shape));
            }
        }
        if !splits(a.dtype(), m, n, k) {
            return Ok((a.matmul(b, bmnk, &la, &lb)?, shape));
        }
        let (Some((a0, _)), Some((b0, _))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("matmul: split f32 operands must be contiguous");
        };
        let g = Gemm {
            m,
            n,
            k,
            ta: self.ta,
            tb: self.tb,
            batch,
        };
        let out = cuda::alloc_like(a, shape.elem_count())?;
        let (an, bn) = (al.shape().elem_count(), bl.shape().elem_count());
        let (ia, ib) = g.runs();
        let sa = cuda::SplitOperand::new(a, a0, an, ia, true)?;
        let sb = cuda::SplitOperand::new(b, b0, bn, ib, false)?;
        let blas = a.device.cublas_handle();
        cuda::gemm_split(&blas, (&sa, 0), (&sb, 0), (&out, 0), &g)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // An operand that is a constant of the graph (no variable behind it: a frozen
        // Hugging Face base's projection or head) gets no gradient. candle would store one
        // for it anyway, a product as large as the weight kept until the step ends.
        let (need_a, need_b) = (a.track_op(), b.track_op());
        // Detached operands: the gradients are values, not graphs that keep activations.
        let (a, b, g) = (a.detach(), b.detach(), grad.contiguous()?);
        self.grads(&a, &b, &g, need_a, need_b)
    }
}

impl Product {
    /// The gradients of the product for the operands that want one.
    fn grads(
        &self,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
        need_a: bool,
        need_b: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let pick = |want: bool, f: &dyn Fn() -> candle_core::Result<Tensor>| {
            if want { f().map(Some) } else { Ok(None) }
        };
        match self.causal {
            // c = op(a) @ b with op(a) triangular: da = g @ b^T in full (only its triangle
            // means anything to the op that made `a`), db = op(a)^T @ g, triangular the
            // other way.
            Causal::Tri(tri) => Ok((
                pick(need_a, &|| {
                    if self.ta {
                        product(b, g, false, true)
                    } else {
                        product(g, b, false, true)
                    }
                })?,
                pick(need_b, &|| {
                    causal_product(a, g, !self.ta, false, Causal::Tri(tri.flip()))
                })?,
            )),
            // c = a @ b^T with a lower triangular gradient: da = g @ b, db = g^T @ a.
            Causal::GradLower if !self.ta && self.tb => Ok((
                pick(need_a, &|| {
                    causal_product(g, b, false, false, Causal::Tri(Tri::Lower))
                })?,
                pick(need_b, &|| {
                    causal_product(g, a, true, false, Causal::Tri(Tri::Upper))
                })?,
            )),
            Causal::GradLower => candle_core::bail!("matmul: a causal gradient of a^T @ b"),
            // For c = op(a) @ op(b): da = g @ op(b)^T and db = op(a)^T @ g, each written as
            // one product of the stored operands in the stored layout of a and b.
            Causal::No => match (self.ta, self.tb) {
                (false, false) => Ok((
                    pick(need_a, &|| product(g, b, false, true))?,
                    pick(need_b, &|| product(a, g, true, false))?,
                )),
                (false, true) => Ok((
                    pick(need_a, &|| product(g, b, false, false))?,
                    pick(need_b, &|| product(g, a, true, false))?,
                )),
                (true, false) => Ok((
                    pick(need_a, &|| product(b, g, false, true))?,
                    pick(need_b, &|| product(a, g, false, false))?,
                )),
                // Built by none of the functions above nor by these gradients.
                (true, true) => candle_core::bail!("matmul: no backward for a^T @ b^T"),
            },
        }
    }
}

/// The experts' projections without padding: `x: [A, k]` holds the rows of all experts one
/// after another (expert `e`'s `counts[e]` rows, in expert order, as the model's block
/// dispatch lays them out) and `w: [E, n, k]` their stacked weights; row `r` of expert `e`
/// comes out as `x[r] @ w[e]^T`, so the result is `[A, n]`. The batched product over a
/// padded `[E, cap, k]` layout does `E * cap` rows of arithmetic, and with uneven routing
/// `cap` is several times the mean; here each expert is one matrix product of exactly its
/// rows (one cuBLAS call each, all inside one graph node). Differentiable with respect to
/// both: `dx` is the grouped product with `w[e]` itself and `dw[e] = dy_e^T @ x_e` (zero for
/// an expert without rows).
pub fn grouped_matmul_t(x: &Tensor, w: &Tensor, counts: &[usize]) -> candle_core::Result<Tensor> {
    let (a, k) = x.dims2()?;
    let (e, _n, wk) = w.dims3()?;
    if wk != k || counts.len() != e || counts.iter().sum::<usize>() != a {
        candle_core::bail!(
            "grouped matmul: x {:?}, w {:?} and {} rows in {} groups do not fit",
            x.dims(),
            w.dims(),
            counts.iter().sum::<usize>(),
            counts.len()
        );
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!("grouped matmul: x is {:?}, w {:?}", x.dtype(), w.dtype());
    }
    let op = Grouped {
        counts: counts.into(),
        kind: GroupedKind::XWt,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// Which product of [`grouped_matmul_t`] a [`Grouped`] op computes, per expert `e` with rows
/// `r_e` of the sorted layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupedKind {
    /// `a: [A, k]`, `b: [E, n, k]` -> `[A, n]`: `a[r_e] @ b[e]^T` (the forward).
    XWt,
    /// `a: [A, n]`, `b: [E, n, k]` -> `[A, k]`: `a[r_e] @ b[e]` (the input's gradient).
    XW,
    /// `a: [A, n]`, `b: [A, k]` -> `[E, n, k]`: `a[r_e]^T @ b[r_e]` (the weights' gradient).
    AtB,
}

#[derive(Debug, Clone)]
struct Grouped {
    counts: std::sync::Arc<[usize]>,
    kind: GroupedKind,
}

/// One expert's product in row-major terms, `c[m, n] = op(a) @ op(b)`, on dense operands:
/// `a` from element `a_off`, stored `[m, k]` (`[k, m]` when `ta`), `b` from `b_off`, stored
/// `[k, n]` (`[n, k]` when `tb`), and `c` from `c_off`, stored `[m, n]`.
#[derive(Debug, Clone, Copy)]
struct GroupGemm {
    m: usize,
    n: usize,
    k: usize,
    a_off: usize,
    ta: bool,
    b_off: usize,
    tb: bool,
    c_off: usize,
}

impl Grouped {
    /// The output shape and each expert's product, for inputs of dims `ad`, `bd`.
    fn plan(&self, ad: &[usize], bd: &[usize]) -> (Shape, Vec<GroupGemm>) {
        use GroupedKind::{AtB, XW, XWt};
        // The weights of one expert are `[n, k]` (out, in).
        let (n, k) = match self.kind {
            XWt | XW => (bd[1], bd[2]),
            AtB => (ad[1], bd[1]),
        };
        let mut row = 0;
        let mut gemms = Vec::with_capacity(self.counts.len());
        for (g, &m) in self.counts.iter().enumerate() {
            let w = g * n * k;
            gemms.push(match self.kind {
                XWt => GroupGemm::new((m, n, k), (row * k, false), (w, true), row * n),
                XW => GroupGemm::new((m, k, n), (row * n, false), (w, false), row * k),
                AtB => GroupGemm::new((n, k, m), (row * n, true), (row * k, false), w),
            });
            row += m;
        }
        let shape = match self.kind {
            XWt => Shape::from((ad[0], n)),
            XW => Shape::from((ad[0], k)),
            AtB => Shape::from((self.counts.len(), n, k)),
        };
        (shape, gemms)
    }
}

#[cfg(any(feature = "cuda", test))] // the CUDA path, and its CPU emulation in `tests`
impl Grouped {
    /// Whether a split product splits each operand whole, in the runs of [`Gemm::runs`], for
    /// all experts at once: in the forward pass and the input's gradient, K runs along the
    /// rows of `x` and of the output gradient (runs of a row) and down the columns of each
    /// expert's weights (runs of a whole matrix). In the weights' gradient it runs down each
    /// expert's block of rows, and the blocks' lengths differ: each is split on its own.
    fn split_whole(&self) -> bool {
        self.kind != GroupedKind::AtB
    }
}

impl GroupGemm {
    /// `(m, n, k)`, `(a_off, ta)`, `(b_off, tb)` and `c_off`.
    fn new(
        (m, n, k): (usize, usize, usize),
        (a_off, ta): (usize, bool),
        (b_off, tb): (usize, bool),
        c_off: usize,
    ) -> Self {
        GroupGemm {
            m,
            n,
            k,
            a_off,
            ta,
            b_off,
            tb,
            c_off,
        }
    }

    /// The product's shape for [`Gemm`].
    #[cfg(any(feature = "cuda", test))]
    fn gemm(&self) -> Gemm {
        Gemm {
            m: self.m,
            n: self.n,
            k: self.k,
            ta: self.ta,
            tb: self.tb,
            batch: 1,
        }
    }
}

impl CustomOp2 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let (shape, gemms) = self.plan(al.dims(), bl.dims());
        let (a0, b0) = (al.start_offset(), bl.start_offset());
        // Each product through candle's own CPU matmul on a view of its rows, then one
        // concatenation; an expert without rows adds zeros to a weights' gradient and
        // nothing to a row layout.
        let mut parts = Vec::with_capacity(gemms.len());
        let mut written = 0;
        for g in &gemms {
            if g.m == 0 || g.n == 0 {
                continue;
            }
            debug_assert_eq!(g.c_off, written, "the products fill the output in order");
            written += g.m * g.n;
            if g.k == 0 {
                let zeros = candle_core::cpu_backend::CpuDevice
                    .zeros_impl(&Shape::from((g.m, g.n)), a.dtype())?;
                parts.push(zeros);
                continue;
            }
            let view =
                |off: usize, rows: usize, cols: usize, t: bool| -> candle_core::Result<Layout> {
                    if t {
                        Layout::contiguous_with_offset((cols, rows), off).transpose(0, 1)
                    } else {
                        Ok(Layout::contiguous_with_offset((rows, cols), off))
                    }
                };
            let la = view(a0 + g.a_off, g.m, g.k, g.ta)?;
            let lb = view(b0 + g.b_off, g.k, g.n, g.tb)?;
            parts.push(a.matmul(b, (1, g.m, g.n, g.k), &la, &lb)?);
        }
        if parts.is_empty() {
            let zeros = candle_core::cpu_backend::CpuDevice.zeros_impl(&shape, a.dtype())?;
            return Ok((zeros, shape));
        }
        Ok((CpuStorage::concat(&parts)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (shape, gemms) = self.plan(al.dims(), bl.dims());
        // Every product with a nonzero inner dimension writes its block; a product without
        // one (an expert without rows, in a weights' gradient) leaves a block that must read
        // as zero.
        let out = if gemms.iter().any(|g| g.k == 0 && g.m * g.n > 0) {
            cuda::zeros_like(a, shape.elem_count())?
        } else {
            cuda::alloc_like(a, shape.elem_count())?
        };
        let (a0, b0) = (al.start_offset(), bl.start_offset());
        let gemms: Vec<&GroupGemm> = gemms
            .iter()
            .filter(|g| g.m > 0 && g.n > 0 && g.k > 0)
            .collect();
        let split = |g: &GroupGemm| splits(a.dtype(), g.m, g.n, g.k);
        // The split operands, made on the device's stream before any product starts: once
        // for all experts when any expert's product splits (see `Grouped::split_whole`),
        // otherwise each expert's blocks on their own, all of them before the first product
        // (three times both operands' size, held until the products are enqueued).
        let whole = match gemms.iter().find(|g| split(g)) {
            Some(g) if self.split_whole() => {
                let (an, bn) = (al.shape().elem_count(), bl.shape().elem_count());
                let (ia, ib) = g.gemm().runs();
                Some((
                    cuda::SplitOperand::new(a, a0, an, ia, true)?,
                    cuda::SplitOperand::new(b, b0, bn, ib, false)?,
                ))
            }
            _ => None,
        };
        let each = gemms
            .iter()
            .map(
                |g| -> candle_core::Result<Option<(cuda::SplitOperand, cuda::SplitOperand)>> {
                    if whole.is_some() || !split(g) {
                        return Ok(None);
                    }
                    let (ia, ib) = g.gemm().runs();
                    Ok(Some((
                        cuda::SplitOperand::new(a, a0 + g.a_off, ia, ia, true)?,
                        cuda::SplitOperand::new(b, b0 + g.b_off, ib, ib, false)?,
                    )))
                },
            )
            .collect::<candle_core::Result<Vec<_>>>()?;
        let run = |i: usize, blas: &cuda::Blas| -> candle_core::Result<()> {
            let g = gemms[i];
            let c = (&out, g.c_off);
            match (&whole, &each[i]) {
                _ if !split(g) => cuda::gemm_row_major(blas, a, a0, b, b0, &out, g),
                (Some((sa, sb)), _) => {
                    cuda::gemm_split(blas, (sa, g.a_off), (sb, g.b_off), c, &g.gemm())
                }
                (None, Some((sa, sb))) => cuda::gemm_split(blas, (sa, 0), (sb, 0), c, &g.gemm()),
                (None, None) => {
                    candle_core::bail!("grouped matmul: a split product lost its operands")
                }
            }
        };
        cuda::spread(&a.device, gemms.len(), run)?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.kind != GroupedKind::XWt {
            candle_core::bail!("grouped matmul: only the forward product is differentiable");
        }
        let (x, w) = (a.detach(), b.detach());
        let grad = grad.contiguous()?;
        let with = |kind| Grouped {
            counts: self.counts.clone(),
            kind,
        };
        let dx = grad.apply_op2(&w, with(GroupedKind::XW))?;
        let dw = grad.apply_op2(&x, with(GroupedKind::AtB))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// SwiGLU's gate `silu(g) * u` (f32 arithmetic). Differentiable with respect to both.
pub fn swiglu_gate(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    if g.dims() != u.dims() || g.dtype() != u.dtype() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ", g.dims(), u.dims());
    }
    if native(g) {
        g.contiguous()?
            .apply_op2(&u.contiguous()?, SwiGlu(SwiGluPack::Apart))
    } else {
        g.silu()? * u
    }
}

/// SwiGLU's gate on one product's output `gu: [.., 2h]` whose rows hold the gate's `h`
/// values and then the input's (the experts' gate and up projections as one product over
/// their weights stacked `[gate; up]`): `silu(gu[.., :h]) * gu[.., h:]`, `[.., h]`. Its
/// gradient comes out as one `[.., 2h]` tensor, what that product's backward takes.
pub fn swiglu_packed(gu: &Tensor) -> candle_core::Result<Tensor> {
    let last = gu.dims().last().copied().unwrap_or(0);
    if gu.rank() == 0 || last % 2 != 0 {
        candle_core::bail!(
            "swiglu: packed gate and up need an even last dimension, got {:?}",
            gu.dims()
        );
    }
    let h = last / 2;
    if native(gu) {
        gu.contiguous()?.apply_op1(SwiGlu(SwiGluPack::Rows(h)))
    } else {
        let d = gu.rank() - 1;
        gu.narrow(d, 0, h)?.silu()? * gu.narrow(d, h, h)?
    }
}

/// Where a SwiGLU op finds its gate and input: two tensors of their own, or one tensor
/// whose rows hold `h` gate values and then `h` input values.
#[derive(Debug, Clone, Copy)]
enum SwiGluPack {
    Apart,
    Rows(usize),
}

impl SwiGluPack {
    /// For `n` output values: each value's gate index (its input's is `at + up`), `up`, the
    /// kernels' `h` and `stride`, and the gradient's length.
    fn plan(self, n: usize) -> (impl Fn(usize) -> usize, usize, usize, usize, usize) {
        let (h, stride, up) = match self {
            SwiGluPack::Apart => (n.max(1), n.max(1), n),
            SwiGluPack::Rows(h) => (h.max(1), 2 * h.max(1), h),
        };
        (move |k| (k / h) * stride + k % h, up, h, stride, 2 * n)
    }
}

/// SwiGLU on the host: `y[k] = silu(g[at(k)]) * u[at(k)]`.
fn swiglu_host<T: Real>(g: &[T], u: &[T], n: usize, at: impl Fn(usize) -> usize) -> CpuStorage {
    let one = T::from_f64(1.0);
    let y = (0..n)
        .map(|k| {
            let (a, b) = (g[at(k)], u[at(k)]);
            a * (one / (one + (T::from_f64(0.0) - a).exp())) * b
        })
        .collect();
    T::to_cpu_storage_owned(y)
}

/// Its backward: `dg = dy u silu'(g)` at `at(k)` and `du = dy silu(g)` at `at(k) + up`, in
/// a gradient of `len` values.
fn swiglu_host_bwd<T: Real>(
    (g, u, dy): (&[T], &[T], &[T]),
    at: impl Fn(usize) -> usize,
    up: usize,
    len: usize,
) -> CpuStorage {
    let one = T::from_f64(1.0);
    let mut out = vec![T::from_f64(0.0); len];
    for (k, &d) in dy.iter().enumerate() {
        let i = at(k);
        let (a, b) = (g[i], u[i]);
        let sig = one / (one + (T::from_f64(0.0) - a).exp());
        out[i] = d * b * sig * (one + a * (one - sig));
        out[i + up] = d * a * sig;
    }
    T::to_cpu_storage_owned(out)
}

/// [`SwiGluPack::Rows`]' shape of the output for an input of `dims`.
fn swiglu_out_shape(pack: SwiGluPack, dims: &[usize]) -> Shape {
    let mut out = dims.to_vec();
    if let (SwiGluPack::Rows(h), Some(last)) = (pack, out.last_mut()) {
        *last = h;
    }
    Shape::from(out)
}

/// SwiGLU's gate: [`CustomOp2`] on a gate and an input apart, [`CustomOp1`] on the two
/// packed in rows.
#[derive(Debug, Clone, Copy)]
struct SwiGlu(SwiGluPack);

impl SwiGlu {
    fn cpu(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        n: usize,
    ) -> candle_core::Result<CpuStorage> {
        let (at, up, ..) = self.0.plan(n);
        // Packed: the input is the gate's own storage, `up` values on.
        let shift = |l: &Layout| match self.0 {
            SwiGluPack::Apart => l.clone(),
            SwiGluPack::Rows(_) => Layout::contiguous_with_offset(
                (l.shape().elem_count() - up,),
                l.start_offset() + up,
            ),
        };
        Ok(match g {
            CpuStorage::F32(_) => {
                swiglu_host::<f32>(cpu_slice(g, gl)?, cpu_slice(u, &shift(ul))?, n, at)
            }
            CpuStorage::F64(_) => {
                swiglu_host::<f64>(cpu_slice(g, gl)?, cpu_slice(u, &shift(ul))?, n, at)
            }
            _ => candle_core::bail!("swiglu: the CPU version takes f32 or f64"),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        u: &CudaStorage,
        ul: &Layout,
        n: usize,
    ) -> candle_core::Result<CudaStorage> {
        let (_, up, h, stride, _) = self.0.plan(n);
        let out = cuda::alloc_like(g, n)?;
        let gp = cuda::input(g, gl)?;
        let up = match self.0 {
            SwiGluPack::Apart => cuda::input(u, ul)?,
            SwiGluPack::Rows(_) => cuda::advance(&gp, up, g.dtype())?,
        };
        let y = cuda::output(&out)?;
        let (kernel, per) = cuda::fours("swiglu_fwd", g.dtype(), h.min(stride), &[&gp, &up, &y]);
        let args = [
            gp,
            up,
            y,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I64(h as i64),
            cuda::Arg::I64(stride as i64),
        ];
        cuda::launch(&g.device, &kernel, g.dtype(), cuda::flat(n / per), &args)?;
        Ok(out)
    }

    /// `[dg | du]` flat (apart) or the packed input's gradient, from the op's inputs.
    fn grad(&self, g: &Tensor, u: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?
            .apply_op3_no_bwd(&u.contiguous()?, &grad.contiguous()?, &SwiGluBwd(self.0))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = gl.shape().elem_count();
        Ok((self.cpu(gs, gl, us, ul, n)?, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        Ok((self.cuda(gs, gl, us, ul, n)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let both = self.grad(g, u, grad)?;
        let dg = both.narrow(0, 0, n)?.reshape(g.dims())?;
        let du = both.narrow(0, n, n)?.reshape(u.dims())?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = swiglu_out_shape(self.0, l.dims());
        Ok((self.cpu(s, l, s, l, shape.elem_count())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let shape = swiglu_out_shape(self.0, l.dims());
        Ok((self.cuda(s, l, s, l, shape.elem_count())?, shape))
    }

    fn bwd(
        &self,
        gu: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad(gu, gu, grad)?.reshape(gu.dims())?))
    }
}

/// Backward of [`SwiGlu`] from the gate, the input (the packed tensor twice when packed)
/// and the output's gradient: `[dg | du]` flat, or the packed tensor's gradient flat.
#[derive(Debug, Clone, Copy)]
struct SwiGluBwd(SwiGluPack);

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = dl.shape().elem_count();
        let (at, up, _, _, len) = self.0.plan(n);
        let ul = match self.0 {
            SwiGluPack::Apart => ul.clone(),
            SwiGluPack::Rows(_) => {
                Layout::contiguous_with_offset((2 * n - up,), ul.start_offset() + up)
            }
        };
        let out = match gs {
            CpuStorage::F32(_) => swiglu_host_bwd::<f32>(
                (cpu_slice(gs, gl)?, cpu_slice(us, &ul)?, cpu_slice(ds, dl)?),
                at,
                up,
                len,
            ),
            CpuStorage::F64(_) => swiglu_host_bwd::<f64>(
                (cpu_slice(gs, gl)?, cpu_slice(us, &ul)?, cpu_slice(ds, dl)?),
                at,
                up,
                len,
            ),
            _ => candle_core::bail!("swiglu-bwd: the CPU version takes f32 or f64"),
        };
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = dl.shape().elem_count();
        let (_, up, h, stride, len) = self.0.plan(n);
        let dt = gs.dtype();
        let out = cuda::alloc_like(gs, len)?;
        let g = cuda::input(gs, gl)?;
        let u = match self.0 {
            SwiGluPack::Apart => cuda::input(us, ul)?,
            SwiGluPack::Rows(_) => cuda::advance(&g, up, dt)?,
        };
        let (dy, dg) = (cuda::input(ds, dl)?, cuda::output(&out)?);
        let du = cuda::advance(&dg, up, dt)?;
        // Apart, the du half starts n elements in: aligned too when n is a multiple of 4.
        let (kernel, per) = cuda::fours("swiglu_bwd", dt, h.min(stride), &[&g, &u, &dy, &dg, &du]);
        let args = [
            g,
            u,
            dy,
            dg,
            du,
            cuda::Arg::I64(n as i64),
            cuda::Arg::I64(h as i64),
            cuda::Arg::I64(stride as i64),
        ];
        cuda::launch(&gs.device, &kernel, dt, cuda::flat(n / per), &args)?;
        Ok((out, Shape::from(len)))
    }
}

/// Kernel launches through raw device pointers, so one launcher serves every op and dtype.
/// candle runs all work of a device on one stream, and so does every kernel here; only the
/// experts' products of a grouped product and the blocks of a triangular product run on side
/// streams ([`cuda::spread`]), which wait for the device's stream before they start and
/// which it waits for after them.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // allocations the kernels fill, and the launches themselves
pub(crate) mod cuda {
    use std::sync::{Arc, Mutex};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, DeviceId, Map1, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

    use super::{Gemm, MODULE, PTX};

    /// A cuBLAS handle, bound to the stream its products run on.
    pub(super) type Blas = candle_core::cuda_backend::cudarc::cublas::CudaBlas;

    /// A side stream of a device with its own cuBLAS handle, on which some of the products
    /// of a grouped or triangular product run ([`spread`]).
    pub(super) struct Lane {
        stream: Arc<CudaStream>,
        blas: Blas,
    }

    impl Lane {
        pub(super) fn blas(&self) -> &Blas {
            &self.blas
        }
    }

    /// Each device's lanes, made on first use and kept for the process: at most
    /// [`super::MAX_EXPERT_STREAMS`] streams and cuBLAS handles a device.
    static LANES: Mutex<Vec<(DeviceId, Vec<Arc<Lane>>)>> = Mutex::new(Vec::new());

    /// The first `n` lanes of `dev`, made where missing.
    fn lanes(dev: &CudaDevice, n: usize) -> Result<Vec<Arc<Lane>>> {
        let mut all = LANES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let at = match all.iter().position(|(id, _)| *id == dev.id()) {
            Some(at) => at,
            None => {
                all.push((dev.id(), Vec::new()));
                all.len() - 1
            }
        };
        let lanes = &mut all[at].1;
        while lanes.len() < n {
            let stream = dev.cuda_stream().context().new_stream().w()?;
            let blas = Blas::new(stream.clone())
                .map_err(|e| candle_core::Error::Msg(format!("cuBLAS handle: {e:?}")))?;
            lanes.push(Arc::new(Lane { stream, blas }));
        }
        Ok(lanes[..n].to_vec())
    }

    /// Runs `run(i, blas)` for each `i` in `0..count`: side by side on up to
    /// [`super::expert_streams`] lanes (item `i` on lane `i % lanes`, see [`on_lanes`]), or
    /// one after another on the device's stream when that is one stream or one item.
    pub(super) fn spread(
        dev: &CudaDevice,
        count: usize,
        run: impl Fn(usize, &Blas) -> Result<()>,
    ) -> Result<()> {
        let streams = super::expert_streams().min(count);
        if streams <= 1 {
            let blas = dev.cublas_handle();
            return (0..count).try_for_each(|i| run(i, &blas));
        }
        on_lanes(dev, streams, |lanes| {
            (0..count).try_for_each(|i| run(i, lanes[i % lanes.len()].blas()))
        })
    }

    /// Runs `work` on `n` lanes of `dev` (`n` at least 2): the lanes first wait for
    /// everything enqueued on the device's stream so far (the operands, the output's
    /// allocation), and the device's stream waits for all of them before anything enqueued
    /// after this call, the frees of the operands included, runs. The wait is enqueued even
    /// when `work` fails part-way.
    fn on_lanes(
        dev: &CudaDevice,
        n: usize,
        work: impl FnOnce(&[Arc<Lane>]) -> Result<()>,
    ) -> Result<()> {
        let lanes = lanes(dev, n)?;
        let main = dev.cuda_stream();
        let ready = main.record_event(None).w()?;
        for lane in &lanes {
            lane.stream.wait(&ready).w()?;
        }
        let done = work(&lanes);
        let mut joined = Ok(());
        for lane in &lanes {
            if let Err(e) = main.join(&lane.stream) {
                joined = Err(e);
            }
        }
        done?;
        joined.w()
    }

    /// One kernel argument.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Arg {
        /// A device pointer.
        P(u64),
        I64(i64),
        I32(i32),
        F32(f32),
        F64(f64),
    }

    /// A scalar in the kernel's element type (f32 for bf16 kernels' f32 arithmetic).
    pub(super) fn real(dt: DType, x: f64) -> Arg {
        if dt == DType::F64 {
            Arg::F64(x)
        } else {
            Arg::F32(x as f32)
        }
    }

    pub(super) fn suffix(dt: DType) -> Result<&'static str> {
        Ok(match dt {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            other => candle_core::bail!("no fused kernel for {other:?}"),
        })
    }

    /// The device address of element `start` of a storage.
    fn address(s: &CudaStorage, start: usize) -> Result<u64> {
        let stream = s.device.cuda_stream();
        let (base, size) = match &s.slice {
            S::F32(v) => (v.device_ptr(&stream).0, 4),
            S::F64(v) => (v.device_ptr(&stream).0, 8),
            S::BF16(v) => (v.device_ptr(&stream).0, 2),
            S::F16(v) => (v.device_ptr(&stream).0, 2),
            S::U32(v) => (v.device_ptr(&stream).0, 4),
            S::I64(v) => (v.device_ptr(&stream).0, 8),
            _ => candle_core::bail!("fused kernel: unsupported storage {:?}", s.dtype()),
        };
        Ok(base + (start * size) as u64)
    }

    /// The device address of element `start` of a contiguous tensor's own values.
    pub(super) fn tensor_address(t: &candle_core::Tensor, start: usize) -> Result<u64> {
        let (st, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*st else {
            candle_core::bail!("fused kernel: tensor is not on the GPU");
        };
        if !l.is_contiguous() {
            candle_core::bail!("fused kernel: tensor is not contiguous");
        }
        address(s, l.start_offset() + start)
    }

    /// The address of a contiguous input.
    pub(crate) fn input(s: &CudaStorage, l: &Layout) -> Result<Arg> {
        match l.contiguous_offsets() {
            Some((start, _)) => Ok(Arg::P(address(s, start)?)),
            None => candle_core::bail!("fused kernel: input is not contiguous"),
        }
    }

    /// The address of an output.
    pub(crate) fn output(s: &CudaStorage) -> Result<Arg> {
        Ok(Arg::P(address(s, 0)?))
    }

    /// The pointer `p` moved `elems` elements of `dt` on.
    pub(crate) fn advance(p: &Arg, elems: usize, dt: DType) -> Result<Arg> {
        match p {
            Arg::P(a) => Ok(Arg::P(a + (elems * dt.size_in_bytes()) as u64)),
            _ => candle_core::bail!("fused kernel: only a pointer can be advanced"),
        }
    }

    /// An uninitialised buffer of `n` elements of the dtype of `like`, which the kernel
    /// about to be launched fills completely.
    pub(crate) fn alloc_like(like: &CudaStorage, n: usize) -> Result<CudaStorage> {
        buffer_like(like, n, false)
    }

    /// A zeroed buffer of `n` elements of the dtype of `like`.
    pub(super) fn zeros_like(like: &CudaStorage, n: usize) -> Result<CudaStorage> {
        buffer_like(like, n, true)
    }

    fn buffer_like(like: &CudaStorage, n: usize, zeroed: bool) -> Result<CudaStorage> {
        struct Alloc(usize, bool);
        impl Map1 for Alloc {
            fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
                &self,
                _: &CudaSlice<T>,
                dev: &CudaDevice,
                _: &Layout,
            ) -> Result<CudaSlice<T>> {
                if self.1 {
                    return dev.alloc_zeros::<T>(self.0);
                }
                // SAFETY: the callers of `alloc_like` write every element before anything
                // reads it.
                unsafe { dev.alloc::<T>(self.0) }
            }
        }
        let layout = Layout::contiguous(1);
        let slice = Alloc(n, zeroed).map(&like.slice, &like.device, &layout)?;
        Ok(CudaStorage {
            slice,
            device: like.device.clone(),
        })
    }

    /// One product of [`super::GroupGemm`] through cuBLAS on the stream of `blas`, on raw
    /// addresses within `a` (from element `a0`), `b` (from `b0`) and `c`. f32 products
    /// honour candle's TF32 switch as its own matmul does (off unless a caller turned it on);
    /// bf16 and f16 accumulate in f32.
    pub(super) fn gemm_row_major(
        blas: &Blas,
        a: &CudaStorage,
        a0: usize,
        b: &CudaStorage,
        b0: usize,
        c: &CudaStorage,
        g: &super::GroupGemm,
    ) -> Result<()> {
        let compute = compute_type(a.dtype());
        let addrs = (
            address(a, a0 + g.a_off)?,
            address(b, b0 + g.b_off)?,
            address(c, g.c_off)?,
        );
        gemm_at(blas, a.dtype(), compute, addrs, &g.gemm(), None)
    }

    /// The compute type of a product of `dt` that does not split, as candle's own: f32
    /// honours candle's TF32 switch, bf16 and f16 accumulate in f32.
    fn compute_type(
        dt: DType,
    ) -> candle_core::cuda_backend::cudarc::cublas::sys::cublasComputeType_t {
        use candle_core::cuda_backend::cudarc::cublas::sys::cublasComputeType_t as C;
        match dt {
            DType::F32 if candle_core::cuda_backend::gemm_reduced_precision_f32() => {
                C::CUBLAS_COMPUTE_32F_FAST_TF32
            }
            DType::F64 => C::CUBLAS_COMPUTE_64F,
            _ => C::CUBLAS_COMPUTE_32F,
        }
    }

    /// The leading dimensions `(lda, ldb, ldc)` and the batch strides `(a, b, c)` of a
    /// product inside larger matrices.
    type GemmLayout = ((usize, usize, usize), (usize, usize, usize));

    /// `c = op(a) @ b` for one block of a triangular product: the matrices of `g` inside
    /// larger ones whose rows are `lda` (`a`) and `ldb` (`b` and `c`) long, `strides` elements
    /// apart from one matrix of the batch to the next, from elements `(a0, b0, c0)`.
    pub(super) fn gemm_strided(
        blas: &Blas,
        (a, b, c): (&CudaStorage, &CudaStorage, &CudaStorage),
        (a0, b0, c0): (usize, usize, usize),
        g: &Gemm,
        (lda, ldb): (usize, usize),
        strides: (usize, usize, usize),
    ) -> Result<()> {
        let addrs = (address(a, a0)?, address(b, b0)?, address(c, c0)?);
        let lay = ((lda, ldb, ldb), strides);
        gemm_at(
            blas,
            a.dtype(),
            compute_type(a.dtype()),
            addrs,
            g,
            Some(lay),
        )
    }

    /// `c = op(a) @ op(b)` through cuBLAS on the stream of `blas`, on raw addresses of `dt`
    /// elements, in `lay` where the matrices sit inside larger ones (else dense, one after
    /// another).
    fn gemm_at(
        blas: &Blas,
        dt: DType,
        compute: candle_core::cuda_backend::cudarc::cublas::sys::cublasComputeType_t,
        (pa, pb, pc): (u64, u64, u64),
        g: &Gemm,
        lay: Option<GemmLayout>,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result::gemm_strided_batched_ex, sys};
        use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        use sys::cudaDataType_t as D;
        let ty = match dt {
            DType::F32 => D::CUDA_R_32F,
            DType::BF16 => D::CUDA_R_16BF,
            DType::F16 => D::CUDA_R_16F,
            DType::F64 => D::CUDA_R_64F,
            other => candle_core::bail!("matmul: no product for {other:?}"),
        };
        let (one, zero) = (1f64, 0f64);
        let (one32, zero32) = (1f32, 0f32);
        let (alpha, beta): (*const std::ffi::c_void, *const std::ffi::c_void) = if dt == DType::F64
        {
            ((&one as *const f64).cast(), (&zero as *const f64).cast())
        } else {
            (
                (&one32 as *const f32).cast(),
                (&zero32 as *const f32).cast(),
            )
        };
        // Row-major `c[m, n] = op(a) @ op(b)` is column-major `c^T[n, m] = op(b)^T @ op(a)^T`:
        // cuBLAS gets `b` first. A row-major operand stored as `[rows, cols]` is a
        // column-major `[cols, rows]` with leading dimension `cols`.
        let ((lda, ldb, ldc), (sa, sb, sc)) = lay.unwrap_or_else(|| {
            let (lda, ldb) = g.leading();
            ((lda, ldb, g.n), g.strides())
        });
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let int = |v: usize| -> Result<i32> {
            i32::try_from(v).map_err(|_| {
                candle_core::Error::Msg(format!("matmul: {v} is too large for cuBLAS"))
            })
        };
        let long = |v: usize| -> Result<i64> {
            i64::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("matmul: stride {v} is too large")))
        };
        // SAFETY: the addresses point into live buffers of `dt` elements holding `batch`
        // operands of `m x k`, `k x n` and `m x n` elements one after another (the callers
        // compute them from the inputs' dims); alpha and beta outlive the call. It is
        // enqueued on the stream of `blas`: the device's, or a lane that waits for it and
        // that it waits for before the buffers can be freed (`on_lanes`).
        unsafe {
            gemm_strided_batched_ex(
                *blas.handle(),
                op(g.tb),
                op(g.ta),
                int(g.n)?,
                int(g.m)?,
                int(g.k)?,
                alpha,
                pb as *const _,
                ty,
                int(ldb)?,
                long(sb)?,
                pa as *const _,
                ty,
                int(lda)?,
                long(sa)?,
                beta,
                pc as *mut _,
                ty,
                int(ldc)?,
                long(sc)?,
                int(g.batch)?,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("matmul: cuBLAS: {e:?}")))?;
        Ok(())
    }

    /// One operand of split f32 products ([`super::F32Products::Split`]): its `n` values
    /// from element `start`, as `[n / inner, 3, inner]` (`tf32_split3` in `kernels.cu`):
    /// each run of `inner` values three times, as (lo, hi, hi) for the left operand of a
    /// product and (hi, lo, hi) for the right one. With `inner` the extent of K along the
    /// operand (a row's `k` values where K runs along rows, a whole `[k, cols]` matrix where
    /// it runs down columns), one product over 3K sums the small terms first, then
    /// `hi·hi`.
    pub(super) struct SplitOperand {
        parts: CudaStorage,
    }

    impl SplitOperand {
        /// Splits `n` values of `s` from element `start` in runs of `inner`, in the order of
        /// the left operand of a product (`left`) or of the right one.
        pub(super) fn new(
            s: &CudaStorage,
            start: usize,
            n: usize,
            inner: usize,
            left: bool,
        ) -> Result<Self> {
            if s.dtype() != DType::F32 || inner == 0 || !n.is_multiple_of(inner) {
                candle_core::bail!("tf32 split: {:?}, {n} values in runs of {inner}", s.dtype());
            }
            let parts = alloc_acc(&s.device, 3 * n, false)?;
            let (src, dst) = (Arg::P(address(s, start)?), output(&parts)?);
            // Four values a thread where the runs and both addresses allow 16-byte accesses.
            let (kernel, per) = fours("tf32_split3_x", DType::F32, inner, &[&src, &dst]);
            let kernel = if per == 4 {
                kernel.as_str()
            } else {
                "tf32_split3"
            };
            let width = inner / per;
            let args = [
                src,
                dst,
                Arg::I64((n / inner) as i64),
                Arg::I64(width as i64),
                Arg::I32(left as i32),
            ];
            launch_named(&s.device, kernel, run_grid(n / inner, width), &args)?;
            Ok(SplitOperand { parts })
        }
    }

    /// `c = op(a) @ op(b)` from elements `a_off` and `b_off` of the split operands (counted
    /// in the original values, at the start of a run) into `c` from `c_off`: one TF32
    /// product over 3K, `lo_a hi_b`, then `hi_a lo_b`, then `hi_a hi_b` along K, with f32
    /// accumulation, on the stream of `blas`.
    pub(super) fn gemm_split(
        blas: &Blas,
        (a, a_off): (&SplitOperand, usize),
        (b, b_off): (&SplitOperand, usize),
        (c, c_off): (&CudaStorage, usize),
        g: &Gemm,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::sys::cublasComputeType_t as C;
        let addrs = (
            address(&a.parts, 3 * a_off)?,
            address(&b.parts, 3 * b_off)?,
            address(c, c_off)?,
        );
        let g3 = g.tripled();
        gemm_at(
            blas,
            DType::F32,
            C::CUBLAS_COMPUTE_32F_FAST_TF32,
            addrs,
            &g3,
            None,
        )
    }

    /// An uninitialised f32 (or, for `wide`, f64) buffer of `n` elements.
    pub(crate) fn alloc_acc(dev: &CudaDevice, n: usize, wide: bool) -> Result<CudaStorage> {
        // SAFETY: the caller's kernel writes every element before anything reads it.
        let slice = if wide {
            S::F64(unsafe { dev.alloc::<f64>(n)? })
        } else {
            S::F32(unsafe { dev.alloc::<f32>(n)? })
        };
        Ok(CudaStorage {
            slice,
            device: dev.clone(),
        })
    }

    /// An uninitialised u32 buffer of `n` elements, which the caller's kernel fills.
    pub(super) fn alloc_u32(dev: &CudaDevice, n: usize) -> Result<CudaStorage> {
        // SAFETY: the caller's kernel writes every element before anything reads it.
        let slice = S::U32(unsafe { dev.alloc::<u32>(n)? });
        Ok(CudaStorage {
            slice,
            device: dev.clone(),
        })
    }

    /// Rows per block of the one-warp-per-row kernels.
    const ROWS_PER_BLOCK: usize = 4;

    /// One warp per row.
    pub(super) fn rows(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
            block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride launch over `n` elements: enough blocks to fill the GPU a few times.
    pub(super) fn row_groups(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A grid-stride launch over `n` elements, 256 threads a block, at most 8 blocks an SM.
    pub(super) fn flat(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 132 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `outer` runs of `width` items: the threads' x covers a run (up to 256 threads), their
    /// y the runs, so that a block of 256 threads holds several runs shorter than 256 (the
    /// grid's y is at most 65,535 blocks; the kernel strides over the rest).
    pub(super) fn run_grid(outer: usize, width: usize) -> LaunchConfig {
        let tx = width.clamp(1, 256);
        let ty = 256 / tx;
        LaunchConfig {
            grid_dim: (
                width.div_ceil(tx) as u32,
                outer.div_ceil(ty).clamp(1, 65_535) as u32,
                1,
            ),
            block_dim: (tx as u32, ty as u32, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One thread per item, for kernels without a grid-stride loop.
    pub(super) fn flat_exact(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block of `threads` threads.
    pub(super) fn one_block(threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `n` blocks of 256 threads.
    pub(super) fn blocks(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The variant of `kernel` that moves four elements a thread (`{kernel}4`, with 8- or
    /// 16-byte accesses) where `width` (a row's element count, or the whole tensor's) is a
    /// multiple of 4 and every address in `addrs` is aligned to 4 elements of `dt`, else
    /// `kernel` itself; and the elements a thread.
    pub(super) fn fours(kernel: &str, dt: DType, width: usize, addrs: &[&Arg]) -> (String, usize) {
        let quad = 4 * dt.size_in_bytes() as u64;
        let aligned = addrs
            .iter()
            .all(|a| matches!(a, Arg::P(p) if p.is_multiple_of(quad)));
        if width.is_multiple_of(4) && aligned {
            (format!("{kernel}4"), 4)
        } else {
            (kernel.to_string(), 1)
        }
    }

    /// Launches `{kernel}_{dtype}` from `kernels.cu` on the device's stream.
    pub(super) fn launch(
        dev: &CudaDevice,
        kernel: &str,
        dt: DType,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        launch_named(dev, &format!("{kernel}_{}", suffix(dt)?), cfg, args)
    }

    /// Launches the kernel `name` from `kernels.cu` on the device's stream.
    pub(crate) fn launch_named(
        dev: &CudaDevice,
        name: &str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        launch_from(dev, MODULE, PTX, name, cfg, args)
    }

    /// Launches the kernel `name` of the PTX module `module` (compiled from `ptx`, loaded
    /// into candle's per-device cache on first use) on the device's stream.
    pub(crate) fn launch_from(
        dev: &CudaDevice,
        module: &str,
        ptx: &str,
        name: &str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let func = dev.get_or_load_custom_func(name, module, ptx)?;
        let mut b = func.builder();
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: every caller passes the arguments of the kernel's signature in
        // `kernels.cu`, with pointers to buffers of the sizes the kernel indexes.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// The split f32 products' layouts emulated on the CPU, where CI runs them: the host twin of
/// `tf32_split3`, and cuBLAS's product read through the leading dimensions and strides
/// `cuda::gemm_at` passes it (its row-major to column-major mapping is the one the CUDA
/// tests check against plain products). Every product the GPU splits, plain and grouped,
/// is laid out as the CUDA code lays it out and must come out as the plain product.
#[cfg(test)]
mod tests {
    use super::*;

    /// `tf32_split3` of `kernels.cu` on the host.
    fn split3(x: &[f32], inner: usize, left: bool) -> Vec<f32> {
        let mut out = vec![0f32; 3 * x.len()];
        for (i, &v) in x.iter().enumerate() {
            let (hi, lo) = tf32_split(v);
            let at = (i / inner) * 3 * inner + i % inner;
            let parts = if left { [lo, hi, hi] } else { [hi, lo, hi] };
            for (p, part) in parts.into_iter().enumerate() {
                out[at + p * inner] = part;
            }
        }
        out
    }

    /// The product cuBLAS computes for `cuda::gemm_at`, in f64.
    fn gemm(a: &[f32], b: &[f32], g: &Gemm) -> Vec<f64> {
        let ((lda, ldb), (sa, sb, _)) = (g.leading(), g.strides());
        let mut c = vec![0f64; g.batch * g.m * g.n];
        for t in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    c[(t * g.m + i) * g.n + j] = (0..g.k)
                        .map(|kk| {
                            let x = a[t * sa + if g.ta { kk * lda + i } else { i * lda + kk }];
                            let y = b[t * sb + if g.tb { j * ldb + kk } else { kk * ldb + j }];
                            x as f64 * y as f64
                        })
                        .sum();
                }
            }
        }
        c
    }

    /// Values in about [-2, 2] with every mantissa bit in use (a fixed LCG).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
            })
            .collect()
    }

    fn rel_err(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let num: f64 = got.iter().zip(want).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = want.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    #[test]
    fn split_products_lay_out_the_three_terms_along_k() {
        for (ta, tb) in [(false, false), (false, true), (true, false)] {
            let g = Gemm {
                m: 5,
                n: 7,
                k: 3,
                ta,
                tb,
                batch: 2,
            };
            let (a, b) = (values(2 * 5 * 3, 1), values(2 * 3 * 7, 2));
            // The emulated library reads the operands as the op does on the CPU.
            let shape = |rows, cols| Shape::from((2, rows, cols));
            let at = Tensor::from_vec(
                a.clone(),
                shape(if ta { 3 } else { 5 }, if ta { 5 } else { 3 }),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let bt = Tensor::from_vec(
                b.clone(),
                shape(if tb { 7 } else { 3 }, if tb { 3 } else { 7 }),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let want = product(
                &at.to_dtype(DType::F64).unwrap(),
                &bt.to_dtype(DType::F64).unwrap(),
                ta,
                tb,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
            assert!(rel_err(&gemm(&a, &b, &g), &want) < 1e-15, "{ta} {tb}");
            let (ia, ib) = g.runs();
            let split = gemm(&split3(&a, ia, true), &split3(&b, ib, false), &g.tripled());
            let e = rel_err(&split, &want);
            // Only lo_a lo_b is missing: about 2^-22 of the product.
            assert!(e < 1e-6, "transposed {ta} {tb}: error {e}");
        }
    }

    #[test]
    fn split_grouped_products_lay_out_each_experts_terms_along_k() {
        let counts: std::sync::Arc<[usize]> = vec![3, 0, 5, 2].into();
        let (rows, e, n, k) = (10, 4, 4, 6);
        for (kind, ad, bd) in [
            (GroupedKind::XWt, vec![rows, k], vec![e, n, k]),
            (GroupedKind::XW, vec![rows, n], vec![e, n, k]),
            (GroupedKind::AtB, vec![rows, n], vec![rows, k]),
        ] {
            let op = Grouped {
                counts: counts.clone(),
                kind,
            };
            let a = values(ad.iter().product(), 3);
            let b = values(bd.iter().product(), 4);
            let cpu = candle_core::Device::Cpu;
            let at = Tensor::from_vec(a.clone(), ad.as_slice(), &cpu).unwrap();
            let bt = Tensor::from_vec(b.clone(), bd.as_slice(), &cpu).unwrap();
            let want: Vec<f64> = at
                .to_dtype(DType::F64)
                .unwrap()
                .apply_op2_no_bwd(&bt.to_dtype(DType::F64).unwrap(), &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // As `Grouped::cuda_fwd` runs it when every product splits.
            let (shape, gemms) = op.plan(&ad, &bd);
            let gemms: Vec<&GroupGemm> = gemms.iter().filter(|g| g.m * g.n * g.k > 0).collect();
            let (ia, ib) = gemms[0].gemm().runs();
            let whole = op
                .split_whole()
                .then(|| (split3(&a, ia, true), split3(&b, ib, false)));
            let mut got = vec![0f64; shape.elem_count()];
            for g in gemms {
                let c = if let Some((sa, sb)) = &whole {
                    gemm(&sa[3 * g.a_off..], &sb[3 * g.b_off..], &g.gemm().tripled())
                } else {
                    let (ia, ib) = g.gemm().runs();
                    let sa = split3(&a[g.a_off..g.a_off + ia], ia, true);
                    let sb = split3(&b[g.b_off..g.b_off + ib], ib, false);
                    gemm(&sa, &sb, &g.gemm().tripled())
                };
                got[g.c_off..g.c_off + c.len()].copy_from_slice(&c);
            }
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{kind:?}: error {e}");
        }
    }
}
