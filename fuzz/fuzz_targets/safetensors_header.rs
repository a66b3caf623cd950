//! The safetensors header of a checkpoint file, read before any tensor is mapped
//! (`coordinator::safetensors_header::read_header`).
#![no_main]

use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_coordinator::safetensors_header::read_header;
use potluck_fuzz as _;

fuzz_target!(|data: &[u8]| {
    // The file may be longer than the bytes we have (the tensors follow the header): let the
    // input's first byte stretch the declared file length.
    let Some((&extra, bytes)) = data.split_first() else {
        return;
    };
    let file_len = bytes.len() as u64 + (u64::from(extra) << 20);
    if let Ok(h) = read_header(&mut &bytes[..], file_len) {
        for t in &h.tensors {
            assert!(t.data_begin <= t.data_end);
            assert!(8 + h.header_len + t.data_end <= file_len);
        }
    }
});
