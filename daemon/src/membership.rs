//! Private swarms closed by membership. The owner's key names the swarm; the owner signs a
//! [`v1::MembershipRecord`] for every admitted peer id and a [`v1::MemberRemoval`] when a
//! member is removed. Invites carry a one-time token that the owner exchanges for a record;
//! invites expire and can be revoked. This module is pure logic over bytes, keys and `now`:
//! the event loop in `net` owns the sockets, the gate and the timers.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{Multiaddr, PeerId};
use potluck_proto::{PROTOCOL_VERSION, check_version, decode_limited, v1};
use prost::Message as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Largest membership message (request, response, record, invite) we accept.
pub const MEMBERSHIP_LIMIT: usize = 8 * 1024;
/// File holding this peer's own membership of someone else's swarm.
pub const MEMBERSHIP_FILE: &str = "membership.pb";
/// File holding the owner's invites and members, and every peer's list of removed members.
pub const SWARM_STATE_FILE: &str = "swarm-state.json";
/// Invites stored by the owner; older used/revoked/expired ones are dropped first.
const MAX_INVITES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("malformed membership data: {0}")]
    Malformed(String),
    #[error("membership is signed by {signer}, not by this swarm's owner {owner}")]
    WrongOwner { signer: String, owner: String },
    #[error("invalid owner signature")]
    BadSignature,
    #[error("membership of {member} was issued to someone else ({presenter} presented it)")]
    NotYours { member: String, presenter: String },
    #[error("membership expired")]
    Expired,
    #[error("{0} was removed from this swarm")]
    Removed(String),
    #[error("unknown invite token")]
    UnknownInvite,
    #[error("invite already used")]
    InviteUsed,
    #[error("invite revoked")]
    InviteRevoked,
    #[error("invite expired")]
    InviteExpired,
    #[error("invite text is not valid: {0}")]
    BadInvite(String),
}

fn malformed(e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Malformed(e.to_string())
}

/// Signs `record` bytes with the owner's key.
fn sign(owner: &Keypair, record: Vec<u8>) -> v1::Signed {
    // Signing with an ed25519 key cannot fail; other key types are never used here.
    let signature = owner.sign(&record).unwrap_or_default();
    v1::Signed { record, signature }
}

fn owner_of(public_key: &[u8]) -> Result<PublicKey, MembershipError> {
    PublicKey::try_decode_protobuf(public_key).map_err(malformed)
}

/// Checks the signature of `signed` against the embedded owner key and that the key belongs
/// to `expected_owner`.
fn check_signed(
    signed: &v1::Signed,
    owner_key: &[u8],
    expected_owner: &PeerId,
) -> Result<(), MembershipError> {
    let key = owner_of(owner_key)?;
    let signer = key.to_peer_id();
    if &signer != expected_owner {
        return Err(MembershipError::WrongOwner {
            signer: signer.to_base58(),
            owner: expected_owner.to_base58(),
        });
    }
    if !key.verify(&signed.record, &signed.signature) {
        return Err(MembershipError::BadSignature);
    }
    Ok(())
}

/// The owner grants `member` a membership record.
pub fn grant(owner: &Keypair, member: &PeerId, now_ms: u64, expires_at_ms: u64) -> v1::Signed {
    let record = v1::MembershipRecord {
        protocol_version: PROTOCOL_VERSION,
        owner_public_key: owner.public().encode_protobuf(),
        member_peer_id: member.to_bytes(),
        issued_at_ms: now_ms,
        expires_at_ms,
    };
    sign(owner, record.encode_to_vec())
}

/// A verified membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub owner: PeerId,
    pub member: PeerId,
    pub expires_at_ms: u64,
}

