//! CI's smoke test of the bytes benchmark: every mode trains a few steps of the tiny model
//! on a slice of the real corpus, in one process on the CPU, and counts bytes both ways.
//! It asserts that the pipeline runs and counts, nothing about speed or how good a codec is.

use std::path::Path;

use potluck_benches::corpus::{Corpus, CorpusSpec};
use potluck_benches::swarm_bytes::{Mode, Settings, run, table};
use potluck_worker::{Dataset, DeviceSpec, ModelConfig};

#[test]
fn every_mode_runs_on_the_corpus_and_counts_bytes_both_ways() {
    let corpus = Corpus::build(&CorpusSpec {
        only: Some(vec!["anyhow".into(), "hex".into()]),
        // Two small crates hold too few files for 5% to hold one out.
        eval_permille: 200,
        ..CorpusSpec::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
    })
    .expect("the locked crates are unpacked by the build (cargo fetch --locked)");
    let s = Settings {
        replicas: 3,
        model: ModelConfig::tiny(),
        model_name: "tiny".into(),
        inner_steps: 2,
        total_tokens: 3 * 2 * 32 * 4,
        batch: 2,
        seq: 32,
        lr: 3e-3,
        warmup: 1,
        outer_lr: 1.0,
        outer_momentum: 0.3,
        eval_batches: 2,
        device: DeviceSpec::Cpu,
    };
    let tok = |b: &[u8]| b.iter().map(|&x| u32::from(x)).collect::<Vec<u32>>();
    let data = Dataset::from_tokens(tok(&corpus.train), tok(&corpus.eval), 256, 3).unwrap();
    let mut results = Vec::new();
    for mode in ["a", "b", "int8", "topk", "sign"] {
        let m = run(&data, &s, Mode::parse(mode).unwrap(), 7).unwrap();
        assert_eq!(m.steps, 4, "{mode}");
        assert_eq!(m.tokens, s.total_tokens, "{mode}");
        assert!(m.bytes_sent > 0 && m.bytes_received > 0, "{mode}");
        // Every frame is counted once by its sender and once by its receiver.
        assert_eq!(m.bytes_sent, m.bytes_received, "{mode}");
        // 3 members: each slice comes from 2 others and goes back to 2 others, per exchange.
        let exchanges = if mode == "a" { 4 } else { 2 };
        assert_eq!(m.frames, exchanges * 12, "{mode}");
        assert!(m.eval_loss.is_finite(), "{mode}");
        assert_eq!(m.curve.len(), 2, "{mode}");
        results.push(m);
    }
    // Fewer exchanges of f32 cost fewer bytes; a codec fewer than f32.
    assert!(results[1].bytes() < results[0].bytes());
    assert!(results[2..].iter().all(|r| r.bytes() < results[1].bytes()));
    let t = table(&results);
    assert_eq!(t.lines().count(), 2 + results.len());
}
