//! A run's data as a package that peers fetch from the swarm.
//!
//! A run whose data comes from a path pins two hashes: the hash of the token stream (what
//! every replica trains on) and the root of the *data package*, the source's files and the
//! tokenizer hashed as one checkpoint-style content. In the package the text files are
//! named `text-000000`, `text-000001`, ... in the order the worker reads them (so reading
//! the package in name order gives the same tokens), and the tokenizer is `tokenizer.json`.
//!
//! The run's starter copies the files into `runs/<run id>/data/` beside a manifest signed
//! with its coordinator key, where the checkpoint server (`ckpt_transfer`) serves them as
//! it serves any checkpoint. A peer that lacks the data, or whose copy differs, fetches the
//! package by its root with the verified multi-source transfer (every piece checked
//! against the manifest before it is written; a peer that serves a bad one is banned), then
//! serves it in turn. A peer that has its own copy at the source's paths serves that too,
//! hard-linked under the package manifest the coordinator's welcome carries. The token hash
//! is checked on whatever is read, so a package can only ever feed a replica the run's own
//! data.

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::SignedRunManifest;
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, MANIFEST_FILE, MAX_FILES, RUN_FILE, SignedManifest,
};

use super::checkpoint;
use super::manifest::{DataSpec, MAX_DATA_BYTES, ManifestError, ResolvedRun};
use super::session::TrainError;

/// The package's directory in a run directory.
pub const DATA_DIR: &str = "data";
/// The tokenizer's name in a package.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const TEXT_PREFIX: &str = "text-";

fn text_name(i: usize) -> String {
    format!("{TEXT_PREFIX}{i:06}")
}

fn data_err(e: impl std::fmt::Display) -> ManifestError {
    ManifestError::Data(e.to_string())
}

/// The files of a path source's package as `(name in the package, path here)`.
pub fn package_files(spec: &DataSpec) -> Result<Vec<(String, PathBuf)>, ManifestError> {
    let texts = potluck_worker::data::text_files(Path::new(&spec.source)).map_err(data_err)?;
    // One name is kept for the tokenizer.
    if texts.len() >= MAX_FILES {
        return Err(ManifestError::Data(format!(
            "'{}' holds {} files, but a run's data may have at most {}: concatenate them \
             into fewer files",
            spec.source,
            texts.len(),
            MAX_FILES - 1
        )));
    }
    // Nothing is read past the limit a run's text has anyway.
    let mut total = 0u64;
    for t in &texts {
        total += std::fs::metadata(t).map(|m| m.len()).unwrap_or(0);
        if total > MAX_DATA_BYTES {
            return Err(ManifestError::Data(format!(
                "'{}' holds more than the limit of {MAX_DATA_BYTES} bytes of text",
                spec.source
            )));
        }
    }
    let mut files: Vec<(String, PathBuf)> = texts
        .into_iter()
        .enumerate()
        .map(|(i, p)| (text_name(i), p))
        .collect();
    if let Some(t) = &spec.tokenizer {
        let len = std::fs::metadata(t).map(|m| m.len()).unwrap_or(0);
        if len > potluck_worker::data::MAX_TOKENIZER_BYTES {
            return Err(ManifestError::Data(format!(
                "the tokenizer '{t}' is larger than the limit of {} bytes",
                potluck_worker::data::MAX_TOKENIZER_BYTES
            )));
        }
        files.push((TOKENIZER_FILE.into(), PathBuf::from(t)));
    }
    Ok(files)
}

/// The content a path source's package has, hashed from the files where they are.
pub fn package_content(spec: &DataSpec) -> Result<CheckpointContent, ManifestError> {
    CheckpointContent::of_files(&package_files(spec)?, DEFAULT_CHUNK_SIZE).map_err(data_err)
}

/// The root a path source's package has.
pub fn package_root(spec: &DataSpec) -> Result<Hash32, ManifestError> {
    Ok(package_content(spec)?.root())
}

/// The text files of a package directory in reading order, and its tokenizer when the run
/// has one.
pub fn package_texts(
    dir: &Path,
    spec: &DataSpec,
) -> Result<(Vec<PathBuf>, Option<PathBuf>), ManifestError> {
    let rd = std::fs::read_dir(dir).map_err(|e| data_err(format!("{}: {e}", dir.display())))?;
    let mut texts = Vec::new();
    for e in rd {
        let e = e.map_err(|e| data_err(format!("{}: {e}", dir.display())))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEXT_PREFIX) {
            texts.push(e.path());
        }
    }
    texts.sort();
    let tokenizer = spec.tokenizer.as_ref().map(|_| dir.join(TOKENIZER_FILE));
    Ok((texts, tokenizer))
}