/// Verifies a membership record presented by `presenter` in the swarm of `owner`.
pub fn verify(
    signed: &v1::Signed,
    owner: &PeerId,
    presenter: &PeerId,
    now_ms: u64,
) -> Result<Membership, MembershipError> {
    let rec: v1::MembershipRecord =
        decode_limited("membership record", &signed.record, MEMBERSHIP_LIMIT).map_err(malformed)?;
    check_version(rec.protocol_version).map_err(malformed)?;
    check_signed(signed, &rec.owner_public_key, owner)?;
    let member = PeerId::from_bytes(&rec.member_peer_id).map_err(malformed)?;
    if &member != presenter {
        return Err(MembershipError::NotYours {
            member: member.to_base58(),
            presenter: presenter.to_base58(),
        });
    }
    if rec.expires_at_ms != 0 && rec.expires_at_ms <= now_ms {
        return Err(MembershipError::Expired);
    }
    Ok(Membership {
        owner: *owner,
        member,
        expires_at_ms: rec.expires_at_ms,
    })
}

/// Reads the owner's peer id out of a membership record, without trusting it: used by a
/// member to learn which swarm its stored record belongs to, then verified with [`verify`].
pub fn owner_in(signed: &v1::Signed) -> Result<PeerId, MembershipError> {
    let rec: v1::MembershipRecord =
        decode_limited("membership record", &signed.record, MEMBERSHIP_LIMIT).map_err(malformed)?;
    Ok(owner_of(&rec.owner_public_key)?.to_peer_id())
}

/// The owner's signed statement that `member` is removed.
pub fn sign_removal(owner: &Keypair, member: &PeerId, now_ms: u64) -> v1::Signed {
    let rec = v1::MemberRemoval {
        protocol_version: PROTOCOL_VERSION,
        owner_public_key: owner.public().encode_protobuf(),
        member_peer_id: member.to_bytes(),
        removed_at_ms: now_ms,
    };
    sign(owner, rec.encode_to_vec())
}

/// Verifies a removal and returns the removed member.
pub fn verify_removal(signed: &v1::Signed, owner: &PeerId) -> Result<PeerId, MembershipError> {
    let rec: v1::MemberRemoval =
        decode_limited("member removal", &signed.record, MEMBERSHIP_LIMIT).map_err(malformed)?;
    check_version(rec.protocol_version).map_err(malformed)?;
    check_signed(signed, &rec.owner_public_key, owner)?;
    PeerId::from_bytes(&rec.member_peer_id).map_err(malformed)
}

/// A decoded invite, as a joiner sees it.
#[derive(Debug, Clone)]
pub struct Invite {
    pub owner: PeerId,
    pub owner_addrs: Vec<Multiaddr>,
    pub token: Vec<u8>,
    pub expires_at_ms: u64,
}

