//! The error type of the Hugging Face loader and forward pass. A base directory is user
//! input (it may be a download, or a file a peer sent), so every way it can be wrong is a
//! variant a caller can match on, and each message names the file or tensor involved.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a Hugging Face format base.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// Reading a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (`config.json`, the shard index) is not valid JSON of the expected form.
    #[error("{path} is not valid: {reason}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// `config.json` names an architecture this loader does not implement.
    #[error(
        "unsupported architecture {architectures}: Potluck loads LlamaForCausalLM, \
         Qwen2ForCausalLM, MistralForCausalLM, Phi3ForCausalLM, MixtralForCausalLM and \
         Qwen2MoeForCausalLM"
    )]
    Unsupported {
        /// The `architectures` value (or `model_type` when that is all there is), as written.
        architectures: String,
    },
    /// A field of `config.json` is missing, of the wrong type, inconsistent or asks for a
    /// feature this loader does not implement.
    #[error("config field {field}: {reason}")]
    Config {
        /// The field's name in `config.json`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A size in the config or a file is past what this loader accepts; nothing was allocated.
    #[error("{what} is {got}, more than the limit of {limit}")]
    TooLarge {
        /// What was measured.
        what: String,
        /// Its value.
        got: u64,
        /// The largest value accepted.
        limit: u64,
    },
    /// A safetensors file is malformed (bad header, offsets past the end, wrong length).
    #[error("bad safetensors file {path}: {reason}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the weights.
    #[error("tensor {name} is missing from the weights")]
    MissingTensor {
        /// The tensor's name in the Hugging Face layout.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name} has shape {found:?}, the config implies {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the model cannot compute in.
    #[error("tensor {name} has dtype {found}; bases load in f32, bf16 or f16")]
    DType {
        /// The tensor's name.
        name: String,
        /// The dtype in the file.
        found: String,
    },
    /// The model's input does not fit it (a token id past the vocabulary, an empty batch).
    #[error("bad input: {0}")]
    Input(String),
    /// Output disagrees with a reference (a parity fixture) by more than the tolerance.
    #[error(
        "{what} differs from the reference by {max_rel:e} relative (limit {limit:e}) at index {index}"
    )]
    Parity {
        /// What was compared.
        what: String,
        /// The largest difference, relative to the reference's largest magnitude.
        max_rel: f64,
        /// The tolerance.
        limit: f64,
        /// The flat index of the largest difference.
        index: usize,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl HfError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HfError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        HfError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
