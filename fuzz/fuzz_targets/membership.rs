//! Membership records, removals and invites, as a peer presents them: the signed records
//! (`daemon::membership::{verify, owner_in, verify_removal}`), the swarm invite's text form
//! (`membership::Invite::parse`) and the run invite's (`train::runs::RunInvite::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use libp2p::identity::Keypair;
use potluck_daemon::membership;
use potluck_daemon::train::runs::RunInvite;
use potluck_fuzz as _;
use potluck_proto::{decode_limited, v1};
use std::sync::OnceLock;

fn owner() -> &'static libp2p::PeerId {
    static OWNER: OnceLock<libp2p::PeerId> = OnceLock::new();
    OWNER.get_or_init(|| {
        Keypair::ed25519_from_bytes([1; 32])
            .expect("key")
            .public()
            .to_peer_id()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let Ok(signed) =
                decode_limited::<v1::Signed>("membership", bytes, membership::MEMBERSHIP_LIMIT)
            else {
                return;
            };
            let _ = membership::verify(&signed, owner(), owner(), 1);
            let _ = membership::owner_in(&signed);
            let _ = membership::verify_removal(&signed, owner());
        }
        1 => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                let _ = membership::Invite::parse(text);
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                let _ = RunInvite::parse(text);
            }
        }
    }
});
