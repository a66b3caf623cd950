//! Parity of the Hugging Face loader and forward pass (`potluck_worker::hf`) with
//! `transformers`, against the fixtures that `fixtures/hf/make_fixtures.py` generated
//! (transformers 5.17, f32): every architecture's logits and loss within 1e-4 relative;
//! the other weight layouts (sharded, transformers 5's stacked experts) give the same
//! logits; and broken inputs (a changed weight byte, a wrong shape, a truncated file, an
//! unsupported architecture, absurd sizes) give typed errors, not panics.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::parity::{Expected, check_close};
use potluck_worker::hf::{self, HfConfig, HfError, config::RopeScaling};

mod hf_common;
use hf_common::fixture;

/// The tolerance the issue sets for f32: relative to the largest reference logit.
const RTOL: f64 = 1e-4;

const ARCHS: [&str; 7] = [
    "llama",
    "llama3",
    "qwen2",
    "mistral",
    "phi3",
    "mixtral",
    "qwen2_moe",
];

/// A copy of fixture `name` in a fresh temporary directory (for tampering).
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// Loads the base in `dir` and checks its logits and loss against fixture `name`'s
/// expectations; the error is the first disagreement.
fn check(dir: &Path, name: &str) -> Result<(f64, f64), HfError> {
    let model = hf::load_model(dir, None, &Device::Cpu)?;
    let want = Expected::load(&fixture(name))?;
    let logits = model.forward(&want.input_ids)?;
    let e_logits = check_close("logits", &logits, &want.logits, RTOL)?;
    let loss = model.loss(&want.input_ids)?;
    let e_loss = check_close(
        "loss",
        &loss.reshape(1)?,
        &Tensor::new(&[want.loss], &Device::Cpu)?,
        RTOL,
    )?;
    Ok((e_logits, e_loss))
}

#[test]
fn every_architecture_matches_transformers() {
    for name in ARCHS {
        let (logits, loss) = check(&fixture(name), name).unwrap_or_else(|e| panic!("{name}: {e}"));
        println!("{name}: logits max rel err {logits:.2e}, loss rel err {loss:.2e}");
    }
}

#[test]
fn configs_parse_to_their_features() {
    let cfg = |n: &str| HfConfig::from_file(&fixture(n).join("config.json")).expect("config");
    let l3 = cfg("llama3");
    assert!(matches!(l3.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert!(l3.tie_embeddings && l3.qkv_bias && l3.o_bias && l3.mlp_bias);
    assert_eq!((l3.head_dim, l3.heads, l3.kv_heads), (8, 4, 2));
    assert_eq!(cfg("mistral").windows, vec![Some(3), Some(3)]);
    assert_eq!(cfg("phi3").rope.rotary_dim, 2);
    let q = cfg("qwen2_moe");
    let moe = q.moe.as_ref().expect("moe");
    assert_eq!(moe.sparse, vec![true, false]);
    assert_eq!(moe.shared_hidden, Some(24));
    assert!(!moe.norm_topk);
    assert_eq!(q.windows, vec![None, None]);
    assert!(cfg("mixtral").moe.as_ref().expect("moe").norm_topk);
}

#[test]
fn hub_style_rope_fields_read_like_transformers_5() {
    // Llama 3's config.json on the Hub: rope_theta at the top, rope_scaling with "rope_type".
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama3").join("config.json")).expect("read"),
    )
    .expect("json");
    let obj = v.as_object_mut().expect("object");
    let mut params = obj.remove("rope_parameters").expect("rope_parameters");
    let theta = params
        .as_object_mut()
        .expect("object")
        .remove("rope_theta")
        .expect("theta");
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), params);
    let hub = HfConfig::from_json(&v.to_string()).expect("hub config");
    let new = HfConfig::from_file(&fixture("llama3").join("config.json")).expect("config");
    assert_eq!(hub, new);
}

/// Rewrites `dir/model.safetensors` through `edit`.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    edit(&mut map);
    candle_core::safetensors::save(&map, &path).expect("save");
}

