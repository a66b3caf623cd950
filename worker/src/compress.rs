//! Update compression with error feedback.
//!
//! A replica's pseudo-gradient is sent through one of these codecs: `None` (raw f32),
//! `Int8` (blockwise int8 with one f32 scale per block), `TopK` (per chunk, the k values of
//! largest magnitude, their in-chunk indices and low-bit values with one f32 scale per
//! chunk) or `Sign` (one bit per value, the sign, with one f32 scale per block: the block's
//! mean magnitude, as in error-feedback signSGD). What a lossy codec does not send is kept by [`ErrorFeedback`] and added to the next round's update, so
//! nothing is lost for good, only delayed; the residual is plain bytes so that it survives a
//! restart.
//!
//! Every encoder is a pure function of the values, computed in index order, so every replica
//! that encodes the same values writes the same bytes.
//!
//! Every decoder is fed bytes from peers: it checks the declared length against the length
//! the caller expects before it allocates, and it never panics on hostile input.

use std::fmt;

/// Which codec encodes an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Raw little-endian f32: exact.
    None,
    /// Blockwise int8: each block of `block` values shares one f32 scale (max |x| / 127).
    Int8 { block: u32 },
    /// Per chunk of `chunk` values, the `k` of largest magnitude, with `bits`-bit signed
    /// values (4 or 8) and one f32 scale per chunk; indices are u16 within the chunk.
    TopK { chunk: u32, k: u32, bits: u8 },
    /// One bit per value (set for negative values) and one f32 scale per block of `block`
    /// values: the block's mean magnitude, the scale that minimises the squared error of
    /// `scale * sign(x)`. 1 + 32/`block` bits per value.
    Sign { block: u32 },
}

impl Codec {
    /// The default int8 codec.
    pub const INT8: Codec = Codec::Int8 { block: 256 };
    /// The default sparse codec: 1% of values at 4 bits.
    pub const TOPK: Codec = Codec::TopK {
        chunk: 4096,
        k: 41,
        bits: 4,
    };

    /// The default sign codec: blocks of 1024 values, 1.03 bits per value.
    pub const SIGN: Codec = Codec::Sign { block: 1024 };

