//! Shared helpers for Potluck's benchmarks: the real-text corpus ([`corpus`]) and the
//! in-process swarm that the bytes benchmark trains ([`swarm_bytes`]).

pub mod corpus;
pub mod swarm_bytes;
