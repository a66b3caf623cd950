//! `potluck sample` run as the real binary: on the tiny Llama fixture (with a word-level
//! tokenizer.json written next to a copy of it) greedy and seeded top-p output equal
//! `hf::generate` called directly; an adapter directory written by `hf::export` changes the
//! output to exactly the in-memory adapted model's; a Potluck checkpoint samples as
//! `potluck_worker::sample` does; and each way the files or flags can be wrong is a
//! clear error with a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use potluck_worker::hf::generate::{GenerateConfig, Sampling, generate};
use potluck_worker::hf::{self, HfLoraConfig, HfModel};
use potluck_worker::sample::SampleConfig;
use potluck_worker::{DeviceSpec, ModelConfig, Replica, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BIN: &str = env!("CARGO_BIN_EXE_potluck");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/hf/llama")
}

/// A word-level tokenizer: `w0`..`w{n-2}` are ids 0..n-1, `[UNK]` is id n-1.
fn tokenizer_json(n: usize) -> String {
    let mut vocab = serde_json::Map::new();
    for i in 0..n - 1 {
        vocab.insert(format!("w{i}"), serde_json::json!(i));
    }
    vocab.insert("[UNK]".into(), serde_json::json!(n - 1));
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    })
    .to_string()
}

/// A copy of the fixture (config.json, model.safetensors) with a tokenizer.json for its
/// 64-token vocabulary, in `parent/name`.
fn base(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.join(f)).expect("copy fixture");
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(64)).expect("tokenizer");
    dir
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn potluck(args: &[&str]) -> Out {
    let out = Command::new(BIN)
        .arg("sample")
        .args(args)
        .output()
        .expect("run potluck");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs with `--json` and returns (prompt ids, generated ids, text, stop, model kind).
fn sample_json(args: &[&str]) -> (Vec<u32>, Vec<u32>, String, String, String) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = potluck(&all);
    assert!(out.ok, "potluck sample failed: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json output");
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .expect(k)
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let s = |k: &str| v[k].as_str().expect(k).to_string();
    (
        ids("prompt_tokens"),
        ids("tokens"),
        s("text"),
        s("stop"),
        s("model"),
    )
}

/// A refused run: non-zero exit, an `error:` line containing `want`, no panic.
fn refused(args: &[&str], want: &str) {
    let out = potluck(args);
    assert!(!out.ok, "{args:?} succeeded: {}", out.stdout);
    assert!(
        !out.stderr.contains("panicked"),
        "{args:?} panicked: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("error:") && out.stderr.contains(want),
        "{args:?}: expected an error containing {want:?}, got: {}",
        out.stderr
    );
}

fn expected(model: &HfModel, prompt: &[u32], n: usize, sampling: Sampling) -> Vec<u32> {
    let cfg = GenerateConfig {
        max_new_tokens: n,
        sampling,
        // The fixture's eos_token_id.
        eos: Some(2),
    };
    generate(model, prompt, &cfg).expect("generate")
}

/// Rank-4 adapters on q/v/down with random nonzero `B`s, so they change the output.
fn adapt(model: &mut HfModel) {
    let mut cfg = HfLoraConfig::new(&["q_proj", "v_proj", "down_proj"]);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    cfg.seed = 3;
    model.attach_lora(&cfg).expect("attach");
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for (n, v) in model.lora_params() {
        if n.ends_with("lora_B.weight") {
            let b: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random::<f32>() - 0.5)
                .collect();
            v.set(&Tensor::from_vec(b, v.shape(), &Device::Cpu).expect("b"))
                .expect("set");
        }
    }
}

