//! potluck-coordinator: run state machines and provenance (placeholder until it lands).
