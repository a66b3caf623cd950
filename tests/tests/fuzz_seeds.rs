//! The seed corpus of the fuzz targets (fuzz/seeds/<target>/, docs/FUZZING.md), made with
//! the crates' own encoders. Every seed must be accepted by the decoder its target feeds it
//! to, so the fuzzer starts past the first checks; the committed files must be exactly what
//! the encoders make today (a changed wire format fails here until the seeds are made again
//! with `POTLUCK_WRITE_FUZZ_SEEDS=1 cargo test -p potluck-tests --test fuzz_seeds`).

use futures::executor::block_on;
use libp2p::identity::Keypair;
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{RunManifest as CoordRun, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, ManifestBody, SignedManifest, SignerRole, signing_key,
};
use potluck_coordinator::round::{CommitRecord, Contributor, RoundPlan};
use potluck_coordinator::safetensors_header::read_header;
use potluck_daemon::ckpt_transfer::{Op, WireRequest};
use potluck_daemon::dataplane::{Limits, read_frame, seal_payload, write_frame};
use potluck_daemon::membership::{self, Invite, SwarmState};
use potluck_daemon::train::manifest::{DEMO_MANIFEST, ResolvedRun, RunManifest};
use potluck_daemon::train::runs::RunInvite;
use potluck_proto::{PROTOCOL_VERSION, v1};
use potluck_worker::compress::{self, Codec};
use prost::Message;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;

const COORD_SECRET: [u8; 32] = [3; 32];

type Seeds = BTreeMap<(&'static str, &'static str), Vec<u8>>;

fn with(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(bytes);
    v
}

fn keypair(b: u8) -> Keypair {
    Keypair::ed25519_from_bytes([b; 32]).expect("ed25519 key")
}

fn frame(payload: &[u8], level: Option<i32>) -> Vec<u8> {
    let mut h = v1::FrameHeader {
        run_id: vec![7; 32],
        round: 3,
        kind: v1::FrameKind::Contribution as i32,
        len: payload.len() as u64 / 4,
        tokens: 99,
        ..Default::default()
    };
    let wire = seal_payload(&mut h, payload, level);
    let mut out = Vec::new();
    block_on(write_frame(&mut out, &h, &wire)).expect("frame");
    out
}

/// A signed run manifest and a checkpoint manifest of it over one small package file.
fn manifests() -> (SignedRunManifest, SignedManifest) {
    let coord = signing_key(&COORD_SECRET).verifying_key().to_bytes();
    let run = SignedRunManifest::create(
        CoordRun {
            name: "fuzz-seed".into(),
            genesis_root: Hash32([1; 32]),
            coordinator_keys: vec![coord],
            settings: b"{}".to_vec(),
        },
        &COORD_SECRET,
    )
    .expect("run manifest");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("text-0000");
    std::fs::write(&file, b"hello potluck\n").expect("package file");
    let content =
        CheckpointContent::of_files(&[("text-0000".into(), file)], 64 << 10).expect("content");
    let body = ManifestBody {
        run_id: run.run_id(),
        round: 0,
        parent: None,
        root: content.root(),
        content,
        contributors: Vec::new(),
        coordinator_key: coord,
    };
    let mut signed = SignedManifest::new(body);
    signed
        .sign(SignerRole::Coordinator, &COORD_SECRET)
        .expect("signature");
    (run, signed)
}

