//! Checkpoints of a swarm run: the state a replica holds after a round, as files (the
//! worker's safetensors and `config.json`, plus the outer optimizer's `outer.bin`), named by
//! the coordinator crate's content root, and signed per committed round into a ledger.
//!
//! Every replica computes the files of its state in memory and reports their content root
//! as the round's root, so the hash the swarm agrees on is the root of the checkpoint that
//! `potluck verify` checks: nothing is hashed two ways. The coordinator signs one manifest
//! per committed round (parent = the previous commit) and appends it to its ledger; the
//! replicas receive it with the commit and keep their own copy of the ledger, with the
//! newest checkpoints on disk.

use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{RunManifest as SignedRunBody, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, ManifestBody, SignedManifest, SignerRole,
};
use potluck_coordinator::round::Contributor;
use potluck_coordinator::store::{write_atomic, write_manifest_files};
use potluck_worker::{OuterOptimizer, Replica};

use super::manifest::ResolvedRun;
use super::session::TrainError;

/// The outer optimizer's state file in a checkpoint.
pub const OUTER_FILE: &str = "outer.bin";
/// The inner optimizer's state in a data-parallel run's checkpoints.
pub const INNER_FILE: &str = "inner.bin";
/// Where a daemon keeps what it holds of runs, under its data directory.
pub const RUNS_DIR: &str = "runs";
/// The raw ed25519 secret key of a libp2p identity, for the coordinator crate's signatures.
pub fn secret_key(keypair: &Keypair) -> Result<[u8; 32], TrainError> {
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| TrainError::Other("this daemon's identity is not an ed25519 key".into()))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(ed.secret().as_ref());
    Ok(out)
}

fn err(e: &dyn std::fmt::Display) -> TrainError {
    TrainError::Other(format!("checkpoint: {e}"))
}

/// The files of a replica state at the end of `round`: the worker's weights-only checkpoint
/// at the swarm's step for that round, the outer optimizer's state, and in a data-parallel
/// run the inner optimizer's state the replicas share (`inner.bin`).
pub fn state_files(
    rep: &Replica,
    run: &ResolvedRun,
    round: u64,
    (params, velocity): (&[f32], &[f32]),
    inner: Option<&InnerState>,
) -> Result<Vec<(String, Vec<u8>)>, TrainError> {
    let mut files = rep.checkpoint_files(params, swarm_step(run, round))?;
    files.push((OUTER_FILE.to_string(), outer_bytes(run, velocity)));
    if let Some(inner) = inner {
        files.push((INNER_FILE.to_string(), inner.to_bytes()));
    }
    Ok(files)
}

