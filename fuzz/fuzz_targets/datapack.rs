//! The data package a peer fetches when it joins a run: the signed welcome manifest a
//! coordinator sends (`SignedManifest::decode`, as `daemon::train::datapack::link_package`
//! reads it) and the check of a package directory against its content
//! (`coordinator::verify::verify_content`), where a hostile manifest's file names, lengths
//! and chunk sizes meet the file system.
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_coordinator::manifest::SignedManifest;
use potluck_fuzz as _;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A package directory with one small text file, made once per process.
fn package_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("potluck-fuzz-datapack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("package dir");
        std::fs::write(dir.join("text-0000"), b"hello potluck\n").expect("package file");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = SignedManifest::decode(data) else {
        return;
    };
    let body = signed.body();
    let _ = body.content.root() == body.root;
    let _ = potluck_coordinator::verify::verify_content(package_dir(), &body.content);
});
