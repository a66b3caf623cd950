//! The `potluck` binary.
fn main() {}
