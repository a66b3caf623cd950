//! LoRA adapters on Hugging Face bases (`potluck_worker::hf::lora`): a fresh adapter leaves
//! the base's output unchanged, training moves the adapters only (the base is no variable
//! of the graph and stays bit-identical) and lowers the loss on tiny bases of three families, dropout is
//! reproducible from its seed, and bad settings are typed errors.

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::{self, HfError, HfLoraConfig, HfModel};
use potluck_worker::{AdamW, TrainConfig};

mod hf_common;
use hf_common::{fixture, values};

fn load(name: &str) -> (HfModel, Tensor) {
    let model = hf::load_model(&fixture(name), None, &Device::Cpu).expect("model");
    let ids = Expected::load(&fixture(name)).expect("expected").input_ids;
    (model, ids)
}

const ALL: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[test]
fn fresh_adapters_leave_the_output_unchanged() {
    let (mut model, ids) = load("llama");
    let before = values(&model.forward(&ids).expect("forward"));
    let n = model.attach_lora(&HfLoraConfig::new(&ALL)).expect("attach");
    assert_eq!(n, 2 * 7);
    assert_eq!(model.lora_params().len(), 2 * n);
    let after = values(&model.forward(&ids).expect("forward"));
    assert_eq!(
        before, after,
        "B starts at zero, so the output must not move"
    );
}

fn train(name: &str, targets: &[&str], adapted: usize) {
    let (mut model, ids) = load(name);
    let mut cfg = HfLoraConfig::new(targets);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    cfg.dropout = 0.1;
    cfg.seed = 7;
    assert_eq!(model.attach_lora(&cfg).expect("attach"), adapted, "{name}");
    let base: Vec<(String, Vec<f32>)> = model
        .base_tensors()
        .expect("base")
        .iter()
        .map(|(n, t)| (n.clone(), values(t)))
        .collect();
    let params = model.lora_params();
    let mut opt = AdamW::new(&params).expect("adamw");
    let tc = TrainConfig {
        weight_decay: 0.0,
        grad_clip: 1.0,
        ..TrainConfig::default()
    };
    let start = model
        .loss(&ids)
        .and_then(|l| Ok(l.to_scalar::<f32>()?))
        .expect("loss");
    for step in 0..40u64 {
        let loss = model.train_loss(&ids, step).expect("train loss");
        let grads = loss.backward().expect("backward");
        if step == 0 {
            // The base is constants of the graph, the adapters its only variables. (candle
            // still computes a gradient for a constant that feeds a fused op; nothing reads
            // it, and the base's bit-identity below is what counts.)
            for (n, t) in model.base_tensors().expect("base") {
                assert!(!t.is_variable(), "{name}: base tensor {n} is trainable");
            }
            for (n, p) in &params {
                assert!(
                    n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"),
                    "{n}"
                );
                if n.ends_with("lora_B.weight") {
                    assert!(
                        grads.get(p.as_tensor()).is_some(),
                        "{name}: {n} got no gradient"
                    );
                }
            }
        }
        opt.step(&params, &grads, &tc, 1e-2).expect("step");
    }
    let end = model
        .loss(&ids)
        .and_then(|l| Ok(l.to_scalar::<f32>()?))
        .expect("loss");
    println!("{name}: loss {start:.4} -> {end:.4}");
    assert!(end < 0.7 * start, "{name}: loss {start} -> {end}");
    for ((n, want), (_, t)) in base.iter().zip(model.base_tensors().expect("base")) {
        assert_eq!(want, &values(&t), "{name}: base tensor {n} changed");
    }
}

#[test]
fn training_moves_only_the_adapters_and_lowers_the_loss() {
    // Llama: every attention and MLP projection (7 per layer).
    train("llama", &ALL, 14);
    // Phi-3's fused projections.
    train(
        "phi3",
        &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        8,
    );
    // Qwen2-MoE: attention, and `gate_proj` reaches the shared expert (layer 0) and the
    // dense MLP (layer 1), not the stacked experts.
    train("qwen2_moe", &["q_proj", "v_proj", "gate_proj"], 6);
}

