//! The frozen base of an adapter run as a package that peers fetch from the swarm.
//!
//! An adapter run (`[base]` and `[adapters]` in its manifest) names its base by the root of
//! the base's files hashed as one checkpoint-style content, pinned in the run id beside the
//! data package's root. The package is the base's directory as Hugging Face writes it, under
//! the same file names (`config.json`, `model.safetensors` or `model.safetensors.index.json`
//! and its shards, `tokenizer.json` and the tokenizer's other JSON files when present), so a
//! package directory is itself a base the worker loads.
//!
//! Everything else is the data package's path ([`super::datapack`]), shared rather than
//! copied: the starter checks the files against the pinned root before the run's ledger
//! exists, then copies them (each copy checked) into `runs/<run id>/base/` beside a manifest
//! signed with its coordinator key, which the checkpoint server serves. A replica uses the
//! package it holds, else its own copy at `[base] path` when those files have the pinned
//! root, else fetches the package by root from the coordinator and the replicas the
//! welcome names, verified piece by piece, and keeps it to serve in turn.

use std::path::{Path, PathBuf};

use potluck_coordinator::Hash32;
use potluck_coordinator::manifest::{CheckpointContent, DEFAULT_CHUNK_SIZE, MAX_FILES};
use potluck_worker::TrainConfig;
use potluck_worker::hf::HfConfig;

use super::datapack::{self, PackageSource};
use super::manifest::{BaseSpec, ManifestError, ResolvedRun};
use super::session::TrainError;

/// The package's directory in a run directory.
pub const BASE_DIR: &str = "base";
/// Largest base accepted, all files together: an 8B-parameter base in f32 and its
/// tokenizer fit with room to spare.
pub const MAX_BASE_BYTES: u64 = 64 << 30;
/// Largest non-weight file of a base (`config.json`, the shard index, tokenizer files).
pub const MAX_BASE_JSON_BYTES: u64 = 64 << 20;

fn base_err(e: impl std::fmt::Display) -> ManifestError {
    ManifestError::Base(e.to_string())
}

/// Whether a file of a base's directory belongs in its package.
fn is_base_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || matches!(
            name,
            "config.json"
                | "model.safetensors.index.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
                | "generation_config.json"
        )
}

/// The files of the base at `spec.path` that make its package, as `(name in the package,
/// path here)` in name order; checked for count and size before anything is read.
pub fn base_files(spec: &BaseSpec) -> Result<Vec<(String, PathBuf)>, ManifestError> {
    let dir = Path::new(&spec.path);
    let rd = std::fs::read_dir(dir).map_err(|e| {
        base_err(format!(
            "the base directory '{}' cannot be read: {e}",
            spec.path
        ))
    })?;
    let mut files = Vec::new();
    let mut total = 0u64;
    for e in rd {
        let e = e.map_err(|e| base_err(format!("'{}': {e}", spec.path)))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = e
            .metadata()
            .map_err(|e| base_err(format!("'{}/{name}': {e}", spec.path)))?;
        if !meta.is_file() || !is_base_file(&name) {
            continue;
        }
        if !name.ends_with(".safetensors") && meta.len() > MAX_BASE_JSON_BYTES {
            return Err(base_err(format!(
                "'{}/{name}' is larger than the limit of {MAX_BASE_JSON_BYTES} bytes",
                spec.path
            )));
        }
        total += meta.len();
        if total > MAX_BASE_BYTES {
            return Err(base_err(format!(
                "the base at '{}' is larger than the limit of {MAX_BASE_BYTES} bytes",
                spec.path
            )));
        }
        files.push((name, e.path()));
        if files.len() > MAX_FILES {
            return Err(base_err(format!(
                "the base at '{}' holds more than {MAX_FILES} files",
                spec.path
            )));
        }
    }
    files.sort();
    let has = |n: &str| files.iter().any(|(f, _)| f == n);
    if !has("config.json") || !files.iter().any(|(f, _)| f.ends_with(".safetensors")) {
        return Err(base_err(format!(
            "'{}' is not a Hugging Face base: it needs config.json and model.safetensors \
             (or model.safetensors.index.json and its shards)",
            spec.path
        )));
    }
    Ok(files)
}

/// The root the base at `spec.path` has, hashed from its files where they are.
pub fn base_root(spec: &BaseSpec) -> Result<Hash32, ManifestError> {
    let files = base_files(spec)?;
    Ok(CheckpointContent::of_files(&files, DEFAULT_CHUNK_SIZE)
        .map_err(base_err)?
        .root())
}

