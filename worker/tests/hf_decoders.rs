//! The Hugging Face loader fed hostile input (style point 10): random bytes and random
//! single-byte changes to a weight file, and random values in `config.json`'s fields, give
//! a model or a typed error, never a panic, and an accepted config stays within the
//! parameter bound.

use candle_core::{Device, Tensor};
use potluck_worker::hf::{self, HfConfig, config::MAX_PARAMS};
use proptest::prelude::*;

mod hf_common;
use hf_common::fixture;

fn base_with_weights(bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture("qwen2_moe").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    std::fs::write(dir.path().join("model.safetensors"), bytes).expect("write");
    dir
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_weight_files_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = base_with_weights(&bytes);
        prop_assert!(hf::load_model(dir.path(), None, &Device::Cpu).is_err());
    }

    #[test]
    fn a_changed_byte_never_panics(at in any::<prop::sample::Index>(), bits in 1u8..=255) {
        let mut bytes = std::fs::read(fixture("qwen2_moe").join("model.safetensors")).expect("read");
        let i = at.index(bytes.len());
        bytes[i] ^= bits;
        let dir = base_with_weights(&bytes);
        // A change in the data loads (and computes something); one in the header is refused.
        if let Ok(model) = hf::load_model(dir.path(), None, &Device::Cpu) {
            let ids = Tensor::new(&[[3u32, 5, 7, 9]], &Device::Cpu).expect("ids");
            let _ = model.forward(&ids);
        }
    }

    #[test]
    fn random_config_values_never_panic(
        field in prop::sample::select(vec![
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "decoder_sparse_step", "mlp_only_layers", "sliding_window", "rms_norm_eps",
            "rope_parameters", "architectures", "max_position_embeddings",
        ]),
        value in prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|x| serde_json::json!(x)),
            "[a-z_]{0,12}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!([1, 2, 3])),
            Just(serde_json::json!({"rope_type": "llama3", "factor": 0.0})),
        ],
    ) {
        let text = std::fs::read_to_string(fixture("qwen2_moe").join("config.json")).expect("read");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v.as_object_mut().expect("object").insert(field.to_string(), value);
        if let Ok(cfg) = HfConfig::from_json(&v.to_string()) {
            prop_assert!(cfg.param_count() <= MAX_PARAMS);
            prop_assert!(cfg.kv_heads > 0 && cfg.heads % cfg.kv_heads == 0);
        }
    }
}