impl Invite {
    /// Parses the text form (base64url of a [`v1::Invite`]).
    pub fn parse(text: &str) -> Result<Self, MembershipError> {
        let bad = |e: String| MembershipError::BadInvite(e);
        let text = text.trim();
        if text.len() > MEMBERSHIP_LIMIT * 2 {
            return Err(bad("too long".into()));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|e| bad(e.to_string()))?;
        let inv: v1::Invite =
            decode_limited("invite", &bytes, MEMBERSHIP_LIMIT).map_err(|e| bad(e.to_string()))?;
        check_version(inv.protocol_version).map_err(|e| bad(e.to_string()))?;
        let owner = owner_of(&inv.owner_public_key)
            .map_err(|e| bad(e.to_string()))?
            .to_peer_id();
        if inv.token.len() != 32 {
            return Err(bad("token must be 32 bytes".into()));
        }
        let owner_addrs = inv
            .owner_addrs
            .into_iter()
            .take(32)
            .map(|b| Multiaddr::try_from(b).map_err(|e| bad(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            owner,
            owner_addrs,
            token: inv.token,
            expires_at_ms: inv.expires_at_ms,
        })
    }
}

fn token_id(token: &[u8]) -> String {
    hex::encode(&blake3::hash(token).as_bytes()[..8])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InviteState {
    Open,
    Used,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteEntry {
    /// blake3 of the token, hex: the token itself is never stored.
    pub token_hash: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub state: InviteState,
}

/// Persistent swarm state: the owner's invites and members, and (for everyone) the members
/// the owner removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwarmState {
    /// Invite id -> entry.
    pub invites: BTreeMap<String, InviteEntry>,
    /// Admitted member peer ids (owner only), as base58 strings.
    pub members: Vec<String>,
    /// Removed member peer ids, as base58 strings.
    pub removed: Vec<String>,
    /// The owner's signed removals (hex of encoded `Signed`), passed on to other members.
    #[serde(default)]
    pub removals: Vec<String>,
}

/// Removals passed on in one membership message.
pub const MAX_REMOVALS: usize = 256;

impl SwarmState {
    pub fn load(data_dir: &Path) -> Result<Self, std::io::Error> {
        let path = data_dir.join(SWARM_STATE_FILE);
        match fsutil::read_limited(&path, 16 << 20) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            )),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), std::io::Error> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        fsutil::write_atomic(&data_dir.join(SWARM_STATE_FILE), &bytes, 0o600)
    }

    pub fn is_removed(&self, peer: &PeerId) -> bool {
        let s = peer.to_base58();
        self.removed.iter().any(|r| r == &s)
    }

    /// The signed removals to pass on (newest last, at most [`MAX_REMOVALS`]).
    pub fn signed_removals(&self) -> Vec<v1::Signed> {
        self.removals
            .iter()
            .rev()
            .take(MAX_REMOVALS)
            .filter_map(|h| hex::decode(h).ok())
            .filter_map(|b| decode_limited("member removal", &b, MEMBERSHIP_LIMIT).ok())
            .collect()
    }

    /// Records a verified removal and its signed proof.
    pub fn record_removal(&mut self, peer: &PeerId, proof: &v1::Signed) {
        self.mark_removed(peer);
        let h = hex::encode(proof.encode_to_vec());
        if !self.removals.contains(&h) {
            self.removals.push(h);
        }
    }

    pub fn mark_removed(&mut self, peer: &PeerId) {
        let s = peer.to_base58();
        self.members.retain(|m| m != &s);
        if !self.removed.contains(&s) {
            self.removed.push(s);
        }
    }

    /// Creates an invite valid for `ttl_ms`; returns (text, id, expires_at_ms).
    pub fn create_invite(
        &mut self,
        owner: &Keypair,
        owner_addrs: &[Multiaddr],
        now_ms: u64,
        ttl_ms: u64,
        rng: &mut impl RngCore,
    ) -> (String, String, u64) {
        let mut token = vec![0u8; 32];
        rng.fill_bytes(&mut token);
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        let inv = v1::Invite {
            protocol_version: PROTOCOL_VERSION,
            owner_public_key: owner.public().encode_protobuf(),
            owner_addrs: owner_addrs.iter().take(16).map(|a| a.to_vec()).collect(),
            token: token.clone(),
            expires_at_ms,
        };
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(inv.encode_to_vec());
        let id = token_id(&token);
        if self.invites.len() >= MAX_INVITES {
            let stale: Vec<String> = self
                .invites
                .iter()
                .filter(|(_, e)| e.state != InviteState::Open || e.expires_at_ms <= now_ms)
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                self.invites.remove(&k);
            }
        }
        self.invites.insert(
            id.clone(),
            InviteEntry {
                token_hash: blake3::hash(&token).to_hex().to_string(),
                created_at_ms: now_ms,
                expires_at_ms,
                state: InviteState::Open,
            },
        );
        (text, id, expires_at_ms)
    }

    /// Consumes a token: Ok once for an open, unexpired invite; the reason otherwise.
    pub fn redeem(&mut self, token: &[u8], now_ms: u64) -> Result<(), MembershipError> {
        let id = token_id(token);
        let entry = self
            .invites
            .get_mut(&id)
            .ok_or(MembershipError::UnknownInvite)?;
        if entry.token_hash != blake3::hash(token).to_hex().as_str() {
            return Err(MembershipError::UnknownInvite);
        }
        match entry.state {
            InviteState::Used => Err(MembershipError::InviteUsed),
            InviteState::Revoked => Err(MembershipError::InviteRevoked),
            InviteState::Open if entry.expires_at_ms <= now_ms => {
                Err(MembershipError::InviteExpired)
            }
            InviteState::Open => {
                entry.state = InviteState::Used;
                Ok(())
            }
        }
    }

    /// Revokes an invite by id; false when no such invite exists.
    pub fn revoke(&mut self, id: &str) -> bool {
        match self.invites.get_mut(id) {
            Some(e) => {
                e.state = InviteState::Revoked;
                true
            }
            None => false,
        }
    }
}