#[test]
fn stacked_experts_layout_gives_the_same_logits() {
    // transformers 5 keeps experts stacked in memory ([E, 2I, H] gate-then-up, [E, H, I]);
    // a base saved in that layout loads to the same model.
    for (name, block, (g, u, d)) in [
        ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
        ("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ] {
        let dir = copy_fixture(name);
        rewrite(dir.path(), |map| {
            for l in 0..2 {
                let p = format!("model.layers.{l}.{block}");
                if !map.contains_key(&format!("{p}.experts.0.{g}.weight")) {
                    continue;
                }
                let mut gu = Vec::new();
                let mut dn = Vec::new();
                for e in 0..4 {
                    let mut take = |w: &str| {
                        map.remove(&format!("{p}.experts.{e}.{w}.weight"))
                            .expect("expert weight")
                    };
                    let (gate, up, down) = (take(g), take(u), take(d));
                    gu.push(Tensor::cat(&[gate, up], 0).expect("cat"));
                    dn.push(down);
                }
                // transformers 5 names the block `mlp` for Mixtral too.
                let q = format!("model.layers.{l}.mlp");
                let router = map.remove(&format!("{p}.gate.weight")).expect("router");
                map.insert(format!("{q}.gate.weight"), router);
                map.insert(
                    format!("{q}.experts.gate_up_proj"),
                    Tensor::stack(&gu, 0).expect("stack"),
                );
                map.insert(
                    format!("{q}.experts.down_proj"),
                    Tensor::stack(&dn, 0).expect("stack"),
                );
            }
        });
        check(dir.path(), name).unwrap_or_else(|e| panic!("{name} stacked: {e}"));
    }
}

#[test]
fn sharded_weights_give_the_same_logits() {
    let dir = copy_fixture("llama");
    let path = dir.path().join("model.safetensors");
    let map = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    std::fs::remove_file(&path).expect("remove");
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut index = serde_json::Map::new();
    for (name, t) in map {
        let file = if name.contains("layers.1") || name.starts_with("lm_head") {
            b.insert(name.clone(), t);
            "model-00002-of-00002.safetensors"
        } else {
            a.insert(name.clone(), t);
            "model-00001-of-00002.safetensors"
        };
        index.insert(name, file.into());
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .expect("save");
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .expect("save");
    let index = serde_json::json!({ "metadata": {}, "weight_map": index });
    std::fs::write(dir.path().join(hf::load::INDEX_FILE), index.to_string()).expect("index");
    check(dir.path(), "llama").expect("sharded llama");

    // An index that points outside the base's directory is refused.
    let evil = serde_json::json!({ "weight_map": { "model.norm.weight": "../model.safetensors" } });
    std::fs::write(dir.path().join(hf::load::INDEX_FILE), evil.to_string()).expect("index");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("escaping shard");
    assert!(matches!(err, HfError::Json { .. }), "{err}");

    // An index that puts a tensor in a shard that lacks it is refused.
    let lie = serde_json::json!({ "weight_map": { "model.norm.weight": "model-00002-of-00002.safetensors" } });
    std::fs::write(dir.path().join(hf::load::INDEX_FILE), lie.to_string()).expect("index");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("lying index");
    assert!(matches!(err, HfError::Safetensors { .. }), "{err}");
}

#[test]
fn a_changed_weight_byte_fails_parity_with_a_typed_error() {
    let dir = copy_fixture("llama");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    let (header, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let info = meta.info("model.norm.weight").expect("norm");
    // The high byte (sign and exponent) of the final norm's first f32 weight.
    let at = 8 + header + info.data_offsets.0 + 3;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    match check(dir.path(), "llama") {
        Err(HfError::Parity { what, max_rel, .. }) => {
            assert_eq!(what, "logits");
            assert!(max_rel > RTOL);
        }
        other => panic!("a changed weight must fail parity, got {other:?}"),
    }
}

#[test]
fn a_tampered_reference_fails_parity_with_a_typed_error() {
    let dir = copy_fixture("qwen2");
    let path = dir.path().join("expected.safetensors");
    let mut map = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    let logits = map.remove("logits").expect("logits");
    let shifted = (logits.clone()
        + logits
            .ones_like()
            .expect("ones")
            .affine(0.01, 0.0)
            .expect("affine"))
    .expect("add");
    map.insert("logits".into(), shifted);
    candle_core::safetensors::save(&map, &path).expect("save");
    let model = hf::load_model(&fixture("qwen2"), None, &Device::Cpu).expect("model");
    let want = Expected::load(dir.path()).expect("expected");
    let got = model.forward(&want.input_ids).expect("forward");
    let err = check_close("logits", &got, &want.logits, RTOL).expect_err("tampered");
    assert!(matches!(err, HfError::Parity { .. }), "{err}");
}

#[test]
fn wrong_shapes_are_typed_errors() {
    // A weight of the wrong shape in the file.
    let dir = copy_fixture("mistral");
    rewrite(dir.path(), |map| {
        let name = "model.layers.1.self_attn.k_proj.weight";
        let t = map.remove(name).expect("k_proj");
        map.insert(name.into(), t.reshape((16, 8)).expect("reshape"));
    });
    match hf::load_model(dir.path(), None, &Device::Cpu) {
        Err(HfError::Shape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "model.layers.1.self_attn.k_proj.weight");
            assert_eq!((expected, found), (vec![8, 16], vec![16, 8]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }

    // A config that disagrees with the weights.
    let dir = copy_fixture("phi3");
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).expect("read");
    std::fs::write(
        &cfg_path,
        text.replace("\"intermediate_size\": 32", "\"intermediate_size\": 24"),
    )
    .expect("write");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("shape");
    assert!(
        matches!(&err, HfError::Shape { name, .. } if name.ends_with("gate_up_proj.weight")),
        "{err}"
    );

    // A missing head in an untied base.
    let dir = copy_fixture("mixtral");
    rewrite(dir.path(), |map| {
        map.remove("lm_head.weight");
    });
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("missing");
    assert!(
        matches!(&err, HfError::MissingTensor { name } if name == "lm_head.weight"),
        "{err}"
    );
}

#[test]
fn truncated_and_garbage_weight_files_are_typed_errors() {
    let dir = copy_fixture("llama");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    for broken in [
        bytes[..bytes.len() - 1].to_vec(),
        bytes[..4].to_vec(),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header".to_vec(),
        Vec::new(),
    ] {
        std::fs::write(&path, &broken).expect("write");
        let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("broken file");
        assert!(matches!(err, HfError::Safetensors { .. }), "{err}");
    }
    std::fs::remove_file(&path).expect("remove");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("no weights");
    assert!(matches!(err, HfError::Io { .. }), "{err}");
}

/// The llama fixture's config with `edit` applied, parsed.
fn edited(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<HfConfig, HfError> {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama").join("config.json")).expect("read"),
    )
    .expect("json");
    edit(v.as_object_mut().expect("object"));
    HfConfig::from_json(&v.to_string())
}

#[test]
fn unsupported_architectures_are_refused_by_name() {
    let err = edited(|c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
    })
    .expect_err("gpt2");
    assert!(matches!(err, HfError::Unsupported { .. }));
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");

    let err = edited(|c| {
        c.remove("architectures");
        c.insert("model_type".into(), "gemma".into());
    })
    .expect_err("gemma");
    assert!(err.to_string().contains("gemma"), "{err}");

    // And on the loading path, before any weight is read.
    let dir = copy_fixture("llama");
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).expect("read");
    std::fs::write(
        &cfg_path,
        text.replace("LlamaForCausalLM", "FalconForCausalLM"),
    )
    .expect("write");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("falcon");
    assert!(err.to_string().contains("FalconForCausalLM"), "{err}");
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let yarn = edited(|c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
        );
    })
    .expect_err("yarn");
    assert!(
        matches!(&yarn, HfError::Config { field, .. } if field.contains("rope_type")),
        "{yarn}"
    );
    let gelu = edited(|c| {
        c.insert("hidden_act".into(), "gelu".into());
    })
    .expect_err("gelu");
    assert!(
        matches!(&gelu, HfError::Config { field, .. } if field == "hidden_act"),
        "{gelu}"
    );
    let quant = edited(|c| {
        c.insert(
            "quantization_config".into(),
            serde_json::json!({"quant_method": "gptq"}),
        );
    })
    .expect_err("gptq");
    assert!(matches!(quant, HfError::Config { .. }));
    let gqa = edited(|c| {
        c.insert("num_key_value_heads".into(), 3.into());
    })
    .expect_err("kv heads");
    assert!(matches!(gqa, HfError::Config { .. }));
    let not_json = HfConfig::from_json("{\"vocab_size\": ").expect_err("json");
    assert!(matches!(not_json, HfError::Json { .. }));
}

