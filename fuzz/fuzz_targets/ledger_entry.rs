//! Ledger entries (`coordinator::store::Ledger::read_entries` decodes each file with
//! `SignedManifest::decode`) and the signed run manifest that anchors the ledger
//! (`coordinator::failover::SignedRunManifest::decode`), then the check of one against the
//! other (`coordinator::verify::check_manifest_against_run`).
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_coordinator::failover::SignedRunManifest;
use potluck_coordinator::manifest::SignedManifest;
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(m) = SignedManifest::decode(bytes) {
                // A decoded entry re-encodes to the bytes it came from (canonical form).
                assert_eq!(m.encode(), bytes);
            }
        }
        1 => {
            let _ = SignedRunManifest::decode(bytes);
        }
        _ => {
            // Both, split by a length prefix: an entry checked against its run.
            let Some((n, rest)) = bytes.split_first_chunk::<2>() else {
                return;
            };
            let n = (u16::from_le_bytes(*n) as usize).min(rest.len());
            let (run, entry) = rest.split_at(n);
            if let (Ok(run), Ok(entry)) = (
                SignedRunManifest::decode(run),
                SignedManifest::decode(entry),
            ) {
                let _ = potluck_coordinator::verify::check_manifest_against_run(&run, &entry);
            }
        }
    }
});
