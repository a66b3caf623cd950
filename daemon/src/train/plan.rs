//! Pure planning for a round: which slice of the parameter vector each member reduces, and
//! how bytes compare with plain data parallelism. Data shards are the coordinator crate's
//! decision (`assign_shards`).
//!
//! The reduction is sharded: member `i` of the round's sorted member list reduces slice `i`
//! of every parameter group, so each member receives `n - 1` slices of size `P / n` and sends
//! back one averaged slice to `n - 1` peers: O(P) bytes per member whatever `n` is, and no
//! member receives every peer's full update.

/// The slices (moved to the exchange machine, which checks frames against them).
pub use potluck_coordinator::exchange::slice_ranges;

/// Bytes plain data-parallel training would put on the wire for the same work: every inner
/// step, each of `peers` replicas reduce-scatters and all-gathers a full f32 gradient of
/// `params` values, sending and receiving `(peers - 1) / peers` of it each way.
pub fn plain_data_parallel_bytes(params: u64, peers: u64, steps: u64) -> u64 {
    if peers < 2 {
        return 0;
    }
    // Per step and peer: 2 phases x (peers-1)/peers x 4 bytes x params, counted at the sender
    // and again at the receiver, as our own counters do.
    let per_peer_sent = 2 * (peers - 1) * params * 4 / peers;
    2 * per_peer_sent * peers * steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_everything_once() {
        for len in [0usize, 1, 7, 1000, 1001] {
            for n in 1..6 {
                let r = slice_ranges(len, n);
                assert_eq!(r.len(), n);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[n - 1].end, len);
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
