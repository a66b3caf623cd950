//! Offline verification of a checkpoint directory (what `potluck verify PATH` calls), of a
//! ledger's chain of commits, and export of a verified checkpoint for other tools.
//!
//! A checkpoint directory holds the model files, `manifest.pb` (the signed manifest) and
//! `run.pb` (the signed run manifest, the trust anchor: its blake3 is the run id, and it
//! names the keys allowed to sign commits). Verification reads every byte once and names
//! the first thing that differs: the file, its header, the tensor and chunk, or the
//! signature or chain link.

use crate::Hash32;
use crate::failover::SignedRunManifest;
use crate::manifest::{
    CheckpointContent, FileKind, MANIFEST_FILE, ManifestError, PieceLabel, RUN_FILE, SignedManifest,
};
use crate::safetensors_header;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Why a checkpoint (or a chain) failed verification. Each variant names what changed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Manifest {
        file: &'static str,
        #[source]
        source: ManifestError,
    },
    #[error("manifest is not signed by its coordinator")]
    NotCoordinatorSigned,
    #[error("manifest signed by key {key}, which the run manifest does not allow to coordinate")]
    UntrustedCoordinator { key: String },
    #[error("checkpoint belongs to run {got}, expected run {expected}")]
    WrongRun { expected: String, got: String },
    #[error("file {file} is listed in the manifest but missing")]
    MissingFile { file: String },
    #[error("file {file} is in the directory but not in the manifest")]
    UnlistedFile { file: String },
    #[error("file {file} has {got} bytes, the manifest says {expected}")]
    Size {
        file: String,
        expected: u64,
        got: u64,
    },
    #[error("file {file}: safetensors header changed")]
    Header { file: String },
    #[error("file {file}: header does not describe the manifest's tensors: {reason}")]
    HeaderContent { file: String, reason: String },
    #[error("file {file}: tensor {tensor}, chunk {chunk} changed")]
    TensorChunk {
        file: String,
        tensor: String,
        chunk: u32,
    },
    #[error("file {file}: chunk {chunk} changed")]
    FileChunk { file: String, chunk: u32 },
    #[error("file {file}: whole-file hash differs")]
    FileHash { file: String },
    #[error("chain: round {round}: {reason}")]
    Chain { round: u64, reason: String },
}

fn vio(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the caller knows beforehand.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// The run id from the invite or config; `None` accepts the directory's own run.pb
    /// (then the result proves consistency with that run, which the caller should show).
    pub expected_run_id: Option<Hash32>,
    /// Ledger directory ([`crate::store::Ledger`]); when given, the checkpoint must be on
    /// the chain it holds, and the whole chain back to round 0 is verified.
    pub ledger_dir: Option<PathBuf>,
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub run_id: Hash32,
    pub round: u64,
    pub root: Hash32,
    pub manifest_id: Hash32,
    pub coordinator_key: [u8; 32],
    pub replica_signers: usize,
    pub bytes_checked: u64,
    /// Number of ledger entries checked back to round 0 (0 without a ledger).
    pub chain_len: usize,
}

fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>, VerifyError> {
    let f = File::open(path).map_err(vio(path))?;
    let mut buf = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(vio(path))?;
    Ok(buf)
}

/// Reads and checks `run.pb` and `manifest.pb` of `dir`: signatures, run id, coordinator key.
pub fn read_signed(
    dir: &Path,
    expected_run_id: Option<Hash32>,
) -> Result<(SignedRunManifest, SignedManifest), VerifyError> {
    let run_bytes = read_limited(&dir.join(RUN_FILE), crate::failover::MAX_RUN_MANIFEST_BYTES)?;
    let run = SignedRunManifest::decode(&run_bytes).map_err(|source| VerifyError::Manifest {
        file: RUN_FILE,
        source,
    })?;
    if let Some(exp) = expected_run_id
        && exp != run.run_id()
    {
        return Err(VerifyError::WrongRun {
            expected: exp.to_hex(),
            got: run.run_id().to_hex(),
        });
    }
    let m_bytes = read_limited(
        &dir.join(MANIFEST_FILE),
        crate::manifest::MAX_MANIFEST_BYTES,
    )?;
    let m = SignedManifest::decode(&m_bytes).map_err(|source| VerifyError::Manifest {
        file: MANIFEST_FILE,
        source,
    })?;
    check_manifest_against_run(&run, &m)?;
    Ok((run, m))
}

