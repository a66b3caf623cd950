//! Generation (`potluck_worker::hf::generate` and `HfModel::forward_cached`): logits computed
//! step by step against the key/value cache equal the full forward's on every family
//! (sliding windows, partial rotary, fused projections, experts, adapters, an NF4 base),
//! greedy generation picks the full forward's argmax at each step, top-p sampling is
//! reproducible from its seed and narrows to greedy as `top_p` shrinks, and bad settings
//! are typed errors.

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::generate::{GenerateConfig, Sampling, choose, generate};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::{self, HfError, HfLoraConfig, HfModel, QuantFormat};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod hf_common;
use hf_common::{fixture, values};

/// Feeds `ids` (one sequence) in chunks of `sizes` through the cache and compares every
/// position's logits with the full forward's.
fn cached_equals_full(name: &str, model: &HfModel, ids: &Tensor, sizes: &[usize]) {
    let ids = ids.narrow(0, 0, 1).expect("one sequence");
    let t = ids.dim(1).expect("t");
    let full = values(&model.forward(&ids).expect("forward"));
    let mut cache = model.new_cache();
    let mut got = Vec::new();
    let mut at = 0;
    for &n in sizes.iter().cycle() {
        if at >= t {
            break;
        }
        let n = n.min(t - at);
        let chunk = ids.narrow(1, at, n).expect("chunk");
        got.extend(values(
            &model.forward_cached(&chunk, &mut cache).expect("cached"),
        ));
        at += n;
        assert_eq!(cache.len(), at);
    }
    let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = full
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    println!("{name}: cached logits differ by {diff:e} relative");
    assert!(diff < 1e-5, "{name}: cached logits differ by {diff}");
}

#[test]
fn cached_logits_equal_the_full_forward() {
    for name in [
        "llama",
        "llama3",
        "qwen2",
        "mistral",
        "phi3",
        "mixtral",
        "qwen2_moe",
    ] {
        let dir = fixture(name);
        let ids = Expected::load(&dir).expect("expected").input_ids;
        let model = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
        // A prompt of three, then one token at a time; and uneven chunks.
        cached_equals_full(name, &model, &ids, &[3, 1]);
        cached_equals_full(name, &model, &ids, &[2, 5]);
    }
    let dir = fixture("llama");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model =
        hf::load_quantized(&dir, Some(DType::F32), QuantFormat::Nf4, &Device::Cpu).expect("nf4");
    model
        .attach_lora(&HfLoraConfig::new(&["q_proj", "down_proj"]))
        .expect("attach");
    cached_equals_full("llama nf4 + lora", &model, &ids, &[4, 1]);
}

#[test]
fn greedy_generation_follows_the_full_forward() {
    let dir = fixture("qwen2");
    let model = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
    let prompt = [3u32, 17, 9];
    let cfg = GenerateConfig {
        max_new_tokens: 6,
        sampling: Sampling::Greedy,
        eos: None,
    };
    let out = generate(&model, &prompt, &cfg).expect("generate");
    assert_eq!(out.len(), 6);
    let mut seq = prompt.to_vec();
    for &id in &out {
        let ids = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).expect("ids");
        let logits = values(&model.forward(&ids).expect("forward"));
        let v = model.config().vocab;
        let last = &logits[(seq.len() - 1) * v..];
        let mut best = 0;
        for (i, x) in last.iter().enumerate() {
            if *x > last[best] {
                best = i;
            }
        }
        assert_eq!(id, best as u32);
        seq.push(id);
    }
    // An end token stops generation and is kept.
    let stop = GenerateConfig {
        eos: Some(out[1]),
        ..cfg
    };
    let first = out.iter().position(|&x| x == out[1]).expect("present");
    assert_eq!(
        generate(&model, &prompt, &stop).expect("generate"),
        out[..=first]
    );
}

#[test]
fn top_p_is_reproducible_and_narrows_to_greedy() {
    let dir = fixture("llama");
    let model = hf::load_model(&dir, None, &Device::Cpu).expect("model");
    let top_p = |p: f64, seed: u64| GenerateConfig {
        max_new_tokens: 12,
        sampling: Sampling::TopP {
            top_p: p,
            temperature: 1.0,
            seed,
        },
        eos: None,
    };
    let a = generate(&model, &[1, 2], &top_p(0.9, 7)).expect("a");
    assert_eq!(a, generate(&model, &[1, 2], &top_p(0.9, 7)).expect("again"));
    let others: Vec<Vec<u32>> = (8..12)
        .map(|s| generate(&model, &[1, 2], &top_p(0.9, s)).expect("other"))
        .collect();
    assert!(others.iter().any(|o| *o != a), "the seed changes nothing");
    let greedy = GenerateConfig {
        max_new_tokens: 12,
        sampling: Sampling::Greedy,
        eos: None,
    };
    assert_eq!(
        generate(&model, &[1, 2], &top_p(1e-9, 3)).expect("narrow"),
        generate(&model, &[1, 2], &greedy).expect("greedy")
    );
    // The nucleus: with p = 0.5 only the two tokens holding 0.4 + 0.3 can come out.
    let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let sampling = Sampling::TopP {
        top_p: 0.5,
        temperature: 1.0,
        seed: 0,
    };
    let mut seen = [0usize; 4];
    for _ in 0..2000 {
        seen[choose(&logits, sampling, &mut rng).expect("choose") as usize] += 1;
    }
    assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    assert!(seen[0] > 1000 && seen[1] > 700, "{seen:?}");
}

#[test]
fn bad_generation_settings_are_typed_errors() {
    let model = hf::load_model(&fixture("llama"), None, &Device::Cpu).expect("model");
    let bad = |sampling, n, prompt: &[u32]| {
        let cfg = GenerateConfig {
            max_new_tokens: n,
            sampling,
            eos: None,
        };
        generate(&model, prompt, &cfg).expect_err("bad")
    };
    let tp = |top_p, temperature| Sampling::TopP {
        top_p,
        temperature,
        seed: 0,
    };
    assert!(matches!(bad(tp(0.0, 1.0), 2, &[1]), HfError::Config { .. }));
    assert!(matches!(bad(tp(1.5, 1.0), 2, &[1]), HfError::Config { .. }));
    assert!(matches!(bad(tp(0.9, 0.0), 2, &[1]), HfError::Config { .. }));
    assert!(matches!(bad(Sampling::Greedy, 2, &[]), HfError::Input(_)));
    assert!(matches!(bad(Sampling::Greedy, 2, &[64]), HfError::Input(_)));
    // max_position_embeddings is 64.
    assert!(matches!(bad(Sampling::Greedy, 64, &[1]), HfError::Input(_)));
    let mut cache = model.new_cache();
    let two = Tensor::from_slice(&[1u32, 2, 3, 4], (2, 2), &Device::Cpu).expect("ids");
    model.forward_cached(&two, &mut cache).expect("first");
    let one = Tensor::from_slice(&[1u32], (1, 1), &Device::Cpu).expect("ids");
    assert!(matches!(
        model.forward_cached(&one, &mut cache),
        Err(HfError::Input(_))
    ));
}