/// `spec` with its root and vocabulary pinned, as the run's starter publishes it: the
/// files' root (checked against the root already written, if any), and the base's
/// `config.json` read and checked (an unsupported architecture is refused by name, and
/// sequences of `inner.seq_len` must fit its positions).
pub fn pin_base(mut spec: BaseSpec, inner: &TrainConfig) -> Result<BaseSpec, ManifestError> {
    let root = base_root(&spec)?.to_hex();
    if !spec.root.is_empty() && spec.root != root {
        return Err(base_err(format!(
            "the files of '{}' have the root {root}, but the run expects {}: this is not \
             the run's base (another model, another revision or a damaged copy)",
            spec.path, spec.root
        )));
    }
    spec.root = root;
    let cfg = HfConfig::from_file(&Path::new(&spec.path).join("config.json"))
        .map_err(|e| base_err(format!("'{}': {e}", spec.path)))?;
    if inner.seq_len + 1 > cfg.max_positions {
        return Err(ManifestError::Invalid {
            key: "inner.seq_len",
            reason: format!(
                "{} needs {} positions, the base has {} (max_position_embeddings)",
                inner.seq_len,
                inner.seq_len + 1,
                cfg.max_positions
            ),
        });
    }
    spec.vocab = cfg.vocab;
    Ok(spec)
}

/// The tokenizer an adapter run's data is read with: the base's own `tokenizer.json` when
/// `data.tokenizer` is left out and the base has one (bytes when it has none), and the one
/// `data.tokenizer` names only when it is byte for byte the base's. The base reads the ids
/// of its own tokenizer: text tokenized otherwise would train the adapters on ids that mean
/// other tokens to the base.
pub fn data_tokenizer(
    base: &BaseSpec,
    data: &super::manifest::DataSpec,
) -> Result<Option<String>, ManifestError> {
    let own = Path::new(&base.path).join(super::datapack::TOKENIZER_FILE);
    let has_own = own.is_file();
    match (&data.tokenizer, has_own) {
        (None, true) => Ok(Some(own.display().to_string())),
        (None, false) => Ok(None),
        (Some(t), true) => {
            let read = |p: &Path| {
                crate::fsutil::read_limited(p, MAX_BASE_JSON_BYTES)
                    .map_err(|e| base_err(format!("{}: {e}", p.display())))
            };
            if read(Path::new(t))? != read(&own)? {
                return Err(ManifestError::Invalid {
                    key: "data.tokenizer",
                    reason: format!(
                        "'{t}' is not the base's tokenizer.json ({}): the base reads the ids \
                         of its own tokenizer; leave data.tokenizer out to use it",
                        own.display()
                    ),
                });
            }
            Ok(Some(t.clone()))
        }
        (Some(t), false) => Err(ManifestError::Invalid {
            key: "data.tokenizer",
            reason: format!(
                "the base at '{}' has no tokenizer.json to check '{t}' against: put the \
                 base's tokenizer.json beside its config.json",
                base.path
            ),
        }),
    }
}

/// The base's root as the run pins it; `None` for a run of the worker's own model.
pub fn pinned_root(run: &ResolvedRun) -> Result<Option<Hash32>, TrainError> {
    let Some(base) = &run.base else {
        return Ok(None);
    };
    hex::decode(&base.root)
        .ok()
        .and_then(|b| Hash32::from_slice("base root", &b).ok())
        .map(Some)
        .ok_or_else(|| {
            TrainError::Other(format!(
                "the run's base root {:?} is not a hash: pin the run before starting it",
                base.root
            ))
        })
}

/// What [`datapack::write_checked_package`] copies into `dest` for the run's base, checked
/// against the pinned root: `None` for a run without a base or when `dest` already holds
/// the package intact; an error when the base's files no longer have the pinned root.
pub fn check_base_source(
    dest: &Path,
    run: &ResolvedRun,
) -> Result<Option<PackageSource>, TrainError> {
    let (Some(root), Some(base)) = (pinned_root(run)?, &run.base) else {
        return Ok(None);
    };
    datapack::check_source(dest, root, "base", &base.path, || Ok(base_files(base)?))
}

