//! Tensor frames of the data plane (`daemon::dataplane::read_frame`): the length prefix, the
//! protobuf header, the payload (raw or zstd) and its hash, read from a peer's stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_daemon::dataplane::{Limits, read_frame};
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    // The daemon's own limits: a frame may declare up to 1 GiB, and a hostile one must not
    // make us allocate that much before the bytes arrive (the fuzzer's malloc limit).
    let limits = Limits::default();
    let mut r = futures::io::Cursor::new(data);
    // Frames follow each other on one stream: read until the end or the first error.
    while let Ok(Some(_)) = futures::executor::block_on(read_frame(&mut r, &limits)) {}
});
