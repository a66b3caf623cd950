//! Compressed updates (`worker::compress::decode`, every codec), as a peer sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    // The receiver knows how many values it expects (the model's size); let the input pick
    // one, small enough that an honest decode fits the malloc limit many times over.
    let Some((n, bytes)) = data.split_first_chunk::<2>() else {
        return;
    };
    let expected = u16::from_le_bytes(*n) as usize;
    if let Ok(v) = potluck_worker::compress::decode(bytes, expected) {
        assert_eq!(v.len(), expected);
    }
});
