//! Checkpoints: bit-exact round trips, resuming with optimizer state, LoRA adapters, and
//! refusal of malformed or mismatched files.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::fs;
use std::path::Path;

use potluck_worker::checkpoint::write_f32_tensors;
use potluck_worker::{
    Dataset, DeviceSpec, LoraConfig, ModelConfig, Replica, SyntheticCorpus, SyntheticSpec,
    TrainConfig, WorkerError,
};

fn train_cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        seq_len: 16,
        seed: 3,
        ..TrainConfig::default()
    }
}

fn data() -> Dataset {
    let corpus = SyntheticCorpus::new(SyntheticSpec::default()).unwrap();
    Dataset::synthetic(&corpus, 20_000, 4_000, 2).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn round_trip_is_bit_exact_and_resume_continues_identically() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::new(&ModelConfig::tiny(), &train_cfg(), &DeviceSpec::Cpu).unwrap();
    a.train_steps(&data, 0, 3).unwrap();
    a.save_checkpoint(dir.path(), true).unwrap();
    let mut b = Replica::load_checkpoint(dir.path(), &DeviceSpec::Cpu).unwrap();
    assert_eq!(b.step(), 3);
    assert_eq!(
        bits(&a.flat_params().unwrap()),
        bits(&b.flat_params().unwrap())
    );
    // With the optimizer state restored, the next steps are the same bit for bit.
    a.train_steps(&data, 1, 2).unwrap();
    b.train_steps(&data, 1, 2).unwrap();
    assert_eq!(
        bits(&a.flat_params().unwrap()),
        bits(&b.flat_params().unwrap())
    );

    // Saving again replaces the old tensor files; a weights-only checkpoint resets AdamW.
    a.save_checkpoint(dir.path(), false).unwrap();
    let files: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let mut c = Replica::load_checkpoint(dir.path(), &DeviceSpec::Cpu).unwrap();
    assert_eq!(
        bits(&a.flat_params().unwrap()),
        bits(&c.flat_params().unwrap())
    );
    a.train_steps(&data, 1, 1).unwrap();
    c.train_steps(&data, 1, 1).unwrap();
    assert_ne!(
        bits(&a.flat_params().unwrap()),
        bits(&c.flat_params().unwrap())
    );
}

#[test]
fn in_memory_checkpoint_files_match_what_is_saved() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let mut a = Replica::new(&ModelConfig::tiny(), &train_cfg(), &DeviceSpec::Cpu).unwrap();
    a.train_steps(&data, 0, 2).unwrap();
    a.save_checkpoint(dir.path(), false).unwrap();
    let flat = a.flat_params().unwrap();
    let mut files = a.checkpoint_files(&flat, a.step()).unwrap();
    files.sort();
    let mut on_disk: Vec<(String, Vec<u8>)> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    on_disk.sort();
    assert_eq!(files, on_disk);
    // Another replica (other seed, other step counter) with the same weights and step writes
    // the same bytes: the swarm names states by them.
    let mut b = Replica::new(
        &ModelConfig::tiny(),
        &TrainConfig {
            seed: 99,
            ..train_cfg()
        },
        &DeviceSpec::Cpu,
    )
    .unwrap();
    b.set_flat_params(&flat).unwrap();
    b.set_step(a.step());
    let mut from_b = b.checkpoint_files(&flat, a.step()).unwrap();
    from_b.sort();
    assert_ne!(
        from_b, files,
        "the train config (seed) is part of config.json"
    );
    let mut same = Replica::new(&ModelConfig::tiny(), &train_cfg(), &DeviceSpec::Cpu).unwrap();
    same.set_flat_params(&flat).unwrap();
    let mut from_same = same.checkpoint_files(&flat, a.step()).unwrap();
    from_same.sort();
    assert_eq!(from_same, files);
    assert!(a.checkpoint_files(&flat[1..], 2).is_err());
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn expect_refused(dir: &Path, what: &str) {
    match Replica::load_checkpoint(dir, &DeviceSpec::Cpu) {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => {
            eprintln!("{what}: {e}");
            assert!(
                matches!(e, WorkerError::Checkpoint { .. } | WorkerError::Io { .. }),
                "{what}: {e:?}"
            );
        }
    }
}

