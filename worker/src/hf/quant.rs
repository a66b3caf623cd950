//! Quantised frozen weights for QLoRA-style adapter training: int8 with one absmax scale per
//! row, and 4-bit NF4 with double quantisation as the QLoRA paper defines it (blocks of 64
//! values share an absmax; the absmaxes, less their mean, are quantised to 8 bits in blocks
//! of 256 with one f32 scale each). A projection's weight is quantised once at load and
//! dequantised on the fly, per projection, each time the forward pass needs it; only the
//! dequantised copy of the projection being computed is alive at a time.
//!
//! The boundary: quantising runs on the host in plain Rust (the reference, and the only
//! code that decides a code); dequantising is written in candle ops only (casts, floor,
//! `index_select` into the codebook, broadcast products), so the CPU and CUDA run the same
//! arithmetic. Tensors that are not projections (embedding, norms, head, router, stacked
//! experts) stay in the compute dtype.
//!
//! The second-level scales are linear int8 (symmetric, per block of 256) rather than
//! bitsandbytes' dynamic 8-bit map: the memory is the same (8 bits per block of 64 plus
//! 32 bits per 256 blocks) and the absmax error stays below half a step of its block.

use candle_core::{DType, Device, Tensor};

use super::HfError;

type Result<T> = std::result::Result<T, HfError>;

/// Values per NF4 block (one absmax each).
pub const NF4_BLOCK: usize = 64;
/// NF4 absmaxes per second-level block (one f32 scale each).
pub const NF4_SCALE_BLOCK: usize = 256;

/// The 16 NF4 levels of QLoRA (Dettmers et al., 2023, appendix E): quantiles of a standard
/// normal scaled to [-1, 1], with an exact zero.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// How the frozen projections are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 8-bit integers, one f32 absmax scale per output row.
    Int8,
    /// 4-bit NF4 with double-quantised block scales (QLoRA).
    Nf4,
}

impl QuantFormat {
    /// The exact resident bytes of a `[rows, cols]` weight in this format, as
    /// [`QTensor::bytes`] counts them.
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match self {
            QuantFormat::Int8 => n + 4 * rows as u64,
            QuantFormat::Nf4 => {
                let blocks = n.div_ceil(NF4_BLOCK as u64);
                let groups = blocks.div_ceil(NF4_SCALE_BLOCK as u64);
                // Codes (padded to whole blocks), one byte per absmax (padded to whole
                // groups), one f32 per group, one f32 mean.
                blocks * NF4_BLOCK as u64 / 2 + groups * NF4_SCALE_BLOCK as u64 + 4 * groups + 4
            }
        }
    }
}

/// A quantised `[rows, cols]` weight and the dtype it dequantises to.
#[derive(Debug, Clone)]
pub struct QTensor {
    rows: usize,
    cols: usize,
    dtype: DType,
    data: QData,
}

#[derive(Debug, Clone)]
enum QData {
    Int8 {
        /// `[rows, cols]` u8: the code plus 128.
        codes: Tensor,
        /// `[rows, 1]` f32.
        scales: Tensor,
    },
    Nf4 {
        /// `[blocks * 32]` u8: value `2i` in the high nibble, `2i + 1` in the low one.
        codes: Tensor,
        /// `[groups * 256]` u8: each block's absmax less `mean`, as a code plus 128.
        absmax: Tensor,
        /// `[groups, 1]` f32: the step of each group's absmax codes.
        scales: Tensor,
        /// The mean of the absmaxes.
        mean: f32,
    },
}

/// Host-side result of quantising, before upload.
#[derive(Debug, Clone, PartialEq)]
pub enum HostQuant {
    /// Codes plus 128, row-major; one scale per row.
    Int8 {
        /// Codes plus 128.
        codes: Vec<u8>,
        /// Per-row scale (absmax / 127).
        scales: Vec<f32>,
    },
    /// Packed NF4 codes, the absmaxes' 8-bit codes, their per-group scales and mean.
    Nf4 {
        /// Two codes per byte, padded to whole blocks.
        codes: Vec<u8>,
        /// Absmax codes plus 128, padded to whole groups.
        absmax: Vec<u8>,
        /// Per-group steps.
        scales: Vec<f32>,
        /// The mean absmax.
        mean: f32,
    },
}

/// Index of the NF4 level nearest to `x` in [-1, 1] (ties to the lower level).
fn nf4_code(x: f32) -> u8 {
    let mut code = 0u8;
    for i in 0..15 {
        let mid = 0.5 * (NF4_CODEBOOK[i] + NF4_CODEBOOK[i + 1]);
        if x > mid {
            code = i as u8 + 1;
        } else {
            break;
        }
    }
    code
}

