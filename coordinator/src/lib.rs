//! potluck-coordinator: the logic that decides who is in each round and what was agreed, and
//! the provenance of the checkpoints it commits.
//!
//! Nothing here opens a socket or reads a clock: the daemon passes `now` (milliseconds) in,
//! feeds events through `handle_*` methods and drains decisions through `poll_*` methods, in
//! the manner of quinn-proto. The only module that touches the file system is [`store`]
//! (atomic write-fsync-rename of state and ledger) and the checkpoint functions of
//! [`manifest`] and [`verify`], which read the directory they are given.
//!
//! How the daemon uses it:
//! 1. Start a run: hash the initial checkpoint directory
//!    ([`manifest::CheckpointContent::scan`], `.root()`), sign a [`failover::RunManifest`]
//!    naming the coordinator and its successors ([`failover::SignedRunManifest::create`]
//!    with the 32 secret bytes of the libp2p ed25519 identity); its `run_id()` goes into
//!    [`round::RunConfig`] and the invite.
//! 2. Drive rounds: [`store::PersistentRun`] wraps [`round::RunMachine`]; feed joins,
//!    leaves, reports and timeouts through `apply(|m| m.handle_*(..))`, carry out each
//!    `peek_action()`, then `ack_action()`.
//! 3. On `Action::Committed`: each replica builds [`manifest::ManifestBody::for_commit`]
//!    from its checkpoint directory, signs ([`manifest::ManifestSignature::sign`]); the
//!    coordinator collects signatures into a [`manifest::SignedManifest`], appends it to the
//!    [`store::Ledger`] and writes `manifest.pb`/`run.pb` with
//!    [`store::write_manifest_files`].
//! 4. Verify ([`verify::verify_checkpoint_dir`]), fetch ([`transfer::Download`]), export
//!    ([`verify::export_checkpoint`]), fail over ([`failover::take_over`]).
//!
//! Where to start reading: [`round::RunMachine`] (rounds and quorum), [`manifest`] (what a
//! checkpoint is and how it is signed), [`verify::verify_checkpoint_dir`] (what `potluck
//! verify` calls).

// Tests may unwrap; the library itself is checked without this (clippy also lints the
// non-test build).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod aggregate;
pub mod exchange;
pub mod failover;
pub mod manifest;
pub mod placement;
pub mod rejections;
pub mod robust;
pub mod round;
pub mod safetensors_header;
pub mod sim;
pub mod store;
pub mod succession;
pub mod transfer;
pub mod verify;
pub mod wire;

use serde::{Deserialize, Serialize};
use std::fmt;

/// A blake3 hash (32 bytes): weight roots, update hashes, run ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// Hex of the first 8 bytes, for messages and logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses a 32-byte value from a byte slice of a peer or file.
    pub fn from_slice(
        what: &'static str,
        bytes: &[u8],
    ) -> Result<Self, potluck_proto::DecodeError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            potluck_proto::invalid(what, format!("expected 32 bytes, got {}", bytes.len()))
        })?;
        Ok(Hash32(arr))
    }
}

