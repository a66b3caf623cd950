//! Adapter replicas: LoRA adapters trained on a frozen Hugging Face base through the same
//! `Replica` interface the swarm drives (train_steps, flat params, eval_loss, checkpoints).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use potluck_worker::adapters::{AdapterConfig, LlamaShape, write_random_llama};
use potluck_worker::{Dataset, DeviceSpec, Replica, TrainConfig};

const ROOT: &str = "ab12";

fn shape() -> LlamaShape {
    LlamaShape {
        vocab: 256,
        hidden: 64,
        intermediate: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        max_positions: 64,
    }
}

fn adapters() -> AdapterConfig {
    AdapterConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        target_modules: vec!["o_proj".into(), "down_proj".into()],
        quant: None,
    }
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        lr: 0.02,
        warmup_steps: 2,
        total_steps: 1000,
        weight_decay: 0.0,
        batch_size: 4,
        seq_len: 32,
        seed: 3,
        ..TrainConfig::default()
    }
}

/// Byte tokens of English-like text: far from the uniform prediction a random base makes.
fn data() -> Dataset {
    let text = "the quick brown fox jumps over the lazy dog while the cat sleeps. "
        .repeat(200)
        .into_bytes();
    let tokens: Vec<u32> = text.into_iter().map(u32::from).collect();
    let eval = tokens[..1024].to_vec();
    Dataset::from_tokens(tokens, eval, 256, 2).unwrap()
}

fn replica(base: &Path) -> Replica {
    Replica::new_adapters(base, ROOT, &adapters(), &train_cfg(), &DeviceSpec::Cpu).unwrap()
}

#[test]
fn adapters_learn_on_a_frozen_base_and_are_the_only_parameters() {
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(dir.path(), &shape(), 11).unwrap();
    let data = data();
    let mut rep = replica(dir.path());
    // Only the adapters: rank 2 on o_proj [64, 64] and down_proj [64, 128], two layers.
    let want = 2 * (2 * (64 + 64) + 2 * (128 + 64));
    assert_eq!(rep.num_params(), want);
    assert!(
        want * 80 < shape().params(),
        "{want} vs {}",
        shape().params()
    );
    let layout = rep.param_layout();
    assert_eq!(layout[0].0, "model.layers.0.self_attn.o_proj.lora_A.weight");
    assert!(
        layout
            .iter()
            .all(|(n, _)| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))
    );
    let before = rep.eval_loss(&data, 4).unwrap();
    let base = |rep: &Replica| -> Vec<Vec<f32>> {
        let hf = rep.adapter_model().unwrap().hf();
        let tensors = hf.base_tensors().unwrap();
        tensors
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let base_before = base(&rep);
    let stats = rep.train_steps(&data, 0, 60).unwrap();
    assert_eq!(stats.steps, 60);
    let after = rep.eval_loss(&data, 4).unwrap();
    eprintln!("eval loss {before} -> {after}");
    assert!(after < before - 1.0, "eval loss {before} -> {after}");
    assert!(base(&rep) == base_before, "the base changed");
}

