//! What every fuzz target links: an allocator that fails the target (abort, which libFuzzer
//! reports as a crash and saves the input) on any single allocation over [`MAX_ALLOC`].
//! libFuzzer's own `-malloc_limit_mb` needs a sanitizer's malloc hooks, and `-rss_limit_mb`
//! misses a reservation that is never touched; this catches a decoder that reserves what
//! a peer claims. No input of the targets (at most a few KiB) justifies a quarter GiB.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation a target may make.
pub const MAX_ALLOC: usize = 256 << 20;

struct Capped;

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No allocation here: formatting integers into stderr does not allocate.
        eprintln!("fuzz: one allocation of {size} bytes, over the {MAX_ALLOC}-byte cap");
        std::process::abort();
    }
}

// SAFETY: every call is passed to `System` unchanged; the check only reads the size.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;