/// Checks that `m` is of `run` and signed by a key the run allows to coordinate.
pub fn check_manifest_against_run(
    run: &SignedRunManifest,
    m: &SignedManifest,
) -> Result<(), VerifyError> {
    if m.body().run_id != run.run_id() {
        return Err(VerifyError::WrongRun {
            expected: run.run_id().to_hex(),
            got: m.body().run_id.to_hex(),
        });
    }
    if !m.coordinator_signed() {
        return Err(VerifyError::NotCoordinatorSigned);
    }
    if !run.may_coordinate(&m.body().coordinator_key) {
        return Err(VerifyError::UntrustedCoordinator {
            key: hex::encode(m.body().coordinator_key),
        });
    }
    Ok(())
}

/// Verifies a checkpoint directory offline: signatures and trust anchor, every file's
/// size, header, chunks and whole-file hash, no unlisted files, and the ledger chain when
/// `opts.ledger_dir` is given.
pub fn verify_checkpoint_dir(dir: &Path, opts: &VerifyOptions) -> Result<Verified, VerifyError> {
    let (run, m) = read_signed(dir, opts.expected_run_id)?;
    let body = m.body();
    let bytes_checked = verify_content(dir, &body.content)?;
    let mut chain_len = 0;
    if let Some(ledger_dir) = &opts.ledger_dir {
        let entries =
            crate::store::Ledger::read_entries(ledger_dir).map_err(|e| VerifyError::Chain {
                round: body.round,
                reason: format!("cannot read ledger: {e}"),
            })?;
        verify_chain(&run, &entries)?;
        chain_len = entries.len();
        match entries.iter().find(|e| e.body().round == body.round) {
            Some(e) if e.id() == m.id() => {}
            Some(_) => {
                return Err(VerifyError::Chain {
                    round: body.round,
                    reason: "the ledger holds a different manifest for this round".into(),
                });
            }
            None => {
                let head = entries.last().map(|e| (e.body().round, e.body().root));
                let reason = match head {
                    Some(h) if body.round > h.0 && body.parent == Some(h) => format!(
                        "not yet in the ledger, whose head is round {}: update the ledger",
                        h.0
                    ),
                    _ => "round not in the ledger: parent not in the chain".into(),
                };
                return Err(VerifyError::Chain {
                    round: body.round,
                    reason,
                });
            }
        }
    }
    Ok(Verified {
        run_id: body.run_id,
        round: body.round,
        root: body.root,
        manifest_id: m.id(),
        coordinator_key: body.coordinator_key,
        replica_signers: m.replica_signers().count(),
        bytes_checked,
        chain_len,
    })
}

/// Checks that `next` may follow `prev` on a chain: same run, later round, parent link.
/// Refuses replays of old rounds and manifests whose parent is not `prev`.
pub fn check_link(prev: &SignedManifest, next: &SignedManifest) -> Result<(), VerifyError> {
    let (p, n) = (prev.body(), next.body());
    let round = n.round;
    if n.run_id != p.run_id {
        return Err(VerifyError::Chain {
            round,
            reason: "belongs to another run".into(),
        });
    }
    if n.round <= p.round {
        return Err(VerifyError::Chain {
            round,
            reason: format!("replay: round {} is not after round {}", n.round, p.round),
        });
    }
    if n.parent != Some((p.round, p.root)) {
        return Err(VerifyError::Chain {
            round,
            reason: format!(
                "parent is not the previous commit (round {}, root {})",
                p.round,
                p.root.short()
            ),
        });
    }
    Ok(())
}

/// Verifies a whole chain: every entry signed by an allowed coordinator of `run`, the
/// first one the run's genesis (round 0, no parent, the run's genesis root), and each next
/// one linked to the one before.
pub fn verify_chain(
    run: &SignedRunManifest,
    entries: &[SignedManifest],
) -> Result<(), VerifyError> {
    let Some(first) = entries.first() else {
        return Err(VerifyError::Chain {
            round: 0,
            reason: "empty ledger".into(),
        });
    };
    let b = first.body();
    if b.round != 0 || b.parent.is_some() || b.root != run.body().genesis_root {
        return Err(VerifyError::Chain {
            round: b.round,
            reason: "first entry is not the run's genesis checkpoint".into(),
        });
    }
    for e in entries {
        check_manifest_against_run(run, e).map_err(|err| VerifyError::Chain {
            round: e.body().round,
            reason: err.to_string(),
        })?;
    }
    for w in entries.windows(2) {
        check_link(&w[0], &w[1])?;
    }
    Ok(())
}