fn words(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn greedy_and_seeded_samples_of_a_base_equal_hf_generate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = base(tmp.path(), "llama");
    let model = hf::load_model(&dir, None, &Device::Cpu).expect("load");
    let prompt = [5u32, 9, 14];
    let args = [p(&dir), "--prompt", "w5 w9 w14", "--max-new-tokens", "12"];

    let greedy = [&args[..], &["--greedy"]].concat();
    let (ids, tokens, text, stop, kind) = sample_json(&greedy);
    assert_eq!(ids, prompt);
    assert_eq!(kind, "hf_base");
    let want = expected(&model, &prompt, 12, Sampling::Greedy);
    assert_eq!(
        tokens, want,
        "the binary's greedy tokens are hf::generate's"
    );
    assert_eq!(text, words(&[&prompt[..], &want].concat()));
    let ended = if want.last() == Some(&2) {
        "eos"
    } else {
        "length"
    };
    assert_eq!(stop, ended);
    assert_eq!(
        sample_json(&greedy).1,
        tokens,
        "greedy output is deterministic"
    );
    // The plain output is the decoded text.
    let out = potluck(&greedy);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.trim_end(), text);

    let seeded = [&args[..], &["--top-p", "0.8", "--temperature", "1.5"]].concat();
    let with_seed = |s: &str| sample_json(&[&seeded[..], &["--seed", s]].concat()).1;
    let rule = |seed| Sampling::TopP {
        top_p: 0.8,
        temperature: 1.5,
        seed,
    };
    let a = with_seed("7");
    assert_eq!(a, expected(&model, &prompt, 12, rule(7)));
    assert_eq!(with_seed("7"), a, "a seed reproduces its sample");
    assert_eq!(with_seed("8"), expected(&model, &prompt, 12, rule(8)));
}

