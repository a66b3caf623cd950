//! The benchmarks' real-text corpus: the sources of the crates that the workspace's
//! `Cargo.lock` pins, exactly as cargo unpacks them, so every machine that can build the
//! workspace rebuilds the same bytes without any download beyond crates.io.
//!
//! What is in it, fixed so that the hash means the same everywhere:
//! - crates: every `[[package]]` of the lock file whose `source` is a registry
//!   (`registry+...` or `sparse+...`), found as `NAME-VERSION/` in one of the index folders
//!   under cargo's registry source directory (`$CARGO_HOME/registry/src/*/`, the first in
//!   name order that has it). A missing crate is an error naming it and the command that
//!   fetches it (`cargo fetch --locked`, which unpacks every locked crate for every target;
//!   a plain build unpacks only the host's);
//! - files: regular files (symbolic links are not followed) ending in `.rs`, `.md` or
//!   `.toml` (so `Cargo.toml` as published, not `Cargo.toml.orig`), of at most
//!   [`MAX_FILE_BYTES`] each (larger ones, mostly generated bindings, are left out and
//!   counted), in the order of their path `NAME-VERSION/relative/path` compared as bytes;
//! - split: a file is held out when the first 8 bytes of the blake3 hash of that path, as a
//!   little-endian integer, modulo 1000 fall below `eval_permille` (5% by default); a file
//!   is in exactly one split, whatever else the corpus holds;
//! - each split is the concatenation of its files' bytes, each followed by one `\n`; its
//!   blake3 hash is the hash of that stream, the bytes the model reads.
//!
//! Tokens are bytes (vocabulary 256): nothing else to train or pin.

use std::path::{Path, PathBuf};

use serde_json::json;

/// Files larger than this are left out of the corpus.
pub const MAX_FILE_BYTES: u64 = 256 << 10;
/// A lock file larger than this is refused before it is read.
pub const MAX_LOCK_BYTES: u64 = 16 << 20;
/// Directory levels below a crate's root that are searched.
const MAX_DEPTH: usize = 32;
/// The extensions taken.
pub const EXTENSIONS: [&str; 3] = ["rs", "md", "toml"];

/// Why the corpus could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The lock file cannot be read or parsed.
    #[error("lock file {path}: {reason}")]
    Lock { path: PathBuf, reason: String },
    /// A locked crate is not unpacked.
    #[error(
        "crate {name} {version}, pinned by {lock}, is not unpacked under {src}/*/{name}-{version}: \
         run `cargo fetch --locked` in the workspace (it unpacks every locked crate)"
    )]
    Missing {
        name: String,
        version: String,
        lock: PathBuf,
        src: PathBuf,
    },
    /// A file or directory cannot be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A saved corpus does not match the hashes saved beside it.
    #[error("saved corpus in {dir}: {reason}")]
    Saved { dir: PathBuf, reason: String },
    /// The selection holds nothing in one of the splits.
    #[error("the corpus is empty or has an empty split: {0}")]
    Empty(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to build the corpus from.
#[derive(Clone, Debug)]
pub struct CorpusSpec {
    /// The workspace's `Cargo.lock`.
    pub lock: PathBuf,
    /// Cargo's registry source directory (`$CARGO_HOME/registry/src`).
    pub registry_src: PathBuf,
    /// Only the locked crates of these names (for tests and smoke runs); `None`: all.
    pub only: Option<Vec<String>>,
    /// Held-out files per thousand.
    pub eval_permille: u32,
}

impl CorpusSpec {
    /// Every locked crate of `lock`, from the registry source directory of `$CARGO_HOME`
    /// (or `$HOME/.cargo`), 5% of files held out.
    pub fn new(lock: PathBuf) -> Self {
        CorpusSpec {
            lock,
            registry_src: default_registry_src(),
            only: None,
            eval_permille: 50,
        }
    }
}

/// `$CARGO_HOME/registry/src`, or `$HOME/.cargo/registry/src` without `CARGO_HOME`.
pub fn default_registry_src() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    home.join("registry").join("src")
}

/// The built corpus.
#[derive(Clone, Debug, Default)]
pub struct Corpus {
    /// The training split's bytes.
    pub train: Vec<u8>,
    /// The held-out split's bytes.
    pub eval: Vec<u8>,
    /// Paths (`NAME-VERSION/relative`) of the training split's files, in order.
    pub train_files: Vec<String>,
    /// Paths of the held-out split's files, in order.
    pub eval_files: Vec<String>,
    /// Crates read.
    pub crates: usize,
    /// Files of a taken extension left out for their size.
    pub skipped_large: usize,
}

