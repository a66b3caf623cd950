//! `MambaForCausalLM` checkpoints from disk against `transformers`' own logits: fixtures made
//! once on the GPU machine by `tests/fixtures/mamba/make_fixtures.py` (tiny random configs,
//! every parameter perturbed), and the loader's refusals of what it does not describe.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use potluck_worker::WorkerError;
use potluck_worker::mamba::hf;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mamba")
        .join(case)
}

fn inputs(dir: &Path) -> (Tensor, Tensor) {
    let ids: Vec<Vec<u32>> =
        serde_json::from_slice(&std::fs::read(dir.join("input_ids.json")).unwrap()).unwrap();
    let (b, t) = (ids.len(), ids[0].len());
    let ids = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap();
    let logits = candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap();
    (ids, logits)
}

/// Largest difference relative to the largest logit.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let (a, b) = (f(a), f(b));
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale.max(1e-12)
}

#[test]
fn logits_match_transformers() {
    for case in ["tied", "untied"] {
        let dir = fixture(case);
        let (ids, want) = inputs(&dir);
        for dtype in [DType::F32, DType::F64] {
            let model = hf::load(&dir, &Device::Cpu, dtype, dtype).unwrap();
            let w = model.weights(false).unwrap();
            let got = model.logits(&w, &ids).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = rel_diff(&got, &want);
            eprintln!("{case} {dtype:?}: max |diff| / max |logit| = {d:e}");
            assert!(d < 1e-5, "{case} {dtype:?}: {d}");
        }
    }
}

#[test]
fn recurrent_generation_of_a_loaded_model_matches_transformers() {
    let dir = fixture("untied");
    let (ids, want) = inputs(&dir);
    let model = hf::load(&dir, &Device::Cpu, DType::F64, DType::F64).unwrap();
    let w = model.weights(false).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let mut state = model.recurrent_state(&w, b).unwrap();
    let mut steps = Vec::with_capacity(t);
    for i in 0..t {
        let tok = ids.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
        steps.push(
            model
                .step_logits(&w, &mut state, &tok)
                .unwrap()
                .unsqueeze(1)
                .unwrap(),
        );
    }
    let got = Tensor::cat(&steps, 1).unwrap();
    let d = rel_diff(&got, &want);
    assert!(d < 1e-5, "{d}");
}

/// A copy of a fixture in a temporary directory, with `edit` applied to its config.
fn edited(case: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join(f), tmp.path().join(f)).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    tmp
}

fn refused(dir: &Path, want: &str) {
    match hf::load(dir, &Device::Cpu, DType::F32, DType::F32) {
        Err(e @ WorkerError::Checkpoint { .. }) => {
            assert!(e.to_string().contains(want), "{want:?} not in {e}")
        }
        Err(e) => panic!("{want}: wrong error {e}"),
        Ok(_) => panic!("{want}: loaded"),
    }
}

#[test]
fn what_the_loader_does_not_describe_is_refused() {
    refused(
        edited("tied", |c| c["use_bias"] = true.into()).path(),
        "use_bias",
    );
    refused(
        edited("tied", |c| c["use_conv_bias"] = false.into()).path(),
        "use_conv_bias",
    );
    refused(
        edited("tied", |c| c["hidden_act"] = "gelu".into()).path(),
        "hidden_act",
    );
    refused(
        edited("tied", |c| c["model_type"] = "llama".into()).path(),
        "model_type",
    );
    refused(
        edited("tied", |c| c["expand"] = 3.into()).path(),
        "intermediate_size",
    );
    // A config that disagrees with the weights: a shape, or a tensor too many.
    refused(
        edited("tied", |c| c["state_size"] = 5.into()).path(),
        "shape",
    );
    refused(
        edited("tied", |c| {
            c["num_hidden_layers"] = (c["num_hidden_layers"].as_u64().unwrap() - 1).into()
        })
        .path(),
        "does not describe",
    );
    refused(
        edited("tied", |c| {
            c["num_hidden_layers"] = (c["num_hidden_layers"].as_u64().unwrap() + 1).into()
        })
        .path(),
        "missing",
    );
    // An untied config over tied weights has no head to read.
    refused(
        edited("tied", |c| c["tie_word_embeddings"] = false.into()).path(),
        "lm_head.weight is missing",
    );
    // Sizes are bounded before anything is allocated.
    refused(
        edited("tied", |c| {
            c["hidden_size"] = (1u64 << 40).into();
            c["intermediate_size"] = (2u64 << 40).into();
        })
        .path(),
        "limit",
    );
    let big = edited("tied", |_| {});
    std::fs::write(
        big.path().join("config.json"),
        vec![b' '; hf::MAX_CONFIG_BYTES as usize + 1],
    )
    .unwrap();
    match hf::load(big.path(), &Device::Cpu, DType::F32, DType::F32) {
        Err(WorkerError::Checkpoint { .. } | WorkerError::Io { .. }) => {}
        other => panic!("an oversized config.json: {:?}", other.map(|_| ())),
    }
    let garbage = edited("tied", |_| {});
    std::fs::write(garbage.path().join("model.safetensors"), b"not safetensors").unwrap();
    refused(garbage.path(), "not a valid safetensors file");
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tied").join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(sharded.path().join("model.safetensors.index.json"), b"{}").unwrap();
    refused(sharded.path(), "sharded");
}