    /// Checks the parameters; an invalid codec would make decoders refuse everything.
    pub fn validate(&self) -> Result<(), CodecError> {
        match *self {
            Codec::None => Ok(()),
            Codec::Int8 { block } | Codec::Sign { block } if (1..=1 << 20).contains(&block) => {
                Ok(())
            }
            Codec::Int8 { block } | Codec::Sign { block } => Err(CodecError::Params(format!(
                "{} block size {block} must be between 1 and 1048576",
                self.name()
            ))),
            Codec::TopK { chunk, k, bits } => {
                if !(1..=65536).contains(&chunk) {
                    return Err(CodecError::Params(format!(
                        "top-k chunk {chunk} must be between 1 and 65536"
                    )));
                }
                if k == 0 || k > chunk {
                    return Err(CodecError::Params(format!(
                        "top-k k={k} must be between 1 and the chunk size {chunk}"
                    )));
                }
                if bits != 4 && bits != 8 {
                    return Err(CodecError::Params(format!(
                        "top-k values must have 4 or 8 bits, not {bits}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// Parses the names used in run manifests: `none`, `int8`, `topk`, `sign`, or with
    /// parameters `int8:BLOCK`, `topk:CHUNK:K:BITS`, `sign:BLOCK`.
    pub fn parse(s: &str) -> Result<Codec, CodecError> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let num = |p: &str| -> Result<u32, CodecError> {
            p.parse()
                .map_err(|_| CodecError::Params(format!("'{p}' in codec '{s}' is not a number")))
        };
        let codec = match parts.as_slice() {
            ["none"] | ["f32"] => Codec::None,
            ["int8"] => Codec::INT8,
            ["int8", b] => Codec::Int8 { block: num(b)? },
            ["topk"] => Codec::TOPK,
            ["sign"] => Codec::SIGN,
            ["sign", b] => Codec::Sign { block: num(b)? },
            ["topk", c, k, b] => Codec::TopK {
                chunk: num(c)?,
                k: num(k)?,
                bits: u8::try_from(num(b)?)
                    .map_err(|_| CodecError::Params(format!("bits in '{s}' too large")))?,
            },
            _ => {
                return Err(CodecError::Params(format!(
                    "unknown codec '{s}': use none, int8, int8:BLOCK, topk, topk:CHUNK:K:BITS, \
                     sign or sign:BLOCK"
                )));
            }
        };
        codec.validate()?;
        Ok(codec)
    }

    fn tag(&self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Int8 { .. } => 1,
            Codec::TopK { .. } => 2,
            Codec::Sign { .. } => 3,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Int8 { .. } => "int8",
            Codec::TopK { .. } => "topk",
            Codec::Sign { .. } => "sign",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::None => write!(f, "none"),
            Codec::Int8 { block } => write!(f, "int8:{block}"),
            Codec::TopK { chunk, k, bits } => write!(f, "topk:{chunk}:{k}:{bits}"),
            Codec::Sign { block } => write!(f, "sign:{block}"),
        }
    }
}

/// Why an encoded update was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("invalid codec parameters: {0}")]
    Params(String),
    #[error("encoded update is truncated: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("encoded update declares {declared} values but {expected} were expected")]
    Length { declared: u64, expected: usize },
    #[error("encoded update has {extra} trailing bytes")]
    Trailing { extra: usize },
    #[error("encoded update uses codec tag {0}, which this build does not know")]
    UnknownCodec(u8),
    #[error("encoded update is malformed: {0}")]
    Malformed(String),
}

const HEADER: usize = 1 + 8 + 4 + 4 + 1;

/// Encodes `values` with `codec`. The codec must be valid ([`Codec::validate`]).
pub fn encode(codec: Codec, values: &[f32]) -> Vec<u8> {
    let (p1, p2, p3) = match codec {
        Codec::None => (0, 0, 0),
        Codec::Int8 { block } | Codec::Sign { block } => (block, 0, 0),
        Codec::TopK { chunk, k, bits } => (chunk, k, bits),
    };
    let mut out = Vec::with_capacity(HEADER + encoded_body_len(codec, values.len()));
    out.push(codec.tag());
    out.extend_from_slice(&(values.len() as u64).to_le_bytes());
    out.extend_from_slice(&p1.to_le_bytes());
    out.extend_from_slice(&p2.to_le_bytes());
    out.push(p3);
    match codec {
        Codec::None => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Codec::Int8 { block } => {
            for blk in values.chunks(block as usize) {
                let scale = max_abs(blk) / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                for &v in blk {
                    out.push(quantize(v, scale, 127) as u8);
                }
            }
        }
        Codec::TopK { chunk, k, bits } => {
            let qmax = if bits == 4 { 7 } else { 127 };
            for ch in values.chunks(chunk as usize) {
                let k = (k as usize).min(ch.len());
                let idx = top_k_indices(ch, k);
                let scale = idx.iter().map(|&i| ch[i].abs()).fold(0.0f32, f32::max) / qmax as f32;
                out.extend_from_slice(&scale.to_le_bytes());
                for &i in &idx {
                    out.extend_from_slice(&(i as u16).to_le_bytes());
                }
                let q: Vec<i8> = idx.iter().map(|&i| quantize(ch[i], scale, qmax)).collect();
                if bits == 8 {
                    out.extend(q.iter().map(|&v| v as u8));
                } else {
                    for pair in q.chunks(2) {
                        let lo = (pair[0] as u8) & 0x0f;
                        let hi = pair.get(1).map_or(0, |&v| (v as u8) & 0x0f);
                        out.push(lo | (hi << 4));
                    }
                }
            }
        }
        Codec::Sign { block } => {
            for blk in values.chunks(block as usize) {
                out.extend_from_slice(&mean_abs(blk).to_le_bytes());
                for group in blk.chunks(8) {
                    let mut byte = 0u8;
                    for (j, &v) in group.iter().enumerate() {
                        byte |= u8::from(v < 0.0) << j;
                    }
                    out.push(byte);
                }
            }
        }
    }
    out
}

/// The block's mean magnitude (non-finite values count as zero).
fn mean_abs(v: &[f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let sum = v
        .iter()
        .map(|x| x.abs())
        .filter(|x| x.is_finite())
        .fold(0.0f32, |a, b| a + b);
    let mean = sum / v.len() as f32;
    if mean.is_finite() { mean } else { f32::MAX }
}

/// The number of body bytes `encode` writes for `n` values.
fn encoded_body_len(codec: Codec, n: usize) -> usize {
    match codec {
        Codec::None => n * 4,
        Codec::Int8 { block } => n.div_ceil(block as usize) * 4 + n,
        Codec::TopK { chunk, k, bits } => {
            let chunk = chunk as usize;
            let full = n / chunk;
            let rest = n % chunk;
            let per = |len: usize| {
                let k = (k as usize).min(len);
                4 + 2 * k + if bits == 8 { k } else { k.div_ceil(2) }
            };
            full * per(chunk) + if rest > 0 { per(rest) } else { 0 }
        }
        Codec::Sign { block } => {
            let block = block as usize;
            let per = |len: usize| 4 + len.div_ceil(8);
            let rest = n % block;
            (n / block) * per(block) + if rest > 0 { per(rest) } else { 0 }
        }
    }
}

/// Decodes an update that must hold exactly `expected` values. The declared length and the
/// codec's parameters are checked before any allocation, so hostile bytes cost at most the
/// memory of `expected` values.
pub fn decode(bytes: &[u8], expected: usize) -> Result<Vec<f32>, CodecError> {
    if bytes.len() < HEADER {
        return Err(CodecError::Truncated {
            needed: HEADER,
            got: bytes.len(),
        });
    }
    let declared = u64::from_le_bytes(arr(&bytes[1..9]));
    if declared != expected as u64 {
        return Err(CodecError::Length { declared, expected });
    }
    let p1 = u32::from_le_bytes(arr(&bytes[9..13]));
    let p2 = u32::from_le_bytes(arr(&bytes[13..17]));
    let p3 = bytes[17];
    let codec = match bytes[0] {
        0 => Codec::None,
        1 => Codec::Int8 { block: p1 },
        2 => Codec::TopK {
            chunk: p1,
            k: p2,
            bits: p3,
        },
        3 => Codec::Sign { block: p1 },
        t => return Err(CodecError::UnknownCodec(t)),
    };
    codec.validate()?;
    let body = &bytes[HEADER..];
    let needed = encoded_body_len(codec, expected);
    if body.len() < needed {
        return Err(CodecError::Truncated {
            needed: HEADER + needed,
            got: bytes.len(),
        });
    }
    if body.len() > needed {
        return Err(CodecError::Trailing {
            extra: body.len() - needed,
        });
    }
    let mut out = vec![0f32; expected];
    match codec {
        Codec::None => {
            for (o, b) in out.iter_mut().zip(body.chunks_exact(4)) {
                *o = f32::from_le_bytes(arr(b));
                if !o.is_finite() {
                    return Err(CodecError::Malformed(format!("value {o} is not finite")));
                }
            }
        }
        Codec::Int8 { block } => {
            let mut pos = 0;
            for blk in out.chunks_mut(block as usize) {
                let scale = finite_scale(&body[pos..pos + 4], 127)?;
                pos += 4;
                let n = blk.len();
                for (o, &q) in blk.iter_mut().zip(&body[pos..pos + n]) {
                    *o = (q as i8) as f32 * scale;
                }
                pos += n;
            }
        }
        Codec::TopK { chunk, k, bits } => {
            let mut pos = 0;
            for ch in out.chunks_mut(chunk as usize) {
                let k = (k as usize).min(ch.len());
                let qmax = if bits == 8 { 127 } else { 7 };
                let scale = finite_scale(&body[pos..pos + 4], qmax)?;
                pos += 4;
                let idx_bytes = &body[pos..pos + 2 * k];
                pos += 2 * k;
                let vals: Vec<i8> = if bits == 8 {
                    let v = body[pos..pos + k].iter().map(|&b| b as i8).collect();
                    pos += k;
                    v
                } else {
                    let packed = &body[pos..pos + k.div_ceil(2)];
                    pos += k.div_ceil(2);
                    (0..k)
                        .map(|i| {
                            let byte = packed[i / 2];
                            let nib = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                            ((nib << 4) as i8) >> 4
                        })
                        .collect()
                };
                let mut prev: Option<usize> = None;
                for (ib, q) in idx_bytes.chunks_exact(2).zip(vals) {
                    let i = u16::from_le_bytes(arr(ib)) as usize;
                    if i >= ch.len() || prev.is_some_and(|p| i <= p) {
                        return Err(CodecError::Malformed(format!(
                            "top-k index {i} out of order or outside its chunk of {}",
                            ch.len()
                        )));
                    }
                    prev = Some(i);
                    ch[i] = q as f32 * scale;
                }
            }
        }
        Codec::Sign { block } => {
            let mut pos = 0;
            for blk in out.chunks_mut(block as usize) {
                let scale = finite_scale(&body[pos..pos + 4], 1)?;
                pos += 4;
                let packed = &body[pos..pos + blk.len().div_ceil(8)];
                pos += packed.len();
                for (group, &byte) in blk.chunks_mut(8).zip(packed) {
                    // Bits past the block's last value must be clear: one encoding per update.
                    if group.len() < 8 && byte >> group.len() != 0 {
                        return Err(CodecError::Malformed(
                            "padding bits after a block's last value are set".into(),
                        ));
                    }
                    for (j, o) in group.iter_mut().enumerate() {
                        *o = if byte >> j & 1 == 1 { -scale } else { scale };
                    }
                }
            }
        }
    }
    Ok(out)
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// A block's scale: finite, non-negative, and small enough that every value it decodes to
/// (at most `qmax` times the scale in magnitude) is finite too.
fn finite_scale(b: &[u8], qmax: i32) -> Result<f32, CodecError> {
    let s = f32::from_le_bytes(arr(b));
    if s.is_finite() && s >= 0.0 && (s * qmax as f32).is_finite() {
        Ok(s)
    } else {
        Err(CodecError::Malformed(format!(
            "block scale {s} is not a finite non-negative number whose values stay finite"
        )))
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter()
        .map(|x| x.abs())
        .filter(|x| x.is_finite())
        .fold(0.0, f32::max)
}

fn quantize(v: f32, scale: f32, qmax: i32) -> i8 {
    if scale == 0.0 || !v.is_finite() {
        return 0;
    }
    (v / scale).round().clamp(-(qmax as f32), qmax as f32) as i8
}

/// Indices of the `k` values of largest magnitude, in ascending index order. Ties break
/// towards the lower index so that every replica picks the same set.
fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let key = |i: usize| {
        let a = v[i].abs();
        if a.is_finite() { a } else { 0.0 }
    };
    if k < v.len() {
        idx.select_nth_unstable_by(k, |&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

fn outside(r: &std::ops::Range<usize>, len: usize) -> CodecError {
    CodecError::Params(format!(
        "slice {}..{} lies outside a vector of {len} values (or its values differ in length)",
        r.start, r.end
    ))
}

/// Carries what a lossy codec did not send into the next round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// A fresh feedback buffer for vectors of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            residual: vec![0.0; len],
        }
    }

    /// The residual not yet sent.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Adds the residual to `update`, encodes the sum and keeps what was not sent. Returns
    /// the encoded bytes and the values the receivers will decode from them.
    pub fn compress(
        &mut self,
        codec: Codec,
        update: &[f32],
    ) -> Result<(Vec<u8>, Vec<f32>), CodecError> {
        codec.validate()?;
        if self.residual.len() != update.len() {
            return Err(CodecError::Length {
                declared: update.len() as u64,
                expected: self.residual.len(),
            });
        }
        let sum: Vec<f32> = update
            .iter()
            .zip(&self.residual)
            .map(|(u, r)| u + r)
            .collect();
        let bytes = encode(codec, &sum);
        let sent = decode(&bytes, sum.len())?;
        for ((r, s), t) in self.residual.iter_mut().zip(&sum).zip(&sent) {
            *r = s - t;
        }
        Ok((bytes, sent))
    }

    /// Like [`ErrorFeedback::compress`], but encodes each of `ranges` (contiguous slices of
    /// the vector, one per reducer) on its own. Returns one encoding per range.
    pub fn compress_slices(
        &mut self,
        codec: Codec,
        update: &[f32],
        ranges: &[std::ops::Range<usize>],
    ) -> Result<Vec<Vec<u8>>, CodecError> {
        codec.validate()?;
        if self.residual.len() != update.len() {
            return Err(CodecError::Length {
                declared: update.len() as u64,
                expected: self.residual.len(),
            });
        }
        ranges
            .iter()
            .map(|r| {
                let values = update
                    .get(r.clone())
                    .ok_or_else(|| outside(r, update.len()))?;
                self.compress_range(codec, values, r.clone())
            })
            .collect()
    }

    /// Encodes `values`, the slice `range` of a vector, with this buffer's residual for that
    /// range, and keeps what was not sent there (one slice of
    /// [`ErrorFeedback::compress_slices`]). Returns the encoded bytes.
    pub fn compress_range(
        &mut self,
        codec: Codec,
        values: &[f32],
        range: std::ops::Range<usize>,
    ) -> Result<Vec<u8>, CodecError> {
        codec.validate()?;
        let len = self.residual.len();
        let residual = self
            .residual
            .get_mut(range.clone())
            .filter(|r| r.len() == values.len())
            .ok_or_else(|| outside(&range, len))?;
        let sum: Vec<f32> = values
            .iter()
            .zip(residual.iter())
            .map(|(u, e)| u + e)
            .collect();
        let bytes = encode(codec, &sum);
        let sent = decode(&bytes, sum.len())?;
        for ((e, s), t) in residual.iter_mut().zip(&sum).zip(&sent) {
            *e = s - t;
        }
        Ok(bytes)
    }

    /// The residual as bytes (little-endian f32), for saving.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(Codec::None, &self.residual)
    }

    /// Restores a residual saved by [`ErrorFeedback::to_bytes`] for vectors of `len` values.
    pub fn from_bytes(bytes: &[u8], len: usize) -> Result<Self, CodecError> {
        let residual = decode(bytes, len)?;
        Ok(Self { residual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codecs() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::None),
            (1u32..600).prop_map(|block| Codec::Int8 { block }),
            (1u32..600, 1u32..600, prop_oneof![Just(4u8), Just(8u8)]).prop_map(
                |(chunk, k, bits)| Codec::TopK {
                    chunk,
                    k: k.min(chunk),
                    bits
                }
            ),
            (1u32..600).prop_map(|block| Codec::Sign { block }),
        ]
    }

    #[test]
    fn none_is_exact() {
        let v = vec![1.5, -2.25, 0.0, f32::MIN_POSITIVE];
        assert_eq!(decode(&encode(Codec::None, &v), 4).unwrap(), v);
    }

    #[test]
    fn topk_keeps_the_largest() {
        let v = vec![0.1, -5.0, 0.2, 3.0, -0.3, 0.0];
        let out = decode(
            &encode(
                Codec::TopK {
                    chunk: 6,
                    k: 2,
                    bits: 8,
                },
                &v,
            ),
            6,
        )
        .unwrap();
        assert_eq!(out[0], 0.0);
        assert!((out[1] + 5.0).abs() < 0.05);
        assert!((out[3] - 3.0).abs() < 0.05);
        assert_eq!(out.iter().filter(|x| **x != 0.0).count(), 2);
    }

    #[test]
    fn sign_sends_signs_at_the_mean_magnitude() {
        let v = vec![0.5, -1.5, 0.0, 2.0, -1.0, 3.0, -4.0, 0.25, 1.0, -2.0];
        let bytes = encode(Codec::Sign { block: 8 }, &v);
        // Two blocks (8 and 2 values): two scales and one byte of signs each.
        assert_eq!(bytes.len(), HEADER + 2 * (4 + 1));
        let out = decode(&bytes, v.len()).unwrap();
        let m1 = (0.5 + 1.5 + 0.0 + 2.0 + 1.0 + 3.0 + 4.0 + 0.25) / 8.0;
        let m2 = (1.0 + 2.0) / 2.0;
        let want = [m1, -m1, m1, m1, -m1, m1, -m1, m1, m2, -m2];
        assert_eq!(out, want);
    }

    #[test]
    fn set_padding_bits_are_refused() {
        // 10 sign values: the second byte holds 2 values and 6 padding bits.
        let mut bytes = encode(Codec::Sign { block: 16 }, &[1.0; 10]);
        *bytes.last_mut().unwrap() |= 0x80;
        assert!(matches!(decode(&bytes, 10), Err(CodecError::Malformed(_))));
        // A whole block of zeros has scale 0 and decodes to zeros, whatever its signs.
        assert_eq!(
            decode(&encode(Codec::Sign { block: 3 }, &[0.0; 5]), 5).unwrap(),
            vec![0.0; 5]
        );
    }

    #[test]
    fn sign_error_feedback_tracks_the_sum() {
        // EF-signSGD: over many rounds the sum of what was sent follows the sum of what was
        // meant, up to the residual, which stays bounded.
        let update: Vec<f32> = (0..64)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
            .collect();
        let mut ef = ErrorFeedback::new(64);
        let mut sent_total = [0f32; 64];
        let rounds = 500;
        for _ in 0..rounds {
            let (_, sent) = ef.compress(Codec::Sign { block: 16 }, &update).unwrap();
            for (t, s) in sent_total.iter_mut().zip(sent) {
                *t += s;
            }
        }
        let max_u = update.iter().map(|u| u.abs()).fold(0.0, f32::max);
        for i in 0..64 {
            let meant = update[i] * rounds as f32;
            assert!((meant - sent_total[i] - ef.residual()[i]).abs() < 1e-3);
            assert!(
                ef.residual()[i].abs() < 64.0 * max_u,
                "residual {i} grew to {}",
                ef.residual()[i]
            );
            assert!(
                (sent_total[i] / rounds as f32 - update[i]).abs() < 0.1 * max_u,
                "value {i}: mean sent {} against {}",
                sent_total[i] / rounds as f32,
                update[i]
            );
        }
    }

    #[test]
    fn error_feedback_delivers_everything_eventually() {
        // A constant update through a 1-of-8 top-k: after enough rounds the sum of what was
        // sent approaches the sum of what was meant, because the residual carries the rest.
        let codec = Codec::TopK {
            chunk: 8,
            k: 1,
            bits: 8,
        };
        let update: Vec<f32> = (0..8).map(|i| 0.1 * (i as f32 + 1.0)).collect();
        let mut ef = ErrorFeedback::new(8);
        let mut sent_total = [0f32; 8];
        let rounds = 200;
        for _ in 0..rounds {
            let (_, sent) = ef.compress(codec, &update).unwrap();
            for (t, s) in sent_total.iter_mut().zip(sent) {
                *t += s;
            }
        }
        for (i, (t, u)) in sent_total.iter().zip(&update).enumerate() {
            let meant = u * rounds as f32;
            // The shortfall is exactly the residual, which stays bounded.
            assert!(
                (meant - t - ef.residual()[i]).abs() < 1e-2 * meant,
                "value {i}: meant {meant}, sent {t}"
            );
            assert!(
                ef.residual()[i].abs() < 8.0,
                "residual {i} grew without bound"
            );
        }
    }

    #[test]
    fn slices_match_whole_vector_compression() {
        let update: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let codec = Codec::Int8 { block: 100 };
        let mut whole = ErrorFeedback::new(1000);
        let (_, sent) = whole.compress(codec, &update).unwrap();
        let mut sliced = ErrorFeedback::new(1000);
        let ranges = [0..300, 300..600, 600..1000];
        let parts = sliced.compress_slices(codec, &update, &ranges).unwrap();
        let mut joined = Vec::new();
        for (p, r) in parts.iter().zip(&ranges) {
            joined.extend(decode(p, r.len()).unwrap());
        }
        // Block boundaries align with the slices here, so both paths send the same values.
        assert_eq!(joined, sent);
        assert_eq!(sliced, whole);
        let too_long = std::slice::from_ref(&(0..2000));
        assert!(sliced.compress_slices(codec, &update, too_long).is_err());
    }

    proptest! {
        /// Feedback on one range: over several updates, what was sent plus what is kept is
        /// what was meant, for every codec; values outside the range are never touched, and
        /// a range or length that does not fit is refused.
        #[test]
        fn a_range_sends_what_was_meant_in_the_end(
            codec in codecs(),
            updates in proptest::collection::vec(
                proptest::collection::vec(-10f32..10.0, 40), 1..6),
            start in 0usize..30,
        ) {
            let range = start..start + 40;
            let mut ef = ErrorFeedback::new(100);
            let (mut meant, mut sent) = (vec![0f64; 40], vec![0f64; 40]);
            for m in &updates {
                let bytes = ef.compress_range(codec, m, range.clone()).unwrap();
                for (i, (d, v)) in decode(&bytes, 40).unwrap().iter().zip(m).enumerate() {
                    sent[i] += f64::from(*d);
                    meant[i] += f64::from(*v);
                }
            }
            for i in 0..40 {
                let kept = f64::from(ef.residual()[start + i]);
                prop_assert!((meant[i] - sent[i] - kept).abs() < 1e-3 * (1.0 + meant[i].abs()));
            }
            prop_assert!(ef.residual()[..start].iter().chain(&ef.residual()[start + 40..])
                .all(|r| *r == 0.0));
            prop_assert!(ef.compress_range(codec, &updates[0], 70..110).is_err());
            prop_assert!(ef.compress_range(codec, &updates[0][..39], range.clone()).is_err());
        }
    }

    #[test]
    fn residual_survives_a_restart() {
        let mut ef = ErrorFeedback::new(100);
        let update: Vec<f32> = (0..100).map(|i| (i as f32).sin()).collect();
        ef.compress(Codec::TOPK, &update).unwrap();
        let back = ErrorFeedback::from_bytes(&ef.to_bytes(), 100).unwrap();
        assert_eq!(back, ef);
    }

    #[test]
    fn hostile_headers_are_refused_before_allocating() {
        let mut bytes = encode(Codec::None, &[1.0, 2.0]);
        bytes[1..9].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&bytes, 2), Err(CodecError::Length { .. })));
        let bytes = encode(Codec::INT8, &[1.0; 10]);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], 10),
            Err(CodecError::Truncated { .. })
        ));
        let mut bad = encode(Codec::INT8, &[1.0; 10]);
        bad[0] = 9;
        assert_eq!(decode(&bad, 10), Err(CodecError::UnknownCodec(9)));
        let mut nan_scale = encode(Codec::INT8, &[1.0; 10]);
        nan_scale[HEADER..HEADER + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode(&nan_scale, 10),
            Err(CodecError::Malformed(_))
        ));
        // A finite scale whose values would overflow to infinity is refused too, for every
        // codec with scales (the scale is the first 4 bytes of the body in each).
        for codec in [Codec::INT8, Codec::TOPK, Codec::SIGN] {
            let v: Vec<f32> = (0..50).map(|i| i as f32 - 20.0).collect();
            let mut huge = encode(codec, &v);
            assert!(decode(&huge, v.len()).is_ok(), "{codec}");
            let s = if codec == Codec::SIGN {
                f32::MAX
            } else {
                f32::MAX / 2.0
            };
            huge[HEADER..HEADER + 4].copy_from_slice(&s.to_le_bytes());
            let out = decode(&huge, v.len());
            assert!(
                matches!(out, Err(CodecError::Malformed(_)))
                    || out.as_ref().is_ok_and(|o| o.iter().all(|x| x.is_finite())),
                "{codec}: {out:?}"
            );
        }
    }

    #[test]
    fn parse_round_trips_display() {
        for c in [
            Codec::None,
            Codec::INT8,
            Codec::TOPK,
            Codec::SIGN,
            Codec::Sign { block: 7 },
        ] {
            assert_eq!(Codec::parse(&c.to_string()).unwrap(), c);
        }
        assert!(Codec::parse("zip").is_err());
        assert!(Codec::parse("topk:16:32:4").is_err());
        assert!(Codec::parse("sign:0").is_err());
        assert!(Codec::parse("sign:2000000").is_err());
        assert!(Codec::parse("sign:4:4").is_err());
    }

    proptest! {
        #[test]
        fn round_trip_within_stated_error(
            codec in codecs(),
            values in proptest::collection::vec(-100f32..100f32, 0..2000),
        ) {
            let out = decode(&encode(codec, &values), values.len()).unwrap();
            prop_assert_eq!(out.len(), values.len());
            match codec {
                Codec::None => prop_assert_eq!(out, values),
                Codec::Int8 { block } => {
                    for (blk_in, blk_out) in values.chunks(block as usize).zip(out.chunks(block as usize)) {
                        let tol = max_abs(blk_in) / 127.0 * 0.5 + 1e-6;
                        for (a, b) in blk_in.iter().zip(blk_out) {
                            prop_assert!((a - b).abs() <= tol * 1.001, "{} vs {} tol {}", a, b, tol);
                        }
                    }
                }
                Codec::TopK { chunk, k, bits } => {
                    let qmax = if bits == 4 { 7.0 } else { 127.0 };
                    for (ci, co) in values.chunks(chunk as usize).zip(out.chunks(chunk as usize)) {
                        let kept = co.iter().filter(|x| **x != 0.0).count();
                        prop_assert!(kept <= (k as usize).min(ci.len()));
                        let tol = max_abs(ci) / qmax * 0.5 + 1e-6;
                        for (a, b) in ci.iter().zip(co) {
                            if *b != 0.0 {
                                prop_assert!((a - b).abs() <= tol * 1.001);
                            }
                        }
                    }
                }
                Codec::Sign { block } => {
                    for (bi, bo) in values.chunks(block as usize).zip(out.chunks(block as usize)) {
                        let s = mean_abs(bi);
                        let (mut err, mut norm) = (0f64, 0f64);
                        for (a, b) in bi.iter().zip(bo) {
                            // Every value is the block's mean magnitude with the value's sign.
                            prop_assert_eq!(b.abs(), s);
                            prop_assert!(*a == 0.0 || (*a < 0.0) == (*b < 0.0));
                            err += ((a - b) as f64).powi(2);
                            norm += (*a as f64).powi(2);
                        }
                        // The mean magnitude is the least-squares scale: the error is
                        // |x|^2 - n s^2, never more than the block itself.
                        let want = norm - bi.len() as f64 * (s as f64).powi(2);
                        prop_assert!((err - want).abs() <= 1e-4 * norm.max(1.0), "{} vs {}", err, want);
                    }
                }
            }
        }

        #[test]
        fn encodings_are_deterministic_and_sized(
            codec in codecs(),
            values in proptest::collection::vec(-100f32..100f32, 0..2000),
        ) {
            // Every replica must write the same bytes for the same update.
            let bytes = encode(codec, &values);
            prop_assert_eq!(&bytes, &encode(codec, &values));
            prop_assert_eq!(bytes.len(), HEADER + encoded_body_len(codec, values.len()));
        }

        #[test]
        fn residual_of_any_codec_survives_a_restart(
            codec in codecs(),
            values in proptest::collection::vec(-10f32..10f32, 1..500),
        ) {
            let mut ef = ErrorFeedback::new(values.len());
            ef.compress(codec, &values).unwrap();
            let mut back = ErrorFeedback::from_bytes(&ef.to_bytes(), values.len()).unwrap();
            prop_assert_eq!(&back, &ef);
            // And the restored buffer goes on exactly as the original would have.
            let (a, _) = ef.compress(codec, &values).unwrap();
            let (b, _) = back.compress(codec, &values).unwrap();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            expected in 0usize..4096,
        ) {
            let _ = decode(&bytes, expected);
        }

        #[test]
        fn mutated_encodings_never_panic(
            codec in codecs(),
            values in proptest::collection::vec(-10f32..10f32, 1..300),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encode(codec, &values);
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            if let Ok(out) = decode(&bytes, values.len()) {
                prop_assert_eq!(out.len(), values.len());
                prop_assert!(out.iter().all(|x| x.is_finite()));
            }
        }
    }
}
