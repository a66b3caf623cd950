//! A batch split into micro-batches under a memory cap trains like the whole batch: the
//! accumulated gradient is the batch's, so the weights after a few steps agree with a
//! replica that ran each batch at once; and a config that does not fit refuses to plan.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use potluck_worker::memory::{MemoryError, estimate_step, plan_batch};
use potluck_worker::{
    Dataset, DeviceSpec, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec, TrainConfig,
    WorkerError,
};

fn configs() -> (ModelConfig, TrainConfig) {
    // Dense: expert capacity is per pass, so only a dense model's gradient is exactly the
    // whole batch's.
    let model = ModelConfig {
        moe_layers: vec![],
        ..ModelConfig::tiny()
    };
    let train = TrainConfig {
        batch_size: 6,
        seq_len: 32,
        seed: 11,
        warmup_steps: 0,
        ..TrainConfig::default()
    };
    (model, train)
}

fn data() -> Dataset {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    Dataset::synthetic(&corpus, 50_000, 5_000, 2).unwrap()
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch() {
    let (model, train) = configs();
    let data = data();
    let mut whole = Replica::new(&model, &train, &DeviceSpec::Cpu).unwrap();
    let a = whole.train_steps(&data, 0, 3).unwrap();
    let base = whole.flat_params().unwrap();
    // Even (3 + 3) and uneven (4 + 2) splits.
    for rows in [3, 4] {
        let mut split = Replica::new(&model, &train, &DeviceSpec::Cpu).unwrap();
        split.set_micro_batch(rows);
        assert_eq!(split.micro_batch(), rows);
        let b = split.train_steps(&data, 0, 3).unwrap();
        assert_eq!((a.steps, a.tokens), (b.steps, b.tokens));
        assert!(
            (a.mean_loss - b.mean_loss).abs() < 1e-4,
            "{} vs {}",
            a.mean_loss,
            b.mean_loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm.max(1.0));
        let p = split.flat_params().unwrap();
        let worst = base
            .iter()
            .zip(&p)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-5,
            "micro-batches of {rows}: weights differ by {worst}"
        );
        // The weights moved: the comparison is not between two untrained replicas.
        let fresh = Replica::new(&model, &train, &DeviceSpec::Cpu)
            .unwrap()
            .flat_params()
            .unwrap();
        let moved = fresh
            .iter()
            .zip(&p)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-3, "{moved}");
    }
}

#[test]
fn the_plan_under_a_cap_trains_and_a_cap_below_one_sequence_is_refused() {
    let (model, train) = configs();
    let whole = estimate_step(&model, &train, 6, false).unwrap().total();
    let plan = plan_batch(&model, &train, whole - 1).unwrap();
    assert!(plan.micro_batches > 1, "{plan:?}");
    let mut rep = Replica::new(&model, &train, &DeviceSpec::Cpu).unwrap();
    rep.set_micro_batch(plan.micro_batch);
    let stats = rep.train_steps(&data(), 1, 2).unwrap();
    assert_eq!(stats.tokens, 2 * 6 * 32);
    assert!(stats.mean_loss.is_finite());

    let one = estimate_step(&model, &train, 1, true).unwrap().total();
    let err = WorkerError::from(plan_batch(&model, &train, one - 1).unwrap_err());
    assert!(
        matches!(err, WorkerError::Memory(MemoryError::TooLarge { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("memory_limit_mb"), "{err}");
}