#[test]
fn a_base_fills_at_most_its_context() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = base(tmp.path(), "llama");
    // 60 prompt tokens in a context of 64: four new tokens at most, and a note.
    let prompt = vec!["w7"; 60].join(" ");
    let args = [p(&dir), "--prompt", &prompt, "--greedy"];
    let (_, tokens, _, stop, _) = sample_json(&args);
    let model = hf::load_model(&dir, None, &Device::Cpu).expect("load");
    assert_eq!(tokens, expected(&model, &[7; 60], 4, Sampling::Greedy));
    if tokens.last() != Some(&2) {
        assert_eq!(stop, "context");
        let out = potluck(&args);
        assert!(out.ok, "{}", out.stderr);
        assert!(
            out.stderr.contains("end of the model's context"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn exported_adapters_change_the_output_to_the_adapted_models() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = base(tmp.path(), "llama");
    let base_model = hf::load_model(&dir, None, &Device::Cpu).expect("load");
    let mut adapted = hf::load_model(&dir, None, &Device::Cpu).expect("load");
    adapt(&mut adapted);
    let adapters = tmp.path().join("adapters");
    hf::export::export_peft(&adapted, "tiny-llama", &adapters).expect("export");

    let prompt = [5u32, 9, 14];
    let want_base = expected(&base_model, &prompt, 16, Sampling::Greedy);
    let want = expected(&adapted, &prompt, 16, Sampling::Greedy);
    assert_ne!(
        want, want_base,
        "the adapters must change the greedy text for this test to mean anything"
    );
    let (_, tokens, _, _, kind) = sample_json(&[
        p(&dir),
        "--prompt",
        "w5 w9 w14",
        "--adapters",
        p(&adapters),
        "--greedy",
        "--max-new-tokens",
        "16",
    ]);
    assert_eq!(kind, "hf_adapted");
    assert_eq!(tokens, want, "the binary's tokens are the adapted model's");
    assert_ne!(tokens, want_base);
}

/// Copies `from` to `to` with `edit` applied to its `adapter_config.json`.
fn edited_adapters(from: &Path, to: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in [hf::export::ADAPTER_CONFIG, hf::export::ADAPTER_WEIGHTS] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
    let path = to.join(hf::export::ADAPTER_CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&path, v.to_string()).expect("write");
}

#[test]
fn bad_paths_files_and_flags_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let dir = base(t, "llama");
    let d = p(&dir);
    let prompt = ["--prompt", "w1 w2", "--greedy"];
    let run = |path: &str, extra: &[&str], want: &str| {
        refused(&[&[path][..], &prompt[..], extra].concat(), want);
    };

    // No model there.
    run(p(&t.join("nope")), &[], "does not exist");
    std::fs::create_dir(t.join("empty")).expect("mkdir");
    run(p(&t.join("empty")), &[], "has no config.json");
    let huge = base(t, "huge");
    std::fs::File::options()
        .append(true)
        .open(huge.join("config.json"))
        .and_then(|f| f.set_len(4 << 20))
        .expect("grow config.json");
    run(p(&huge), &[], "has a config.json of more than");

    // An architecture the loader does not implement, named.
    let gpt2 = base(t, "gpt2");
    let cfg = std::fs::read_to_string(gpt2.join("config.json")).expect("read");
    std::fs::write(
        gpt2.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .expect("write");
    run(p(&gpt2), &[], "unsupported architecture");

    // Corrupted weights: a truncated file, and a header that claims more than the file.
    let short = base(t, "truncated");
    let bytes = std::fs::read(short.join("model.safetensors")).expect("read");
    std::fs::write(short.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    run(p(&short), &[], "bad safetensors");
    let header = base(t, "header");
    let mut bytes = bytes.clone();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(header.join("model.safetensors"), &bytes).expect("write");
    run(p(&header), &[], "bad safetensors");

    // A prompt past the context (64 positions).
    let long = vec!["w3"; 70].join(" ");
    refused(&[d, "--prompt", &long], "shorten the prompt");

    // A tokenizer that is not this model's: ids past its vocabulary of 64.
    let big = t.join("big-tokenizer.json");
    std::fs::write(&big, tokenizer_json(200)).expect("write");
    refused(
        &[d, "--tokenizer", p(&big), "--prompt", "w150"],
        "past the model's vocabulary",
    );
    // No tokenizer at all.
    std::fs::remove_file(gpt2.join("tokenizer.json")).expect("rm");
    std::fs::write(
        gpt2.join("config.json"),
        std::fs::read(dir.join("config.json")).expect("read"),
    )
    .expect("write");
    run(
        p(&gpt2),
        &[],
        "pass the model's tokenizer.json with --tokenizer",
    );

    // Flags out of range.
    refused(&[d, "--prompt", "w1", "--top-p", "0"], "--top-p");
    refused(
        &[d, "--prompt", "w1", "--temperature", "0"],
        "--temperature",
    );
    refused(&[d, "--prompt", "", "--greedy"], "--prompt is empty");
    refused(
        &[d, "--prompt", "w1", "--max-new-tokens", "0"],
        "--max-new-tokens",
    );

    // Adapters that do not fit: another rank than their tensors, a module the base lacks,
    // truncated weights, a missing directory.
    let mut adapted = hf::load_model(&dir, None, &Device::Cpu).expect("load");
    adapt(&mut adapted);
    let good = t.join("adapters");
    hf::export::export_peft(&adapted, "tiny-llama", &good).expect("export");
    let rank = t.join("rank");
    edited_adapters(&good, &rank, |v| v["r"] = serde_json::json!(8));
    run(
        d,
        &["--adapters", p(&rank)],
        "does not describe these weights",
    );
    let module = t.join("module");
    edited_adapters(&good, &module, |v| {
        v["target_modules"] = serde_json::json!(["c_attn"])
    });
    run(d, &["--adapters", p(&module)], "match no projection");
    let cut = t.join("cut");
    edited_adapters(&good, &cut, |_| {});
    let w = cut.join(hf::export::ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&w).expect("read");
    std::fs::write(&w, &bytes[..bytes.len() - 100]).expect("write");
    run(d, &["--adapters", p(&cut)], "bad safetensors file");
    std::fs::remove_file(cut.join(hf::export::ADAPTER_CONFIG)).expect("rm");
    run(d, &["--adapters", p(&cut)], "has no adapter_config.json");
    run(d, &["--adapters", p(&t.join("none"))], "is not a directory");
}

#[test]
fn a_checkpoint_samples_as_the_worker_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ckpt = tmp.path().join("ckpt");
    let replica = Replica::new(
        &ModelConfig::tiny(),
        &TrainConfig::default(),
        &DeviceSpec::Cpu,
    )
    .expect("replica");
    replica.save_checkpoint(&ckpt, false).expect("save");
    let prompt: Vec<u32> = b"hello".iter().map(|&b| u32::from(b)).collect();
    let want = |temperature, top_p, seed| {
        potluck_worker::sample::sample(
            replica.model().expect("a native checkpoint"),
            &prompt,
            &SampleConfig {
                max_new_tokens: 10,
                temperature,
                top_p,
                seed,
            },
        )
        .expect("sample")
    };
    let args = [p(&ckpt), "--prompt", "hello", "--max-new-tokens", "10"];
    let (ids, tokens, _, _, kind) = sample_json(&[&args[..], &["--greedy"]].concat());
    assert_eq!(kind, "checkpoint");
    assert_eq!(ids, prompt);
    assert_eq!(tokens, want(0.0, 1.0, 0));
    let (_, tokens, _, _, _) =
        sample_json(&[&args[..], &["--top-p", "0.5", "--seed", "4"]].concat());
    assert_eq!(tokens, want(1.0, 0.5, 4));
    refused(
        &[&args[..], &["--adapters", p(tmp.path())]].concat(),
        "applies to Hugging Face bases",
    );
}
