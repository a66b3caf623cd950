//! The signed run manifest (who may coordinate a run, in which order) and the pure logic of
//! failover: when the coordinator is gone, the first live key in the succession list takes
//! over and resumes the run from the newest commit of the replicated ledger.
//!
//! The run id is blake3 of the run manifest's exact body bytes, so an invite that carries
//! the run id pins the coordinator and its successors: a forged successor list changes the
//! id. The body is signed by the first coordinator key as well, so the manifest cannot be
//! re-issued under another key for the same id.

use crate::Hash32;
use crate::manifest::{ManifestError, SignedManifest};
use crate::round::{CommitRecord, RunConfig, RunMachine};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use potluck_proto::{decode_limited, invalid, v1};
use prost::Message;

pub const MAX_RUN_MANIFEST_BYTES: usize = 1 << 20;
pub const MAX_COORDINATORS: usize = 64;
const RUN_SIGNATURE_DOMAIN: &[u8] = b"potluck/run/v1";

/// What a run is and who coordinates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunManifest {
    pub name: String,
    /// Root of the run's first checkpoint (round 0).
    pub genesis_root: Hash32,
    /// The coordinator first, then its successors in order.
    pub coordinator_keys: Vec<[u8; 32]>,
    /// Model, data and optimizer settings (opaque here).
    pub settings: Vec<u8>,
}

/// A run manifest with its exact body bytes and the first coordinator's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRunManifest {
    body_bytes: Vec<u8>,
    body: RunManifest,
    signature: [u8; 64],
}

fn run_message(body: &[u8]) -> Vec<u8> {
    let mut m = RUN_SIGNATURE_DOMAIN.to_vec();
    m.extend_from_slice(blake3::hash(body).as_bytes());
    m
}

impl SignedRunManifest {
    /// Encodes and signs `run` with the raw secret key of its first coordinator key.
    pub fn create(run: RunManifest, secret_key: &[u8; 32]) -> Result<Self, ManifestError> {
        let key = SigningKey::from_bytes(secret_key);
        if run.coordinator_keys.first() != Some(&key.verifying_key().to_bytes()) {
            return Err(ManifestError::Key(
                "the run manifest must be signed by its first coordinator key".into(),
            ));
        }
        let body = v1::RunManifestBody {
            format_version: 1,
            name: run.name.clone(),
            genesis_root: run.genesis_root.0.to_vec(),
            coordinator_keys: run.coordinator_keys.iter().map(|k| k.to_vec()).collect(),
            settings: run.settings.clone(),
        };
        let body_bytes = body.encode_to_vec();
        // Round-trip through the checks a reader applies, so we never sign what we refuse.
        Self::check_body(&body_bytes)?;
        let signature = key.sign(&run_message(&body_bytes)).to_bytes();
        Ok(SignedRunManifest {
            body_bytes,
            body: run,
            signature,
        })
    }

