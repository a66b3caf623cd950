//! Control messages between peers and from the control socket: the length-prefixed protobuf
//! frames of `daemon::wire::read_frame` (capability and membership exchanges) and
//! `daemon::train::wire::read_control` (training control), the coordinator's round messages
//! (`coordinator::wire`), and the control socket's requests (tonic decodes them with prost).
#![no_main]

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
// The allocation cap (src/lib.rs).
use potluck_coordinator::Hash32;
use potluck_fuzz as _;
use potluck_proto::{decode_limited, v1};

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let run_id = Hash32([7; 32]);
    match which % 12 {
        0 => {
            let mut r = bytes;
            let _ = block_on(
                potluck_daemon::wire::read_frame::<v1::CapabilityExchange, _>(
                    &mut r,
                    "capability",
                    LIMIT,
                ),
            );
        }
        1 => {
            let mut r = bytes;
            let _ = block_on(
                potluck_daemon::wire::read_frame::<v1::MembershipRequest, _>(
                    &mut r,
                    "membership",
                    LIMIT,
                ),
            );
        }
        2 => {
            let mut r = bytes;
            let _ = block_on(
                potluck_daemon::wire::read_frame::<v1::MembershipResponse, _>(
                    &mut r,
                    "membership",
                    LIMIT,
                ),
            );
        }
        3 => {
            let mut r = futures::io::Cursor::new(bytes);
            while let Ok(Some(_)) = block_on(potluck_daemon::train::wire::read_control(&mut r)) {}
        }
        4 => {
            let _ = potluck_coordinator::wire::decode_round_opened(bytes, &run_id);
        }
        5 => {
            let sender = potluck_coordinator::PeerId(vec![0, 4, 1, 2, 3, 4]);
            let _ = potluck_coordinator::wire::decode_round_report(bytes, &run_id, sender);
        }
        6 => {
            let _ = potluck_coordinator::wire::decode_round_committed(bytes, &run_id);
        }
        7 => {
            let _ = decode_limited::<v1::CapabilityRecord>("capability record", bytes, LIMIT);
        }
        8 => {
            let _ = decode_limited::<v1::StartRunRequest>("start run", bytes, LIMIT);
        }
        9 => {
            let _ = decode_limited::<v1::JoinRunRequest>("join run", bytes, LIMIT);
        }
        10 => {
            let _ = decode_limited::<v1::AcceptRunInviteRequest>("accept run invite", bytes, LIMIT);
        }
        _ => {
            let _ = decode_limited::<v1::JoinRequest>("join", bytes, LIMIT);
        }
    }
});
