//! The final checkpoint of a run: the worker's safetensors and `config.json` plus the outer
//! optimizer state, described by a signed run manifest (`run.pb`) and a signed checkpoint
//! manifest (`manifest.pb`) in the coordinator crate's format, so that `potluck verify DIR`
//! checks it offline.

use std::path::Path;

use libp2p::identity::Keypair;
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{RunManifest as SignedRunBody, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, MANIFEST_FILE, ManifestBody, RUN_FILE, SignedManifest,
    SignerRole,
};
use potluck_coordinator::round::Contributor;
use potluck_coordinator::store::write_atomic;

use super::manifest::ResolvedRun;
use super::session::TrainError;

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

/// Signs and writes `run.pb` and `manifest.pb` for the checkpoint the worker wrote to `dir`
/// at `round`. Returns the checkpoint's content root (hex).
pub fn write_manifest(
    dir: &Path,
    run: &ResolvedRun,
    genesis_root: [u8; 32],
    round: u64,
    contributors: Vec<Contributor>,
    keypair: &Keypair,
) -> Result<String, TrainError> {
    let sk = secret_key(keypair)?;
    let pk = potluck_coordinator::manifest::public_key(&sk);
    let err = |e: &dyn std::fmt::Display| TrainError::Other(format!("checkpoint manifest: {e}"));
    let signed_run = SignedRunManifest::create(
        SignedRunBody {
            name: run.name.clone(),
            genesis_root: Hash32(genesis_root),
            coordinator_keys: vec![pk],
            settings: run.canonical_bytes(),
        },
        &sk,
    )
    .map_err(|e| err(&e))?;
    let content = CheckpointContent::scan(dir, DEFAULT_CHUNK_SIZE).map_err(|e| err(&e))?;
    let root = content.root();
    let body = ManifestBody {
        run_id: signed_run.run_id(),
        round,
        parent: None,
        root,
        content,
        contributors,
        coordinator_key: pk,
    };
    let mut signed = SignedManifest::new(body);
    signed
        .sign(SignerRole::Coordinator, &sk)
        .map_err(|e| err(&e))?;
    write_atomic(&dir.join(RUN_FILE), &signed_run.encode()).map_err(|e| err(&e))?;
    write_atomic(&dir.join(MANIFEST_FILE), &signed.encode()).map_err(|e| err(&e))?;
    Ok(root.to_hex())
}

/// Where a daemon keeps what it holds of runs, under its data directory.
pub const RUNS_DIR: &str = "runs";

/// The directory of run `run_id` under `data_dir`: `ledger/` (the signed manifests of every
/// committed round, as the coordinator crate's [`potluck_coordinator::store::Ledger`] writes
/// them), `checkpoints/<round>/` (committed checkpoints, pruned by retention) and `local/`
/// (this replica's own state: error feedback, inner optimizer).
pub fn run_dir(data_dir: &Path, run_id: &[u8; 32]) -> std::path::PathBuf {
    data_dir.join(RUNS_DIR).join(hex::encode(run_id))
}

/// The ledger directory of a run directory.
pub fn ledger_dir(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join(potluck_coordinator::store::LEDGER_DIR)
}