impl From<blake3::Hash> for Hash32 {
    fn from(h: blake3::Hash) -> Self {
        Hash32(*h.as_bytes())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({})", self.short())
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// An opaque peer identity: the bytes of a libp2p peer id (this crate does not depend on
/// libp2p). Ordered bytewise, which fixes the order of aggregation and of every list the
/// coordinator emits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerId(pub Vec<u8>);

/// Longest peer id accepted from the wire; libp2p ids are 38 bytes for ed25519 keys.
pub const MAX_PEER_ID_LEN: usize = 128;

impl PeerId {
    /// Checks the length of a peer id received from a peer or file.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, potluck_proto::DecodeError> {
        if bytes.is_empty() || bytes.len() > MAX_PEER_ID_LEN {
            return Err(potluck_proto::invalid(
                "peer id",
                format!("length {} outside 1..={MAX_PEER_ID_LEN}", bytes.len()),
            ));
        }
        Ok(PeerId(bytes.to_vec()))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", hex::encode(&self.0))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fixtures shared by the tests: keys, a small checkpoint directory, its run.
    use crate::failover::{RunManifest, SignedRunManifest};
    use crate::manifest::{
        CheckpointContent, MANIFEST_FILE, ManifestBody, RUN_FILE, SignedManifest, SignerRole,
    };
    use crate::round::{CommitRecord, Contributor};
    use crate::{Hash32, PeerId};
    use safetensors::tensor::{Dtype, TensorView};
    use std::path::Path;

    pub const COORD: [u8; 32] = [7; 32];
    pub const SUCC: [u8; 32] = [8; 32];
    pub const REPLICA: [u8; 32] = [9; 32];
    pub const FORGER: [u8; 32] = [66; 32];
    pub const CHUNK: u32 = 4096;

    /// Writes model.safetensors (three tensors, one spanning several chunks, one empty),
    /// config.json, with weights depending on `seed`.
    pub fn write_model(dir: &Path, seed: u8) {
        std::fs::create_dir_all(dir).unwrap();
        let a: Vec<u8> = (0..3 * 5000u32)
            .flat_map(|i| ((i as f32) * 0.5 + f32::from(seed)).to_le_bytes())
            .collect();
        let b: Vec<u8> = (0..64u16)
            .flat_map(|i| (i ^ u16::from(seed)).to_le_bytes())
            .collect();
        let e: Vec<u8> = Vec::new();
        let tensors = vec![
            (
                "layer.0.weight",
                TensorView::new(Dtype::F32, vec![3, 5000], &a).unwrap(),
            ),
            (
                "layer.0.bias",
                TensorView::new(Dtype::BF16, vec![64], &b).unwrap(),
            ),
            (
                "empty",
                TensorView::new(Dtype::F32, vec![0, 4], &e).unwrap(),
            ),
        ];
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(tensors, Some(meta), &dir.join("model.safetensors"))
            .unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!("{{\"hidden\": 64, \"seed\": {seed}}}"),
        )
        .unwrap();
    }

    pub fn run(genesis_root: Hash32) -> SignedRunManifest {
        SignedRunManifest::create(
            RunManifest {
                name: "test".into(),
                genesis_root,
                coordinator_keys: vec![
                    crate::manifest::public_key(&COORD),
                    crate::manifest::public_key(&SUCC),
                ],
                settings: b"lr=0.1".to_vec(),
            },
            &COORD,
        )
        .unwrap()
    }

    /// A chain of `n` checkpoint directories `dir/<round>` (round 0 = genesis), each with
    /// manifest.pb and run.pb, signed by COORD and REPLICA. Returns the run and manifests.
    pub fn chain(dir: &Path, n: u64) -> (SignedRunManifest, Vec<SignedManifest>) {
        let g = dir.join("0");
        write_model(&g, 0);
        let genesis_root = CheckpointContent::scan(&g, CHUNK).unwrap().root();
        let run = run(genesis_root);
        let mut out: Vec<SignedManifest> = Vec::new();
        for r in 0..n {
            let d = dir.join(r.to_string());
            write_model(&d, r as u8);
            let root = CheckpointContent::scan(&d, CHUNK).unwrap().root();
            let commit = CommitRecord {
                round: r,
                root,
                parent: out.last().map(|p| (p.body().round, p.body().root)),
                participants: 1,
                agreeing: if r == 0 {
                    vec![]
                } else {
                    vec![Contributor {
                        peer: PeerId(b"replica".to_vec()),
                        tokens: 100,
                        update_hash: Hash32([r as u8; 32]),
                    }]
                },
            };
            let body = ManifestBody::for_commit(
                &d,
                CHUNK,
                run.run_id(),
                &commit,
                crate::manifest::public_key(&COORD),
            )
            .unwrap();
            let mut m = SignedManifest::new(body);
            m.sign(SignerRole::Coordinator, &COORD).unwrap();
            m.sign(SignerRole::Replica, &REPLICA).unwrap();
            std::fs::write(d.join(MANIFEST_FILE), m.encode()).unwrap();
            std::fs::write(d.join(RUN_FILE), run.encode()).unwrap();
            out.push(m);
        }
        (run, out)
    }
}
