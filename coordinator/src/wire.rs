//! Wire forms of the round messages (`potluck.v1.RoundOpened`, `RoundReport`,
//! `RoundCommitted`) and their checked conversions to the domain types of [`crate::round`].
//! Every decoder takes the bytes, enforces a size limit before decoding, checks the
//! protocol version and the run id, and bounds every list.

use crate::round::{CommitRecord, Contributor, Report, RoundPlan};
use crate::{Hash32, PeerId};
use potluck_proto::{DecodeError, PROTOCOL_VERSION, check_version, decode_limited, invalid, v1};
use prost::Message;

/// Largest round announcement accepted (a 100,000-peer assignment is ~5 MB).
pub const MAX_ROUND_OPENED_BYTES: usize = 16 << 20;
pub const MAX_ROUND_REPORT_BYTES: usize = 1024;
pub const MAX_ROUND_COMMITTED_BYTES: usize = 16 << 20;

fn check_run(got: &[u8], run_id: &Hash32) -> Result<(), DecodeError> {
    if Hash32::from_slice("run id", got)? != *run_id {
        return Err(invalid("run id", "message of another run"));
    }
    Ok(())
}

pub fn encode_round_opened(run_id: &Hash32, plan: &RoundPlan) -> Vec<u8> {
    v1::RoundOpened {
        protocol_version: PROTOCOL_VERSION,
        run_id: run_id.0.to_vec(),
        round: plan.round,
        base_round: plan.base_round,
        base_root: plan.base_root.0.to_vec(),
        opened_at_ms: plan.opened_at_ms,
        deadline_ms: plan.deadline_ms,
        assignment: plan
            .assignment
            .iter()
            .map(|(p, s)| v1::ShardAssignment {
                peer_id: p.0.clone(),
                shard: *s,
            })
            .collect(),
    }
    .encode_to_vec()
}

pub fn decode_round_opened(bytes: &[u8], run_id: &Hash32) -> Result<RoundPlan, DecodeError> {
    let w: v1::RoundOpened = decode_limited("round opened", bytes, MAX_ROUND_OPENED_BYTES)?;
    check_version(w.protocol_version)?;
    check_run(&w.run_id, run_id)?;
    if w.base_round >= w.round || w.deadline_ms < w.opened_at_ms {
        return Err(invalid(
            "round opened",
            "base round or deadline out of order",
        ));
    }
    let mut assignment = Vec::with_capacity(w.assignment.len());
    for a in w.assignment {
        let p = PeerId::from_wire(&a.peer_id)?;
        if assignment
            .last()
            .is_some_and(|(q, _): &(PeerId, u32)| *q >= p)
        {
            return Err(invalid(
                "round opened",
                "assignment not sorted or peer twice",
            ));
        }
        assignment.push((p, a.shard));
    }
    Ok(RoundPlan {
        round: w.round,
        base_round: w.base_round,
        base_root: Hash32::from_slice("base root", &w.base_root)?,
        opened_at_ms: w.opened_at_ms,
        deadline_ms: w.deadline_ms,
        assignment,
    })
}

pub fn encode_round_report(run_id: &Hash32, r: &Report) -> Vec<u8> {
    v1::RoundReport {
        protocol_version: PROTOCOL_VERSION,
        run_id: run_id.0.to_vec(),
        round: r.round,
        tokens: r.tokens,
        update_hash: r.update_hash.0.to_vec(),
        weight_root: r.weight_root.0.to_vec(),
    }
    .encode_to_vec()
}

/// Decodes a report sent by `sender` (the authenticated source of the message).
pub fn decode_round_report(
    bytes: &[u8],
    run_id: &Hash32,
    sender: PeerId,
) -> Result<Report, DecodeError> {
    let w: v1::RoundReport = decode_limited("round report", bytes, MAX_ROUND_REPORT_BYTES)?;
    check_version(w.protocol_version)?;
    check_run(&w.run_id, run_id)?;
    Ok(Report {
        peer: sender,
        round: w.round,
        tokens: w.tokens,
        update_hash: Hash32::from_slice("update hash", &w.update_hash)?,
        weight_root: Hash32::from_slice("weight root", &w.weight_root)?,
    })
}