impl Corpus {
    /// Reads the crates of `spec`.
    pub fn build(spec: &CorpusSpec) -> Result<Corpus, CorpusError> {
        let locked = locked_crates(&spec.lock)?;
        let selected: Vec<&(String, String)> = locked
            .iter()
            .filter(|(n, _)| spec.only.as_ref().is_none_or(|o| o.contains(n)))
            .collect();
        if let Some(only) = &spec.only
            && let Some(n) = only.iter().find(|n| !locked.iter().any(|(l, _)| l == *n))
        {
            return Err(CorpusError::Empty(format!(
                "{n} is not a registry crate of {}",
                spec.lock.display()
            )));
        }
        let indexes = index_dirs(&spec.registry_src)?;
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        let mut skipped_large = 0;
        for (name, version) in &selected {
            let dir_name = format!("{name}-{version}");
            let root = indexes
                .iter()
                .map(|i| i.join(&dir_name))
                .find(|d| d.is_dir())
                .ok_or_else(|| CorpusError::Missing {
                    name: name.clone(),
                    version: version.clone(),
                    lock: spec.lock.clone(),
                    src: spec.registry_src.clone(),
                })?;
            walk(&root, &dir_name, 0, &mut files, &mut skipped_large)?;
        }
        files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut c = Corpus {
            crates: selected.len(),
            skipped_large,
            ..Corpus::default()
        };
        for (rel, path) in files {
            // The size was checked while walking; a file that grew since is refused here.
            let bytes = read_capped(&path)?;
            let (out, names) = if held_out(&rel, spec.eval_permille) {
                (&mut c.eval, &mut c.eval_files)
            } else {
                (&mut c.train, &mut c.train_files)
            };
            out.extend_from_slice(&bytes);
            out.push(b'\n');
            names.push(rel);
        }
        if c.train.is_empty() || c.eval.is_empty() {
            return Err(CorpusError::Empty(format!(
                "{} training and {} held-out files from {} crates",
                c.train_files.len(),
                c.eval_files.len(),
                c.crates
            )));
        }
        Ok(c)
    }

    /// blake3 of the training split, hex.
    pub fn train_hash(&self) -> String {
        blake3::hash(&self.train).to_hex().to_string()
    }

    /// blake3 of the held-out split, hex.
    pub fn eval_hash(&self) -> String {
        blake3::hash(&self.eval).to_hex().to_string()
    }

    /// What a result names the corpus by: hashes, sizes and the tokenizer.
    pub fn describe(&self) -> serde_json::Value {
        json!({
            "corpus": "crates pinned by Cargo.lock",
            "tokens": "bytes",
            "crates": self.crates,
            "train_files": self.train_files.len(),
            "eval_files": self.eval_files.len(),
            "train_bytes": self.train.len(),
            "eval_bytes": self.eval.len(),
            "skipped_large_files": self.skipped_large,
            "train_blake3": self.train_hash(),
            "eval_blake3": self.eval_hash(),
        })
    }
}

/// A saved split larger than this is refused before it is read.
pub const MAX_SAVED_SPLIT_BYTES: u64 = 4 << 30;

