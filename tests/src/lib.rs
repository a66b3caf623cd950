//! Shared helpers for Potluck's end-to-end tests.