/// The inner AdamW state of a data-parallel run, which every replica holds alike (they apply
/// the same mean gradients), so it is part of the state a round's root names.
#[derive(Debug, Clone, PartialEq)]
pub struct InnerState {
    pub steps: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl InnerState {
    /// The state of `rep`'s inner optimizer.
    pub fn of(rep: &Replica) -> Result<Self, TrainError> {
        let (steps, m, v) = rep.flat_optimizer_state()?;
        Ok(InnerState { steps, m, v })
    }

    /// The bytes of `inner.bin` (and of a state frame's tail): the step count (8 bytes),
    /// then the first and the second moments, all little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * (self.m.len() + self.v.len()));
        out.extend_from_slice(&self.steps.to_le_bytes());
        for x in self.m.iter().chain(&self.v) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// Parses [`Self::to_bytes`] for a model of `n` parameters: exactly `8 + 8 n` bytes.
    pub fn from_bytes(bytes: &[u8], n: usize) -> Result<Self, TrainError> {
        if bytes.len() != 8 + 8 * n {
            return Err(err(&format!(
                "inner optimizer state of {} bytes, expected {} for {n} parameters",
                bytes.len(),
                8 + 8 * n
            )));
        }
        let (steps, rest) = bytes.split_at(8);
        let floats: Vec<f32> = rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (m, v) = floats.split_at(n);
        Ok(InnerState {
            steps: u64::from_le_bytes(steps.try_into().map_err(|_| err(&"steps"))?),
            m: m.to_vec(),
            v: v.to_vec(),
        })
    }
}

/// The bytes of `outer.bin`: the run's outer optimizer with this momentum.
pub fn outer_bytes(run: &ResolvedRun, velocity: &[f32]) -> Vec<u8> {
    OuterOptimizer::with_velocity(run.outer.lr, run.outer.momentum, velocity.to_vec()).to_bytes()
}

/// The inner step every replica's schedule is at after `round`: rounds are H steps each.
pub fn swarm_step(run: &ResolvedRun, round: u64) -> u64 {
    round.saturating_mul(run.inner_steps as u64)
}

/// The content (and so the root) of a set of checkpoint files.
pub fn content_of(files: &[(String, Vec<u8>)]) -> Result<CheckpointContent, TrainError> {
    CheckpointContent::from_files(files, DEFAULT_CHUNK_SIZE).map_err(|e| err(&e))
}

/// The signed run manifest: the run's settings (its canonical encoding), its genesis root,
/// and this daemon's key as the coordinator's, followed by its successors' keys.
pub fn signed_run(
    run: &ResolvedRun,
    genesis_root: Hash32,
    keypair: &Keypair,
    successors: Vec<[u8; 32]>,
) -> Result<SignedRunManifest, TrainError> {
    let sk = secret_key(keypair)?;
    let mut keys = vec![potluck_coordinator::manifest::public_key(&sk)];
    for k in successors {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    SignedRunManifest::create(
        SignedRunBody {
            name: run.name.clone(),
            genesis_root,
            coordinator_keys: keys,
            settings: run.canonical_bytes(),
        },
        &sk,
    )
    .map_err(|e| err(&e))
}

/// Signs, as the run's coordinator, the manifest of the checkpoint committed at `round`.
pub fn sign_round(
    signed_run: &SignedRunManifest,
    round: u64,
    parent: Option<(u64, Hash32)>,
    content: CheckpointContent,
    contributors: Vec<Contributor>,
    keypair: &Keypair,
) -> Result<SignedManifest, TrainError> {
    let sk = secret_key(keypair)?;
    let body = ManifestBody {
        run_id: signed_run.run_id(),
        round,
        parent,
        root: content.root(),
        content,
        contributors,
        coordinator_key: potluck_coordinator::manifest::public_key(&sk),
    };
    let mut signed = SignedManifest::new(body);
    signed
        .sign(SignerRole::Coordinator, &sk)
        .map_err(|e| err(&e))?;
    Ok(signed)
}

/// Writes a checkpoint directory atomically: the files and both manifests go into a hidden
/// sibling first, which is renamed into place, so `dir` is either absent or complete.
pub fn write_checkpoint(
    dir: &Path,
    files: &[(String, Vec<u8>)],
    manifest: &SignedManifest,
    run: &SignedRunManifest,
) -> Result<(), TrainError> {
    replace_dir(dir, |tmp| {
        for (f, bytes) in files {
            write_atomic(&tmp.join(f), bytes).map_err(|e| err(&e))?;
        }
        write_manifest_files(tmp, manifest, run).map_err(|e| err(&e))
    })
}

/// Replaces the directory `dir` as a whole: `fill` writes its contents into a hidden sibling
/// (`.<name>.partial`, cleared first), which is then renamed over `dir` and the parent
/// fsynced, so `dir` is always either the old directory or the complete new one.
pub fn replace_dir(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let parent = dir
        .parent()
        .ok_or_else(|| TrainError::Other(format!("{} has no parent", dir.display())))?;
    let name = dir
        .file_name()
        .ok_or_else(|| TrainError::Other(format!("{} has no name", dir.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let tmp = parent.join(format!(".{}.partial", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    fill(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(parent, e))
}

/// Copies a run's ledger directory (the signed manifests) to `to`, file by file, atomically.
pub fn copy_ledger(from: &Path, to: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(to).map_err(|e| io_err(to, e))?;
    for m in potluck_coordinator::store::Ledger::read_entries(from).map_err(|e| err(&e))? {
        let name = potluck_coordinator::store::entry_name(m.body().round);
        write_atomic(&to.join(name), &m.encode()).map_err(|e| err(&e))?;
    }
    Ok(())
}

fn io_err(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Other(format!("{}: {e}", path.display()))
}

/// The directory of run `run_id` under `data_dir`: `ledger/` (the signed manifests of every
/// committed round, as the coordinator crate's [`potluck_coordinator::store::Ledger`] writes
/// them), `checkpoints/<round>/` (committed checkpoints, pruned by retention) and `local/`
/// (this replica's own state: error feedback, inner optimizer).
pub fn run_dir(data_dir: &Path, run_id: &[u8; 32]) -> PathBuf {
    data_dir.join(RUNS_DIR).join(hex::encode(run_id))
}

/// The ledger directory of a run directory.
pub fn ledger_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(potluck_coordinator::store::LEDGER_DIR)
}

/// The directory of the checkpoint committed at `round`, in a run directory.
pub fn checkpoint_dir(run_dir: &Path, round: u64) -> PathBuf {
    potluck_coordinator::store::checkpoint_dir(run_dir, round)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inner_state_round_trips_and_refuses_other_sizes() {
        let s = InnerState {
            steps: 7,
            m: vec![1.0, -2.5, 3.0],
            v: vec![0.5, 0.25, f32::MIN_POSITIVE],
        };
        let b = s.to_bytes();
        assert_eq!(b.len(), 8 + 8 * 3);
        assert_eq!(InnerState::from_bytes(&b, 3).unwrap(), s);
        for len in [0, 7, 8, b.len() - 1, b.len() + 1] {
            let mut c = b.clone();
            c.resize(len, 0);
            assert!(InnerState::from_bytes(&c, 3).is_err(), "{len} bytes");
        }
        assert!(InnerState::from_bytes(&b, 2).is_err());
    }
}
