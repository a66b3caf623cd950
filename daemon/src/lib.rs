//! potluck-daemon: the I/O shell of Potluck and the `potluck` binary.

pub mod dataplane;