/// Verifies the files of `dir` against `content`; returns the bytes read.
pub fn verify_content(dir: &Path, content: &CheckpointContent) -> Result<u64, VerifyError> {
    let listed: BTreeSet<&str> = content.files.iter().map(|f| f.path.as_str()).collect();
    for e in std::fs::read_dir(dir).map_err(vio(dir))? {
        let e = e.map_err(vio(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE && name != RUN_FILE && !listed.contains(name.as_str()) {
            return Err(VerifyError::UnlistedFile { file: name });
        }
    }
    let pieces = content.pieces();
    let mut buf = vec![0u8; content.chunk_size.max(1) as usize];
    let mut total = 0u64;
    let mut pi = 0usize;
    for (fi, f) in content.files.iter().enumerate() {
        let path = dir.join(&f.path);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VerifyError::MissingFile {
                    file: f.path.clone(),
                });
            }
            Err(e) => return Err(vio(&path)(e)),
        };
        let meta = file.metadata().map_err(vio(&path))?;
        if !meta.is_file() {
            return Err(VerifyError::MissingFile {
                file: f.path.clone(),
            });
        }
        if meta.len() != f.size {
            return Err(VerifyError::Size {
                file: f.path.clone(),
                expected: f.size,
                got: meta.len(),
            });
        }
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut whole = blake3::Hasher::new();
        while pi < pieces.len() && pieces[pi].file == fi {
            let p = &pieces[pi];
            pi += 1;
            let got = if p.label == PieceLabel::Header {
                let mut raw = vec![0u8; p.len as usize];
                r.read_exact(&mut raw).map_err(vio(&path))?;
                whole.update(&raw);
                let h: Hash32 = blake3::hash(&raw).into();
                if h != p.hash {
                    return Err(VerifyError::Header {
                        file: f.path.clone(),
                    });
                }
                check_header_matches(f, &raw)?;
                continue;
            } else {
                let b = &mut buf[..p.len as usize];
                r.read_exact(b).map_err(vio(&path))?;
                whole.update(b);
                Hash32::from(blake3::hash(b))
            };
            if got != p.hash {
                return Err(match &p.label {
                    PieceLabel::TensorChunk { tensor, chunk } => VerifyError::TensorChunk {
                        file: f.path.clone(),
                        tensor: tensor.clone(),
                        chunk: *chunk,
                    },
                    PieceLabel::FileChunk { chunk } => VerifyError::FileChunk {
                        file: f.path.clone(),
                        chunk: *chunk,
                    },
                    PieceLabel::Header => VerifyError::Header {
                        file: f.path.clone(),
                    },
                });
            }
        }
        let h: Hash32 = whole.finalize().into();
        if h != f.file_hash {
            return Err(VerifyError::FileHash {
                file: f.path.clone(),
            });
        }
        total += f.size;
    }
    Ok(total)
}

/// For resuming a download into `dir`: which of `content`'s pieces are already on disk
/// with the right hash. Missing or short files simply yield `false` for their pieces.
pub fn verified_pieces(dir: &Path, content: &CheckpointContent) -> Vec<bool> {
    use std::io::{Seek, SeekFrom};
    let mut out = Vec::new();
    let mut open: Option<(usize, File)> = None;
    let mut buf = Vec::new();
    for p in content.pieces() {
        if open.as_ref().is_none_or(|(i, _)| *i != p.file) {
            open = File::open(dir.join(&content.files[p.file].path))
                .ok()
                .map(|f| (p.file, f));
        }
        let ok = open.as_mut().is_some_and(|(_, f)| {
            buf.resize(p.len as usize, 0);
            f.seek(SeekFrom::Start(p.offset)).is_ok()
                && f.read_exact(&mut buf).is_ok()
                && Hash32::from(blake3::hash(&buf)) == p.hash
        });
        out.push(ok);
    }
    out
}