#[test]
fn absurd_sizes_are_refused_before_allocation() {
    for (field, value) in [
        ("hidden_size", serde_json::json!(1u64 << 40)),
        ("vocab_size", serde_json::json!(1u64 << 30)),
        ("num_hidden_layers", serde_json::json!(1u64 << 20)),
        ("intermediate_size", serde_json::json!(u64::MAX)),
    ] {
        let err = edited(|c| {
            c.insert(field.into(), value);
        })
        .expect_err(field);
        assert!(matches!(err, HfError::TooLarge { .. }), "{field}: {err}");
    }
    // Each size within its bound, their product not: refused by the parameter count.
    let err = edited(|c| {
        c.insert("num_hidden_layers".into(), 1024.into());
        c.insert("hidden_size".into(), (1 << 18).into());
        c.insert("intermediate_size".into(), (1 << 18).into());
        c.insert("head_dim".into(), 64.into());
    })
    .expect_err("product");
    assert!(
        matches!(&err, HfError::TooLarge { what, .. } if what.contains("parameter count")),
        "{err}"
    );
    // A negative or fractional size is a typed error too.
    let err = edited(|c| {
        c.insert("hidden_size".into(), serde_json::json!(-16));
    })
    .expect_err("negative");
    assert!(matches!(err, HfError::Config { .. }));
    // An oversized config file is not read.
    let dir = copy_fixture("llama");
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(2 << 20));
    std::fs::write(dir.path().join("config.json"), big).expect("write");
    let err = hf::load_model(dir.path(), None, &Device::Cpu).expect_err("big config");
    assert!(matches!(err, HfError::TooLarge { .. }), "{err}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model = hf::load_model(&fixture("qwen2"), None, &Device::Cpu).expect("model");
    let past = Tensor::new(&[[1u32, 64]], &Device::Cpu).expect("ids");
    assert!(matches!(model.forward(&past), Err(HfError::Input(_))));
    let flat = Tensor::new(&[1u32, 2], &Device::Cpu).expect("ids");
    assert!(matches!(model.forward(&flat), Err(HfError::Input(_))));
    let float = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).expect("ids");
    assert!(matches!(model.forward(&float), Err(HfError::Input(_))));
    // Longer than max_position_embeddings (64): refused before the attention is built.
    let long = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).expect("ids");
    assert!(matches!(model.forward(&long), Err(HfError::Input(_))));
    let one = Tensor::new(&[[1u32]], &Device::Cpu).expect("ids");
    assert!(matches!(model.loss(&one), Err(HfError::Input(_))));
}

