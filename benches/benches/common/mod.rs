//! Shared by the network benchmarks: two libp2p nodes with the daemon's QUIC transport
//! (only the stream behaviour on top, so nothing else competes for the link), and a plain
//! `quinn` connection with the same transport settings and the same TLS configuration
//! (libp2p-tls's, which libp2p-quic uses), so the two differ only by what runs over them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};

/// The transport settings libp2p-quic 0.14 derives from its default `Config` (what the
/// daemon's `.with_quic()` uses): 10 MB stream window, 15 MB connection window, 256
/// bidirectional streams, no datagrams, keep-alive 5 s, idle timeout 10 s, MTU discovery.
pub fn libp2p_like_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(256u32.into());
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(10_000).into()));
    t.allow_spin(false);
    t.stream_receive_window(10_000_000u32.into());
    t.receive_window(15_000_000u32.into());
    t.mtu_discovery_config(Some(Default::default()));
    t
}

/// A plain quinn client connection and the server side of it, on loopback.
pub struct QuinnPair {
    pub client: quinn::Connection,
    pub server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

pub async fn quinn_pair() -> anyhow::Result<QuinnPair> {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    let transport = Arc::new(libp2p_like_transport());
    let skey = Keypair::generate_ed25519();
    let ckey = Keypair::generate_ed25519();
    let server_tls = QuicServerConfig::try_from(libp2p::tls::make_server_config(&skey)?)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    server_config.transport = transport.clone();
    server_config.migration(false);
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let client_tls = QuicClientConfig::try_from(libp2p::tls::make_client_config(&ckey, None)?)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_tls));
    client_config.transport_config(transport);
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>()?)?;
    client.set_default_client_config(client_config);
    let connecting = client.connect(server.local_addr()?, "l")?;
    let accept = async {
        let incoming = server
            .accept()
            .await
            .ok_or_else(|| anyhow::anyhow!("server endpoint closed"))?;
        anyhow::Ok(incoming.await?)
    };
    let (c, s) = tokio::join!(connecting, accept);
    Ok(QuinnPair {
        client: c?,
        server: s?,
        _endpoints: (server, client),
    })
}

/// Starts a libp2p node with the daemon's QUIC transport and the stream behaviour, on
/// loopback; returns its stream control, peer id and listen address.
pub async fn libp2p_node() -> anyhow::Result<(libp2p_stream::Control, PeerId, Multiaddr)> {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse()?)?;
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let control = swarm.behaviour().new_control();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((control, peer, addr.with(Protocol::P2p(peer))))
}

/// Two libp2p nodes; the second has dialed the first. Returns (first, second) controls and
/// the first's peer id.
pub async fn libp2p_pair()
-> anyhow::Result<(libp2p_stream::Control, libp2p_stream::Control, PeerId)> {
    let key = Keypair::generate_ed25519();
    let (a, a_peer, a_addr) = libp2p_node().await?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.dial(a_addr)?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == a_peer => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                anyhow::bail!("dial failed: {error}")
            }
            _ => {}
        }
    }
    let b = swarm.behaviour().new_control();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((a, b, a_peer))
}

/// `len` bytes no compressor can shrink (xorshift64).
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// An environment variable parsed as a number, or `default`.
pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median of the per-run ratios `a[i] / b[i]`: runs taken side by side share the machine's
/// load at that moment, so this is steadier than the ratio of medians on a busy machine.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&mut r)
}

/// CPU time this process has used so far (user and system, all threads), in seconds, from
/// `/proc/self/stat` (10 ms resolution); 0 where that cannot be read. On a busy shared
/// machine the CPU a transfer costs is steadier than its wall time: where the transfer is
/// CPU-bound, `cpu(plain) / cpu(ours)` is the throughput ratio a dedicated machine would see.
pub fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count fields from after it.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux) ticks.
    (ticks(11) + ticks(12)) as f64 / 100.0
}
