//! Helpers shared by the daemon's integration tests: in-process nodes on loopback.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use potluck_daemon::{Config, Node};

pub fn config(dir: &Path, bootstrap: Vec<Multiaddr>) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: vec![
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
            "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        ],
        bootstrap,
        mdns: false,
        capability_interval: Duration::from_secs(1),
        ..Config::default()
    }
}

pub async fn start(dir: &Path, bootstrap: Vec<Multiaddr>) -> Node {
    Node::start(config(dir, bootstrap)).await.unwrap()
}

/// The node's listen address of the given transport ("quic-v1" or "tcp"), with /p2p/.
pub async fn addr(node: &Node, transport: &str) -> Multiaddr {
    let c = node.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.status().await.unwrap();
        let found = s.listen_addrs.iter().find(|a| {
            a.iter().any(|p| match (&p, transport) {
                (Protocol::QuicV1, "quic-v1") => true,
                (Protocol::Tcp(_), "tcp") => !a.iter().any(|q| matches!(q, Protocol::QuicV1)),
                _ => false,
            })
        });
        if let Some(a) = found {
            return a.clone().with(Protocol::P2p(s.peer_id));
        }
        assert!(
            Instant::now() < deadline,
            "node never listened on {transport}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peers of `node` that have a capability record.
pub async fn listed(node: &Node) -> Vec<PeerId> {
    node.client()
        .peers()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.record.is_some())
        .map(|p| p.peer_id)
        .collect()
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether every node lists every other node of `nodes`.
pub async fn all_list_all(nodes: &[&Node]) -> bool {
    let ids: Vec<PeerId> = nodes.iter().map(|n| n.client().local_peer_id()).collect();
    for n in nodes {
        let seen = listed(n).await;
        let me = n.client().local_peer_id();
        if ids.iter().any(|id| *id != me && !seen.contains(id)) {
            return false;
        }
    }
    true
}
