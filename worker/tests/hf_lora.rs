//! LoRA adapters on Hugging Face bases (`potluck_worker::hf::lora`): a fresh adapter leaves
//! the base's output unchanged, training moves the adapters only (the base is no variable
//! of the graph, gets no gradient and stays bit-identical) and lowers the loss on tiny bases
//! of four families, MoE experts and routers take adapters by PEFT's module names and only
//! the experts a batch reaches get gradients, dropout is reproducible from its seed, and bad
//! settings are typed errors.

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::{self, Checkpointing, HfError, HfLoraConfig, HfModel};
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
            // The base is constants of the graph, the adapters its only variables.
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
    // Qwen2-MoE: attention, and `gate_proj` reaches the four experts and the shared expert
    // of layer 0 and the dense MLP of layer 1.
    train("qwen2_moe", &["q_proj", "v_proj", "gate_proj"], 10);
    // Mixtral: the experts alone (three projections of four experts in two layers).
    train("mixtral", &["w1", "w2", "w3"], 24);
}

/// The fixture's first sequence cut to the shortest prefix that leaves some expert of some
/// sparse layer without a token, with the model's expert load for it.
fn sparse_batch(model: &HfModel, ids: &Tensor) -> (Tensor, Vec<Vec<usize>>) {
    let t = ids.dim(1).expect("time");
    for len in 2..=t {
        let cut = ids
            .narrow(0, 0, 1)
            .and_then(|x| x.narrow(1, 0, len))
            .expect("cut");
        let load = model.expert_load(&cut).expect("load");
        if load.iter().flatten().any(|&n| n == 0) {
            return (cut, load);
        }
    }
    panic!("every prefix reaches every expert");
}

