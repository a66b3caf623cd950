//! The weights of a Hugging Face base on disk: `model.safetensors`, or the shards a
//! `model.safetensors.index.json` names, memory-mapped and read tensor by tensor in the
//! file's own dtype (a bf16 base stays bf16: no f32 copy of the whole model is ever made).
//!
//! Every header is checked by the `safetensors` crate before use (its length, the offsets
//! of every tensor against the file's size), shard names from the index must be plain file
//! names in the base's directory, and a tensor is only copied out of the map once its shape
//! matches what the config implies, so a wrong or truncated file is an [`HfError`] before
//! anything of its claimed size is allocated. The maps live only while a model loads.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

use super::HfError;

type Result<T> = std::result::Result<T, HfError>;

/// The single-file weights' name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index's name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest shard index read.
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Most shards accepted.
pub const MAX_SHARDS: usize = 4096;

/// One mapped safetensors file and its checked header.
struct Mapped {
    path: PathBuf,
    map: Mmap,
    /// Where the tensor data begins: 8 bytes of header length plus the header.
    data_start: usize,
    meta: Metadata,
}

/// The weight files of one base, opened and their headers checked.
pub struct WeightFiles {
    files: Vec<Mapped>,
    /// Which file holds each tensor.
    owner: HashMap<String, usize>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.owner.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Mapped> {
    let file = File::open(path).map_err(|e| HfError::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Another process truncating
    // or rewriting the file while it is mapped could change what we read (or fault); a
    // base's files are content the run pins by hash, not files anything writes while a
    // model loads, and the maps are dropped once the tensors are copied out.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|e| HfError::io(path, e))?;
    let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| HfError::Safetensors {
        path: path.into(),
        reason: e.to_string(),
    })?;
    Ok(Mapped {
        path: path.into(),
        map,
        data_start: 8 + header,
        meta,
    })
}

fn candle_dtype(name: &str, dt: Dtype) -> Result<DType> {
    Ok(match dt {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F64 => DType::F64,
        other => {
            return Err(HfError::DType {
                name: name.into(),
                found: format!("{other:?}"),
            });
        }
    })
}

impl WeightFiles {
    /// Opens the weights in `dir`: the shard index when there is one, else the single file.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if !single.is_file() {
            return Err(HfError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in the base's directory"),
                ),
            ));
        }
        let file = map_file(&single)?;
        let owner = file
            .meta
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Ok(WeightFiles {
            files: vec![file],
            owner,
        })
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let len = std::fs::metadata(index)
            .map_err(|e| HfError::io(index, e))?
            .len();
        if len > MAX_INDEX_BYTES {
            return Err(HfError::TooLarge {
                what: format!("{}'s size in bytes", index.display()),
                got: len,
                limit: MAX_INDEX_BYTES,
            });
        }
        let text = std::fs::read_to_string(index).map_err(|e| HfError::io(index, e))?;
        let bad = |reason: String| HfError::Json {
            path: index.into(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no weight_map object".into()))?;
        let mut shard_of: HashMap<String, usize> = HashMap::new();
        let mut shards: Vec<String> = Vec::new();
        let mut owner = HashMap::with_capacity(map.len());
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("{name} maps to {file}, not a file name")))?;
            // A shard must be a file beside the index: no directories, no way out of `dir`.
            if file.is_empty()
                || file.contains(['/', '\\'])
                || file == ".."
                || file == "."
                || !file.ends_with(".safetensors")
            {
                return Err(bad(format!(
                    "shard {file:?} is not a .safetensors file name in the base's directory"
                )));
            }
            let next = shards.len();
            let i = *shard_of.entry(file.to_string()).or_insert(next);
            if i == next {
                if shards.len() == MAX_SHARDS {
                    return Err(HfError::TooLarge {
                        what: "the number of shards".into(),
                        got: (MAX_SHARDS + 1) as u64,
                        limit: MAX_SHARDS as u64,
                    });
                }
                shards.push(file.to_string());
            }
            owner.insert(name.clone(), i);
        }
        let files = shards
            .iter()
            .map(|s| map_file(&dir.join(s)))
            .collect::<Result<Vec<_>>>()?;
        for (name, &i) in &owner {
            if files[i].meta.info(name).is_none() {
                return Err(HfError::Safetensors {
                    path: files[i].path.clone(),
                    reason: format!("the index puts {name} here, but the file does not hold it"),
                });
            }
        }
        Ok(WeightFiles { files, owner })
    }

    /// Whether the weights hold `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// The names of all tensors, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    /// The dtype of tensor `name` as candle names it.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let (_, info) = self.info(name)?;
        candle_dtype(name, info.dtype)
    }

    fn info(&self, name: &str) -> Result<(&Mapped, &safetensors::tensor::TensorInfo)> {
        let file = self
            .owner
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| HfError::MissingTensor { name: name.into() })?;
        let info = file
            .meta
            .info(name)
            .ok_or_else(|| HfError::MissingTensor { name: name.into() })?;
        Ok((file, info))
    }

    /// Tensor `name`, which must have shape `shape`, on `device` in `dtype` (the file's
    /// dtype unless the model computes in another).
    pub fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (file, info) = self.info(name)?;
        if info.shape != shape {
            return Err(HfError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let file_dtype = candle_dtype(name, info.dtype)?;
        // `read_metadata` checked every offset against the file's length.
        let (start, end) = info.data_offsets;
        let bytes = file
            .map
            .get(file.data_start + start..file.data_start + end)
            .ok_or_else(|| HfError::Safetensors {
                path: file.path.clone(),
                reason: format!("{name}'s data lies past the end of the file"),
            })?;
        let t = Tensor::from_raw_buffer(bytes, file_dtype, shape, &Device::Cpu)?;
        let t = if file_dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }
}
