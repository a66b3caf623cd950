//! potluck-worker: all tensor math of Potluck, with no sockets and no async runtime, so the
//! daemon can drive it and tests can run it alone.
//!
//! Start at [`Replica`]: a model, its inner AdamW and its step counter, trained on a shard of
//! a [`Dataset`]. The swarm snapshots [`Replica::flat_params`], computes the pseudo-gradient
//! with [`pseudo_gradient`] and applies the averaged update with [`OuterOptimizer`]. The
//! [`model`] module holds the transformer and its pipeline and expert cuts.

pub mod adapters;
pub mod checkpoint;
pub mod compress;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod data;
mod error;
pub mod fused;
pub mod hf;
pub mod mamba;
pub mod memory;
pub mod model;
pub mod optim;
pub mod replica;
pub mod sample;

pub use config::{Checkpointing, ComputeDType, DeviceSpec, LoraConfig, ModelConfig, TrainConfig};
pub use data::{Dataset, SyntheticCorpus, SyntheticSpec, Tokenizer};
pub use error::WorkerError;
pub use model::{Model, StageSpec, TrainGrads};
pub use optim::{AdamW, OuterOptimizer, pseudo_gradient};
pub use replica::{Gradients, Replica, StepStats};

/// Hands the memory `device`'s pool keeps but nothing holds back to the driver (see
/// `cuda::release_pooled_memory`); nothing to do on the CPU.
pub fn release_pooled_memory(device: &candle_core::Device) -> Result<(), WorkerError> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::release_pooled_memory(d),
        _ => Ok(()),
    }
}

/// Bytes in use on the GPU of `device` and its total (see `cuda::memory_in_use`), for
/// benchmarks and status; `None` on the CPU.
pub fn device_memory(device: &candle_core::Device) -> Result<Option<(u64, u64)>, WorkerError> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => cuda::memory_in_use(d).map(Some),
        _ => Ok(None),
    }
}
