//! The checkpoint transfer protocol: a request as a server reads it
//! (`daemon::ckpt_transfer::WireRequest::decode`, 56 bytes) and the manifest a client reads
//! before it asks for pieces (`coordinator::manifest::SignedManifest::decode`), whose content
//! drives the piece scheduler (`coordinator::transfer::Download`).
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_coordinator::manifest::SignedManifest;
use potluck_coordinator::transfer::{Download, DownloadConfig};
use potluck_daemon::ckpt_transfer::{REQUEST_LEN, WireRequest};
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    if let Some(req) = data.first_chunk::<REQUEST_LEN>() {
        if let Ok(r) = WireRequest::decode(req) {
            assert_eq!(&r.encode(), req);
        }
    }
    if let Ok(m) = SignedManifest::decode(data) {
        // A decoded manifest's content is what a download schedules pieces from: it must
        // never panic, however many files or chunks it lists.
        let mut d = Download::new(&m.body().content, &[], DownloadConfig::default());
        d.add_source(0);
        let mut now = 0;
        while let Some(req) = d.poll_request(now) {
            d.handle_failure(req.source, req.piece);
            now += 1;
            if now > 64 {
                break;
            }
        }
    }
});
