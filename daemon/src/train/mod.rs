//! Swarm training: run manifests, round planning, the control-stream wire format, the
//! coordinator and replica loops, and `potluck demo`.

pub mod basepack;
pub mod checkpoint;
pub mod cli;
pub mod datapack;
pub mod demo;
pub mod manifest;
pub mod pause;
pub mod plan;
pub mod reduce;
pub mod reference;
pub mod runs;
pub mod session;
pub mod waiting;
pub mod wire;

pub use manifest::{DEMO_MANIFEST, ResolvedRun, RunManifest};
pub use session::{RunEvent, RunStatus, RunSummary, TrainError, TrainService, TrainSettings};