impl Corpus {
    /// Writes the two splits (`train.bin`, `eval.bin`) and their description with the
    /// hashes (`corpus.json`) into `dir`, each written to a temporary name, synced and
    /// renamed: a machine without the crate sources (the GPU machine) loads them with
    /// [`Corpus::load`].
    pub fn save(&self, dir: &Path) -> Result<(), CorpusError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut info = self.describe();
        info["train_list"] = json!(self.train_files);
        info["eval_list"] = json!(self.eval_files);
        let json_bytes = serde_json::to_vec_pretty(&info).map_err(|e| CorpusError::Saved {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        for (name, bytes) in [
            ("train.bin", &self.train[..]),
            ("eval.bin", &self.eval[..]),
            ("corpus.json", &json_bytes[..]),
        ] {
            write_atomic(&dir.join(name), bytes)?;
        }
        Ok(())
    }

    /// Reads what [`Corpus::save`] wrote, refusing splits whose blake3 differs from the
    /// hashes saved beside them.
    pub fn load(dir: &Path) -> Result<Corpus, CorpusError> {
        let bad = |reason: String| CorpusError::Saved {
            dir: dir.to_path_buf(),
            reason,
        };
        let read = |name: &str, cap: u64| -> Result<Vec<u8>, CorpusError> {
            use std::io::Read;
            let path = dir.join(name);
            let f = std::fs::File::open(&path).map_err(io(&path))?;
            let mut bytes = Vec::new();
            f.take(cap + 1).read_to_end(&mut bytes).map_err(io(&path))?;
            if bytes.len() as u64 > cap {
                return Err(bad(format!("{name} is larger than {cap} bytes")));
            }
            Ok(bytes)
        };
        let info: serde_json::Value = serde_json::from_slice(&read("corpus.json", 64 << 20)?)
            .map_err(|e| bad(format!("corpus.json: {e}")))?;
        let list = |k: &str| -> Result<Vec<String>, CorpusError> {
            serde_json::from_value(info[k].clone()).map_err(|e| bad(format!("{k}: {e}")))
        };
        let c = Corpus {
            train: read("train.bin", MAX_SAVED_SPLIT_BYTES)?,
            eval: read("eval.bin", MAX_SAVED_SPLIT_BYTES)?,
            train_files: list("train_list")?,
            eval_files: list("eval_list")?,
            crates: info["crates"].as_u64().unwrap_or(0) as usize,
            skipped_large: info["skipped_large_files"].as_u64().unwrap_or(0) as usize,
        };
        for (k, got) in [
            ("train_blake3", c.train_hash()),
            ("eval_blake3", c.eval_hash()),
        ] {
            if info[k].as_str() != Some(got.as_str()) {
                return Err(bad(format!("{k} is {got}, corpus.json says {}", info[k])));
            }
        }
        Ok(c)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CorpusError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Whether the file at `rel` is held out (see the module's documentation).
pub fn held_out(rel: &str, eval_permille: u32) -> bool {
    let h = blake3::hash(rel.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first) % 1000 < u64::from(eval_permille)
}

/// The (name, version) of every registry package of a lock file, in its order.
pub fn locked_crates(lock: &Path) -> Result<Vec<(String, String)>, CorpusError> {
    let bad = |reason: String| CorpusError::Lock {
        path: lock.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(lock).map_err(io(lock))?.len();
    if len > MAX_LOCK_BYTES {
        return Err(bad(format!("{len} bytes, above {MAX_LOCK_BYTES}")));
    }
    let text = std::fs::read_to_string(lock).map_err(io(lock))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let packages = match table.get("package") {
        Some(toml::Value::Array(p)) => p,
        _ => return Err(bad("no [[package]] entries".into())),
    };
    let mut out = Vec::new();
    for p in packages {
        let field = |k: &str| p.get(k).and_then(|v| v.as_str());
        let Some(source) = field("source") else {
            continue; // a workspace member or a path dependency
        };
        if !(source.starts_with("registry+") || source.starts_with("sparse+")) {
            continue;
        }
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            return Err(bad("a package without a name or version".into()));
        };
        // The names become path components: refuse anything that could leave the folder.
        let safe = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
                && !s.starts_with('.')
        };
        if !safe(name) || !safe(version) {
            return Err(bad(format!(
                "package {name:?} {version:?} is not a crate name"
            )));
        }
        out.push((name.to_string(), version.to_string()));
    }
    Ok(out)
}

/// The index folders under the registry source directory, in name order.
fn index_dirs(src: &Path) -> Result<Vec<PathBuf>, CorpusError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(src).map_err(io(src))? {
        let e = e.map_err(io(src))?;
        if e.file_type().map_err(io(src))?.is_dir() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

fn walk(
    dir: &Path,
    rel: &str,
    depth: usize,
    out: &mut Vec<(String, PathBuf)>,
    skipped_large: &mut usize,
) -> Result<(), CorpusError> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let ty = e.file_type().map_err(io(dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue; // a name that is not UTF-8 has no stable path string
        };
        let child = format!("{rel}/{name}");
        if ty.is_dir() {
            walk(&e.path(), &child, depth + 1, out, skipped_large)?;
        } else if ty.is_file() {
            let ext = Path::new(&name).extension().and_then(|x| x.to_str());
            if !ext.is_some_and(|x| EXTENSIONS.contains(&x)) {
                continue;
            }
            if e.metadata().map_err(io(dir))?.len() > MAX_FILE_BYTES {
                *skipped_large += 1;
                continue;
            }
            out.push((child, e.path()));
        }
    }
    Ok(())
}

fn read_capped(path: &Path) -> Result<Vec<u8>, CorpusError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(CorpusError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("grew past the size cap while the corpus was read"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workspace's own lock file.
    fn lock() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock")
    }

    /// A few small crates the workspace pins (any build of it unpacks them).
    fn few() -> CorpusSpec {
        CorpusSpec {
            only: Some(vec!["anyhow".into(), "hex".into(), "thiserror".into()]),
            ..CorpusSpec::new(lock())
        }
    }

    #[test]
    fn two_builds_hash_the_same() {
        let a = Corpus::build(&few()).unwrap();
        let b = Corpus::build(&few()).unwrap();
        assert_eq!(a.train_hash(), b.train_hash());
        assert_eq!(a.eval_hash(), b.eval_hash());
        assert_eq!(a.train_files, b.train_files);
        assert!(a.crates >= 3, "thiserror may be locked at two versions");
        assert!(a.train.len() > 10_000);
    }

    #[test]
    fn the_split_is_by_file_and_disjoint() {
        let c = Corpus::build(&CorpusSpec {
            eval_permille: 300,
            ..few()
        })
        .unwrap();
        assert!(!c.eval_files.is_empty() && !c.train_files.is_empty());
        for f in &c.eval_files {
            assert!(held_out(f, 300));
            assert!(!c.train_files.contains(f), "{f} in both splits");
        }
        assert!(c.train_files.iter().all(|f| !held_out(f, 300)));
        // Sorted by path, and only the documented extensions.
        let mut sorted = c.train_files.clone();
        sorted.sort();
        assert_eq!(sorted, c.train_files);
        assert!(
            c.train_files
                .iter()
                .all(|f| { EXTENSIONS.iter().any(|x| f.ends_with(&format!(".{x}"))) })
        );
        // A split's bytes are exactly its files, each followed by a newline.
        let total: usize = c.eval.iter().filter(|b| **b == b'\n').count();
        assert!(total >= c.eval_files.len());
        // A larger held-out fraction only moves files into the held-out split.
        let d = Corpus::build(&CorpusSpec {
            eval_permille: 600,
            ..few()
        })
        .unwrap();
        assert!(c.eval_files.iter().all(|f| d.eval_files.contains(f)));
    }

    #[test]
    fn a_missing_crate_names_itself_and_the_fetch_command() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("index.example/anyhow-0.0.1")).unwrap();
        let lock = dir.path().join("Cargo.lock");
        std::fs::write(
            &lock,
            "version = 4\n\n[[package]]\nname = \"me\"\nversion = \"0.1.0\"\n\n\
             [[package]]\nname = \"nowhere-crate\"\nversion = \"1.2.3\"\n\
             source = \"registry+https://github.com/rust-lang/crates.io-index\"\n",
        )
        .unwrap();
        let err = Corpus::build(&CorpusSpec {
            lock,
            registry_src: dir.path().to_path_buf(),
            only: None,
            eval_permille: 50,
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CorpusError::Missing { .. }), "{msg}");
        assert!(msg.contains("nowhere-crate 1.2.3"), "{msg}");
        assert!(msg.contains("cargo fetch --locked"), "{msg}");
    }

    #[test]
    fn a_saved_corpus_loads_the_same_and_a_changed_one_is_refused() {
        let c = Corpus::build(&few()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        c.save(dir.path()).unwrap();
        let back = Corpus::load(dir.path()).unwrap();
        assert_eq!(back.train_hash(), c.train_hash());
        assert_eq!(back.eval, c.eval);
        assert_eq!(back.train_files, c.train_files);
        let mut eval = c.eval.clone();
        eval[0] ^= 1;
        std::fs::write(dir.path().join("eval.bin"), eval).unwrap();
        let err = Corpus::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("eval_blake3"), "{err}");
    }

    #[test]
    fn a_hostile_lock_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("Cargo.lock");
        std::fs::write(
            &lock,
            "[[package]]\nname = \"../../etc\"\nversion = \"1\"\nsource = \"registry+x\"\n",
        )
        .unwrap();
        assert!(matches!(
            locked_crates(&lock),
            Err(CorpusError::Lock { .. })
        ));
        std::fs::write(&lock, "not = [toml").unwrap();
        assert!(matches!(
            locked_crates(&lock),
            Err(CorpusError::Lock { .. })
        ));
    }
}
