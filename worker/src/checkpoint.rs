//! Files on disk: f32 tensors in safetensors, read back with the expected layout checked
//! name by name, and atomic writes (write a temporary, fsync, rename, fsync the directory)
//! so a crash never leaves a half-written file under a real name.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::WorkerError;

/// A named f32 tensor on its way to or from disk: name, shape, values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Largest safetensors header accepted on top of the expected tensor bytes.
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Writes `bytes` to `path` atomically: a sibling temporary file is written and fsynced,
/// renamed over `path`, and the directory is fsynced so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WorkerError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| WorkerError::checkpoint(path, "path has no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp: PathBuf = dir.join(tmp_name);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(WorkerError::io(path, e));
    }
    Ok(())
}

/// Reads a whole file, refusing anything larger than `limit` bytes before allocating.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, WorkerError> {
    let f = fs::File::open(path).map_err(|e| WorkerError::io(path, e))?;
    let len = f.metadata().map_err(|e| WorkerError::io(path, e))?.len();
    if len > limit {
        return Err(WorkerError::checkpoint(
            path,
            format!("file is {len} bytes, more than the {limit} expected"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| WorkerError::io(path, e))?;
    Ok(buf)
}

/// Serialises named f32 tensors (in the given order) and writes them atomically.
pub fn write_f32_tensors(path: &Path, tensors: &[NamedTensor]) -> Result<(), WorkerError> {
    write_atomic(path, &serialize_f32_tensors(path, tensors)?)
}

/// Serialises named f32 tensors to safetensors bytes; `path` names the file in errors.
pub fn serialize_f32_tensors(path: &Path, tensors: &[NamedTensor]) -> Result<Vec<u8>, WorkerError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| WorkerError::checkpoint(path, format!("tensor {name}: {e}")))?;
        views.push((name.as_str(), view));
    }
    safetensors::tensor::serialize(views, None)
        .map_err(|e| WorkerError::checkpoint(path, format!("serialise: {e}")))
}

/// Reads a safetensors file that must hold exactly the tensors of `layout`, as f32 with the
/// given shapes; returns their values in layout order.
pub fn read_f32_tensors(
    path: &Path,
    layout: &[(String, Vec<usize>)],
) -> Result<Vec<Vec<f32>>, WorkerError> {
    let data_bytes: u64 = layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
        .sum();
    let buf = read_limited(path, data_bytes + MAX_HEADER_BYTES)?;
    let st = SafeTensors::deserialize(&buf)
        .map_err(|e| WorkerError::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
    if st.len() != layout.len() {
        let expected: std::collections::HashSet<&str> =
            layout.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !expected.contains(n))
            .take(3)
            .collect();
        return Err(WorkerError::checkpoint(
            path,
            format!(
                "holds {} tensors, the model has {} (unexpected: {extra:?})",
                st.len(),
                layout.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(layout.len());
    for (name, shape) in layout {
        let view = st
            .tensor(name)
            .map_err(|_| WorkerError::checkpoint(path, format!("tensor {name} is missing")))?;
        if view.dtype() != Dtype::F32 {
            return Err(WorkerError::checkpoint(
                path,
                format!("tensor {name} is {:?}, expected F32", view.dtype()),
            ));
        }
        if view.shape() != shape.as_slice() {
            return Err(WorkerError::checkpoint(
                path,
                format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    view.shape()
                ),
            ));
        }
        out.push(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(out)
}
