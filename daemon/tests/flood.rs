//! Issue 17, finding 2: cheap attacks on a seed's connection limits, over loopback.
//!
//! A flood of half-open TCP connections (TCP connects that never speak multistream-select or
//! Noise) must not lock new peers out: not over QUIC from the same host, and not over any
//! transport from another host. A bootstrap peer that is down when a daemon starts, or that
//! restarts later, must be redialled and found without help. Each wait has a generous
//! deadline; how long a fresh peer took is printed as one JSON line per measurement.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{addr, config, eventually, listed, start};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use potluck_daemon::Node;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

/// Half-open connections the attacker keeps open: more than the old global pending limit (64).
const SLOTS: usize = 96;
/// Connects per slot at most, so that the attacker's loops are bounded whatever happens.
const MAX_CONNECTS_PER_SLOT: u32 = 400;

/// A running flood: `SLOTS` tasks, each connecting from `from` to `to`, holding the
/// connection without a byte until the daemon closes it, then connecting again.
struct Flood {
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    fn start(from: Ipv4Addr, to: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let tasks = (0..SLOTS)
            .map(|_| {
                let (stop, connects) = (stop.clone(), connects.clone());
                tokio::spawn(async move {
                    for _ in 0..MAX_CONNECTS_PER_SLOT {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let s = TcpSocket::new_v4().unwrap();
                        s.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
                        if let Ok(mut conn) = s.connect(to).await {
                            connects.fetch_add(1, Ordering::Relaxed);
                            let mut buf = [0u8; 64];
                            // Hold it until the daemon closes it (or the flood stops).
                            while !stop.load(Ordering::Relaxed) {
                                match tokio::time::timeout(
                                    Duration::from_millis(200),
                                    conn.read(&mut buf),
                                )
                                .await
                                {
                                    Ok(Ok(0)) | Ok(Err(_)) => break,
                                    Ok(Ok(_)) | Err(_) => {}
                                }
                            }
                        }
                        // A real attacker reconnects at once; a pause keeps the test's CPU use sane.
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            connects,
            tasks,
        }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.connects.load(Ordering::Relaxed)
    }
}

fn tcp_socket(a: &Multiaddr) -> SocketAddr {
    let mut ip = None;
    let mut port = None;
    for p in a.iter() {
        match p {
            Protocol::Ip4(i) => ip = Some(IpAddr::V4(i)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    SocketAddr::new(ip.unwrap(), port.unwrap())
}

/// Whether `a` and `b` list each other.
async fn met(a: &Node, b: &Node) -> bool {
    let (ai, bi) = (a.client().local_peer_id(), b.client().local_peer_id());
    listed(a).await.contains(&bi) && listed(b).await.contains(&ai)
}

/// Floods `seed`'s TCP port from `attacker`, starts a fresh daemon bootstrapping from the
/// seed over `transport`, and returns how long it took to get in while the flood went on,
/// or `None` when it did not within the deadline (then also how long after the flood).
async fn fresh_peer_under_flood(attacker: Ipv4Addr, transport: &str) -> Option<Duration> {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let seed = start(dirs[0].path(), vec![]).await;
    let target = tcp_socket(&addr(&seed, "tcp").await);
    let flood = Flood::start(attacker, target);
    // Let the flood fill the seed's pending slots before the newcomer arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The seed counts the flood and denies what is over the caps.
    let caps = potluck_daemon::limits::InboundCaps::default();
    let inbound = seed.client().status().await.unwrap().inbound;
    assert!(inbound.denied > 0, "nothing denied: {inbound:?}");
    assert!(
        inbound.pending_tcp > 0 && inbound.pending_tcp <= caps.pending_per_address,
        "one host holds more than its TCP handshake slots: {inbound:?}"
    );
    assert_eq!(inbound.pending_quic, 0);

    let t0 = Instant::now();
    let fresh = start(dirs[1].path(), vec![addr(&seed, transport).await]).await;
    let during = eventually(Duration::from_secs(30), || met(&seed, &fresh)).await;
    let took = t0.elapsed();
    let connects = flood.stop().await;
    let result = if during {
        println!(
            "{{\"bench\":\"flood\",\"attacker\":\"{attacker}\",\"transport\":\"{transport}\",\"phase\":\"during\",\"secs\":{:.2},\"attacker_connects\":{connects}}}",
            took.as_secs_f64()
        );
        Some(took)
    } else {
        // Not in during the flood: measure how long recovery takes once it stops.
        let t1 = Instant::now();
        let after = eventually(Duration::from_secs(90), || met(&seed, &fresh)).await;
        println!(
            "{{\"bench\":\"flood\",\"attacker\":\"{attacker}\",\"transport\":\"{transport}\",\"phase\":\"after\",\"got_in\":{after},\"secs\":{:.2},\"attacker_connects\":{connects}}}",
            t1.elapsed().as_secs_f64()
        );
        None
    };
    fresh.shutdown().await;
    seed.shutdown().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flood_from_one_host_does_not_starve_quic() {
    // The attacker shares the newcomer's address: only the transport tells them apart.
    let took = fresh_peer_under_flood(Ipv4Addr::LOCALHOST, "quic-v1").await;
    assert!(
        took.is_some(),
        "a fresh daemon did not bootstrap over QUIC within 30 s of a TCP flood from its host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flood_from_another_host_does_not_lock_out_tcp() {
    // 127.0.0.2 is another loopback address: another host as far as the seed can tell.
    let took = fresh_peer_under_flood(Ipv4Addr::new(127, 0, 0, 2), "tcp").await;
    assert!(
        took.is_some(),
        "a fresh daemon did not bootstrap over TCP within 30 s of a TCP flood from another host"
    );
}

/// A free TCP port on loopback, for a daemon that starts later. TCP, not QUIC: a QUIC dial
/// to a port where nothing listens yet keeps resending its first packet until the handshake
/// deadline and gets in if the peer comes up meanwhile, while a TCP dial is refused at once.
fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_peer_down_at_start_is_redialled() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // The seed's identity exists before the seed runs, so its address can be given.
    let seed_id = potluck_daemon::identity::load_or_create(dirs[0].path())
        .unwrap()
        .public()
        .to_peer_id();
    let port = free_tcp_port();
    let seed_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{seed_id}")
        .parse()
        .unwrap();
    let seed_config = || {
        let mut c = config(dirs[0].path(), vec![]);
        c.listen = vec![
            "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
            format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap(),
        ];
        c
    };

    let fresh = start(dirs[1].path(), vec![seed_addr]).await;
    // The first dial is refused: nothing listens yet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    let seed = Node::start(seed_config()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(40), || met(&seed, &fresh)).await,
        "the bootstrap peer was not redialled within 40 s of coming up"
    );
    println!(
        "{{\"bench\":\"bootstrap_redial\",\"phase\":\"seed_late\",\"secs\":{:.2}}}",
        t0.elapsed().as_secs_f64()
    );

    // The seed restarts: the newcomer, which knows no one else, must find it again.
    seed.shutdown().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            !listed(&fresh).await.contains(&seed_id)
                || fresh.client().status().await.unwrap().connected_peers == 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t1 = Instant::now();
    let seed = Node::start(seed_config()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(40), || async {
            fresh.client().status().await.unwrap().connected_peers > 0 && met(&seed, &fresh).await
        })
        .await,
        "the bootstrap peer was not redialled within 40 s of restarting"
    );
    println!(
        "{{\"bench\":\"bootstrap_redial\",\"phase\":\"seed_restarted\",\"secs\":{:.2}}}",
        t1.elapsed().as_secs_f64()
    );
    fresh.shutdown().await;
    seed.shutdown().await;
}