#[test]
fn dropout_is_reproducible_from_its_seed() {
    let (mut model, ids) = load("qwen2");
    let mut cfg = HfLoraConfig::new(&["q_proj", "down_proj"]);
    cfg.dropout = 0.5;
    model.attach_lora(&cfg).expect("attach");
    // Give B a value, so that dropout changes the output.
    for (n, p) in model.lora_params() {
        if n.ends_with("lora_B.weight") {
            let t = p
                .as_tensor()
                .ones_like()
                .expect("ones")
                .affine(0.1, 0.0)
                .expect("affine");
            p.set(&t).expect("set");
        }
    }
    let loss = |seed| {
        model
            .train_loss(&ids, seed)
            .and_then(|l| Ok(l.to_scalar::<f32>()?))
            .expect("loss")
    };
    assert_eq!(loss(3), loss(3));
    assert_ne!(loss(3), loss(4));
    // Inference uses no dropout.
    let a = values(&model.forward(&ids).expect("forward"));
    assert_eq!(a, values(&model.forward(&ids).expect("forward")));
}

#[test]
fn bad_adapter_settings_are_typed_errors() {
    let (mut model, _) = load("llama");
    let base = HfLoraConfig::new(&["q_proj"]);
    for (bad, field) in [
        (
            HfLoraConfig {
                rank: 0,
                ..base.clone()
            },
            "r",
        ),
        (
            HfLoraConfig {
                alpha: -1.0,
                ..base.clone()
            },
            "lora_alpha",
        ),
        (
            HfLoraConfig {
                dropout: 1.0,
                ..base.clone()
            },
            "lora_dropout",
        ),
        (
            HfLoraConfig {
                target_modules: vec![],
                ..base.clone()
            },
            "target_modules",
        ),
        (HfLoraConfig::new(&["q_proj", "w1"]), "target_modules"),
    ] {
        match model.attach_lora(&bad) {
            Err(HfError::Config { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
            }
            other => panic!("{bad:?} gave {other:?}"),
        }
        assert!(
            model.lora_params().is_empty(),
            "a refused config attaches nothing"
        );
    }
    // Mixtral's experts are stacked parameters, not modules: `w1` matches nothing.
    let (mut mixtral, _) = load("mixtral");
    let err = mixtral
        .attach_lora(&HfLoraConfig::new(&["w1"]))
        .expect_err("experts");
    assert!(err.to_string().contains("experts"), "{err}");
    // `all-linear` reaches every projection; a dotted suffix reaches the named ones.
    assert_eq!(
        model
            .attach_lora(&HfLoraConfig::new(&["all-linear"]))
            .expect("all"),
        14
    );
    assert_eq!(
        model
            .attach_lora(&HfLoraConfig::new(&["self_attn.o_proj"]))
            .expect("suffix"),
        2
    );
    assert!(
        model.attach_lora(&HfLoraConfig::new(&["proj"])).is_err(),
        "a bare fragment is not a suffix"
    );
}

#[test]
fn adapters_train_on_a_bf16_base() {
    // Most Hub bases are bf16: the base stays bf16, the adapters are f32 masters cast into
    // the pass, and their gradients come back through the cast.
    let ids = Expected::load(&fixture("llama"))
        .expect("expected")
        .input_ids;
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(f), dir.path().join(f)).expect("copy");
    }
    let path = dir.path().join("model.safetensors");
    let mut map = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    for t in map.values_mut() {
        *t = t.to_dtype(DType::BF16).expect("bf16");
    }
    candle_core::safetensors::save(&map, &path).expect("save");
    let mut model = hf::load_model(dir.path(), None, &Device::Cpu).expect("bf16 model");
    assert_eq!(model.dtype(), DType::BF16);
    model.attach_lora(&HfLoraConfig::new(&ALL)).expect("attach");
    let params = model.lora_params();
    assert!(params.iter().all(|(_, p)| p.dtype() == DType::F32));
    let mut opt = AdamW::new(&params).expect("adamw");
    let tc = TrainConfig {
        weight_decay: 0.0,
        ..TrainConfig::default()
    };
    let scalar = |l: Tensor| l.to_scalar::<f32>().expect("scalar");
    let start = scalar(model.loss(&ids).expect("loss"));
    for step in 0..30 {
        let grads = model
            .train_loss(&ids, step)
            .expect("loss")
            .backward()
            .expect("backward");
        opt.step(&params, &grads, &tc, 1e-2).expect("step");
    }
    let end = scalar(model.loss(&ids).expect("loss"));
    assert!(end < 0.8 * start, "bf16 base: loss {start} -> {end}");
}
