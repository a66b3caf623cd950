//! CPU training throughput of the `small` config (d=384, 6 layers, 6 heads, 8 experts top-2
//! in every layer), to follow CPU speed over time. One iteration is one optimizer step on
//! `BATCH x SEQ` tokens; criterion reports it as tokens/s. The batch is smaller than a GPU
//! run's so that a CPU finishes in reasonable time.
//!
//! Run with `cargo bench -p potluck-benches --bench worker_train`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use potluck_worker::{
    Dataset, DeviceSpec, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec, TrainConfig,
};

const BATCH: usize = 2;
const SEQ: usize = 256;

fn train_small(c: &mut Criterion) {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).expect("corpus");
    let data = Dataset::synthetic(&corpus, 200_000, 20_000, 1).expect("dataset");
    let train = TrainConfig {
        batch_size: BATCH,
        seq_len: SEQ,
        ..TrainConfig::default()
    };
    let mut replica =
        Replica::new(&ModelConfig::small(), &train, &DeviceSpec::Cpu).expect("replica");
    // One step outside the measurement: first-touch allocation.
    replica.train_steps(&data, 0, 1).expect("warm-up step");
    let mut group = c.benchmark_group("worker_train");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    group.sample_size(10);
    // A step takes seconds on a CPU; give criterion room for its ten samples.
    group.measurement_time(std::time::Duration::from_secs(60));
    group.bench_function("small_cpu_f32_step", |b| {
        b.iter(|| replica.train_steps(&data, 0, 1).expect("train step"))
    });
    group.finish();
}

criterion_group!(benches, train_small);
criterion_main!(benches);