/// The package's root as the run pins it.
pub fn pinned_root(run: &ResolvedRun) -> Result<Option<Hash32>, TrainError> {
    if run.data.root.is_empty() {
        return Ok(None);
    }
    hex::decode(&run.data.root)
        .ok()
        .and_then(|b| Hash32::from_slice("data root", &b).ok())
        .map(Some)
        .ok_or_else(|| {
            TrainError::Other(format!(
                "the run's data root {:?} is not a hash",
                run.data.root
            ))
        })
}

/// Whether `dir` holds the package of root `root` with every file intact. `Ok(false)`: no
/// package there; an error says what is wrong with the one that is.
pub fn holds(dir: &Path, root: Hash32) -> Result<bool, String> {
    let mpath = dir.join(MANIFEST_FILE);
    let bytes = match crate::fsutil::read_limited(
        &mpath,
        potluck_coordinator::manifest::MAX_MANIFEST_BYTES as u64,
    ) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", mpath.display())),
    };
    let m = SignedManifest::decode(&bytes).map_err(|e| format!("its manifest: {e}"))?;
    let content = &m.body().content;
    if m.body().root != root || content.root() != root {
        return Err(format!(
            "it is the package of root {}, not {}",
            content.root().short(),
            root.short()
        ));
    }
    potluck_coordinator::verify::verify_content(dir, content)
        .map(|_| true)
        .map_err(|e| e.to_string())
}

/// The source files of a run's package, checked against the root the run pinned
/// ([`check_package_source`]), ready to be copied by [`write_checked_package`].
#[derive(Debug)]
pub struct PackageSource {
    files: Vec<(String, PathBuf)>,
    content: CheckpointContent,
}

/// Checks what [`write_package`] would copy into `dest`, before anything of the run is
/// written: `None` when there is nothing to copy (no path source, or `dest` already holds
/// the package intact; a damaged one is removed), an error when the source's files no
/// longer have the pinned root.
pub fn check_package_source(
    dest: &Path,
    run: &ResolvedRun,
) -> Result<Option<PackageSource>, TrainError> {
    let Some(root) = pinned_root(run)? else {
        return Ok(None);
    };
    check_source(dest, root, "data", &run.data.source, || {
        Ok(package_files(&run.data)?)
    })
}

/// [`check_package_source`] for any package (`what`: "data", "base") of root `root`
/// whose files `files` lists from their source `source`: shared by the run's data and an
/// adapter run's base ([`super::basepack`]).
pub(super) fn check_source(
    dest: &Path,
    root: Hash32,
    what: &str,
    source: &str,
    files: impl FnOnce() -> Result<Vec<(String, PathBuf)>, TrainError>,
) -> Result<Option<PackageSource>, TrainError> {
    match holds(dest, root) {
        Ok(true) => return Ok(None),
        Ok(false) => {}
        Err(reason) => {
            tracing::warn!(dir = %dest.display(), %reason, what, "replacing a damaged package");
            std::fs::remove_dir_all(dest).map_err(|e| {
                TrainError::Other(format!(
                    "removing the damaged {what} package at {}: {e}",
                    dest.display()
                ))
            })?;
        }
    }
    let files = files()?;
    let content = CheckpointContent::of_files(&files, DEFAULT_CHUNK_SIZE)
        .map_err(|e| TrainError::Other(format!("the run's {what}: {e}")))?;
    if content.root() != root {
        return Err(TrainError::Other(format!(
            "the files of '{source}' changed since the run was started ({what} root {} \
             instead of {}): restore them, or start a new run",
            content.root().short(),
            root.short()
        )));
    }
    Ok(Some(PackageSource { files, content }))
}

