//! Comparison of the worker's output with a reference computed by `transformers`: the
//! fixture format (`expected.safetensors` beside a base: `input_ids` i64 `[B, T]`,
//! `logits` f32 `[B, T, V]`, `loss` f32 `[1]`) and the tolerance rule. A fixture that
//! does not match is an [`HfError::Parity`] naming the size and place of the difference,
//! so a tampered or stale fixture reads as such rather than as a panic.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::HfError;

type Result<T> = std::result::Result<T, HfError>;

/// The fixture file's name in a base's directory.
pub const EXPECTED_FILE: &str = "expected.safetensors";
/// Largest fixture file read.
pub const MAX_EXPECTED_BYTES: u64 = 16 << 20;

/// What `transformers` computed for a fixture base.
#[derive(Debug)]
pub struct Expected {
    /// `[B, T]`, u32.
    pub input_ids: Tensor,
    /// `[B, T, V]`, f32.
    pub logits: Tensor,
    /// The mean next-token loss with `labels = input_ids`.
    pub loss: f32,
}

impl Expected {
    /// Reads `dir/expected.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(EXPECTED_FILE);
        let len = std::fs::metadata(&path)
            .map_err(|e| HfError::io(&path, e))?
            .len();
        if len > MAX_EXPECTED_BYTES {
            return Err(HfError::TooLarge {
                what: format!("{}'s size in bytes", path.display()),
                got: len,
                limit: MAX_EXPECTED_BYTES,
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| HfError::io(&path, e))?;
        let bad = |reason: String| HfError::Safetensors {
            path: path.clone(),
            reason,
        };
        let mut map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let mut take = |name: &str| {
            map.remove(name)
                .ok_or_else(|| HfError::MissingTensor { name: name.into() })
        };
        let ids = take("input_ids")?;
        let logits = take("logits")?.to_dtype(DType::F32)?;
        let loss = take("loss")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (b, t) = ids
            .dims2()
            .map_err(|_| bad(format!("input_ids has shape {:?}, not [B, T]", ids.dims())))?;
        let (lb, lt, _) = logits.dims3().map_err(|_| {
            bad(format!(
                "logits has shape {:?}, not [B, T, V]",
                logits.dims()
            ))
        })?;
        if (lb, lt) != (b, t) || loss.len() != 1 {
            return Err(bad(
                "input_ids, logits and loss do not agree in shape".into()
            ));
        }
        let ids = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        let ids = ids
            .into_iter()
            .map(|x| {
                u32::try_from(x).map_err(|_| bad(format!("token id {x} is negative or too large")))
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Expected {
            input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
            logits,
            loss: loss[0],
        })
    }
}

/// The largest `|got - want|` relative to the largest `|want|`, and where it is. Both must
/// have the same shape; compared in f64.
pub fn max_relative_error(got: &Tensor, want: &Tensor) -> Result<(f64, usize)> {
    if got.dims() != want.dims() {
        return Err(HfError::Shape {
            name: "output".into(),
            expected: want.dims().to_vec(),
            found: got.dims().to_vec(),
        });
    }
    let g = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let w = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let scale = w
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let mut worst = (0f64, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = (a - b).abs() / scale;
        // A NaN anywhere is the worst difference there is.
        if d.is_nan() || d > worst.0 {
            worst = (if d.is_nan() { f64::INFINITY } else { d }, i);
        }
    }
    Ok(worst)
}

/// `Ok(error)` when `got` is within `limit` of `want` ([`max_relative_error`]), else
/// [`HfError::Parity`].
pub fn check_close(what: &str, got: &Tensor, want: &Tensor, limit: f64) -> Result<f64> {
    let (max_rel, index) = max_relative_error(got, want)?;
    if max_rel > limit {
        return Err(HfError::Parity {
            what: what.into(),
            max_rel,
            limit,
            index,
        });
    }
    Ok(max_rel)
}
