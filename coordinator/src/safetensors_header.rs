//! Reads the header of a safetensors file without trusting it: size limits before
//! allocation, known dtypes only, and tensor data regions that exactly tile the data section,
//! so that every byte of the file belongs either to the header or to exactly one tensor and
//! is covered by some hash of the manifest.
//!
//! Format: an 8-byte little-endian header length `N`, `N` bytes of JSON (padded with spaces),
//! then the data section.

use std::io::Read;

/// Headers larger than this are refused (the same limit the safetensors crate uses).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;
/// Tensors per file beyond this are refused.
pub const MAX_TENSORS: usize = 1 << 20;
/// Dimensions per tensor beyond this are refused.
pub const MAX_RANK: usize = 16;

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data_begin: u64,
    pub data_end: u64,
}

/// A parsed header; tensors sorted by their position in the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The JSON length `N` (the 8-byte prefix excluded).
    pub header_len: u64,
    /// The 8-byte prefix followed by the JSON, exactly as in the file.
    pub raw: Vec<u8>,
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }
}

/// Why a safetensors header is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read header: {0}")]
    Io(#[from] std::io::Error),
    #[error("header length {len} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    TooLong { len: u64 },
    #[error("header length {header_len} does not fit a file of {file_len} bytes")]
    Truncated { header_len: u64, file_len: u64 },
    #[error("header is not valid JSON: {0}")]
    Json(String),
    #[error("tensor {name:?}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("data section: {0}")]
    Layout(String),
}

/// Bytes per element of the dtypes this build knows.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads and checks the header at the start of `r`, a file of `file_len` bytes.
pub fn read_header<R: Read>(r: &mut R, file_len: u64) -> Result<Header, HeaderError> {
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix)?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong { len: header_len });
    }
    if header_len.checked_add(8).is_none_or(|end| end > file_len) {
        return Err(HeaderError::Truncated {
            header_len,
            file_len,
        });
    }
    let mut raw = Vec::with_capacity(8 + header_len as usize);
    raw.extend_from_slice(&prefix);
    r.take(header_len).read_to_end(&mut raw)?;
    if raw.len() as u64 != 8 + header_len {
        return Err(HeaderError::Truncated {
            header_len,
            file_len,
        });
    }
    let tensors = parse_json(&raw[8..], file_len - 8 - header_len)?;
    Ok(Header {
        header_len,
        raw,
        tensors,
    })
}

fn parse_json(json: &[u8], data_len: u64) -> Result<Vec<TensorInfo>, HeaderError> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| HeaderError::Json(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| HeaderError::Json("top level is not an object".into()))?;
    if obj.len() > MAX_TENSORS {
        return Err(HeaderError::Json(format!(
            "more than {MAX_TENSORS} tensors"
        )));
    }
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |reason: &str| HeaderError::Tensor {
            name: name.clone(),
            reason: reason.to_string(),
        };
        let dtype = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("missing dtype"))?;
        let size = dtype_size(dtype).ok_or_else(|| bad(&format!("unknown dtype {dtype}")))?;
        let shape_v = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape"))?;
        if shape_v.len() > MAX_RANK {
            return Err(bad("too many dimensions"));
        }
        let shape = shape_v
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| bad("shape is not a list of integers"))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        let offs = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("data_offsets is not a pair"))?;
        let begin = offs[0].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
        let end = offs[1].as_u64().ok_or_else(|| bad("bad data_offsets"))?;
        let bytes = shape
            .iter()
            .try_fold(size, |acc, d| acc.checked_mul(*d))
            .ok_or_else(|| bad("size overflows"))?;
        if end < begin || end - begin != bytes {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}) do not hold {bytes} bytes"
            )));
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype: dtype.to_string(),
            shape,
            data_begin: begin,
            data_end: end,
        });
    }
    tensors.sort_by_key(|a| (a.data_begin, a.data_end));
    let mut at = 0u64;
    for t in &tensors {
        if t.data_begin != at {
            return Err(HeaderError::Layout(format!(
                "tensor {:?} starts at {} but the previous one ends at {at}",
                t.name, t.data_begin
            )));
        }
        at = t.data_end;
    }
    if at != data_len {
        return Err(HeaderError::Layout(format!(
            "tensors cover {at} bytes but the data section holds {data_len}"
        )));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn parse(b: &[u8]) -> Result<Header, HeaderError> {
        read_header(&mut &b[..], b.len() as u64)
    }

    #[test]
    fn gaps_overlaps_and_lies_are_refused() {
        let ok =
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"x":"y"}}"#;
        assert_eq!(parse(&file(ok, 8)).unwrap().tensors.len(), 1);
        // trailing bytes not covered by any tensor
        assert!(matches!(parse(&file(ok, 9)), Err(HeaderError::Layout(_))));
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(matches!(parse(&file(gap, 12)), Err(HeaderError::Layout(_))));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(parse(&file(overlap, 8)).is_err());
        let wrong_size = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(matches!(
            parse(&file(wrong_size, 8)),
            Err(HeaderError::Tensor { .. })
        ));
        let unknown = r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#;
        assert!(matches!(
            parse(&file(unknown, 16)),
            Err(HeaderError::Tensor { .. })
        ));
        let mut huge = file(ok, 8);
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&huge), Err(HeaderError::TooLong { .. })));
        let mut short = file(ok, 8);
        short[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(matches!(parse(&short), Err(HeaderError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn agrees_with_the_safetensors_crate(shapes in proptest::collection::vec(proptest::collection::vec(0u64..5, 0..3), 1..6)) {
            use safetensors::tensor::{Dtype, TensorView};
            let datas: Vec<Vec<u8>> = shapes.iter().map(|s| vec![1u8; 4 * s.iter().product::<u64>() as usize]).collect();
            let views: Vec<(String, TensorView<'_>)> = shapes.iter().zip(&datas).enumerate()
                .map(|(i, (s, d))| (format!("t{i}"), TensorView::new(Dtype::F32, s.iter().map(|x| *x as usize).collect(), d).unwrap()))
                .collect();
            let bytes = safetensors::serialize(views, None).unwrap();
            let h = parse(&bytes).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            prop_assert_eq!(h.tensors.len(), st.len());
            for t in &h.tensors {
                let v = st.tensor(&t.name).unwrap();
                prop_assert_eq!(v.shape().iter().map(|x| *x as u64).collect::<Vec<_>>(), t.shape.clone());
                prop_assert_eq!(v.data().len() as u64, t.data_end - t.data_begin);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
            let _ = crate::manifest::SignedManifest::decode(&bytes);
            let _ = crate::manifest::ManifestBody::decode(&bytes);
            let _ = crate::failover::SignedRunManifest::decode(&bytes);
        }

        #[test]
        fn mutated_manifests_never_panic(idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (_, ms) = manifests();
            let mut b = ms.encode();
            let i = idx.index(b.len());
            b[i] = byte;
            let _ = crate::manifest::SignedManifest::decode(&b);
        }
    }

    fn manifests() -> (tempfile::TempDir, crate::manifest::SignedManifest) {
        use std::sync::OnceLock;
        static M: OnceLock<Vec<u8>> = OnceLock::new();
        let t = tempfile::tempdir().unwrap();
        let bytes = M.get_or_init(|| {
            let (_, ms) = crate::testutil::chain(t.path(), 1);
            ms[0].encode()
        });
        (t, crate::manifest::SignedManifest::decode(bytes).unwrap())
    }
}
