//! Potluck's wire schema. The `.proto` files under `proto/` are the single source of truth for
//! every message that crosses a process boundary; this crate holds the code generated from
//! them (`potluck.v1`) and the few rules every decoder must follow: a size limit checked
//! before anything is decoded, and a protocol version that must match.
//!
//! Domain types live in the crates that own them and convert from these wire types with
//! `TryFrom` at the edge, so the core never sees a half-valid message.

/// Code generated from `proto/*.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/potluck.v1.rs"));
}

/// The protocol version this build speaks. A record with another version is refused with
/// [`DecodeError::Version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {len} bytes exceeds the limit of {limit} bytes for {what}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("malformed {what}: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error(
        "peer speaks protocol version {theirs} but this build speaks {ours}: upgrade the older side"
    )]
    Version { theirs: u32, ours: u32 },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Decodes `bytes` as `M` after checking its length against `limit`; never allocates for a
/// message larger than the limit.
pub fn decode_limited<M: prost::Message + Default>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<M, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            limit,
        });
    }
    M::decode(bytes).map_err(|source| DecodeError::Malformed { what, source })
}

/// Checks a record's protocol version against [`PROTOCOL_VERSION`].
pub fn check_version(theirs: u32) -> Result<(), DecodeError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(DecodeError::Version {
            theirs,
            ours: PROTOCOL_VERSION,
        })
    }
}

/// Builds a [`DecodeError::Invalid`]; used by `TryFrom` conversions in other crates.
pub fn invalid(what: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        what,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    #[test]
    fn oversized_message_is_refused_before_decoding() {
        let big = vec![0u8; 2048];
        let err = decode_limited::<v1::CapabilityRecord>("record", &big, 1024).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { len: 2048, .. }));
    }

    #[test]
    fn wrong_version_is_a_clear_refusal() {
        let err = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn record_round_trips() {
        let rec = v1::CapabilityRecord {
            protocol_version: PROTOCOL_VERSION,
            peer_id: vec![1, 2, 3],
            capabilities: Some(v1::Capabilities {
                cpu_count: 8,
                ..Default::default()
            }),
            listen_addrs: vec![b"/ip4/127.0.0.1/udp/1/quic-v1".to_vec()],
            issued_at_ms: 42,
        };
        let bytes = rec.encode_to_vec();
        let back: v1::CapabilityRecord = decode_limited("record", &bytes, 1 << 16).unwrap();
        assert_eq!(back, rec);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_limited::<v1::CapabilityRecord>("record", &bytes, 1 << 16);
        }
    }
}
