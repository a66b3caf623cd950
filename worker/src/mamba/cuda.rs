//! The selective scan on the GPU (compiled with the `cuda` feature): the launches of
//! `scan.cu`'s chunked parallel scan behind the same two custom ops as the CPU version, so
//! the graph, the autograd and the packing of the inputs are shared and only the arithmetic
//! moves. Inputs are f32 or bf16 (states and sums are f32 inside the kernels either way).
//! Scratch buffers (chunk states, adjoints, partial sums) live only for one op.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use super::{Dims, ScanError};
use crate::fused::cuda::{self as k, Arg};

/// The PTX of `scan.cu`, built for the compute capability in `CUDA_COMPUTE_CAP`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/potluck_mamba.ptx"));

/// Name of the module in candle's per-device cache of custom kernels.
const MODULE: &str = "potluck_mamba";

/// Steps of a chunk; `SS_CHUNK` in `scan.cu`.
const CHUNK: usize = 64;

/// Threads of a block of the per-chunk kernels, one channel each.
const THREADS: usize = 128;

fn launch(s: &CudaStorage, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let suffix = match s.dtype() {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => {
            return Err(candle_core::Error::wrap(ScanError::Input(format!(
                "the CUDA scan takes f32 or bf16, not {other:?}"
            ))));
        }
    };
    k::launch_from(
        &s.device,
        MODULE,
        PTX,
        &format!("{kernel}_{suffix}"),
        cfg,
        args,
    )
}