/// Writes a checked package into `dest`, copying the source's files, beside a manifest
/// signed with `keypair` (the run's coordinator key) and the signed run manifest, so that
/// the checkpoint server serves it. Copies are checked against the hashes the files had
/// when they were checked, and the directory appears whole or not at all.
pub fn write_checked_package(
    dest: &Path,
    source: PackageSource,
    signed_run: &SignedRunManifest,
    keypair: &Keypair,
) -> Result<(), TrainError> {
    let PackageSource { files, content } = source;
    let partial = fresh_partial(dest)?;
    let written = (|| {
        for ((name, from), rec) in sorted(&files).into_iter().zip(&content.files) {
            debug_assert_eq!(*name, rec.path);
            potluck_coordinator::store::copy_atomic(from, &partial.join(name), Some(rec.file_hash))
                .map_err(|e| write_err(from, &e))?;
        }
        let manifest = checkpoint::sign_round(signed_run, 0, None, content, Vec::new(), keypair)?;
        seal(&partial, dest, &manifest.encode(), signed_run)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// [`check_package_source`] then [`write_checked_package`]: the package of `run` (a pinned
/// path source) in `dest`. Nothing is done when `dest` already holds it intact.
pub fn write_package(
    dest: &Path,
    run: &ResolvedRun,
    signed_run: &SignedRunManifest,
    keypair: &Keypair,
) -> Result<(), TrainError> {
    match check_package_source(dest, run)? {
        Some(source) => write_checked_package(dest, source, signed_run, keypair),
        None => Ok(()),
    }
}

/// Largest data package manifest a coordinator puts in a welcome: the welcome must stay
/// well inside the control channel's 1 MiB with the ledger head beside it.
pub const MAX_WELCOME_MANIFEST: usize = 256 << 10;

/// The signed manifest of the package in `dir`, for a welcome: empty when there is none or
/// it is larger than [`MAX_WELCOME_MANIFEST`].
pub fn welcome_manifest(dir: &Path) -> Vec<u8> {
    crate::fsutil::read_limited(&dir.join(MANIFEST_FILE), MAX_WELCOME_MANIFEST as u64)
        .unwrap_or_default()
}

/// Serves this peer's own copy of a run's data (already read and found to be the run's)
/// as the run's package in `dest`, with `manifest`, the package's signed manifest that the
/// coordinator sent: the files are hard-linked, never copied, so this costs no disk.
/// `Ok(false)` when there is nothing to do or it cannot be done without a copy (another
/// file system, a manifest that is not the run's).
pub fn link_package(
    dest: &Path,
    run: &ResolvedRun,
    manifest: &[u8],
    signed_run: &SignedRunManifest,
) -> Result<bool, TrainError> {
    let Some(root) = pinned_root(run)? else {
        return Ok(false);
    };
    if manifest.is_empty() || dest.exists() {
        return Ok(false);
    }
    let signed = SignedManifest::decode(manifest)
        .map_err(|e| TrainError::Other(format!("the run's data manifest: {e}")))?;
    potluck_coordinator::verify::check_manifest_against_run(signed_run, &signed)
        .map_err(|e| TrainError::Other(format!("the run's data manifest: {e}")))?;
    if signed.body().root != root || signed.body().content.root() != root {
        return Err(TrainError::Other(
            "the coordinator's data manifest is not the run's package".into(),
        ));
    }
    let partial = fresh_partial(dest)?;
    let io = |p: &Path, e: &dyn std::fmt::Display| {
        TrainError::Other(format!("linking the run's data at {}: {e}", p.display()))
    };
    let linked = (|| {
        for (name, from) in package_files(&run.data)? {
            if std::fs::hard_link(&from, partial.join(&name)).is_err() {
                return Ok(false);
            }
        }
        // The links are the files this peer read; check them against the manifest anyway
        // (a file may have changed since), as a server's pieces would be checked.
        potluck_coordinator::verify::verify_content(&partial, &signed.body().content)
            .map_err(|e| io(&partial, &e))?;
        seal(&partial, dest, manifest, signed_run).map(|()| true)
    })();
    if !matches!(linked, Ok(true)) {
        let _ = std::fs::remove_dir_all(&partial);
    }
    linked
}

/// An empty hidden directory beside `dest` to build its package in (the checkpoint server
/// skips hidden names); what an interrupted build left there is removed.
fn fresh_partial(dest: &Path) -> Result<PathBuf, TrainError> {
    let name = dest
        .file_name()
        .map_or_else(|| "package".into(), |n| n.to_string_lossy().into_owned());
    let partial = dest
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}-partial"));
    let made = match std::fs::remove_dir_all(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::create_dir_all(&partial),
    };
    made.map_err(|e| {
        TrainError::Other(format!(
            "preparing the run's package at {}: {e}",
            partial.display()
        ))
    })?;
    Ok(partial)
}

/// An I/O error while writing a run's data package at `p`.
fn write_err(p: &Path, e: &dyn std::fmt::Display) -> TrainError {
    TrainError::Other(format!("writing the run's package at {}: {e}", p.display()))
}

/// Writes the signed manifests beside the files in `partial` and moves it into place at
/// `dest`, durably: the package appears whole or not at all.
fn seal(
    partial: &Path,
    dest: &Path,
    manifest: &[u8],
    signed_run: &SignedRunManifest,
) -> Result<(), TrainError> {
    for (name, bytes) in [
        (MANIFEST_FILE, manifest.to_vec()),
        (RUN_FILE, signed_run.encode()),
    ] {
        potluck_coordinator::store::write_atomic(&partial.join(name), &bytes)
            .map_err(|e| write_err(partial, &e))?;
    }
    std::fs::rename(partial, dest).map_err(|e| write_err(dest, &e))?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| write_err(parent, &e))
}

fn sorted(files: &[(String, PathBuf)]) -> Vec<&(String, PathBuf)> {
    let mut v: Vec<&(String, PathBuf)> = files.iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::RunManifest;
    use crate::train::manifest::tests::TOKENIZER_JSON;

    fn run_on(source: &Path, tokenizer: Option<&Path>) -> ResolvedRun {
        let tok = tokenizer
            .map(|t| format!("tokenizer = {:?}\n", t.display().to_string()))
            .unwrap_or_default();
        let toml = format!(
            "name = \"t\"\nmodel = \"tiny\"\n[data]\nsource = {:?}\ntrain_bytes = 0\n\
             eval_bytes = 0\nshards = 2\neval_fraction = 0.1\n{tok}",
            source.display().to_string()
        );
        RunManifest::parse(&toml).unwrap().resolve().unwrap()
    }

    /// A directory source with nested files whose path order is not their name order
    /// within each level.
    fn corpus(dir: &Path) -> PathBuf {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("b/inner")).unwrap();
        std::fs::write(src.join("a.txt"), "hello world ! ".repeat(40)).unwrap();
        std::fs::write(src.join("b/inner/z.txt"), "world hello ! ! ".repeat(30)).unwrap();
        std::fs::write(src.join("b/c.txt"), "! world world hello ".repeat(50)).unwrap();
        src
    }

    #[test]
    fn a_package_reads_as_the_same_data_as_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = corpus(dir.path());
        let tok = dir.path().join("words.json");
        std::fs::write(&tok, TOKENIZER_JSON).unwrap();
        for tokenizer in [None, Some(tok.as_path())] {
            let run = run_on(&src, tokenizer).pin_data().unwrap();
            assert_eq!(
                run.data.root.len(),
                64,
                "a path source pins its package root"
            );
            let keypair = Keypair::generate_ed25519();
            let signed = checkpoint::signed_run(&run, Hash32([7; 32]), &keypair, vec![]).unwrap();
            let dest = dir.path().join(format!("pack-{}", tokenizer.is_some()));
            write_package(&dest, &run, &signed, &keypair).unwrap();
            let root = pinned_root(&run).unwrap().unwrap();
            assert_eq!(holds(&dest, root), Ok(true));
            let names: Vec<String> = std::fs::read_dir(&dest)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".pb"))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut want = vec!["text-000000", "text-000001", "text-000002"];
            if tokenizer.is_some() {
                want.push(TOKENIZER_FILE);
            }
            assert_eq!(names, want);
            // Same tokens, so the same pinned hash, read from the package.
            let (_, from_pack) = run.load_data_from_package(&dest).unwrap();
            assert_eq!(from_pack, run.data.hash);
            // Writing it again leaves the intact package alone.
            write_package(&dest, &run, &signed, &keypair).unwrap();
            // The checkpoint server would serve it: it verifies like a checkpoint.
            assert!(dest.join(RUN_FILE).is_file());
        }
    }

    #[test]
    fn a_damaged_or_foreign_package_is_not_held_and_a_changed_source_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = corpus(dir.path());
        let run = run_on(&src, None).pin_data().unwrap();
        let root = pinned_root(&run).unwrap().unwrap();
        let keypair = Keypair::generate_ed25519();
        let signed = checkpoint::signed_run(&run, Hash32([7; 32]), &keypair, vec![]).unwrap();
        let dest = dir.path().join("pack");
        assert_eq!(holds(&dest, root), Ok(false), "nothing there");
        write_package(&dest, &run, &signed, &keypair).unwrap();
        // Another root: not this run's package.
        assert!(holds(&dest, Hash32([1; 32])).is_err());
        // One flipped byte in a text file.
        let text = dest.join("text-000001");
        let mut bytes = std::fs::read(&text).unwrap();
        bytes[10] ^= 0x20;
        std::fs::write(&text, &bytes).unwrap();
        let err = holds(&dest, root).unwrap_err();
        assert!(err.contains("text-000001"), "{err}");
        // Writing the package again replaces the damaged one.
        write_package(&dest, &run, &signed, &keypair).unwrap();
        assert_eq!(holds(&dest, root), Ok(true));
        // A source that changed after the run was pinned is refused, with what to do.
        std::fs::write(src.join("a.txt"), "hello !").unwrap();
        std::fs::remove_dir_all(&dest).unwrap();
        let err = write_package(&dest, &run, &signed, &keypair)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed since the run was started"), "{err}");
        assert!(!dest.exists() && !dir.path().join(".data-partial").exists());
        // And pinning it again under the old root says the copy differs.
        let mut stale = run_on(&src, None);
        stale.data.root = run.data.root.clone();
        let err = stale.pin_data().unwrap_err().to_string();
        assert!(err.contains("package root"), "{err}");
    }

    #[test]
    fn a_peer_links_its_own_copy_only_under_the_coordinators_manifest_of_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let src = corpus(dir.path());
        let run = run_on(&src, None).pin_data().unwrap();
        let coordinator = Keypair::generate_ed25519();
        let signed = checkpoint::signed_run(&run, Hash32([7; 32]), &coordinator, vec![]).unwrap();
        let starter = dir.path().join("starter");
        write_package(&starter, &run, &signed, &coordinator).unwrap();
        let manifest = std::fs::read(starter.join(MANIFEST_FILE)).unwrap();
        let dest = dir.path().join("linked");
        // No manifest (the built-in corpus, or one too large for a welcome): nothing done.
        assert!(!link_package(&dest, &run, &[], &signed).unwrap());
        // A manifest signed by another key than the run's coordinator is refused.
        let other = Keypair::generate_ed25519();
        let content = package_content(&run.data).unwrap();
        let forged = checkpoint::sign_round(&signed, 0, None, content, vec![], &other).unwrap();
        assert!(link_package(&dest, &run, &forged.encode(), &signed).is_err());
        assert!(!dest.exists());
        // The coordinator's manifest: linked, and it is the same package as the starter's.
        assert!(link_package(&dest, &run, &manifest, &signed).unwrap());
        let root = pinned_root(&run).unwrap().unwrap();
        assert_eq!(holds(&dest, root), Ok(true));
        assert_eq!(std::fs::read(dest.join(MANIFEST_FILE)).unwrap(), manifest);
        // Once there, it is left alone.
        assert!(!link_package(&dest, &run, &manifest, &signed).unwrap());
        // A source file that changed since it was read is caught before anything is served.
        let again = dir.path().join("again");
        std::fs::write(src.join("a.txt"), "hello !").unwrap();
        assert!(link_package(&again, &run, &manifest, &signed).is_err());
        assert!(!again.exists() && !dir.path().join(".data-partial").exists());
    }

    #[test]
    fn text_past_the_limit_and_a_huge_tokenizer_are_refused_before_any_read() {
        let dir = tempfile::tempdir().unwrap();
        let src = corpus(dir.path());
        // Sparse files: their length is what counts, and nothing is read.
        let big = std::fs::File::create(src.join("big.txt")).unwrap();
        big.set_len(MAX_DATA_BYTES).unwrap();
        let err = package_files(&run_on(&src, None).data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than the limit"), "{err}");
        std::fs::remove_file(src.join("big.txt")).unwrap();
        let tok = dir.path().join("huge.json");
        let f = std::fs::File::create(&tok).unwrap();
        f.set_len(potluck_worker::data::MAX_TOKENIZER_BYTES + 1)
            .unwrap();
        let err = package_files(&run_on(&src, Some(&tok)).data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than the limit"), "{err}");
    }

    #[test]
    fn too_many_files_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("many");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..MAX_FILES {
            std::fs::write(src.join(format!("{i}.txt")), "hello ").unwrap();
        }
        let err = package_files(&run_on(&src, None).data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("concatenate"), "{err}");
    }
}