fn seeds() -> Seeds {
    let mut s = Seeds::new();
    // Tensor frames: raw, zstd, and two on one stream.
    let payload: Vec<u8> = (0..4096u32).flat_map(|i| (i % 7).to_le_bytes()).collect();
    let raw = frame(&payload[..64], None);
    let zstd = frame(&payload, Some(3));
    s.insert(("frame", "raw"), raw.clone());
    s.insert(("frame", "zstd"), zstd.clone());
    s.insert(("frame", "two"), [raw, zstd].concat());

    // Updates, one per codec.
    let values: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
    for (name, codec) in [
        ("none", "none"),
        ("int8", "int8"),
        ("topk", "topk"),
        ("sign", "sign"),
    ] {
        let codec = Codec::parse(codec).expect("codec");
        let mut seed = (values.len() as u16).to_le_bytes().to_vec();
        seed.extend(compress::encode(codec, &values));
        s.insert(("update_codec", name), seed);
    }

    // Control messages, tagged as the control target reads them.
    let run_id = Hash32([7; 32]);
    let peer = keypair(2).public().to_peer_id();
    let mut cap = Vec::new();
    let exchange = v1::CapabilityExchange::default();
    block_on(potluck_daemon::wire::write_frame(
        &mut cap,
        &exchange,
        1 << 20,
    ))
    .expect("frame");
    s.insert(("control", "capability"), with(0, &cap));
    let mut ctl = Vec::new();
    let msg = v1::TrainControl {
        protocol_version: PROTOCOL_VERSION,
        msg: Some(v1::train_control::Msg::Join(v1::RunJoin::default())),
    };
    block_on(potluck_daemon::train::wire::write_control(&mut ctl, msg)).expect("control");
    s.insert(("control", "train"), with(3, &ctl));
    let plan = RoundPlan {
        round: 4,
        base_round: 3,
        base_root: Hash32([5; 32]),
        opened_at_ms: 1000,
        deadline_ms: 2000,
        assignment: vec![(potluck_coordinator::PeerId(peer.to_bytes()), 0)],
    };
    s.insert(
        ("control", "round-opened"),
        with(
            4,
            &potluck_coordinator::wire::encode_round_opened(&run_id, &plan),
        ),
    );
    let commit = CommitRecord {
        round: 4,
        root: Hash32([6; 32]),
        parent: Some((3, Hash32([5; 32]))),
        participants: 1,
        agreeing: vec![Contributor {
            peer: potluck_coordinator::PeerId(peer.to_bytes()),
            tokens: 10,
            update_hash: Hash32([8; 32]),
        }],
    };
    s.insert(
        ("control", "round-committed"),
        with(
            6,
            &potluck_coordinator::wire::encode_round_committed(&run_id, &commit),
        ),
    );

    // Ledger entries, checkpoint manifests and the data package's welcome manifest.
    let (run, entry) = manifests();
    s.insert(("ledger_entry", "entry"), with(0, &entry.encode()));
    s.insert(("ledger_entry", "run"), with(1, &run.encode()));
    let run_bytes = run.encode();
    let mut both = (run_bytes.len() as u16).to_le_bytes().to_vec();
    both.extend(&run_bytes);
    both.extend(entry.encode());
    s.insert(("ledger_entry", "both"), with(2, &both));
    s.insert(("ckpt_transfer", "manifest"), entry.encode());
    let req = WireRequest {
        op: Op::Range,
        root: Hash32([9; 32]),
        file: 0,
        len: 1024,
        offset: 0,
    };
    s.insert(("ckpt_transfer", "range"), req.encode().to_vec());
    s.insert(("datapack", "welcome"), entry.encode());

    // Membership records, removals and invites.
    let owner = keypair(1);
    let grant = membership::grant(&owner, &owner.public().to_peer_id(), 1, 0);
    s.insert(("membership", "grant"), with(0, &grant.encode_to_vec()));
    let removal = membership::sign_removal(&owner, &peer, 1);
    s.insert(("membership", "removal"), with(0, &removal.encode_to_vec()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let addr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().expect("addr");
    let (invite, _, _) = SwarmState::default().create_invite(
        &owner,
        std::slice::from_ref(&addr),
        1,
        60_000,
        &mut rng,
    );
    s.insert(("membership", "invite"), with(1, invite.as_bytes()));
    let run_invite = RunInvite {
        run_id: [7; 32],
        coordinator: peer,
        addrs: vec![addr],
        swarm_invite: None,
    };
    s.insert(
        ("membership", "run-invite"),
        with(2, run_invite.encode().as_bytes()),
    );

    // Run manifests: the demo's TOML and its canonical JSON.
    s.insert(
        ("run_manifest", "demo-toml"),
        with(0, DEMO_MANIFEST.as_bytes()),
    );
    let resolved = RunManifest::parse(DEMO_MANIFEST)
        .and_then(|m| m.resolve())
        .expect("demo manifest");
    s.insert(
        ("run_manifest", "demo-canonical"),
        with(1, &resolved.canonical_bytes()),
    );

    // A safetensors file: header and data.
    let json =
        br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"a":"b"}}"#;
    let mut st = (json.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(json);
    st.extend_from_slice(&[0; 8]);
    s.insert(("safetensors_header", "one-tensor"), with(0, &st));
    s
}

/// Checks that each seed gets past its target's decoder (the decoders the targets call).
fn accepted(target: &str, seed: &[u8]) -> bool {
    let tail = &seed[1..];
    match target {
        "frame" => {
            let mut r = futures::io::Cursor::new(seed);
            matches!(
                block_on(read_frame(&mut r, &Limits::default())),
                Ok(Some(_))
            )
        }
        "update_codec" => {
            let n = u16::from_le_bytes([seed[0], seed[1]]) as usize;
            compress::decode(&seed[2..], n).is_ok()
        }
        "control" => match seed[0] {
            0 => block_on(
                potluck_daemon::wire::read_frame::<v1::CapabilityExchange, _>(
                    &mut &tail[..],
                    "capability",
                    1 << 20,
                ),
            )
            .is_ok(),
            3 => {
                let mut r = futures::io::Cursor::new(tail);
                matches!(
                    block_on(potluck_daemon::train::wire::read_control(&mut r)),
                    Ok(Some(_))
                )
            }
            4 => potluck_coordinator::wire::decode_round_opened(tail, &Hash32([7; 32])).is_ok(),
            6 => potluck_coordinator::wire::decode_round_committed(tail, &Hash32([7; 32])).is_ok(),
            _ => false,
        },
        "ledger_entry" => match seed[0] {
            0 => SignedManifest::decode(tail).is_ok(),
            1 => SignedRunManifest::decode(tail).is_ok(),
            _ => {
                let n = u16::from_le_bytes([tail[0], tail[1]]) as usize;
                let (run, entry) = tail[2..].split_at(n);
                match (
                    SignedRunManifest::decode(run),
                    SignedManifest::decode(entry),
                ) {
                    (Ok(run), Ok(entry)) => {
                        potluck_coordinator::verify::check_manifest_against_run(&run, &entry)
                            .is_ok()
                    }
                    _ => false,
                }
            }
        },
        "ckpt_transfer" => {
            SignedManifest::decode(seed).is_ok()
                || seed
                    .first_chunk()
                    .is_some_and(|r| WireRequest::decode(r).is_ok())
        }
        "datapack" => SignedManifest::decode(seed).is_ok(),
        "membership" => {
            let text = std::str::from_utf8(tail).unwrap_or("");
            match seed[0] {
                0 => v1::Signed::decode(tail).is_ok_and(|s| {
                    let owner = keypair(1).public().to_peer_id();
                    membership::verify(&s, &owner, &owner, 1).is_ok()
                        || membership::verify_removal(&s, &owner).is_ok()
                }),
                1 => Invite::parse(text).is_ok(),
                _ => RunInvite::parse(text).is_ok(),
            }
        }
        "run_manifest" => match seed[0] {
            0 => std::str::from_utf8(tail)
                .ok()
                .and_then(|t| RunManifest::parse(t).ok())
                .is_some_and(|m| m.resolve().is_ok()),
            _ => ResolvedRun::from_canonical(tail, blake3::hash(tail).as_bytes()).is_ok(),
        },
        "safetensors_header" => read_header(&mut &tail[..], tail.len() as u64).is_ok(),
        _ => false,
    }
}

fn seeds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds")
}