/// A header whose hash matches was hashed by the manifest's author; this catches a
/// manifest whose tensor list does not describe that header.
fn check_header_matches(f: &crate::manifest::FileRecord, raw: &[u8]) -> Result<(), VerifyError> {
    if f.kind != FileKind::Safetensors {
        return Ok(());
    }
    let bad = |reason: String| VerifyError::HeaderContent {
        file: f.path.clone(),
        reason,
    };
    let h =
        safetensors_header::read_header(&mut &raw[..], f.size).map_err(|e| bad(e.to_string()))?;
    if h.tensors.len() != f.tensors.len() {
        return Err(bad("tensor count differs".into()));
    }
    for (a, b) in h.tensors.iter().zip(&f.tensors) {
        if a.name != b.name
            || a.dtype != b.dtype
            || a.shape != b.shape
            || a.data_begin != b.data_begin
            || a.data_end != b.data_end
        {
            return Err(bad(format!("tensor {} differs", b.name)));
        }
    }
    Ok(())
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("checkpoint does not verify: {0}")]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("checkpoint has no {0}")]
    Missing(&'static str),
}

/// Verifies the checkpoint in `src` and writes its safetensors files and `config.json` to
/// `dest` (created if needed), each atomically, for tools that load plain safetensors.
/// Returns the files written.
pub fn export_checkpoint(
    src: &Path,
    dest: &Path,
    opts: &VerifyOptions,
) -> Result<Vec<PathBuf>, ExportError> {
    let verified = verify_checkpoint_dir(src, opts)?;
    let (_, m) = read_signed(src, Some(verified.run_id))?;
    let files = &m.body().content.files;
    if !files.iter().any(|f| f.kind == FileKind::Safetensors) {
        return Err(ExportError::Missing("safetensors file"));
    }
    if !files.iter().any(|f| f.path == "config.json") {
        return Err(ExportError::Missing("config.json"));
    }
    std::fs::create_dir_all(dest).map_err(|source| crate::store::StoreError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for f in files {
        if f.kind == FileKind::Safetensors || f.path == "config.json" {
            let to = dest.join(&f.path);
            crate::store::copy_atomic(&src.join(&f.path), &to, Some(f.file_hash))?;
            out.push(to);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ManifestBody, PieceLabel, SignerRole, public_key};
    use crate::testutil::*;

    fn verify(d: &Path) -> Result<Verified, VerifyError> {
        verify_checkpoint_dir(d, &VerifyOptions::default())
    }

    /// Deterministic offsets: every boundary of interest plus pseudo-random ones.
    fn offsets(len: u64, extra: &[u64]) -> Vec<u64> {
        let mut v: Vec<u64> = extra.iter().copied().filter(|o| *o < len).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len;
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x % len);
        }
        v.push(len - 1);
        v.sort_unstable();
        v.dedup();
        v
    }

    fn flip(path: &Path, off: u64) -> Vec<u8> {
        let orig = std::fs::read(path).unwrap();
        let mut b = orig.clone();
        b[off as usize] ^= 0x20;
        std::fs::write(path, &b).unwrap();
        orig
    }

    #[test]
    fn untouched_checkpoint_verifies() {
        let t = tempfile::tempdir().unwrap();
        let (run, ms) = chain(t.path(), 1);
        let v = verify(&t.path().join("0")).unwrap();
        assert_eq!(v.run_id, run.run_id());
        assert_eq!(v.root, ms[0].body().root);
        assert_eq!(v.replica_signers, 1);
        assert!(v.bytes_checked > 60_000);
    }

    #[test]
    fn every_flipped_byte_in_every_file_is_caught_and_named() {
        let t = tempfile::tempdir().unwrap();
        let (_, ms) = chain(t.path(), 1);
        let d = t.path().join("0");
        let content = &ms[0].body().content;
        let pieces = content.pieces();
        for (fi, f) in content.files.iter().enumerate() {
            let path = d.join(&f.path);
            let len = f.size;
            let h = 8 + f.header_len;
            // length prefix, JSON start, the padding spaces at the header's end, first and
            // last data byte, each chunk boundary of the big tensor.
            let mut extra = vec![0, 3, 7, 8, 9, h - 1, h - 2, h, h + 1];
            extra.extend((1..4).map(|c| h + c * u64::from(CHUNK)));
            for off in offsets(len, &extra) {
                let orig = flip(&path, off);
                let err = verify(&d).unwrap_err();
                let piece = pieces
                    .iter()
                    .find(|p| p.file == fi && p.offset <= off && off < p.offset + p.len)
                    .unwrap();
                match (&piece.label, &err) {
                    (PieceLabel::Header, VerifyError::Header { file }) => assert_eq!(file, &f.path),
                    (
                        PieceLabel::TensorChunk { tensor, chunk },
                        VerifyError::TensorChunk {
                            file,
                            tensor: t2,
                            chunk: c2,
                        },
                    ) => assert_eq!((file, tensor, chunk), (&f.path, t2, c2)),
                    (
                        PieceLabel::FileChunk { chunk },
                        VerifyError::FileChunk { file, chunk: c2 },
                    ) => {
                        assert_eq!((file, chunk), (&f.path, c2))
                    }
                    (label, err) => panic!("offset {off} of {}: {label:?} but {err}", f.path),
                }
                std::fs::write(&path, orig).unwrap();
            }
        }
        verify(&d).unwrap();
    }

    #[test]
    fn every_flipped_byte_of_manifest_and_run_is_refused() {
        let t = tempfile::tempdir().unwrap();
        chain(t.path(), 1);
        let d = t.path().join("0");
        for name in [MANIFEST_FILE, RUN_FILE] {
            let path = d.join(name);
            let len = std::fs::metadata(&path).unwrap().len();
            // The first bytes (tags, lengths, header fields), the last 200 (the
            // signatures) and pseudo-random ones in between.
            let extra: Vec<u64> = (0..64).chain(len.saturating_sub(200)..len).collect();
            for off in offsets(len, &extra) {
                let orig = flip(&path, off);
                match verify(&d) {
                    Err(VerifyError::Manifest { file, .. }) => assert_eq!(file, name),
                    Err(
                        VerifyError::NotCoordinatorSigned
                        | VerifyError::UntrustedCoordinator { .. }
                        | VerifyError::WrongRun { .. },
                    ) => {}
                    other => panic!("{name} byte {off}: {other:?}"),
                }
                std::fs::write(&path, orig).unwrap();
            }
        }
        verify(&d).unwrap();
    }

    #[test]
    fn missing_extra_and_truncated_files_are_named() {
        let t = tempfile::tempdir().unwrap();
        chain(t.path(), 1);
        let d = t.path().join("0");
        std::fs::write(d.join("extra.bin"), b"x").unwrap();
        assert!(
            matches!(verify(&d), Err(VerifyError::UnlistedFile { file }) if file == "extra.bin")
        );
        std::fs::remove_file(d.join("extra.bin")).unwrap();
        let cfg = std::fs::read(d.join("config.json")).unwrap();
        std::fs::write(d.join("config.json"), &cfg[..cfg.len() - 1]).unwrap();
        assert!(matches!(verify(&d), Err(VerifyError::Size { file, .. }) if file == "config.json"));
        std::fs::remove_file(d.join("config.json")).unwrap();
        assert!(
            matches!(verify(&d), Err(VerifyError::MissingFile { file }) if file == "config.json")
        );
    }

    #[test]
    fn forged_manifest_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (run, ms) = chain(t.path(), 1);
        let d = t.path().join("0");
        // A forger signs as coordinator with its own key.
        let mut body = ms[0].body().clone();
        body.coordinator_key = public_key(&FORGER);
        let mut forged = SignedManifest::new(body);
        forged.sign(SignerRole::Coordinator, &FORGER).unwrap();
        std::fs::write(d.join(MANIFEST_FILE), forged.encode()).unwrap();
        assert!(matches!(
            verify(&d),
            Err(VerifyError::UntrustedCoordinator { .. })
        ));
        // A forger claims to be the real coordinator: its signature does not verify.
        let mut m = SignedManifest::new(ms[0].body().clone());
        assert!(matches!(
            m.sign(SignerRole::Coordinator, &FORGER),
            Err(ManifestError::BadSignature { .. })
        ));
        // Only replica signatures: not coordinator-signed.
        m.sign(SignerRole::Replica, &REPLICA).unwrap();
        std::fs::write(d.join(MANIFEST_FILE), m.encode()).unwrap();
        assert!(matches!(verify(&d), Err(VerifyError::NotCoordinatorSigned)));
        // Another run's id pinned by the caller.
        let opts = VerifyOptions {
            expected_run_id: Some(Hash32([1; 32])),
            ledger_dir: None,
        };
        assert!(matches!(
            verify_checkpoint_dir(&d, &opts),
            Err(VerifyError::WrongRun { .. })
        ));
        let _ = run;
    }

    #[test]
    fn unknown_fields_in_a_signed_body_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (_, ms) = chain(t.path(), 1);
        let mut bytes = ms[0].body_bytes().to_vec();
        // field 99, varint 1: unknown to this build.
        bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
        assert!(matches!(
            ManifestBody::decode(&bytes),
            Err(ManifestError::Decode(_))
        ));
        assert!(ManifestBody::decode(ms[0].body_bytes()).is_ok());
    }

    #[test]
    fn chain_is_verified_and_broken_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (run, ms) = chain(&t.path().join("ck"), 3);
        let ledger_dir = t.path().join("ledger");
        let mut ledger = crate::store::Ledger::open(&ledger_dir, run.clone()).unwrap();
        for m in &ms {
            ledger.append(m.clone()).unwrap();
        }
        let opts = VerifyOptions {
            expected_run_id: Some(run.run_id()),
            ledger_dir: Some(ledger_dir.clone()),
        };
        let v = verify_checkpoint_dir(&t.path().join("ck/2"), &opts).unwrap();
        assert_eq!((v.round, v.chain_len), (2, 3));
        // Replay of an old round is refused by the ledger.
        assert!(matches!(
            ledger.append(ms[1].clone()),
            Err(crate::store::StoreError::Chain(VerifyError::Chain { reason, .. })) if reason.contains("replay")
        ));
        // A manifest whose parent is not the head is refused.
        let mut body = ms[2].body().clone();
        body.round = 3;
        body.parent = Some((1, ms[1].body().root));
        let mut bad = SignedManifest::new(body);
        bad.sign(SignerRole::Coordinator, &COORD).unwrap();
        assert!(matches!(
            ledger.append(bad.clone()),
            Err(crate::store::StoreError::Chain(VerifyError::Chain { reason, .. })) if reason.contains("parent")
        ));
        // A checkpoint not on the ledger's chain is refused by verify.
        let d = t.path().join("ck/2");
        std::fs::write(d.join(MANIFEST_FILE), bad.encode()).unwrap();
        assert!(matches!(
            verify_checkpoint_dir(&d, &opts),
            Err(VerifyError::Chain { round: 3, .. })
        ));
        // A ledger whose middle link is swapped fails the chain check.
        std::fs::write(ledger_dir.join(format!("{:020}.pb", 1)), ms[2].encode()).unwrap();
        assert!(crate::store::Ledger::open(&ledger_dir, run.clone()).is_err());
    }

    #[test]
    fn resume_scan_finds_the_intact_pieces() {
        let t = tempfile::tempdir().unwrap();
        let (_, ms) = chain(t.path(), 1);
        let d = t.path().join("0");
        let content = &ms[0].body().content;
        assert!(verified_pieces(&d, content).iter().all(|v| *v));
        let pieces = content.pieces();
        let target = pieces
            .iter()
            .position(|p| matches!(p.label, PieceLabel::TensorChunk { chunk: 1, .. }))
            .unwrap();
        flip(
            &d.join(&content.files[pieces[target].file].path),
            pieces[target].offset + 5,
        );
        let v = verified_pieces(&d, content);
        assert_eq!(v.iter().filter(|x| !**x).count(), 1);
        assert!(!v[target]);
        std::fs::remove_file(d.join("config.json")).unwrap();
        let v = verified_pieces(&d, content);
        assert_eq!(v.iter().filter(|x| !**x).count(), 2);
    }

    #[test]
    fn export_writes_loadable_safetensors_and_config() {
        let t = tempfile::tempdir().unwrap();
        chain(&t.path().join("ck"), 1);
        let out = t.path().join("out");
        let files =
            export_checkpoint(&t.path().join("ck/0"), &out, &VerifyOptions::default()).unwrap();
        assert_eq!(files.len(), 2);
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("layer.0.weight").unwrap().shape(), &[3, 5000]);
        assert!(out.join("config.json").exists());
        assert!(!out.join(MANIFEST_FILE).exists());
        // A corrupt checkpoint is not exported.
        flip(&t.path().join("ck/0/config.json"), 2);
        assert!(matches!(
            export_checkpoint(
                &t.path().join("ck/0"),
                &t.path().join("out2"),
                &VerifyOptions::default()
            ),
            Err(ExportError::Verify(_))
        ));
    }
}
