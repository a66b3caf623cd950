//! Run manifests: the TOML a user or an invite hands the daemon
//! (`daemon::train::manifest::RunManifest::parse`, then `resolve`), and the canonical JSON a
//! peer sends when it welcomes us into a run (`ResolvedRun::from_canonical`).
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_daemon::train::manifest::{ResolvedRun, RunManifest};
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(text) = std::str::from_utf8(bytes)
            && let Ok(m) = RunManifest::parse(text)
        {
            let _ = m.resolve();
        }
    } else {
        // The id check comes first in the daemon; pass the bytes' own hash so that the
        // fuzzer reaches the JSON decoder and the validation behind it.
        let id = blake3_of(bytes);
        if let Ok(run) = ResolvedRun::from_canonical(bytes, &id) {
            let again = run.canonical_bytes();
            assert!(ResolvedRun::from_canonical(&again, &blake3_of(&again)).is_ok());
        }
    }
});

fn blake3_of(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}
