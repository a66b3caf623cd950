//! The daemon's persistent ed25519 identity. The key is created once, on first start, in the
//! data dir (mode 0600, written atomically) and reused on every restart so the peer id is
//! stable. A key file that exists but cannot be read or decoded is an error naming the file:
//! silently minting a new identity would orphan the peer's memberships and run state.

use std::io;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use crate::fsutil;

/// File name of the identity key inside the data dir.
pub const KEY_FILE: &str = "identity.key";

/// A protobuf-encoded ed25519 keypair is about 70 bytes; anything far larger is not ours.
const KEY_FILE_LIMIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read identity key {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "identity key {path} is corrupted ({reason}); restore it from a backup, or delete it to \
         start over with a NEW peer id"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write identity key {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads the key from `data_dir`, creating it when (and only when) no key file exists.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => load(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| IdentityError::Write {
                    path: path.clone(),
                    source: io::Error::other(e.to_string()),
                })?;
            fsutil::write_atomic(&path, &bytes, 0o600)
                .map_err(|source| IdentityError::Write { path, source })?;
            Ok(key)
        }
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn load(path: &Path) -> Result<Keypair, IdentityError> {
    let bytes = fsutil::read_limited(path, KEY_FILE_LIMIT).map_err(|source| {
        if source.kind() == io::ErrorKind::InvalidData {
            IdentityError::Corrupt {
                path: path.to_path_buf(),
                reason: source.to_string(),
            }
        } else {
            IdentityError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if key.clone().try_into_ed25519().is_err() {
        return Err(IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: "not an ed25519 key".into(),
        });
    }
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupted_key_is_refused_and_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, b"garbage").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }));
        assert!(err.to_string().contains(KEY_FILE));
        assert_eq!(std::fs::read(&path).unwrap(), b"garbage");
    }

    #[test]
    fn oversized_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), vec![1u8; 10_000]).unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
