//! The one error type of the worker crate. Every variant says what went wrong and, where it
//! helps, what to do about it; candle's own errors are wrapped rather than flattened to text
//! so a caller can still tell a shape bug from an I/O problem.

use std::path::PathBuf;

/// Everything that can go wrong inside the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A model or training configuration is inconsistent or out of bounds.
    #[error("invalid config: {0}")]
    Config(String),
    /// The requested device cannot be used in this build or on this machine.
    #[error("device unavailable: {0}")]
    Device(String),
    /// A tensor operation failed (usually a shape or dtype bug, or out of memory).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint on disk is malformed or does not match the model.
    #[error("bad checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Training data could not be read or does not fit the request.
    #[error("data error: {0}")]
    Data(String),
    /// A Hugging Face tokenizer could not be loaded or failed to encode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A flat parameter vector or optimizer state does not fit the model.
    #[error("shape mismatch: {0}")]
    Mismatch(String),
    /// The loss or a gradient became NaN or infinite; the step was not applied.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// A Hugging Face base could not be loaded or run (adapter training).
    #[error("base model: {0}")]
    Hf(#[from] crate::hf::HfError),
    /// A training step does not fit the memory cap, even one sequence at a time.
    #[error("memory cap: {0}")]
    Memory(#[from] crate::memory::MemoryError),
}

impl WorkerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WorkerError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        WorkerError::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
