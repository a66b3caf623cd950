//! potluck-coordinator: the logic that decides who is in each round and what was agreed, and
//! the provenance of the checkpoints it commits.
//!
//! Nothing here opens a socket or reads a clock: the daemon passes `now` (milliseconds) in,
//! feeds events through `handle_*` methods and drains decisions through `poll_*` methods, in
//! the manner of quinn-proto. The only module that touches the file system is [`store`]
//! (atomic write-fsync-rename of state and ledger) and the checkpoint functions of
//! [`manifest`] and [`verify`], which read the directory they are given.
//!
//! Where to start reading: [`round::RunMachine`] (rounds and quorum), [`manifest`] (what a
//! checkpoint is and how it is signed), [`verify::verify_checkpoint_dir`] (what `potluck
//! verify` calls).

pub mod aggregate;
pub mod failover;
pub mod manifest;
pub mod round;
pub mod safetensors_header;
pub mod store;
pub mod transfer;
pub mod verify;

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
