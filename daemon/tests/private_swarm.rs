//! Private swarms closed by membership: invites admit members, members find each other, a
//! non-member is disconnected within 2 s over QUIC and TCP and learns nothing, and expired,
//! revoked or reused invites and removed members are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{addr, config, eventually, listed, start};
use libp2p::PeerId;
use potluck_daemon::Node;
use potluck_daemon::net::NetEvent;

async fn start_owner(dir: &std::path::Path) -> Node {
    let mut c = config(dir, vec![]);
    c.private = true;
    Node::start(c).await.unwrap()
}

async fn lists(node: &Node, peer: PeerId) -> bool {
    listed(node).await.contains(&peer)
}

/// Dials `target` from `x` and returns how long the connection lived.
async fn connection_lifetime(x: &Node, target: libp2p::Multiaddr) -> Duration {
    let mut events = x.client().events();
    let target_id = match target.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => panic!("address without /p2p"),
    };
    let t0 = Instant::now();
    x.client().dial(target).await.unwrap();
    let deadline = t0 + Duration::from_secs(5);
    let mut connected = false;
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), events.recv())
            .await
            .expect("no connection event within 5 s")
            .unwrap();
        match ev {
            NetEvent::Connected { peer, .. } if peer == target_id => connected = true,
            NetEvent::Disconnected { peer, lifetime, .. } if peer == target_id => {
                assert!(connected);
                return lifetime;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_non_members_are_shut_out() {
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let owner = start_owner(dirs[0].path()).await;
    let owner_id = owner.client().local_peer_id();
    addr(&owner, "quic-v1").await;

    // Two members join with their own invites; they find each other through the owner.
    let m1 = start(dirs[1].path(), vec![]).await;
    let m2 = start(dirs[2].path(), vec![]).await;
    for m in [&m1, &m2] {
        let inv = owner
            .client()
            .create_invite(Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(m.client().join(&inv.text).await.unwrap(), owner_id);
    }
    let (id1, id2) = (m1.client().local_peer_id(), m2.client().local_peer_id());
    assert!(
        eventually(Duration::from_secs(15), || async {
            lists(&owner, id1).await
                && lists(&owner, id2).await
                && lists(&m1, owner_id).await
                && lists(&m1, id2).await
                && lists(&m2, id1).await
        })
        .await,
        "members did not learn each other"
    );
    let s = m1.client().status().await.unwrap();
    assert!(s.swarm.to_string().contains("member of"), "{}", s.swarm);

    // A non-member (a public daemon) is cut off within 2 s over TCP and QUIC, by the owner
    // and by a member alike, and receives no gossip, addresses or records.
    let x = start(dirs[3].path(), vec![]).await;
    x.client().subscribe("run/test").await.unwrap();
    m1.client().subscribe("run/test").await.unwrap();
    let mut x_gossip = x.client().gossip_messages();
    let mut m1_gossip = m1.client().gossip_messages();
    for target in [
        addr(&owner, "tcp").await,
        addr(&owner, "quic-v1").await,
        addr(&m1, "quic-v1").await,
        addr(&m2, "tcp").await,
    ] {
        let lived = connection_lifetime(&x, target.clone()).await;
        assert!(lived < Duration::from_secs(2), "{target}: lived {lived:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    owner.client().subscribe("run/test").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            owner
                .client()
                .publish("run/test", b"secret".to_vec())
                .await
                .is_ok()
        })
        .await
    );
    let got = tokio::time::timeout(Duration::from_secs(5), m1_gossip.recv())
        .await
        .expect("member got no gossip")
        .unwrap();
    assert_eq!(got.data, b"secret");
    assert!(x_gossip.try_recv().is_err(), "a non-member received gossip");
    for p in x.client().peers().await.unwrap() {
        assert!(
            p.record.is_none(),
            "non-member learned a record of {}",
            p.peer_id
        );
        assert!(
            p.addrs.is_empty(),
            "non-member learned addresses of {}",
            p.peer_id
        );
        assert!(!p.connected);
    }

    // Expired, revoked and reused invites are refused; the refused daemon stays public.
    let m3 = start(dirs[4].path(), vec![]).await;
    let expired = owner
        .client()
        .create_invite(Duration::from_millis(200))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = m3.client().join(&expired.text).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let revoked = owner
        .client()
        .create_invite(Duration::from_secs(60))
        .await
        .unwrap();
    owner.client().revoke_invite(&revoked.id).await.unwrap();
    let err = m3.client().join(&revoked.text).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    let used = owner
        .client()
        .create_invite(Duration::from_secs(60))
        .await
        .unwrap();
    // An invite admits once: the second daemon to present it is refused.
    m3.client().join(&used.text).await.unwrap();
    let x_err = x.client().join(&used.text).await.unwrap_err();
    assert!(x_err.to_string().contains("used"), "{x_err}");

    // A removed member is cut off by the owner and by the other members, and stays out.
    owner.client().remove_member(id2).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            !lists(&owner, id2).await && !lists(&m1, id2).await
        })
        .await,
        "removed member still listed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!lists(&owner, id2).await && !lists(&m1, id2).await);
    let lived = connection_lifetime(&m2, addr(&owner, "quic-v1").await).await;
    assert!(lived < Duration::from_secs(2));

    for n in [owner, m1, m2, m3, x] {
        n.shutdown().await;
    }
}