#[test]
fn replicas_stay_bit_identical_and_checkpoints_hold_the_adapters_and_the_base_root() {
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(&dir.path().join("base"), &shape(), 11).unwrap();
    let base = dir.path().join("base");
    let data = data();
    let (mut a, mut b) = (replica(&base), replica(&base));
    a.train_steps(&data, 1, 5).unwrap();
    b.train_steps(&data, 1, 5).unwrap();
    let flat = a.flat_params().unwrap();
    assert_eq!(
        flat.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        b.flat_params()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        a.checkpoint_files(&flat, 5).unwrap(),
        b.checkpoint_files(&flat, 5).unwrap()
    );
    // set_flat_params then flat_params is the identity, and changes what the model computes.
    let mut moved = flat.clone();
    for x in moved.iter_mut() {
        *x += 0.01;
    }
    b.set_flat_params(&moved).unwrap();
    assert_eq!(b.flat_params().unwrap(), moved);
    assert_ne!(
        a.eval_loss(&data, 1).unwrap(),
        b.eval_loss(&data, 1).unwrap()
    );
    assert!(b.set_flat_params(&moved[1..]).is_err());

    // A checkpoint: the adapters and the optimizer, the base named by its root.
    let ck = dir.path().join("ck");
    a.save_checkpoint(&ck, true).unwrap();
    let config = std::fs::read_to_string(ck.join("config.json")).unwrap();
    assert!(config.contains("potluck-adapter-checkpoint") && config.contains(ROOT));
    let weights_bytes: u64 = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("weights-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(weights_bytes < (a.num_params() * 4 + 4096) as u64);
    let c = Replica::load_adapter_checkpoint(&ck, &base, ROOT, &DeviceSpec::Cpu).unwrap();
    assert_eq!(c.flat_params().unwrap(), flat);
    assert_eq!(c.step(), 5);
    let (sa, ma, va) = a.flat_optimizer_state().unwrap();
    assert_eq!(c.flat_optimizer_state().unwrap(), (sa, ma, va));
    let (root, cfg) = potluck_worker::replica::adapter_checkpoint_base(&ck).unwrap();
    assert_eq!((root.as_str(), cfg), (ROOT, adapters()));
    // Both continue the same way.
    let mut c = c;
    a.train_steps(&data, 0, 2).unwrap();
    c.train_steps(&data, 0, 2).unwrap();
    assert_eq!(a.flat_params().unwrap(), c.flat_params().unwrap());
    // Another base root is refused, naming both; the native loader says what to do.
    let err = Replica::load_adapter_checkpoint(&ck, &base, "cd34", &DeviceSpec::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(ROOT) && err.contains("cd34"), "{err}");
    let err = Replica::load_checkpoint(&ck, &DeviceSpec::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter checkpoint"), "{err}");
}

#[test]
fn a_base_vocabulary_smaller_than_the_data_and_bad_settings_are_refused() {
    // The committed tiny Llama fixture has 64 tokens: byte data does not fit it.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/llama");
    let mut rep = Replica::new_adapters(
        &fixture,
        ROOT,
        &adapters(),
        &TrainConfig {
            seq_len: 16,
            ..train_cfg()
        },
        &DeviceSpec::Cpu,
    )
    .unwrap();
    let err = rep.train_steps(&data(), 0, 1).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    // Its own vocabulary trains.
    let ids: Vec<u32> = (0..2000u32).map(|i| (i * 7 + i / 13) % 64).collect();
    let small = Dataset::from_tokens(ids.clone(), ids[..200].to_vec(), 64, 1).unwrap();
    rep.train_steps(&small, 0, 2).unwrap();
    // Sequences longer than the base's positions (64), an unknown quantisation, a target
    // that matches nothing.
    let long = TrainConfig {
        seq_len: 64,
        ..train_cfg()
    };
    let err = Replica::new_adapters(&fixture, ROOT, &adapters(), &long, &DeviceSpec::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    let quant = AdapterConfig {
        quant: Some("fp3".into()),
        ..adapters()
    };
    let err = Replica::new_adapters(&fixture, ROOT, &quant, &train_cfg(), &DeviceSpec::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nf4"), "{err}");
    let target = AdapterConfig {
        target_modules: vec!["attn_proj".into()],
        ..adapters()
    };
    let err = Replica::new_adapters(&fixture, ROOT, &target, &train_cfg(), &DeviceSpec::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("attn_proj"), "{err}");
}

#[test]
fn a_quantised_base_trains_its_adapters_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(dir.path(), &shape(), 11).unwrap();
    let data = data();
    for quant in ["nf4", "int8"] {
        let cfg = AdapterConfig {
            quant: Some(quant.into()),
            ..adapters()
        };
        let new = || {
            Replica::new_adapters(dir.path(), ROOT, &cfg, &train_cfg(), &DeviceSpec::Cpu).unwrap()
        };
        let (mut a, mut b) = (new(), new());
        let before = a.eval_loss(&data, 2).unwrap();
        a.train_steps(&data, 0, 30).unwrap();
        b.train_steps(&data, 0, 30).unwrap();
        assert_eq!(
            a.flat_params().unwrap(),
            b.flat_params().unwrap(),
            "{quant}"
        );
        let after = a.eval_loss(&data, 2).unwrap();
        assert!(
            after < before - 0.5,
            "{quant}: eval loss {before} -> {after}"
        );
        assert!(a.adapter_model().unwrap().hf().base_bytes() < (shape().params() * 4) as u64);
    }
}

#[test]
fn a_data_parallel_step_on_adapters_is_the_inner_step() {
    let dir = tempfile::tempdir().unwrap();
    write_random_llama(dir.path(), &shape(), 11).unwrap();
    let data = data();
    let (mut a, mut b) = (replica(dir.path()), replica(dir.path()));
    a.train_steps(&data, 1, 1).unwrap();
    let g = b.compute_gradients(&data, 1).unwrap();
    assert_eq!(g.grads.len(), b.num_params());
    assert!(g.grads.iter().any(|x| *x != 0.0));
    b.apply_gradients(&g.grads).unwrap();
    assert_eq!(a.flat_params().unwrap(), b.flat_params().unwrap());
    assert_eq!(a.step(), b.step());
}
