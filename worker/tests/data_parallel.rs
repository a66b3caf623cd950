//! Plain data parallelism in the worker: a gradient computed without a step, applied later
//! with the inner AdamW. Averaging one replica's gradient with itself and applying it is the
//! plain train step, bit for bit; replicas applying the same mean stay bit-identical.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use potluck_worker::{
    Dataset, DeviceSpec, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec, TrainConfig,
    WorkerError,
};

fn train_cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        seq_len: 16,
        seed: 5,
        warmup_steps: 2,
        total_steps: 10,
        // A clip that bites at the first steps, so the clipped path is covered too.
        grad_clip: 0.5,
        ..TrainConfig::default()
    }
}

fn data() -> Dataset {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    Dataset::synthetic(&corpus, 20_000, 4_000, 2).unwrap()
}

fn replica() -> Replica {
    Replica::new(&ModelConfig::tiny(), &train_cfg(), &DeviceSpec::Cpu).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The swarm's reduction of equally weighted gradients: summed in f64 in order, divided.
fn mean(gs: &[&[f32]]) -> Vec<f32> {
    (0..gs[0].len())
        .map(|i| (gs.iter().map(|g| g[i] as f64).sum::<f64>() / gs.len() as f64) as f32)
        .collect()
}

#[test]
fn the_mean_of_a_gradient_with_itself_applied_is_the_plain_step() {
    let data = data();
    let mut plain = replica();
    let mut dp = replica();
    let mut clipped = 0;
    for _ in 0..4 {
        let stats = plain.train_steps(&data, 1, 1).unwrap();
        let g = dp.compute_gradients(&data, 1).unwrap();
        assert_eq!(g.grads.len(), dp.num_params());
        assert_eq!(g.tokens, stats.tokens);
        assert_eq!(g.loss.to_bits(), stats.last_loss.to_bits());
        let avg = mean(&[&g.grads, &g.grads]);
        let norm = dp.apply_gradients(&avg).unwrap();
        assert_eq!((norm as f32).to_bits(), stats.grad_norm.to_bits());
        clipped += usize::from(norm > 0.5);
        assert_eq!(dp.step(), plain.step());
        assert_eq!(
            bits(&dp.flat_params().unwrap()),
            bits(&plain.flat_params().unwrap()),
            "bit-identical to the plain step at step {}",
            dp.step()
        );
    }
    assert!(clipped > 0, "no step exercised the clip");
}

#[test]
fn replicas_applying_the_same_mean_stay_bit_identical() {
    let data = data();
    let (mut a, mut b) = (replica(), replica());
    let mut alone = replica();
    for _ in 0..3 {
        let ga = a.compute_gradients(&data, 0).unwrap();
        let gb = b.compute_gradients(&data, 1).unwrap();
        assert_ne!(
            bits(&ga.grads),
            bits(&gb.grads),
            "shards give other batches"
        );
        let avg = mean(&[&ga.grads, &gb.grads]);
        a.apply_gradients(&avg).unwrap();
        b.apply_gradients(&avg).unwrap();
        alone.train_steps(&data, 0, 1).unwrap();
    }
    let pa = a.flat_params().unwrap();
    assert_eq!(bits(&pa), bits(&b.flat_params().unwrap()));
    // Computing a gradient changes nothing by itself.
    let _ = a.compute_gradients(&data, 0).unwrap();
    assert_eq!(bits(&pa), bits(&a.flat_params().unwrap()));
    assert_eq!(a.step(), 3);
    // And the mean is not what one replica alone would have done.
    assert_ne!(bits(&pa), bits(&alone.flat_params().unwrap()));
}

#[test]
fn bad_gradients_are_refused_and_change_nothing() {
    let data = data();
    let mut r = replica();
    let before = r.flat_params().unwrap();
    let n = r.num_params();
    assert!(matches!(
        r.apply_gradients(&vec![0.0; n - 1]),
        Err(WorkerError::Mismatch(_))
    ));
    let mut g = r.compute_gradients(&data, 0).unwrap().grads;
    g[n / 2] = f32::NAN;
    assert!(matches!(
        r.apply_gradients(&g),
        Err(WorkerError::NonFinite(_))
    ));
    assert_eq!(r.step(), 0);
    assert_eq!(bits(&before), bits(&r.flat_params().unwrap()));
}

#[test]
fn the_inner_optimizer_state_moves_to_another_replica_exactly() {
    let data = data();
    let mut a = replica();
    for _ in 0..3 {
        let g = a.compute_gradients(&data, 0).unwrap();
        a.apply_gradients(&g.grads).unwrap();
    }
    let (steps, m, v) = a.flat_optimizer_state().unwrap();
    assert_eq!(steps, 3);
    assert!(m.iter().any(|x| *x != 0.0) && v.iter().any(|x| *x != 0.0));
    // A fresh replica given the weights and the moments takes the same next step.
    let mut b = replica();
    b.set_flat_params(&a.flat_params().unwrap()).unwrap();
    b.set_flat_optimizer_state(steps, &m, &v).unwrap();
    b.set_step(a.step());
    let g = a.compute_gradients(&data, 1).unwrap();
    a.apply_gradients(&g.grads).unwrap();
    b.apply_gradients(&g.grads).unwrap();
    assert_eq!(
        bits(&a.flat_params().unwrap()),
        bits(&b.flat_params().unwrap())
    );
    // Without the moments it would not have.
    let mut c = replica();
    c.set_flat_params(&b.flat_params().unwrap()).unwrap();
    let (_, m2, _) = b.flat_optimizer_state().unwrap();
    assert_ne!(bits(&m2), bits(&c.flat_optimizer_state().unwrap().1));
    // A state of the wrong size is refused and changes nothing.
    let n = c.num_params();
    assert!(matches!(
        c.set_flat_optimizer_state(1, &vec![0.0; n - 1], &vec![0.0; n]),
        Err(WorkerError::Mismatch(_))
    ));
    assert_eq!(c.flat_optimizer_state().unwrap().0, 0);
}
