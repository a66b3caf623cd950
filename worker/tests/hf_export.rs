//! Exports (`potluck_worker::hf::export`): PEFT adapter directories with PEFT's tensor names
//! and config fields, merged model directories that this crate's loader reloads with the
//! same logits (on an f32 and on an NF4 base), atomic writes that never overwrite, and a
//! typed error for a model without adapters. `write_gpu_check` (ignored) writes the files
//! the GPU machine's PEFT/transformers check reads (docs/GPU.md).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::export::{self, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_WEIGHTS};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::{self, HfError, HfLoraConfig, HfModel, QuantFormat};

mod hf_common;
use hf_common::{fixture, randomize_lora_b, values};

/// Adapters on `model` with random nonzero `B`s, so that they change the output.
fn adapt(model: &mut HfModel, targets: &[&str]) {
    let mut cfg = HfLoraConfig::new(targets);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    cfg.dropout = 0.05;
    cfg.seed = 11;
    model.attach_lora(&cfg).expect("attach");
    randomize_lora_b(model, 5);
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn peft_export_has_peft_names_and_config() {
    let dir = fixture("llama");
    let mut model = hf::load_model(&dir, None, &Device::Cpu).expect("model");
    adapt(&mut model, &["q_proj", "v_proj", "down_proj"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("adapter");
    export::export_peft(&model, "tiny-llama", &out).expect("export");
    let saved = candle_core::safetensors::load(out.join(ADAPTER_WEIGHTS), &Device::Cpu)
        .expect("adapter weights");
    let params = model.lora_params();
    assert_eq!(saved.len(), params.len());
    for (n, p) in &params {
        let key = format!("base_model.model.{n}");
        let t = saved.get(&key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(values(t), values(p.as_tensor()), "{key}");
    }
    assert!(saved.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(ADAPTER_CONFIG)).expect("config"))
            .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["lora_dropout"], 0.05);
    assert_eq!(cfg["base_model_name_or_path"], "tiny-llama");
    let targets = cfg["target_modules"].as_array().expect("list");
    assert_eq!(targets.len(), 6, "three projections in each of two layers");
    assert!(targets.contains(&serde_json::json!("model.layers.0.self_attn.q_proj")));
    // Never overwritten, and nothing partial left behind.
    let err = export::export_peft(&model, "tiny-llama", &out).expect_err("exists");
    assert!(matches!(err, HfError::Io { .. }), "{err}");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).expect("ls").collect();
    assert_eq!(names.len(), 1, "a temporary directory was left: {names:?}");
}

#[test]
fn a_model_without_adapters_has_nothing_to_export() {
    let model = hf::load_model(&fixture("llama"), None, &Device::Cpu).expect("model");
    let tmp = tempfile::tempdir().expect("tmp");
    let err = export::export_peft(&model, "x", &tmp.path().join("a")).expect_err("no adapters");
    assert!(matches!(err, HfError::Input(_)), "{err}");
    assert!(!tmp.path().join("a").exists());
}

fn merged_reloads_with_the_same_logits(name: &str, quant: Option<QuantFormat>, targets: &[&str]) {
    let dir = fixture(name);
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
    if let Some(fmt) = quant {
        model.quantize(fmt).expect("quantize");
    }
    let base = values(&model.forward(&ids).expect("forward"));
    adapt(&mut model, targets);
    let want = values(&model.forward(&ids).expect("forward"));
    assert!(
        max_rel(&base, &want) > 1e-3,
        "{name}: the adapters change nothing"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("merged");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    export::export_merged(&model, &config, &out).expect("export");
    assert!(out.join(MODEL_WEIGHTS).exists());
    let back = hf::load_model(&out, None, &Device::Cpu).expect("reload");
    let got = values(&back.forward(&ids).expect("forward"));
    let rel = max_rel(&want, &got);
    println!("{name} {quant:?}: merged logits differ by {rel:e} relative");
    assert!(
        rel < 1e-4,
        "{name} {quant:?}: merged logits differ by {rel}"
    );
}

#[test]
fn merged_models_reload_with_the_same_logits() {
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    merged_reloads_with_the_same_logits("llama", None, &all);
    merged_reloads_with_the_same_logits("llama", Some(QuantFormat::Nf4), &all);
    merged_reloads_with_the_same_logits("phi3", None, &["qkv_proj", "gate_up_proj"]);
    // Experts are written stacked in transformers 5's layout, their adapters merged, and
    // read back: Qwen2-MoE's experts and shared expert, Mixtral's experts and routers, and
    // Mixtral's experts on an NF4 base.
    merged_reloads_with_the_same_logits(
        "qwen2_moe",
        None,
        &["q_proj", "gate_proj", "up_proj", "down_proj"],
    );
    merged_reloads_with_the_same_logits("mixtral", None, &["q_proj", "gate", "w1", "w2", "w3"]);
    merged_reloads_with_the_same_logits("mixtral", Some(QuantFormat::Nf4), &["w1", "w2", "w3"]);
}

#[test]
fn expert_adapters_export_with_peft_names_and_load_back() {
    // PEFT names experts by their transformers 4 module paths.
    for (name, targets, keys) in [
        (
            "mixtral",
            vec!["w1", "w2", "w3", "gate"],
            vec![
                "model.layers.0.block_sparse_moe.experts.0.w1.lora_A.weight",
                "model.layers.1.block_sparse_moe.experts.3.w2.lora_B.weight",
                "model.layers.1.block_sparse_moe.gate.lora_B.weight",
            ],
        ),
        (
            "qwen2_moe",
            vec!["gate_proj", "up_proj", "down_proj"],
            vec![
                "model.layers.0.mlp.experts.2.down_proj.lora_B.weight",
                "model.layers.0.mlp.shared_expert.up_proj.lora_A.weight",
                "model.layers.1.mlp.gate_proj.lora_A.weight",
            ],
        ),
    ] {
        let dir = fixture(name);
        let ids = Expected::load(&dir).expect("expected").input_ids;
        let mut model = hf::load_model(&dir, None, &Device::Cpu).expect("model");
        adapt(&mut model, &targets);
        let want = values(&model.forward(&ids).expect("forward"));
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("adapter");
        export::export_peft(&model, name, &out).expect("export");
        let saved = candle_core::safetensors::load(out.join(ADAPTER_WEIGHTS), &Device::Cpu)
            .expect("adapter weights");
        assert_eq!(saved.len(), model.lora_params().len(), "{name}");
        for k in keys {
            let key = format!("base_model.model.{k}");
            assert!(saved.contains_key(&key), "{name}: {key} missing");
        }
        let mut back = hf::load_model(&dir, None, &Device::Cpu).expect("model");
        export::load_peft(&mut back, &out).expect("load");
        assert_eq!(
            values(&back.forward(&ids).expect("forward")),
            want,
            "{name}"
        );
    }
}

#[test]
fn merged_export_refuses_a_config_of_another_model() {
    let mut model = hf::load_model(&fixture("llama"), None, &Device::Cpu).expect("model");
    adapt(&mut model, &["q_proj"]);
    let other = std::fs::read_to_string(fixture("qwen2").join("config.json")).expect("config");
    let tmp = tempfile::tempdir().expect("tmp");
    let err = export::export_merged(&model, &other, &tmp.path().join("m")).expect_err("other");
    assert!(matches!(err, HfError::Config { .. }), "{err}");
}

/// Writes `$POTLUCK_HF_EXPORT/{adapter,merged,ours.safetensors}` for the GPU machine's
/// check: the llama fixture with adapters on every projection, PEFT's adapter, the merged
/// model, and our logits with and without the adapters for the fixture's ids.
#[test]
#[ignore = "writes files for the GPU machine's PEFT check; set POTLUCK_HF_EXPORT"]
fn write_gpu_check() {
    let root = PathBuf::from(std::env::var("POTLUCK_HF_EXPORT").expect("POTLUCK_HF_EXPORT"));
    let dir = fixture("llama");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
    let base = model.forward(&ids).expect("forward");
    adapt(
        &mut model,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
    let adapted = model.forward(&ids).expect("forward");
    export::export_peft(&model, "base", &root.join("adapter")).expect("peft");
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    export::export_merged(&model, &config, &root.join("merged")).expect("merged");
    let ours: std::collections::HashMap<String, Tensor> = [
        (
            "input_ids".to_string(),
            ids.to_dtype(DType::I64).expect("ids"),
        ),
        ("base_logits".to_string(), base),
        ("adapted_logits".to_string(), adapted),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&ours, root.join("ours.safetensors")).expect("save");
}

#[test]
fn a_peft_export_loads_back_with_the_same_logits() {
    let dir = fixture("llama");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model = hf::load_model(&dir, None, &Device::Cpu).expect("model");
    adapt(&mut model, &["q_proj", "up_proj"]);
    let want = values(&model.forward(&ids).expect("forward"));
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("adapter");
    export::export_peft(&model, "tiny", &out).expect("export");
    let mut back = hf::load_model(&dir, None, &Device::Cpu).expect("model");
    export::load_peft(&mut back, &out).expect("load");
    assert_eq!(back.lora_config().map(|c| c.rank), Some(4));
    assert_eq!(values(&back.forward(&ids).expect("forward")), want);
    // A tensor of the wrong shape, a missing file, a DoRA config: typed errors.
    let cfg_path = out.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).expect("config");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["r"] = serde_json::json!(2);
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("rank");
    assert!(
        matches!(&err, HfError::Config { field, .. } if field == "r"),
        "{err}"
    );
    // A rank far past the file's tensors is refused from the header, before the adapters
    // it claims are allocated.
    json["r"] = serde_json::json!(4096);
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("huge rank");
    assert!(
        matches!(&err, HfError::Config { field, .. } if field == "r"),
        "{err}"
    );
    json["r"] = serde_json::json!(4);
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    // A header whose length or offsets pass the file's end.
    let wpath = out.join(ADAPTER_WEIGHTS);
    let good = std::fs::read(&wpath).expect("weights");
    let mut lying = good.clone();
    lying[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    std::fs::write(&wpath, &lying).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("header length");
    assert!(matches!(err, HfError::Safetensors { .. }), "{err}");
    std::fs::write(&wpath, &good[..good.len() - 4]).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("truncated data");
    assert!(matches!(err, HfError::Safetensors { .. }), "{err}");
    std::fs::write(&wpath, &good).expect("write");
    json["r"] = serde_json::json!(4);
    json["use_dora"] = serde_json::json!(true);
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("dora");
    assert!(matches!(err, HfError::Config { .. }), "{err}");
    json["use_dora"] = serde_json::json!(false);
    json["target_modules"] = serde_json::json!(".*q_proj");
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("regex");
    assert!(matches!(err, HfError::Config { .. }), "{err}");
    std::fs::remove_file(out.join(ADAPTER_WEIGHTS)).expect("rm");
    json["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(&cfg_path, json.to_string()).expect("write");
    let err = export::load_peft(&mut back, &out).expect_err("no weights");
    assert!(matches!(err, HfError::Io { .. }), "{err}");
}