#[test]
fn malformed_and_mismatched_checkpoints_are_refused() {
    let good = tempfile::tempdir().unwrap();
    let r = Replica::new(&ModelConfig::tiny(), &train_cfg(), &DeviceSpec::Cpu).unwrap();
    r.save_checkpoint(good.path(), true).unwrap();
    let copy = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        for e in fs::read_dir(good.path()).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        let _ = name;
        dir
    };
    let weights_of = |dir: &Path| -> std::path::PathBuf {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("weights-")
            })
            .unwrap()
    };

    let d = copy("garbage config");
    fs::write(d.path().join("config.json"), b"{not json").unwrap();
    expect_refused(d.path(), "garbage config");

    let d = copy("missing config");
    fs::remove_file(d.path().join("config.json")).unwrap();
    expect_refused(d.path(), "missing config");

    let d = copy("unknown field");
    edit_config(d.path(), |v| v["surprise"] = serde_json::json!(1));
    expect_refused(d.path(), "unknown field");

    let d = copy("wrong format");
    edit_config(d.path(), |v| v["version"] = serde_json::json!(99));
    expect_refused(d.path(), "wrong format");

    let d = copy("mismatched model");
    edit_config(d.path(), |v| v["model"]["d_model"] = serde_json::json!(128));
    expect_refused(d.path(), "mismatched model");

    let d = copy("invalid model");
    edit_config(d.path(), |v| v["model"]["n_heads"] = serde_json::json!(3));
    expect_refused(d.path(), "invalid model");

    let d = copy("path escape");
    edit_config(d.path(), |v| {
        v["weights"] = serde_json::json!("../weights.safetensors")
    });
    expect_refused(d.path(), "path escape");

    let d = copy("truncated weights");
    let w = weights_of(d.path());
    let bytes = fs::read(&w).unwrap();
    fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    expect_refused(d.path(), "truncated weights");

    let d = copy("garbage weights");
    fs::write(
        weights_of(d.path()),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk",
    )
    .unwrap();
    expect_refused(d.path(), "garbage weights");

    let d = copy("wrong tensors");
    write_f32_tensors(
        &weights_of(d.path()),
        &[("other".into(), vec![2], vec![1.0, 2.0])],
    )
    .unwrap();
    expect_refused(d.path(), "wrong tensors");

    let d = copy("wrong shape");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = r
        .param_layout()
        .into_iter()
        .map(|(n, s)| {
            let len = s.iter().product();
            (n, s, vec![0.0; len])
        })
        .collect();
    let last = tensors.len() - 1;
    tensors[last].1 = vec![1, tensors[last].2.len()];
    write_f32_tensors(&weights_of(d.path()), &tensors).unwrap();
    expect_refused(d.path(), "wrong shape");

    let d = copy("missing optimizer");
    for e in fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("optimizer-")
        {
            fs::remove_file(p).unwrap();
        }
    }
    expect_refused(d.path(), "missing optimizer");
}

#[test]
fn lora_trains_and_saves_only_adapters() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    let base = Replica::new(&cfg, &train_cfg(), &DeviceSpec::Cpu).unwrap();
    let base_file = dir.path().join("base.safetensors");
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = {
        let flat = base.flat_params().unwrap();
        let mut off = 0;
        base.param_layout()
            .into_iter()
            .map(|(n, s)| {
                let len: usize = s.iter().product();
                off += len;
                (n, s, flat[off - len..off].to_vec())
            })
            .collect()
    };
    write_f32_tensors(&base_file, &tensors).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
    };
    let mut r = Replica::new_lora(&cfg, &train_cfg(), &DeviceSpec::Cpu, &base_file, &lora).unwrap();
    assert!(
        r.param_layout()
            .iter()
            .all(|(n, _)| n.ends_with(".lora_a") || n.ends_with(".lora_b"))
    );
    assert!(r.num_params() < base.num_params() / 4);
    let eval_before = r.eval_loss(&data, 2).unwrap();
    // Zero-initialised B: the adapter model starts exactly at the base model.
    assert_eq!(eval_before, base.eval_loss(&data, 2).unwrap());
    let start = r.flat_params().unwrap();
    r.train_steps(&data, 0, 5).unwrap();
    assert_ne!(bits(&start), bits(&r.flat_params().unwrap()));
    // The base file is untouched and not part of the checkpoint.
    let ckpt = dir.path().join("ckpt");
    r.save_checkpoint(&ckpt, true).unwrap();
    let loaded = Replica::load_checkpoint(&ckpt, &DeviceSpec::Cpu).unwrap();
    assert_eq!(
        bits(&r.flat_params().unwrap()),
        bits(&loaded.flat_params().unwrap())
    );
    assert_eq!(
        r.eval_loss(&data, 2).unwrap(),
        loaded.eval_loss(&data, 2).unwrap()
    );
    // A base file of the wrong model is refused.
    let other = ModelConfig { d_model: 32, ..cfg };
    assert!(Replica::new_lora(&other, &train_cfg(), &DeviceSpec::Cpu, &base_file, &lora).is_err());
}
