//! Data: the synthetic source's entropy rate, shards, text input and tokenizers.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::HashMap;

use potluck_worker::{Dataset, SyntheticCorpus, SyntheticSpec, Tokenizer, WorkerError};

#[test]
fn synthetic_entropy_rate_matches_empirical_conditional_entropy() {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    let h = corpus.entropy_rate_nats_per_byte();
    assert!(h > 0.3 && h < 8f64.ln(), "{h}");
    let bytes = corpus.generate(400_000, 0);
    assert_eq!(bytes, corpus.generate(400_000, 0));
    assert_ne!(bytes[..1000], corpus.generate(1000, 1)[..]);
    // Plug-in estimate of H(X_t | X_{t-2}, X_{t-1}) from the sample.
    let mut ctx: HashMap<(u8, u8), u64> = HashMap::new();
    let mut tri: HashMap<(u8, u8, u8), u64> = HashMap::new();
    for w in bytes.windows(3) {
        *ctx.entry((w[0], w[1])).or_default() += 1;
        *tri.entry((w[0], w[1], w[2])).or_default() += 1;
    }
    let n = (bytes.len() - 2) as f64;
    let est: f64 = tri
        .iter()
        .map(|(&(a, b, _), &c)| {
            let p_joint = c as f64 / n;
            let p_cond = c as f64 / ctx[&(a, b)] as f64;
            -p_joint * p_cond.ln()
        })
        .sum();
    assert!((est - h).abs() < 0.01, "empirical {est} vs exact {h}");
}

#[test]
fn window_floor_matches_empirical_bigram_entropy() {
    // In a window that starts from nothing, the first prediction sees one symbol of the
    // order-2 context: its floor is H(X_1 | X_0), between the entropy rate and ln 8.
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    let rate = corpus.entropy_rate_nats_per_byte();
    let first = corpus.window_floor_nats_per_byte(1);
    assert!(first > rate && first < 8f64.ln(), "{first}");
    let w64 = corpus.window_floor_nats_per_byte(64);
    assert!((w64 - (first + 63.0 * rate) / 64.0).abs() < 1e-12);
    assert!(corpus.window_floor_nats_per_byte(1 << 20) - rate < 1e-5);
    let bytes = corpus.generate(400_000, 0);
    let mut one: HashMap<u8, u64> = HashMap::new();
    let mut two: HashMap<(u8, u8), u64> = HashMap::new();
    for w in bytes.windows(2) {
        *one.entry(w[0]).or_default() += 1;
        *two.entry((w[0], w[1])).or_default() += 1;
    }
    let n = (bytes.len() - 1) as f64;
    let est: f64 = two
        .iter()
        .map(|(&(a, _), &c)| -(c as f64 / n) * (c as f64 / one[&a] as f64).ln())
        .sum();
    assert!(
        (est - first).abs() < 0.01,
        "empirical {est} vs exact {first}"
    );
    // An order-1 source has its full context from the first prediction on.
    let order1 = SyntheticCorpus::new(SyntheticSpec {
        order: 1,
        ..SyntheticSpec::default()
    })
    .unwrap();
    assert_eq!(
        order1.window_floor_nats_per_byte(64),
        order1.entropy_rate_nats_per_byte()
    );
}

#[test]
fn synthetic_spec_is_validated() {
    for spec in [
        SyntheticSpec {
            alphabet: 1,
            ..SyntheticSpec::default()
        },
        SyntheticSpec {
            alphabet: 65,
            ..SyntheticSpec::default()
        },
        SyntheticSpec {
            order: 0,
            ..SyntheticSpec::default()
        },
        SyntheticSpec {
            branching: 9,
            ..SyntheticSpec::default()
        },
        SyntheticSpec {
            smoothing: 0.0,
            ..SyntheticSpec::default()
        },
    ] {
        assert!(matches!(
            SyntheticCorpus::new(spec),
            Err(WorkerError::Data(_))
        ));
    }
}

