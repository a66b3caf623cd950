//! Gradient checkpointing of the Hugging Face decoder (`HfModel::train_grads` with
//! `Checkpointing::Layers`): the adapters' gradients and the loss equal those of the plain
//! backward pass within f32 rounding (a tiny Llama with dropout, Mixtral with adapters on
//! experts and routers), and training with it lowers the loss. The ignored test
//! `peak_memory_with_and_without_checkpointing` measures the heap a training step
//! allocates at its peak on a larger random Llama-shaped base, with this binary's counting
//! allocator, and prints one JSON object per setting (docs/BENCHMARKS.md).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::{self, Checkpointing, HfLoraConfig, HfModel};
use potluck_worker::{AdamW, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod heap;
mod hf_common;
use heap::{peak_since, reset_peak};
use hf_common::{fixture, randomize_lora_b, values};

/// Adapters with random nonzero `B`s, so that every adapter gets a nonzero gradient.
fn adapt(model: &mut HfModel, targets: &[&str], dropout: f64) {
    let mut cfg = HfLoraConfig::new(targets);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    cfg.dropout = dropout;
    cfg.seed = 9;
    model.attach_lora(&cfg).expect("attach");
    randomize_lora_b(model, 1);
}

#[test]
fn checkpointed_gradients_equal_the_plain_ones() {
    for (name, targets) in [
        (
            "llama",
            vec![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        (
            "mixtral",
            vec!["q_proj", "o_proj", "gate", "w1", "w2", "w3"],
        ),
        ("qwen2_moe", vec!["all-linear"]),
    ] {
        let dir = fixture(name);
        let ids = Expected::load(&dir).expect("expected").input_ids;
        let mut model = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
        adapt(&mut model, &targets, 0.1);
        let (plain_loss, plain) = model
            .train_grads(&ids, 4, Checkpointing::Off)
            .expect("plain");
        let (ckpt_loss, ckpt) = model
            .train_grads(&ids, 4, Checkpointing::Layers)
            .expect("checkpointed");
        assert!(
            (plain_loss - ckpt_loss).abs() <= 1e-6 * plain_loss.abs(),
            "{name}: loss {plain_loss} against {ckpt_loss}"
        );
        let mut worst = 0f32;
        for (n, p) in model.lora_params() {
            let a = values(plain.get(p.as_tensor()).expect("plain gradient"));
            let b = values(ckpt.get(p.as_tensor()).expect("checkpointed gradient"));
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name}: {n} has a zero gradient");
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff / scale);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: {n} differs by {diff} (largest {scale})"
            );
        }
        println!(
            "{name}: {} gradients, worst relative difference {worst:e}",
            model.lora_params().len()
        );
        // A different dropout seed gives different gradients: the masks are drawn.
        let (_, other) = model
            .train_grads(&ids, 5, Checkpointing::Layers)
            .expect("other seed");
        let (n, p) = &model.lora_params()[0];
        assert_ne!(
            values(other.get(p.as_tensor()).expect("gradient")),
            values(ckpt.get(p.as_tensor()).expect("gradient")),
            "{name}: {n}"
        );
    }
}

#[test]
fn training_with_checkpointing_lowers_the_loss() {
    let dir = fixture("mixtral");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model = hf::load_model(&dir, None, &Device::Cpu).expect("model");
    let mut cfg = HfLoraConfig::new(&["q_proj", "v_proj", "w1", "w2", "w3"]);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    model.attach_lora(&cfg).expect("attach");
    let params = model.lora_params();
    let mut opt = AdamW::new(&params).expect("adamw");
    let tc = TrainConfig {
        weight_decay: 0.0,
        grad_clip: 1.0,
        ..TrainConfig::default()
    };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..30 {
        let (loss, grads) = model
            .train_grads(&ids, step, Checkpointing::Layers)
            .expect("grads");
        first.get_or_insert(loss);
        last = loss;
        opt.step(&params, &grads, &tc, 1e-2).expect("step");
    }
    let first = first.expect("a step ran");
    println!("mixtral, checkpointed: loss {first:.4} -> {last:.4}");
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

/// A random Llama-shaped base in `dir`: `layers` layers of width `hidden`.
fn random_llama(dir: &std::path::Path, hidden: usize, inter: usize, layers: usize, vocab: usize) {
    let heads = hidden / 64;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut rand = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.05).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), rand(&[vocab, hidden]));
    t.insert("lm_head.weight".into(), rand(&[vocab, hidden]));
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(hidden, DType::F32, &Device::Cpu).expect("ones"),
    );
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{n}.weight"),
                Tensor::ones(hidden, DType::F32, &Device::Cpu).expect("ones"),
            );
        }
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            t.insert(format!("{p}.self_attn.{n}.weight"), rand(&[hidden, hidden]));
        }
        for n in ["gate_proj", "up_proj"] {
            t.insert(format!("{p}.mlp.{n}.weight"), rand(&[inter, hidden]));
        }
        t.insert(format!("{p}.mlp.down_proj.weight"), rand(&[hidden, inter]));
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).expect("save");
}

#[test]
#[ignore = "a larger random base (tens of seconds on 2 cores); run alone with --ignored --nocapture --test-threads=1"]
fn peak_memory_with_and_without_checkpointing() {
    let (hidden, inter, layers, vocab, batch, time) = (512, 1408, 8, 2048, 2, 256);
    let dir = tempfile::tempdir().expect("tmp");
    random_llama(dir.path(), hidden, inter, layers, vocab);
    let mut model = hf::load_model(dir.path(), None, &Device::Cpu).expect("model");
    let mut cfg = HfLoraConfig::new(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]);
    cfg.rank = 8;
    model.attach_lora(&cfg).expect("attach");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let ids: Vec<u32> = (0..batch * time)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, time), &Device::Cpu).expect("ids");
    let mut losses = Vec::new();
    for ckpt in [Checkpointing::Off, Checkpointing::Layers] {
        // Once to warm up (thread pools, first-use buffers), then measured.
        drop(model.train_grads(&ids, 0, ckpt).expect("warm-up"));
        let before = reset_peak();
        let start = std::time::Instant::now();
        let (loss, grads) = model.train_grads(&ids, 0, ckpt).expect("step");
        let secs = start.elapsed().as_secs_f64();
        let peak = peak_since(before);
        drop(grads);
        losses.push(loss);
        println!(
            "{}",
            serde_json::json!({
                "bench": "hf_checkpoint_peak_heap",
                "checkpointing": format!("{ckpt:?}"),
                "hidden": hidden, "intermediate": inter, "layers": layers, "vocab": vocab,
                "batch": batch, "time": time, "dtype": "f32", "lora_rank": 8,
                "base_bytes": model.base_bytes(),
                "peak_heap_above_model_bytes": peak,
                "step_seconds": secs,
                "loss": loss,
            })
        );
    }
    assert!((losses[0] - losses[1]).abs() <= 1e-5 * losses[0].abs());
}
