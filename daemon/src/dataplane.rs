//! The data plane: framed, length-limited, compressed tensor messages on QUIC streams.