/// One thread per (sequence, chunk, channel).
fn per_chunk(dims: &Dims) -> Result<LaunchConfig> {
    let chunks = dims.l.div_ceil(CHUNK);
    if chunks > 65_535 || dims.bs > 65_535 {
        return Err(candle_core::Error::wrap(ScanError::Input(format!(
            "{} sequences of {} steps exceed the CUDA scan's grid (at most 65,535 of each, \
             and {} steps)",
            dims.bs,
            dims.l,
            65_535 * CHUNK
        ))));
    }
    Ok(LaunchConfig {
        grid_dim: (
            dims.d.div_ceil(THREADS) as u32,
            chunks as u32,
            dims.bs as u32,
        ),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One thread per item of `n`.
fn flat(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| candle_core::Error::wrap(ScanError::Input(format!("{v} exceeds i32"))))
}

/// The sizes every kernel takes after its pointers: `L, D, N, C`.
fn sizes(dims: &Dims) -> Result<[Arg; 4]> {
    Ok([
        int(dims.l)?,
        int(dims.d)?,
        int(dims.n)?,
        int(dims.l.div_ceil(CHUNK))?,
    ])
}

/// Passes 1 and 2 of `scan.cu`: every chunk's starting states `[B, C, D, N]` and the sums
/// of its deltas `[B, C, D]`.
fn starts(
    ps: &CudaStorage,
    pl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    dims: &Dims,
) -> Result<(CudaStorage, CudaStorage)> {
    let cells = dims.bs * dims.l.div_ceil(CHUNK) * dims.d;
    let start = k::alloc_acc(&ps.device, cells * dims.n, false)?;
    let dsum = k::alloc_acc(&ps.device, cells, false)?;
    let [l, d, n, c] = sizes(dims)?;
    launch(
        ps,
        "ss_chunk",
        per_chunk(dims)?,
        &[
            k::input(ps, pl)?,
            k::input(as_, al)?,
            k::output(&start)?,
            k::output(&dsum)?,
            l,
            d,
            n,
            c,
        ],
    )?;
    let [_, d, n, c] = sizes(dims)?;
    launch(
        ps,
        "ss_carry",
        flat(dims.bs * dims.d * dims.n),
        &[
            k::output(&start)?,
            k::output(&dsum)?,
            k::input(as_, al)?,
            int(dims.bs)?,
            d,
            n,
            c,
        ],
    )?;
    Ok((start, dsum))
}

fn same_dtype(ps: &CudaStorage, others: &[&CudaStorage]) -> Result<()> {
    if others.iter().any(|o| o.dtype() != ps.dtype()) {
        return Err(candle_core::Error::wrap(ScanError::Input(
            "the CUDA scan's inputs must share one dtype".into(),
        )));
    }
    Ok(())
}

/// `y: [B, L, D]` of the packed rows and `a`.
pub(super) fn forward(
    d: usize,
    n: usize,
    ps: &CudaStorage,
    pl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_dtype(ps, &[as_])?;
    let dims = Dims::of(pl, al, d, n)?;
    let (start, _) = starts(ps, pl, as_, al, &dims)?;
    let y = k::alloc_like(ps, dims.bs * dims.l * dims.d)?;
    let [l, d, n, c] = sizes(&dims)?;
    launch(
        ps,
        "ss_out",
        per_chunk(&dims)?,
        &[
            k::input(ps, pl)?,
            k::input(as_, al)?,
            k::output(&start)?,
            k::output(&y)?,
            l,
            d,
            n,
            c,
        ],
    )?;
    Ok((y, Shape::from((dims.bs, dims.l, dims.d))))
}

/// `[grad packed (flat) | grad a (flat)]` from the output gradient `gs: [B, L, D]`, the
/// layout of the CPU backward op.
pub(super) fn backward(
    d: usize,
    n: usize,
    (ps, pl): (&CudaStorage, &Layout),
    (as_, al): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    same_dtype(ps, &[as_, gs])?;
    let dims = Dims::of(pl, al, d, n)?;
    if gl.shape().dims() != [dims.bs, dims.l, dims.d] {
        candle_core::bail!("selective scan: output gradient {:?}", gl.shape());
    }
    let rows = dims.bs * dims.l;
    let cells = dims.bs * dims.l.div_ceil(CHUNK) * dims.d;
    let warps = dims.d.div_ceil(32);
    let (start, dsum) = starts(ps, pl, as_, al, &dims)?;
    let adj = k::alloc_acc(&ps.device, cells * dims.n, false)?;
    let [l, dd, nn, c] = sizes(&dims)?;
    launch(
        ps,
        "ss_chunk_adj",
        per_chunk(&dims)?,
        &[
            k::input(ps, pl)?,
            k::input(as_, al)?,
            k::input(gs, gl)?,
            k::output(&adj)?,
            l,
            dd,
            nn,
            c,
        ],
    )?;
    let [_, dd, nn, c] = sizes(&dims)?;
    launch(
        ps,
        "ss_carry_adj",
        flat(dims.bs * dims.d * dims.n),
        &[
            k::output(&adj)?,
            k::output(&dsum)?,
            k::input(as_, al)?,
            int(dims.bs)?,
            dd,
            nn,
            c,
        ],
    )?;
    let len = rows * dims.width() + dims.d * dims.n;
    let out = k::alloc_like(ps, len)?;
    let bc_part = k::alloc_acc(&ps.device, rows * warps * 2 * dims.n, false)?;
    let a_part = k::alloc_acc(&ps.device, cells * dims.n, false)?;
    let [l, dd, nn, c] = sizes(&dims)?;
    launch(
        ps,
        "ss_grad",
        per_chunk(&dims)?,
        &[
            k::input(ps, pl)?,
            k::input(as_, al)?,
            k::input(gs, gl)?,
            k::output(&start)?,
            k::output(&adj)?,
            k::output(&out)?,
            k::output(&bc_part)?,
            k::output(&a_part)?,
            l,
            dd,
            nn,
            c,
        ],
    )?;
    launch(
        ps,
        "ss_reduce_bc",
        flat(rows * 2 * dims.n),
        &[
            k::output(&bc_part)?,
            k::output(&out)?,
            Arg::I64(rows as i64),
            int(dims.d)?,
            int(dims.n)?,
        ],
    )?;
    let ga = k::advance(&k::output(&out)?, rows * dims.width(), ps.dtype())?;
    launch(
        ps,
        "ss_reduce_a",
        flat(dims.d * dims.n),
        &[
            k::output(&a_part)?,
            ga,
            Arg::I64((dims.bs * dims.l.div_ceil(CHUNK)) as i64),
            int(dims.d)?,
            int(dims.n)?,
        ],
    )?;
    Ok((out, Shape::from(len)))
}
