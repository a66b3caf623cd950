//! End-to-end tests of Potluck across several daemons live in `tests/tests/`; this library is
//! empty. Tests that need the `potluck` binary itself (`CARGO_BIN_EXE_potluck`) or network
//! namespaces live in `daemon/tests/`, because cargo only exposes a binary to its own
//! package's tests.