    fn check_body(bytes: &[u8]) -> Result<RunManifest, ManifestError> {
        let w: v1::RunManifestBody = decode_limited("run manifest", bytes, MAX_RUN_MANIFEST_BYTES)?;
        if w.encode_to_vec() != bytes {
            return Err(invalid("run manifest", "not canonically encoded").into());
        }
        if w.format_version != 1 {
            return Err(invalid(
                "run manifest",
                format!("format version {}", w.format_version),
            )
            .into());
        }
        if w.coordinator_keys.is_empty() || w.coordinator_keys.len() > MAX_COORDINATORS {
            return Err(invalid("run manifest", "needs 1 to 64 coordinator keys").into());
        }
        let mut keys = Vec::with_capacity(w.coordinator_keys.len());
        for k in &w.coordinator_keys {
            let k = Hash32::from_slice("coordinator key", k)?.0;
            if keys.contains(&k) {
                return Err(invalid("run manifest", "coordinator key listed twice").into());
            }
            keys.push(k);
        }
        Ok(RunManifest {
            name: w.name,
            genesis_root: Hash32::from_slice("genesis root", &w.genesis_root)?,
            coordinator_keys: keys,
            settings: w.settings,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        v1::SignedRunManifest {
            body: self.body_bytes.clone(),
            signature: self.signature.to_vec(),
        }
        .encode_to_vec()
    }

    /// Decodes and verifies the signature of the first coordinator key.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let w: v1::SignedRunManifest =
            decode_limited("signed run manifest", bytes, MAX_RUN_MANIFEST_BYTES)?;
        if w.encode_to_vec() != bytes {
            return Err(invalid("signed run manifest", "not canonically encoded").into());
        }
        let body = Self::check_body(&w.body)?;
        let first = hex::encode(body.coordinator_keys[0]);
        let bad = || ManifestError::BadSignature {
            index: 0,
            key: first.clone(),
        };
        let signature: [u8; 64] = w.signature.as_slice().try_into().map_err(|_| bad())?;
        let key = VerifyingKey::from_bytes(&body.coordinator_keys[0]).map_err(|_| bad())?;
        key.verify_strict(
            &run_message(&w.body),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| bad())?;
        Ok(SignedRunManifest {
            body_bytes: w.body,
            body,
            signature,
        })
    }

    pub fn body(&self) -> &RunManifest {
        &self.body
    }

    /// The run id: blake3 of the body bytes.
    pub fn run_id(&self) -> Hash32 {
        blake3::hash(&self.body_bytes).into()
    }

    /// Whether `key` may sign commits of this run as coordinator.
    pub fn may_coordinate(&self, key: &[u8; 32]) -> bool {
        self.body.coordinator_keys.contains(key)
    }

    /// The key that coordinates when the keys for which `alive` is false are gone: the
    /// first live key in order of succession.
    pub fn acting_coordinator(&self, alive: impl Fn(&[u8; 32]) -> bool) -> Option<[u8; 32]> {
        self.body
            .coordinator_keys
            .iter()
            .copied()
            .find(|k| alive(k))
    }
}

/// Why a peer cannot take over a run.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("this peer's key is not in the run's succession list")]
    NotASuccessor,
    #[error("key {0} comes first in the succession among live peers")]
    NotMyTurn(String),
    #[error("ledger is empty or not of this run: {0}")]
    Ledger(String),
    #[error("{0}")]
    Config(#[from] crate::round::ConfigError),
}

/// The commit a ledger entry records.
pub fn commit_of(m: &SignedManifest) -> CommitRecord {
    let b = m.body();
    CommitRecord {
        round: b.round,
        root: b.root,
        parent: b.parent,
        participants: u32::try_from(b.contributors.len()).unwrap_or(u32::MAX),
        agreeing: b.contributors.clone(),
    }
}

/// Takes over the run as the successor `my_key`, given the keys believed alive, the newest
/// commit of the replicated ledger (`head`, already verified against the run manifest, e.g.
/// by [`crate::verify::verify_chain`]) and the highest round number this peer saw opened
/// (so that no round number is reused; a late report for the dead coordinator's open round
/// can never count in the new one). Members re-join the new coordinator.
pub fn take_over(
    run: &SignedRunManifest,
    my_key: &[u8; 32],
    alive: impl Fn(&[u8; 32]) -> bool,
    head: &SignedManifest,
    highest_round_seen: u64,
    mut config: RunConfig,
) -> Result<RunMachine, FailoverError> {
    if !run.may_coordinate(my_key) {
        return Err(FailoverError::NotASuccessor);
    }
    match run.acting_coordinator(|k| k == my_key || alive(k)) {
        Some(k) if k == *my_key => {}
        Some(k) => return Err(FailoverError::NotMyTurn(hex::encode(k))),
        None => return Err(FailoverError::NotASuccessor),
    }
    if head.body().run_id != run.run_id() {
        return Err(FailoverError::Ledger("head belongs to another run".into()));
    }
    config.run_id = run.run_id();
    let commit = commit_of(head);
    let next = highest_round_seen.max(commit.round) + 1;
    Ok(RunMachine::from_head(config, commit, next)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerId;
    use crate::manifest::{CheckpointContent, ManifestBody, SignerRole, public_key};
    use crate::round::{Action, Report};
    use crate::store::Ledger;
    use crate::testutil::*;

    #[test]
    fn run_manifest_round_trips_and_refuses_tampering() {
        let r = run(Hash32([5; 32]));
        let bytes = r.encode();
        let back = SignedRunManifest::decode(&bytes).unwrap();
        assert_eq!(back.run_id(), r.run_id());
        assert!(back.may_coordinate(&public_key(&SUCC)));
        assert!(!back.may_coordinate(&public_key(&REPLICA)));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(SignedRunManifest::decode(&bad).is_err());
        // Only the first coordinator may sign it.
        let err = SignedRunManifest::create(r.body().clone(), &SUCC).unwrap_err();
        assert!(matches!(err, ManifestError::Key(_)));
    }

    #[test]
    fn successor_takes_over_from_the_ledger_and_the_run_continues() {
        let t = tempfile::tempdir().unwrap();
        let (run, ms) = chain(&t.path().join("ck"), 3);
        let mut ledger = Ledger::open(&t.path().join("ledger"), run.clone()).unwrap();
        for m in &ms {
            ledger.append(m.clone()).unwrap();
        }
        let coord = public_key(&COORD);
        let succ = public_key(&SUCC);
        let head = ledger.head().unwrap().clone();
        let cfg = RunConfig {
            min_participants: 2,
            ..RunConfig::default()
        };

        // While the coordinator lives, the successor must not take over.
        assert!(matches!(
            take_over(&run, &succ, |_| true, &head, 4, cfg.clone()),
            Err(FailoverError::NotMyTurn(_))
        ));
        assert!(matches!(
            take_over(
                &run,
                &public_key(&REPLICA),
                |k| *k != coord,
                &head,
                4,
                cfg.clone()
            ),
            Err(FailoverError::NotASuccessor)
        ));
        assert_eq!(run.acting_coordinator(|k| *k != coord), Some(succ));

        // The coordinator is gone for good; the dead one had opened round 4.
        let mut m = take_over(&run, &succ, |k| *k != coord, &head, 4, cfg).unwrap();
        assert_eq!(m.head().round, 2);
        let (a, b) = (PeerId(b"a".to_vec()), PeerId(b"b".to_vec()));
        m.handle_join(a.clone(), 10);
        m.handle_join(b.clone(), 10);
        let plan = m.open_round().unwrap().clone();
        assert_eq!(plan.round, 5, "no round number is reused");
        assert_eq!(plan.base_root, head.body().root);

        let d = t.path().join("ck/5");
        write_model(&d, 55);
        let root = CheckpointContent::scan(&d, CHUNK).unwrap().root();
        for p in [&a, &b] {
            m.handle_report(
                Report {
                    peer: p.clone(),
                    round: 5,
                    tokens: 1,
                    update_hash: Hash32([2; 32]),
                    weight_root: root,
                },
                11,
            )
            .unwrap();
        }
        let commit = std::iter::from_fn(|| m.poll_action())
            .find_map(|a| match a {
                Action::Committed(c) => Some(c),
                _ => None,
            })
            .unwrap();
        assert_eq!(commit.parent, Some((2, head.body().root)));
        let body = ManifestBody::for_commit(&d, CHUNK, run.run_id(), &commit, succ).unwrap();
        let mut sm = SignedManifest::new(body);
        sm.sign(SignerRole::Coordinator, &SUCC).unwrap();
        ledger.append(sm).unwrap();
        let reopened = Ledger::open(&t.path().join("ledger"), run).unwrap();
        assert_eq!(reopened.head().unwrap().body().round, 5);
    }
}