#[test]
fn only_the_experts_a_batch_reaches_get_gradients() {
    // (fixture, its sparse layers, the expert projections' names)
    for (name, sparse, projs) in [
        ("mixtral", vec![0, 1], ["w1", "w3", "w2"]),
        ("qwen2_moe", vec![0], ["gate_proj", "up_proj", "down_proj"]),
    ] {
        let (mut model, ids) = load(name);
        let n = model
            .attach_lora(&HfLoraConfig::new(&projs))
            .expect("attach");
        assert!(n >= 12, "{name}: {n} adapters");
        let (ids, load) = sparse_batch(&model, &ids);
        assert_eq!(load.len(), sparse.len(), "{name}");
        // The last token predicts nothing: an expert only it reaches is in the graph with a
        // zero gradient. Attention is causal, so the others route as in the whole batch.
        let t = ids.dim(1).expect("time");
        let scored = model
            .expert_load(&ids.narrow(1, 0, t - 1).expect("cut"))
            .expect("load");
        let (_, grads) = model
            .train_grads(&ids, 0, Checkpointing::Off)
            .expect("grads");
        let params: std::collections::HashMap<String, _> =
            model.lora_params().into_iter().collect();
        let block = if name == "mixtral" {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        let (mut routed, mut idle) = (0, 0);
        for ((counts, scored), l) in load.iter().zip(&scored).zip(&sparse) {
            for (e, (&tokens, &scored)) in counts.iter().zip(scored).enumerate() {
                for p in projs {
                    let m = format!("model.layers.{l}.{block}.experts.{e}.{p}");
                    for ab in ["lora_A", "lora_B"] {
                        let key = format!("{m}.{ab}.weight");
                        let var = params.get(&key).unwrap_or_else(|| panic!("{key} missing"));
                        let g = grads.get(var.as_tensor());
                        assert_eq!(
                            g.is_some(),
                            tokens > 0,
                            "{name}: {key} (expert given {tokens} tokens)"
                        );
                        if ab == "lora_B" && tokens > 0 {
                            let g = values(g.expect("grad"));
                            assert_eq!(
                                g.iter().any(|v| *v != 0.0),
                                scored > 0,
                                "{name}: {key} ({scored} of its tokens predict one)"
                            );
                        }
                    }
                }
                if tokens > 0 {
                    routed += 1;
                } else {
                    idle += 1;
                }
            }
        }
        println!("{name}: {routed} experts routed, {idle} idle: {load:?}");
        assert!(routed > 0 && idle > 0, "{name}");
    }
}

#[test]
fn a_router_is_frozen_unless_targeted() {
    let (mut model, ids) = load("mixtral");
    // Experts only: no adapter on the router (the base, router included, is checked
    // bit-identical after training in `train`).
    model
        .attach_lora(&HfLoraConfig::new(&["w1"]))
        .expect("attach");
    assert!(
        model
            .lora_params()
            .iter()
            .all(|(n, _)| n.contains(".experts.") && n.contains(".w1.")),
        "only the experts' w1"
    );
    // `gate` is PEFT's name of the router; it reaches neither `gate_proj` nor Qwen2-MoE's
    // `shared_expert_gate`, and the router's adapter learns through the gate weights.
    assert_eq!(
        model
            .attach_lora(&HfLoraConfig::new(&["gate"]))
            .expect("router"),
        2
    );
    let (_, grads) = model
        .train_grads(&ids, 0, Checkpointing::Off)
        .expect("grads");
    for l in 0..2 {
        let key = format!("model.layers.{l}.block_sparse_moe.gate.lora_B.weight");
        let (_, var) = model
            .lora_params()
            .into_iter()
            .find(|(n, _)| *n == key)
            .unwrap_or_else(|| panic!("{key} missing"));
        let g = values(grads.get(var.as_tensor()).expect("router gradient"));
        assert!(g.iter().any(|v| *v != 0.0), "{key}");
    }
    let (mut qwen, _) = load("qwen2_moe");
    assert_eq!(
        qwen.attach_lora(&HfLoraConfig::new(&["gate"]))
            .expect("router"),
        1,
        "layer 1 is dense"
    );
    assert_eq!(
        qwen.lora_params()[0].0,
        "model.layers.0.mlp.gate.lora_A.weight"
    );
}

#[test]
fn fresh_adapters_on_every_moe_projection_leave_the_output_unchanged() {
    // all-linear on transformers 4 modules: attention, router, experts, shared expert and
    // its gate.
    for (name, adapted) in [
        ("mixtral", 2 * (4 + 1 + 12)),
        ("qwen2_moe", 4 + 1 + 12 + 4 + 7),
    ] {
        let (mut model, ids) = load(name);
        let before = values(&model.forward(&ids).expect("forward"));
        let n = model
            .attach_lora(&HfLoraConfig::new(&["all-linear"]))
            .expect("attach");
        assert_eq!(n, adapted, "{name}");
        assert_eq!(
            values(&model.forward(&ids).expect("forward")),
            before,
            "{name}"
        );
        let (loss, _) = model
            .train_grads(&ids, 0, Checkpointing::Off)
            .expect("grads");
        let base = model
            .loss(&ids)
            .and_then(|l| Ok(l.to_scalar::<f32>()?))
            .expect("loss");
        assert_eq!(loss, base, "{name}: no dropout, zero B: the base's loss");
    }
}

#[test]
fn the_frozen_base_gets_no_gradient() {
    // The base's tensors are constants of the graph: the backward pass computes no
    // gradient for them (a gradient per projection and for the head would cost as much
    // memory as the weights), with or without checkpointing.
    let (mut model, ids) = load("llama");
    model.attach_lora(&HfLoraConfig::new(&ALL)).expect("attach");
    for ckpt in [Checkpointing::Off, Checkpointing::Layers] {
        let (_, grads) = model.train_grads(&ids, 0, ckpt).expect("grads");
        for (n, t) in model.base_tensors().expect("base") {
            assert!(!t.is_variable(), "base tensor {n} is trainable");
            assert!(
                grads.get(&t).is_none(),
                "{ckpt:?}: base tensor {n} got a gradient"
            );
        }
        for (n, p) in model.lora_params() {
            assert!(grads.get(p.as_tensor()).is_some(), "{ckpt:?}: {n} got none");
        }
    }
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
    // Mixtral's experts are modules of transformers 4: `w1` reaches every expert's (four
    // experts, two layers), `experts.3.w1` one expert's; a name of no module is refused
    // with the names that exist.
    let (mut mixtral, _) = load("mixtral");
    assert_eq!(
        mixtral
            .attach_lora(&HfLoraConfig::new(&["w1"]))
            .expect("w1"),
        8
    );
    assert_eq!(
        mixtral
            .attach_lora(&HfLoraConfig::new(&["experts.3.w1"]))
            .expect("one expert"),
        2
    );
    let err = mixtral
        .attach_lora(&HfLoraConfig::new(&["w4"]))
        .expect_err("w4");
    assert!(err.to_string().contains("w1, w2, w3"), "{err}");
    assert!(mixtral.lora_params().is_empty());
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