/// Loads this peer's own stored membership, if any.
pub fn load_own(data_dir: &Path) -> Result<Option<v1::Signed>, std::io::Error> {
    let path = data_dir.join(MEMBERSHIP_FILE);
    match fsutil::read_limited(&path, MEMBERSHIP_LIMIT as u64) {
        Ok(bytes) => decode_limited("membership file", &bytes, MEMBERSHIP_LIMIT)
            .map(Some)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )),
    }
}

pub fn save_own(data_dir: &Path, signed: &v1::Signed) -> Result<(), std::io::Error> {
    fsutil::write_atomic(
        &data_dir.join(MEMBERSHIP_FILE),
        &signed.encode_to_vec(),
        0o600,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn granted_membership_verifies_only_for_its_member_and_owner() {
        let owner = Keypair::generate_ed25519();
        let owner_id = owner.public().to_peer_id();
        let member = PeerId::random();
        let signed = grant(&owner, &member, 1000, 0);
        assert_eq!(
            verify(&signed, &owner_id, &member, 2000).unwrap().member,
            member
        );
        assert!(matches!(
            verify(&signed, &owner_id, &PeerId::random(), 2000),
            Err(MembershipError::NotYours { .. })
        ));
        assert!(matches!(
            verify(&signed, &PeerId::random(), &member, 2000),
            Err(MembershipError::WrongOwner { .. })
        ));
        let mut forged = signed.clone();
        forged.signature[0] ^= 1;
        assert_eq!(
            verify(&forged, &owner_id, &member, 2000),
            Err(MembershipError::BadSignature)
        );
        let expiring = grant(&owner, &member, 1000, 1500);
        assert_eq!(
            verify(&expiring, &owner_id, &member, 2000),
            Err(MembershipError::Expired)
        );
    }

    #[test]
    fn invites_are_one_time_expire_and_revoke() {
        let owner = Keypair::generate_ed25519();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut st = SwarmState::default();
        let (text, _, _) = st.create_invite(&owner, &[], 0, 1000, &mut rng);
        let inv = Invite::parse(&text).unwrap();
        assert_eq!(inv.owner, owner.public().to_peer_id());
        st.redeem(&inv.token, 10).unwrap();
        assert_eq!(st.redeem(&inv.token, 10), Err(MembershipError::InviteUsed));

        let (text, _, _) = st.create_invite(&owner, &[], 0, 1000, &mut rng);
        let inv = Invite::parse(&text).unwrap();
        assert_eq!(
            st.redeem(&inv.token, 1000),
            Err(MembershipError::InviteExpired)
        );

        let (text, id, _) = st.create_invite(&owner, &[], 0, 1000, &mut rng);
        assert!(st.revoke(&id));
        let inv = Invite::parse(&text).unwrap();
        assert_eq!(
            st.redeem(&inv.token, 10),
            Err(MembershipError::InviteRevoked)
        );
        assert_eq!(
            st.redeem(&[7u8; 32], 10),
            Err(MembershipError::UnknownInvite)
        );
    }

    #[test]
    fn removal_verifies() {
        let owner = Keypair::generate_ed25519();
        let m = PeerId::random();
        let r = sign_removal(&owner, &m, 5);
        assert_eq!(verify_removal(&r, &owner.public().to_peer_id()).unwrap(), m);
        assert!(verify_removal(&r, &PeerId::random()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_membership_bytes_never_verify(
            record in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128),
            text in "[A-Za-z0-9_-]{0,300}",
        ) {
            let owner = PeerId::random();
            let signed = v1::Signed { record, signature };
            proptest::prop_assert!(verify(&signed, &owner, &PeerId::random(), 0).is_err());
            proptest::prop_assert!(verify_removal(&signed, &owner).is_err());
            let _ = Invite::parse(&text);
        }
    }

    #[test]
    fn garbage_invites_are_refused() {
        assert!(Invite::parse("not base64 !!").is_err());
        assert!(Invite::parse("AAAA").is_err());
    }
}
