//! potluck-worker: all tensor math of Potluck, with no sockets and no async runtime, so the
//! daemon can drive it and tests can run it alone.

pub mod compress;
