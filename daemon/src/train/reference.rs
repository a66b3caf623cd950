//! The reference training step a daemon measures at start: a few inner steps of the worker's
//! `tiny` model on the built-in corpus, timed after one warm-up step. Its tokens per second go
//! into the peer's capability record, so planners can compare machines by what they train.

use std::time::Instant;

use potluck_worker::{
    Dataset, DeviceSpec, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec, TrainConfig,
};

use super::TrainError;

/// Timed steps after the warm-up.
const STEPS: usize = 3;

/// Measures training throughput (tokens per second) on `device`. CPU-heavy for a fraction of
/// a second: call it off the async runtime.
pub fn measure(device: &DeviceSpec) -> Result<f64, TrainError> {
    let model = ModelConfig::tiny();
    let train = TrainConfig {
        batch_size: 4,
        seq_len: 64,
        warmup_steps: 1,
        total_steps: 10,
        ..TrainConfig::default()
    };
    let corpus = SyntheticCorpus::new(SyntheticSpec::default())?;
    let data = Dataset::synthetic(&corpus, 16_384, 1_024, 1)?;
    let mut rep = Replica::new(&model, &train, device)?;
    rep.train_steps(&data, 0, 1)?;
    let start = Instant::now();
    let stats = rep.train_steps(&data, 0, STEPS)?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(stats.tokens as f64 / secs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_positive_throughput() {
        let t = super::measure(&potluck_worker::DeviceSpec::Cpu).unwrap();
        assert!(t.is_finite() && t > 0.0);
    }
}
