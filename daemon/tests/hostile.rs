//! Hostile input on every protocol the daemon itself speaks (capability exchange,
//! membership): a 2^32 length prefix, truncated frames and random bytes are refused, the
//! offending stream is closed promptly, and the daemon keeps serving other peers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{addr, config, eventually, listed, start};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use potluck_daemon::Node;
use potluck_daemon::net::{CAPABILITY_PROTOCOL, MEMBERSHIP_PROTOCOL, NetEvent};
use rand::RngCore;

/// The attacks: each is written on a fresh stream.
fn attacks() -> Vec<(&'static str, Vec<u8>, bool)> {
    let mut random = vec![0u8; 4096];
    rand::rng().fill_bytes(&mut random);
    vec![
        // (name, bytes, close our write side afterwards)
        (
            "2^32 length prefix",
            vec![0xff, 0xff, 0xff, 0xff, 0, 1, 2, 3],
            false,
        ),
        (
            "just over the limit",
            (64u32 * 1024).to_be_bytes().to_vec(),
            false,
        ),
        ("truncated frame", vec![0, 0, 0, 100, 1, 2, 3], true),
        ("truncated prefix", vec![0, 0], true),
        ("random bytes", random, true),
        (
            "valid prefix, garbage body",
            [vec![0, 0, 0, 8], vec![0xff; 8]].concat(),
            true,
        ),
    ]
}

/// Sends every attack to `target` on `protocol` and checks each stream is closed by the
/// daemon (read returns EOF or an error) within 5 s.
async fn attack(x: &Node, target: PeerId, protocol: StreamProtocol) {
    let mut control = x.client().stream_control();
    for (name, bytes, close) in attacks() {
        let mut s = control
            .open_stream(target, protocol.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot open stream: {e}"));
        let _ = s.write_all(&bytes).await;
        let _ = s.flush().await;
        if close {
            let _ = s.close().await;
        }
        let mut buf = vec![0u8; 1024];
        let ended = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        match ended {
            Err(_) => panic!("{name}: stream left open"),
            // The daemon must not answer garbage with a record.
            Ok(Ok(n)) if n > 0 => panic!("{name}: daemon answered {n} bytes"),
            Ok(_) => {}
        }
    }
}

async fn connect(x: &Node, target: libp2p::Multiaddr) -> PeerId {
    let mut ev = x.client().events();
    x.client().dial(target).await.unwrap();
    loop {
        if let NetEvent::Connected { peer, .. } = ev.recv().await.unwrap() {
            return peer;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_exchange_survives_garbage() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let p = start(dirs[0].path(), vec![]).await;
    let x = start(dirs[1].path(), vec![]).await;
    let target = connect(&x, addr(&p, "quic-v1").await).await;
    attack(&x, target, CAPABILITY_PROTOCOL).await;

    // The daemon still serves an honest newcomer.
    let y = start(dirs[2].path(), vec![addr(&p, "tcp").await]).await;
    let (pid, yid) = (p.client().local_peer_id(), y.client().local_peer_id());
    assert!(
        eventually(Duration::from_secs(10), || async {
            listed(&y).await.contains(&pid) && listed(&p).await.contains(&yid)
        })
        .await
    );
    for n in [p, x, y] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_protocol_survives_garbage() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut c = config(dirs[0].path(), vec![]);
    c.private = true;
    // A generous deadline so that every attack runs on one gated connection.
    c.membership_deadline = Duration::from_millis(1900);
    let owner = Node::start(c).await.unwrap();
    let x = start(dirs[1].path(), vec![]).await;
    let target = connect(&x, addr(&owner, "quic-v1").await).await;
    attack(&x, target, MEMBERSHIP_PROTOCOL).await;

    // The owner still admits an honest member.
    let m = start(dirs[2].path(), vec![]).await;
    let inv = owner
        .client()
        .create_invite(Duration::from_secs(60))
        .await
        .unwrap();
    m.client().join(&inv.text).await.unwrap();
    let mid = m.client().local_peer_id();
    assert!(
        eventually(Duration::from_secs(10), || async {
            listed(&owner).await.contains(&mid)
        })
        .await
    );
    for n in [owner, x, m] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_protocol_version_is_refused() {
    use prost::Message as _;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let p = start(dirs[0].path(), vec![]).await;
    let x = start(dirs[1].path(), vec![]).await;
    let target = connect(&x, addr(&p, "quic-v1").await).await;
    let mut events = x.client().events();
    let mut s = x
        .client()
        .stream_control()
        .open_stream(target, CAPABILITY_PROTOCOL)
        .await
        .unwrap();
    let msg = potluck_proto::v1::CapabilityExchange {
        protocol_version: potluck_proto::PROTOCOL_VERSION + 1,
        record: None,
    }
    .encode_to_vec();
    s.write_all(&(msg.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&msg).await.unwrap();
    s.close().await.unwrap();
    // The daemon refuses the peer: it closes the connection.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let NetEvent::Disconnected { peer, .. } = events.recv().await.unwrap()
                && peer == target
            {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "peer with another protocol version stayed connected"
    );
    for n in [p, x] {
        n.shutdown().await;
    }
}
