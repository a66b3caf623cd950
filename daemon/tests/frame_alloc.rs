//! Regression inputs of the `frame` fuzz target (docs/FUZZING.md), checked for what the
//! reader allocates: a frame's reader must not reserve what a frame claims before the bytes
//! arrive. This binary counts the largest single allocation, so its tests run one at a time
//! (`PEAK` is shared): each resets it under `SERIAL`.
#![allow(unsafe_code)]

use futures::executor::block_on;
use futures::io::Cursor;
use potluck_daemon::dataplane::{FrameError, Limits, read_frame};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation since the last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Held while a test reads, so that the other test's allocations do not count.
static SERIAL: Mutex<()> = Mutex::new(());

struct Peak;

// SAFETY: every call is passed to `System` unchanged; only the size is recorded.
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        PEAK.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        PEAK.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

/// Reads `bytes` as one frame and returns the result and the largest single allocation.
fn read_counting(
    bytes: &[u8],
) -> (
    Result<Option<potluck_daemon::dataplane::Frame>, FrameError>,
    usize,
) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    PEAK.store(0, Ordering::Relaxed);
    let read = block_on(read_frame(&mut Cursor::new(bytes), &Limits::default()));
    (read, PEAK.load(Ordering::Relaxed))
}

/// A 145-byte frame whose header declares a 1 GiB zstd payload and whose zstd frame declares
/// the same content size, with 16 KiB of real content. The reader used to reserve the whole
/// gigabyte before decompressing.
#[test]
fn a_small_frame_claiming_a_gigabyte_is_refused_without_reserving_it() {
    let bytes = include_bytes!("data/frame-zstd-claims-1gib.bin");
    let (read, peak) = read_counting(bytes);
    assert!(
        matches!(read, Err(FrameError::Decompress { want, .. }) if want == 1 << 30),
        "{read:?}"
    );
    assert!(
        peak <= 8 << 20,
        "a {}-byte frame allocated {peak} bytes at once",
        bytes.len()
    );
}

/// The input the `frame` target found (after 2.8 million executions): a 137-byte stream whose
/// first frame declares 268 MB of zstd payload and carries a broken zstd frame claiming more.
#[test]
fn the_fuzzers_frame_is_refused_without_reserving_its_claim() {
    let bytes = include_bytes!("data/frame-zstd-claims-256mib.bin");
    let (read, peak) = read_counting(bytes);
    assert!(
        matches!(read, Err(FrameError::Decompress { .. })),
        "{read:?}"
    );
    assert!(
        peak <= 8 << 20,
        "a {}-byte frame allocated {peak} bytes at once",
        bytes.len()
    );
}
