//! Update compression codecs with error feedback (filled in by the swarm-training work).