#[test]
fn shards_partition_the_training_stream() {
    let train: Vec<u32> = (0..1000).map(|i| i % 200).collect();
    let eval: Vec<u32> = (0..100).collect();
    let d = Dataset::from_tokens(train.clone(), eval, 256, 3).unwrap();
    assert_eq!(d.num_shards(), 3);
    let joined: Vec<u32> = (0..3)
        .flat_map(|s| d.shard_tokens(s).unwrap().to_vec())
        .collect();
    assert_eq!(joined, train);
    assert!(d.shard_tokens(3).is_err());
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let (x, y) = d.sample_batch(1, 4, 10, &mut rng).unwrap();
    assert_eq!(x.len(), 40);
    let shard = d.shard_tokens(1).unwrap();
    for row in 0..4 {
        let xs = &x[row * 10..row * 10 + 10];
        let start = shard
            .windows(10)
            .position(|w| w == xs)
            .expect("window from the shard");
        assert_eq!(&y[row * 10..row * 10 + 10], &shard[start + 1..start + 11]);
    }
    assert!(d.sample_batch(1, 4, 400, &mut rng).is_err());
    let evals = d.eval_batches(2, 10, 100).unwrap();
    assert_eq!(evals.len(), 4);
    assert_eq!(evals, d.eval_batches(2, 10, 100).unwrap());
    assert!(d.eval_batches(20, 10, 1).is_err());
    assert!(Dataset::from_tokens(vec![1, 300], vec![], 256, 1).is_err());
    assert!(Dataset::from_tokens(vec![1, 2], vec![], 256, 0).is_err());
}

#[test]
fn text_directories_are_read_in_order_with_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("b.txt"), "bbbbbbbbbb").unwrap();
    std::fs::write(dir.path().join("a.txt"), "aaaaaaaaaa").unwrap();
    std::fs::write(dir.path().join("sub/c.txt"), "cccccccccc").unwrap();
    let d = Dataset::from_path(dir.path(), &Tokenizer::Byte, 2, 0.1, 1 << 20).unwrap();
    let all: Vec<u32> = (0..2)
        .flat_map(|s| d.shard_tokens(s).unwrap().to_vec())
        .chain(d.eval_tokens().iter().copied())
        .collect();
    let expected: Vec<u32> = "aaaaaaaaaabbbbbbbbbbcccccccccc"
        .bytes()
        .map(u32::from)
        .collect();
    assert_eq!(all, expected);
    assert_eq!(d.eval_tokens().len(), 3);
    assert!(matches!(
        Dataset::from_path(dir.path(), &Tokenizer::Byte, 2, 0.1, 15),
        Err(WorkerError::Data(_))
    ));
    assert!(Dataset::from_path(&dir.path().join("nope"), &Tokenizer::Byte, 1, 0.1, 100).is_err());
}

const TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "!": 3}, "unk_token": "[UNK]"}
}"#;

#[test]
fn hugging_face_tokenizer_json_is_used_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, TOKENIZER_JSON).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(
        tok.encode_bytes(b"hello world! foo").unwrap(),
        vec![0, 1, 3, 2]
    );
    std::fs::write(
        dir.path().join("text.txt"),
        "hello world hello world ! hello",
    )
    .unwrap();
    let d = Dataset::from_path(&dir.path().join("text.txt"), &tok, 1, 0.3, 1000).unwrap();
    assert_eq!(d.vocab(), 4);

    std::fs::write(&path, "{\"model\": 5}").unwrap();
    assert!(matches!(
        Tokenizer::from_file(&path),
        Err(WorkerError::Tokenizer(_))
    ));
    assert_eq!(Tokenizer::Byte.encode_bytes(b"hi").unwrap(), vec![104, 105]);
    assert_eq!(Tokenizer::Byte.decode(&[104, 105]).unwrap(), "hi");
}