pub fn encode_round_committed(run_id: &Hash32, c: &CommitRecord) -> Vec<u8> {
    v1::RoundCommitted {
        protocol_version: PROTOCOL_VERSION,
        run_id: run_id.0.to_vec(),
        round: c.round,
        root: c.root.0.to_vec(),
        parent_round: c.parent.map_or(0, |p| p.0),
        parent_root: c.parent.map(|p| p.1.0.to_vec()).unwrap_or_default(),
        agreeing: c
            .agreeing
            .iter()
            .map(|a| v1::Contributor {
                peer_id: a.peer.0.clone(),
                update_hash: a.update_hash.0.to_vec(),
                tokens: a.tokens,
            })
            .collect(),
        participants: c.participants,
    }
    .encode_to_vec()
}

pub fn decode_round_committed(bytes: &[u8], run_id: &Hash32) -> Result<CommitRecord, DecodeError> {
    let w: v1::RoundCommitted =
        decode_limited("round committed", bytes, MAX_ROUND_COMMITTED_BYTES)?;
    check_version(w.protocol_version)?;
    check_run(&w.run_id, run_id)?;
    let parent = if w.parent_root.is_empty() {
        None
    } else {
        if w.parent_round >= w.round {
            return Err(invalid(
                "round committed",
                "parent round not before the round",
            ));
        }
        Some((
            w.parent_round,
            Hash32::from_slice("parent root", &w.parent_root)?,
        ))
    };
    if w.agreeing.len() > w.participants as usize {
        return Err(invalid(
            "round committed",
            "more agreeing peers than participants",
        ));
    }
    let mut agreeing = Vec::with_capacity(w.agreeing.len());
    for a in w.agreeing {
        let peer = PeerId::from_wire(&a.peer_id)?;
        if agreeing
            .last()
            .is_some_and(|p: &Contributor| p.peer >= peer)
        {
            return Err(invalid(
                "round committed",
                "agreeing peers not sorted or listed twice",
            ));
        }
        agreeing.push(Contributor {
            peer,
            tokens: a.tokens,
            update_hash: Hash32::from_slice("update hash", &a.update_hash)?,
        });
    }
    Ok(CommitRecord {
        round: w.round,
        root: Hash32::from_slice("root", &w.root)?,
        parent,
        participants: w.participants,
        agreeing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::{Action, RunConfig, RunMachine};
    use proptest::prelude::*;

    #[test]
    fn round_messages_round_trip_through_a_machine() {
        let run = Hash32([4; 32]);
        let cfg = RunConfig {
            run_id: run,
            min_participants: 2,
            ..RunConfig::default()
        };
        let mut m = RunMachine::new(cfg, Hash32([0; 32])).unwrap();
        let (a, b) = (PeerId(b"a".to_vec()), PeerId(b"b".to_vec()));
        m.handle_join(a.clone(), 0);
        m.handle_join(b.clone(), 0);
        let plan = m.open_round().unwrap().clone();
        assert_eq!(
            decode_round_opened(&encode_round_opened(&run, &plan), &run).unwrap(),
            plan
        );
        assert!(decode_round_opened(&encode_round_opened(&run, &plan), &Hash32([5; 32])).is_err());
        for p in [&a, &b] {
            let r = Report {
                peer: p.clone(),
                round: plan.round,
                tokens: 3,
                update_hash: Hash32([1; 32]),
                weight_root: Hash32([2; 32]),
            };
            let bytes = encode_round_report(&run, &r);
            let back = decode_round_report(&bytes, &run, p.clone()).unwrap();
            assert_eq!(back, r);
            m.handle_report(back, 1).unwrap();
        }
        let c = std::iter::from_fn(|| m.poll_action())
            .find_map(|x| match x {
                Action::Committed(c) => Some(c),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            decode_round_committed(&encode_round_committed(&run, &c), &run).unwrap(),
            c
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let run = Hash32([4; 32]);
            let _ = decode_round_opened(&bytes, &run);
            let _ = decode_round_report(&bytes, &run, PeerId(vec![1]));
            let _ = decode_round_committed(&bytes, &run);
        }
    }
}