/// Whether this peer's own copy of the base at `[base] path` has the pinned root; the
/// reason when it has not (absent, another root).
pub fn own_copy_matches(spec: &BaseSpec, root: Hash32) -> Result<(), String> {
    match base_root(spec) {
        Ok(r) if r == root => Ok(()),
        Ok(r) => Err(format!(
            "this peer's copy at '{}' has the root {}, not {}",
            spec.path,
            r.short(),
            root.short()
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::RunManifest;
    use potluck_worker::adapters::{LlamaShape, write_random_llama};

    fn shape() -> LlamaShape {
        LlamaShape {
            vocab: 256,
            hidden: 16,
            intermediate: 32,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            max_positions: 64,
        }
    }

    fn manifest(base: &Path, text: &Path, extra: &str) -> String {
        format!(
            "name = \"a\"\n{extra}[data]\nsource = {:?}\ntrain_bytes = 0\neval_bytes = 0\n\
             shards = 2\neval_fraction = 0.1\n[inner]\nseq_len = 16\n[base]\npath = {:?}\n\
             [adapters]\nrank = 2\nalpha = 4.0\ndropout = 0.0\n\
             target_modules = [\"q_proj\", \"v_proj\"]\n",
            text.display().to_string(),
            base.display().to_string()
        )
    }

    fn setup(dir: &Path) -> (PathBuf, PathBuf) {
        let base = dir.join("base");
        write_random_llama(&base, &shape(), 1).unwrap();
        let text = dir.join("text.txt");
        std::fs::write(&text, "hello adapters ".repeat(100)).unwrap();
        (base, text)
    }

    #[test]
    fn the_base_root_is_pinned_in_the_run_id_and_a_changed_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (base, text) = setup(dir.path());
        let run = RunManifest::parse(&manifest(&base, &text, ""))
            .unwrap()
            .resolve()
            .unwrap();
        assert!(run.is_adapter_run() && !run.is_pinned());
        let pinned = run.clone().pin_data().unwrap();
        assert!(pinned.is_pinned());
        let b = pinned.base.as_ref().unwrap();
        assert_eq!((b.root.len(), b.vocab), (64, 256));
        let root = pinned_root(&pinned).unwrap().unwrap();
        assert_eq!(base_root(b).unwrap(), root);
        // The id covers the root.
        let mut other = pinned.clone();
        other.base.as_mut().unwrap().root = "00".repeat(32);
        assert_ne!(other.id(), pinned.id());
        // Files that do not have the pinned root: refused at pin, and at package time.
        write_random_llama(&base, &shape(), 2).unwrap();
        let err = other.clone().pin_data().unwrap_err().to_string();
        assert!(err.contains("not the run's base"), "{err}");
        let err = check_base_source(&dir.path().join("pack"), &pinned)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed since the run was started"), "{err}");
        assert!(own_copy_matches(b, root).is_err());
    }

    #[test]
    fn the_data_is_read_with_the_bases_own_tokenizer_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let (base, text) = setup(dir.path());
        let tok = crate::train::manifest::tests::TOKENIZER_JSON;
        std::fs::write(base.join("tokenizer.json"), tok).unwrap();
        // Left out: the base's own, in the data package like any tokenizer.
        let run = RunManifest::parse(&manifest(&base, &text, ""))
            .unwrap()
            .resolve()
            .unwrap()
            .pin_data()
            .unwrap();
        let used = run.data.tokenizer.clone().unwrap();
        assert_eq!(Path::new(&used), base.join("tokenizer.json"));
        let (data, _) = run.load_data().unwrap();
        assert_eq!(data.vocab(), 4, "the word-level tokenizer's ids");
        // Another tokenizer is refused, saying what to do.
        let other = dir.path().join("other.json");
        std::fs::write(&other, tok.replace("\"!\": 3", "\"?\": 3")).unwrap();
        let with_other = manifest(&base, &text, "").replace(
            "eval_fraction = 0.1\n",
            &format!(
                "eval_fraction = 0.1\ntokenizer = {:?}\n",
                other.display().to_string()
            ),
        );
        let err = RunManifest::parse(&with_other)
            .unwrap()
            .resolve()
            .unwrap()
            .pin_data()
            .unwrap_err()
            .to_string();
        assert!(err.contains("leave data.tokenizer out"), "{err}");
    }

    #[test]
    fn the_example_manifest_resolves_to_an_adapter_run() {
        let text = include_str!("../../../docs/examples/adapters.toml");
        let run = RunManifest::parse(text).unwrap().resolve().unwrap();
        assert!(run.is_adapter_run() && !run.is_pinned());
        assert_eq!(run.adapters.as_ref().unwrap().rank, 8);
    }

    #[test]
    fn manifests_without_their_other_half_or_with_an_unknown_architecture_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (base, text) = setup(dir.path());
        let full = manifest(&base, &text, "");
        let no_adapters = full.split("[adapters]").next().unwrap();
        let err = RunManifest::parse(no_adapters)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("[adapters]"), "{err}");
        let err = RunManifest::parse(&manifest(&base, &text, "model = \"tiny\"\n"))
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("leave `model` out"), "{err}");
        let bad_quant = full.replace("dropout = 0.0\n", "dropout = 0.0\nquant = \"fp4\"\n");
        let err = RunManifest::parse(&bad_quant)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nf4"), "{err}");
        // Sequences longer than the base's positions (64) are refused when pinned.
        let long = full.replace("seq_len = 16", "seq_len = 100");
        let err = RunManifest::parse(&long)
            .unwrap()
            .resolve()
            .unwrap()
            .pin_data()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
        // An architecture the loader does not implement is named.
        let cfg = base.join("config.json");
        let text_cfg = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text_cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
        )
        .unwrap();
        let err = RunManifest::parse(&full)
            .unwrap()
            .resolve()
            .unwrap()
            .pin_data()
            .unwrap_err()
            .to_string();
        assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
        // A directory that is no base.
        std::fs::remove_file(base.join("model.safetensors")).unwrap();
        let err = base_files(&BaseSpec {
            path: base.display().to_string(),
            root: String::new(),
            vocab: 0,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