/// Quantises row-major `values` of a `[rows, cols]` weight on the host.
pub fn quantize_host(values: &[f32], rows: usize, cols: usize, fmt: QuantFormat) -> HostQuant {
    debug_assert_eq!(values.len(), rows * cols);
    match fmt {
        QuantFormat::Int8 => {
            let mut codes = Vec::with_capacity(values.len());
            let mut scales = Vec::with_capacity(rows);
            for row in values.chunks(cols.max(1)) {
                let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                scales.push(scale);
                codes.extend(
                    row.iter()
                        .map(|v| ((v / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8),
                );
            }
            HostQuant::Int8 { codes, scales }
        }
        QuantFormat::Nf4 => {
            let blocks = values.len().div_ceil(NF4_BLOCK);
            let groups = blocks.div_ceil(NF4_SCALE_BLOCK);
            let mut codes = vec![0u8; blocks * NF4_BLOCK / 2];
            let mut absmaxes = Vec::with_capacity(blocks);
            for (b, block) in values.chunks(NF4_BLOCK).enumerate() {
                let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                absmaxes.push(absmax);
                let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
                for (i, v) in block.iter().enumerate() {
                    let c = nf4_code(v * inv);
                    let at = (b * NF4_BLOCK + i) / 2;
                    codes[at] |= if i % 2 == 0 { c << 4 } else { c };
                }
                // A padded tail's codes point at level 7, the exact zero.
                for i in block.len()..NF4_BLOCK {
                    let at = (b * NF4_BLOCK + i) / 2;
                    codes[at] |= if i % 2 == 0 { 7 << 4 } else { 7 };
                }
            }
            let mean =
                (absmaxes.iter().map(|&a| a as f64).sum::<f64>() / blocks.max(1) as f64) as f32;
            let mut absmax = vec![128u8; groups * NF4_SCALE_BLOCK];
            let mut scales = Vec::with_capacity(groups);
            for (g, group) in absmaxes.chunks(NF4_SCALE_BLOCK).enumerate() {
                let m = group.iter().fold(0f32, |m, a| m.max((a - mean).abs()));
                let step = if m > 0.0 { m / 127.0 } else { 1.0 };
                scales.push(step);
                for (i, a) in group.iter().enumerate() {
                    absmax[g * NF4_SCALE_BLOCK + i] =
                        (((a - mean) / step).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
                }
            }
            HostQuant::Nf4 {
                codes,
                absmax,
                scales,
                mean,
            }
        }
    }
}

/// Dequantises on the host (the reference the candle path is tested against).
pub fn dequantize_host(q: &HostQuant, rows: usize, cols: usize) -> Vec<f32> {
    let n = rows * cols;
    match q {
        HostQuant::Int8 { codes, scales } => codes
            .iter()
            .enumerate()
            .map(|(i, &c)| (c as i32 - 128) as f32 * scales[i / cols.max(1)])
            .collect(),
        HostQuant::Nf4 {
            codes,
            absmax,
            scales,
            mean,
        } => (0..n)
            .map(|i| {
                let byte = codes[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                let b = i / NF4_BLOCK;
                let a = (absmax[b] as i32 - 128) as f32 * scales[b / NF4_SCALE_BLOCK] + mean;
                NF4_CODEBOOK[c as usize] * a
            })
            .collect(),
    }
}

impl QTensor {
    /// Quantises a `[rows, cols]` weight (any float dtype, any device) into `fmt`; it
    /// dequantises to the weight's own dtype on its device.
    pub fn quantize(w: &Tensor, fmt: QuantFormat) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let host = quantize_host(&values, rows, cols, fmt);
        Self::from_host(&host, rows, cols, w.dtype(), w.device())
    }

    /// Uploads a host quantisation of a `[rows, cols]` weight.
    pub fn from_host(
        q: &HostQuant,
        rows: usize,
        cols: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let data = match q {
            HostQuant::Int8 { codes, scales } => QData::Int8 {
                codes: Tensor::from_slice(codes, (rows, cols), device)?,
                scales: Tensor::from_slice(scales, (rows, 1), device)?,
            },
            HostQuant::Nf4 {
                codes,
                absmax,
                scales,
                mean,
            } => QData::Nf4 {
                codes: Tensor::from_slice(codes, codes.len(), device)?,
                absmax: Tensor::from_slice(absmax, absmax.len(), device)?,
                scales: Tensor::from_slice(scales, (scales.len(), 1), device)?,
                mean: *mean,
            },
        };
        Ok(QTensor {
            rows,
            cols,
            dtype,
            data,
        })
    }

    /// `(rows, cols)`.
    pub fn dims2(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The format.
    pub fn format(&self) -> QuantFormat {
        match self.data {
            QData::Int8 { .. } => QuantFormat::Int8,
            QData::Nf4 { .. } => QuantFormat::Nf4,
        }
    }

    /// The dtype [`QTensor::dequantize`] returns.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Resident bytes of the stored codes and scales.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match &self.data {
            QData::Int8 { codes, scales } => size(codes) + size(scales),
            QData::Nf4 {
                codes,
                absmax,
                scales,
                ..
            } => size(codes) + size(absmax) + size(scales) + 4,
        }
    }

    /// The `[rows, cols]` weight in its dtype, computed with candle ops on its device.
    pub fn dequantize(&self) -> Result<Tensor> {
        let n = self.rows * self.cols;
        let w = match &self.data {
            QData::Int8 { codes, scales } => codes
                .to_dtype(DType::F32)?
                .affine(1.0, -128.0)?
                .broadcast_mul(scales)?,
            QData::Nf4 {
                codes,
                absmax,
                scales,
                mean,
            } => {
                let dev = codes.device();
                let bytes = codes.to_dtype(DType::F32)?;
                let hi = bytes.affine(1.0 / 16.0, 0.0)?.floor()?;
                let lo = (&bytes - hi.affine(16.0, 0.0)?)?;
                let idx = Tensor::stack(&[hi, lo], 1)?
                    .flatten_all()?
                    .to_dtype(DType::U32)?;
                let book = Tensor::from_slice(&NF4_CODEBOOK, 16, dev)?;
                let levels = book.index_select(&idx, 0)?;
                let blocks = levels.elem_count() / NF4_BLOCK;
                let groups = scales.dim(0)?;
                let amax = absmax
                    .to_dtype(DType::F32)?
                    .affine(1.0, -128.0)?
                    .reshape((groups, NF4_SCALE_BLOCK))?
                    .broadcast_mul(scales)?
                    .affine(1.0, *mean as f64)?
                    .flatten_all()?
                    .narrow(0, 0, blocks)?
                    .reshape((blocks, 1))?;
                levels
                    .reshape((blocks, NF4_BLOCK))?
                    .broadcast_mul(&amax)?
                    .flatten_all()?
                    .narrow(0, 0, n)?
                    .reshape((self.rows, self.cols))?
            }
        };
        Ok(w.to_dtype(self.dtype)?)
    }
}

/// A frozen projection's weight: held in the compute dtype, or quantised.
#[derive(Debug, Clone)]
pub enum Weight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    /// Quantised, dequantised per use (boxed: the dense case stays one pointer wide).
    Quant(Box<QTensor>),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => Ok(t.dims2()?),
            Weight::Quant(q) => Ok(q.dims2()),
        }
    }

    /// The weight in the compute dtype (a dequantised copy when quantised).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quant(q) => q.dequantize(),
        }
    }

    /// Resident bytes.
    pub fn bytes(&self) -> u64 {
        match self {
            Weight::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            Weight::Quant(q) => q.bytes(),
        }
    }

    /// Replaces a dense weight by its quantisation in `fmt` (a quantised one is left as
    /// it is: requantising would compound the error).
    pub fn quantize(&mut self, fmt: QuantFormat) -> Result<()> {
        if let Weight::Dense(t) = self {
            *self = Weight::Quant(Box::new(QTensor::quantize(t, fmt)?));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_pick_the_nearest_level() {
        for (i, &v) in NF4_CODEBOOK.iter().enumerate() {
            assert_eq!(nf4_code(v) as usize, i);
        }
        assert_eq!(nf4_code(2.0), 15);
        assert_eq!(nf4_code(-2.0), 0);
        assert_eq!(nf4_code(0.03), 7);
        assert_eq!(nf4_code(0.05), 8);
    }

    #[test]
    fn byte_formula_matches_stored_tensors() {
        for (r, c) in [(3, 5), (64, 64), (7, 1000), (256, 320)] {
            let w = Tensor::ones((r, c), DType::F32, &Device::Cpu).unwrap();
            for fmt in [QuantFormat::Int8, QuantFormat::Nf4] {
                let q = QTensor::quantize(&w, fmt).unwrap();
                assert_eq!(q.bytes(), fmt.bytes(r, c), "{fmt:?} {r}x{c}");
            }
        }
    }
}
