//! Shared helpers for Potluck's benchmarks.