#[test]
fn a_bf16_base_loads_and_computes_in_bf16() {
    // The same base held in bf16 (as most Hub bases are): it stays bf16 and lands near f32.
    let dir = copy_fixture("llama");
    rewrite(dir.path(), |map| {
        for t in map.values_mut() {
            *t = t.to_dtype(DType::BF16).expect("bf16");
        }
    });
    let model = hf::load_model(dir.path(), None, &Device::Cpu).expect("bf16 model");
    assert_eq!(model.dtype(), DType::BF16);
    let want = Expected::load(&fixture("llama")).expect("expected");
    let got = model.forward(&want.input_ids).expect("forward");
    let err = check_close("bf16 logits", &got, &want.logits, 5e-2).expect("bf16 close");
    assert!(err > 0.0, "bf16 cannot be exact");
}

#[test]
fn the_fixtures_exercise_each_feature() {
    // Switching a feature off in the config must break parity: otherwise the fixture would
    // not be testing it (a window longer than the sequence, a scaling that changes nothing).
    for (name, from, to) in [
        (
            "mistral",
            "\"sliding_window\": 3",
            "\"sliding_window\": null",
        ),
        (
            "llama3",
            "\"rope_type\": \"llama3\"",
            "\"rope_type\": \"default\"",
        ),
        ("phi3", "\"partial_rotary_factor\": 0.5,", ""),
        (
            "qwen2_moe",
            "\"norm_topk_prob\": false",
            "\"norm_topk_prob\": true",
        ),
        (
            "mixtral",
            "\"num_experts_per_tok\": 2",
            "\"num_experts_per_tok\": 1",
        ),
    ] {
        let dir = copy_fixture(name);
        let cfg_path = dir.path().join("config.json");
        let text = std::fs::read_to_string(&cfg_path).expect("read");
        assert!(text.contains(from), "{name}'s config lacks {from}");
        std::fs::write(&cfg_path, text.replace(from, to)).expect("write");
        match check(dir.path(), name) {
            Err(HfError::Parity { .. }) => {}
            other => panic!("{name} without {from} still matched: {other:?}"),
        }
    }
}