#[test]
fn every_seed_passes_its_decoder() {
    for ((target, name), seed) in seeds() {
        assert!(
            accepted(target, &seed),
            "seed {target}/{name} is refused by its decoder"
        );
    }
}

#[test]
fn committed_seeds_are_what_the_encoders_make() {
    let seeds = seeds();
    let dir = seeds_dir();
    if std::env::var_os("POTLUCK_WRITE_FUZZ_SEEDS").is_some() {
        for ((target, name), seed) in &seeds {
            std::fs::create_dir_all(dir.join(target)).expect("seed dir");
            std::fs::write(dir.join(target).join(name), seed).expect("seed file");
        }
    }
    for ((target, name), seed) in &seeds {
        let path = dir.join(target).join(name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (make the seeds again, see the module doc)",
                path.display()
            )
        });
        assert_eq!(
            &on_disk,
            seed,
            "{} is stale: make the seeds again",
            path.display()
        );
    }
    for target in std::fs::read_dir(&dir).expect("seeds dir") {
        let target = target.expect("entry").path();
        for f in std::fs::read_dir(&target).expect("target dir") {
            let f = f.expect("entry").path();
            let t = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let n = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert!(
                seeds.keys().any(|(a, b)| *a == t && *b == n),
                "{} is not made by this test",
                f.display()
            );
        }
    }
}
