//! Per-address caps on incoming connections, so that one host cannot lock everyone else out
//! of a daemon. libp2p's `connection_limits` counts pending (handshaking) connections for
//! the whole node: 64 TCP connects that never speak a byte filled that count and every new
//! peer was refused, over QUIC too (issue 17). Here the pending count is kept per transport
//! (TCP junk cannot starve QUIC) and per remote address and transport (one host holds at
//! most a few handshake slots, not all of them); established incoming connections are
//! capped per address too. An IPv6 remote counts by its /64, the smallest block a home or a
//! server is usually given, so that one host cannot dodge the cap by walking its prefix.
//!
//! The caps are separate for pending and established connections because many honest
//! daemons can share one address (a local swarm on 127.0.0.1, friends behind one NAT): each
//! of them holds a handshake only for milliseconds, while an attacker's half-open
//! connections sit in the pending slots until the handshake deadline.
//!
//! [`InboundCounter`] is the decision, pure and unit-tested; [`Behaviour`] is the thin
//! `NetworkBehaviour` that feeds it the swarm's events and warns (rate-limited) when any
//! limit, this one's or libp2p's, denies a connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenError, ListenFailure,
    NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{PeerId, connection_limits};

/// The transport of a connection, as far as the caps are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Quic,
    /// A relayed circuit: its IP is the relay's, not the remote's, so it has no per-address
    /// count (the relay limits circuits per peer).
    Relay,
    Other,
}

impl Transport {
    pub fn of(addr: &Multiaddr) -> Self {
        let mut t = Transport::Other;
        for p in addr.iter() {
            match p {
                Protocol::P2pCircuit => return Transport::Relay,
                Protocol::QuicV1 | Protocol::Quic => t = Transport::Quic,
                Protocol::Tcp(_) if t == Transport::Other => t = Transport::Tcp,
                _ => {}
            }
        }
        t
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "TCP",
            Transport::Quic => "QUIC",
            Transport::Relay => "relayed",
            Transport::Other => "other",
        })
    }
}

/// What a per-address cap counts by: the IPv4 address, or the /64 of an IPv6 address (an
/// IPv4-mapped IPv6 address counts as its IPv4 address). `None` for a relayed or non-IP
/// address.
pub fn address_key(addr: &Multiaddr) -> Option<IpAddr> {
    if Transport::of(addr) == Transport::Relay {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(match ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(ip) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        }),
        _ => None,
    })
}

/// The caps on incoming connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundCaps {
    /// Handshaking incoming connections per transport, from everyone together.
    pub pending_per_transport: u32,
    /// Handshaking incoming connections per remote address and transport.
    pub pending_per_address: u32,
    /// Established incoming connections per remote address.
    pub established_per_address: u32,
}

impl Default for InboundCaps {
    fn default() -> Self {
        Self {
            pending_per_transport: 128,
            pending_per_address: 16,
            established_per_address: 64,
        }
    }
}

/// Why an incoming connection was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    #[error(
        "{count} {transport} connections from {address} are already handshaking (cap per address: {cap})"
    )]
    PendingPerAddress {
        address: IpAddr,
        transport: Transport,
        count: u32,
        cap: u32,
    },
    #[error("{count} incoming {transport} connections are already handshaking (cap: {cap})")]
    PendingPerTransport {
        transport: Transport,
        count: u32,
        cap: u32,
    },
    #[error("{count} connections from {address} are already established (cap per address: {cap})")]
    EstablishedPerAddress {
        address: IpAddr,
        count: u32,
        cap: u32,
    },
}

/// The counts behind the caps, for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundCounts {
    pub pending_tcp: u32,
    pub pending_quic: u32,
    pub pending_other: u32,
    pub established_incoming: u32,
    /// Incoming connections denied by any limit since the daemon started.
    pub denied: u64,
}

/// Counts incoming connections by transport and remote address and decides whether a new
/// one is under the caps. Fed by connection id: every connection it counted leaves through
/// [`InboundCounter::on_gone`].
#[derive(Debug, Default)]
pub struct InboundCounter {
    caps: InboundCaps,
    pending: HashMap<ConnectionId, (Transport, Option<IpAddr>)>,
    pending_per_transport: HashMap<Transport, u32>,
    pending_per_address: HashMap<(IpAddr, Transport), u32>,
    established: HashMap<ConnectionId, Option<IpAddr>>,
    established_per_address: HashMap<IpAddr, u32>,
    denied: u64,
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl InboundCounter {
    pub fn new(caps: InboundCaps) -> Self {
        Self {
            caps,
            ..Self::default()
        }
    }

    /// A new incoming connection from `remote` starts its handshake: counted if under the
    /// caps, else denied.
    pub fn on_pending(&mut self, conn: ConnectionId, remote: &Multiaddr) -> Result<(), Exceeded> {
        let transport = Transport::of(remote);
        let address = address_key(remote);
        let total = self
            .pending_per_transport
            .get(&transport)
            .copied()
            .unwrap_or(0);
        if total >= self.caps.pending_per_transport {
            return Err(Exceeded::PendingPerTransport {
                transport,
                count: total,
                cap: self.caps.pending_per_transport,
            });
        }
        if let Some(address) = address {
            let count = self
                .pending_per_address
                .get(&(address, transport))
                .copied()
                .unwrap_or(0);
            if count >= self.caps.pending_per_address {
                return Err(Exceeded::PendingPerAddress {
                    address,
                    transport,
                    count,
                    cap: self.caps.pending_per_address,
                });
            }
            *self
                .pending_per_address
                .entry((address, transport))
                .or_default() += 1;
        }
        *self.pending_per_transport.entry(transport).or_default() += 1;
        self.pending.insert(conn, (transport, address));
        Ok(())
    }

    /// The handshake of `conn` finished: it is no longer pending, and it may be established
    /// if its address is under the established cap.
    pub fn check_established(
        &mut self,
        conn: ConnectionId,
        remote: &Multiaddr,
    ) -> Result<(), Exceeded> {
        self.end_pending(conn);
        let Some(address) = address_key(remote) else {
            return Ok(());
        };
        let count = self
            .established_per_address
            .get(&address)
            .copied()
            .unwrap_or(0);
        if count >= self.caps.established_per_address {
            return Err(Exceeded::EstablishedPerAddress {
                address,
                count,
                cap: self.caps.established_per_address,
            });
        }
        Ok(())
    }

    /// An incoming connection is established (every behaviour accepted it).
    pub fn on_established(&mut self, conn: ConnectionId, remote: &Multiaddr) {
        self.end_pending(conn);
        let address = address_key(remote);
        if self.established.insert(conn, address).is_none()
            && let Some(a) = address
        {
            *self.established_per_address.entry(a).or_default() += 1;
        }
    }

    /// `conn` failed its handshake, was denied, or closed.
    pub fn on_gone(&mut self, conn: ConnectionId) {
        self.end_pending(conn);
        if let Some(Some(a)) = self.established.remove(&conn) {
            decrement(&mut self.established_per_address, a);
        }
    }

    /// Records that some limit denied an incoming connection.
    pub fn on_denied(&mut self) {
        self.denied = self.denied.saturating_add(1);
    }

    pub fn counts(&self) -> InboundCounts {
        let pending = |t| self.pending_per_transport.get(&t).copied().unwrap_or(0);
        InboundCounts {
            pending_tcp: pending(Transport::Tcp),
            pending_quic: pending(Transport::Quic),
            pending_other: pending(Transport::Relay) + pending(Transport::Other),
            established_incoming: self.established.len() as u32,
            denied: self.denied,
        }
    }

    fn end_pending(&mut self, conn: ConnectionId) {
        if let Some((transport, address)) = self.pending.remove(&conn) {
            decrement(&mut self.pending_per_transport, transport);
            if let Some(a) = address {
                decrement(&mut self.pending_per_address, (a, transport));
            }
        }
    }
}

/// Decides when a denial is worth a warning: the first one, then at most one per `every`,
/// carrying how many were denied in between, so that a flood cannot flood the log too.
#[derive(Debug)]
pub struct WarnLimiter {
    every: Duration,
    last: Option<Instant>,
    since_last: u64,
}

impl WarnLimiter {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            since_last: 0,
        }
    }

    /// Counts one event; returns how many events the warning due now covers, if one is due.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.since_last = self.since_last.saturating_add(1);
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// How often a warning about denied connections is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The `NetworkBehaviour` that applies [`InboundCounter`]'s caps to incoming connections.
/// It must come first in the composed behaviour, so that it sees every handshake that ends.
pub struct Behaviour {
    counter: InboundCounter,
    warn: WarnLimiter,
}

impl Behaviour {
    pub fn new(caps: InboundCaps) -> Self {
        Self {
            counter: InboundCounter::new(caps),
            warn: WarnLimiter::new(WARN_EVERY),
        }
    }

    pub fn counts(&self) -> InboundCounts {
        self.counter.counts()
    }

    fn on_denied(&mut self, remote: &Multiaddr, cause: &ConnectionDenied) {
        self.counter.on_denied();
        let Some(denied) = self.warn.record(Instant::now()) else {
            return;
        };
        let reason = if let Some(e) = cause.downcast_ref::<Exceeded>() {
            e.to_string()
        } else if let Some(e) = cause.downcast_ref::<connection_limits::Exceeded>() {
            e.to_string()
        } else {
            cause.to_string()
        };
        let c = self.counter.counts();
        tracing::warn!(
            %remote,
            %reason,
            denied_since_last_warning = denied,
            denied_total = c.denied,
            pending_tcp = c.pending_tcp,
            pending_quic = c.pending_quic,
            established_incoming = c.established_incoming,
            "incoming connections denied by a connection limit"
        );
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.counter
            .on_pending(connection_id, remote_addr)
            .map_err(ConnectionDenied::new)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _peer: PeerId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.counter
            .check_established(connection_id, remote_addr)
            .map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        _peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                if let ConnectedPoint::Listener { send_back_addr, .. } = e.endpoint {
                    self.counter.on_established(e.connection_id, send_back_addr);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.counter.on_gone(connection_id)
            }
            FromSwarm::ListenFailure(ListenFailure {
                connection_id,
                send_back_addr,
                error,
                ..
            }) => {
                self.counter.on_gone(connection_id);
                if let ListenError::Denied { cause } = error {
                    self.on_denied(send_back_addr, cause);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn c(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    const CAPS: InboundCaps = InboundCaps {
        pending_per_transport: 6,
        pending_per_address: 3,
        established_per_address: 2,
    };

    #[test]
    fn transports_and_address_keys() {
        assert_eq!(Transport::of(&a("/ip4/1.2.3.4/tcp/5")), Transport::Tcp);
        assert_eq!(
            Transport::of(&a("/ip4/1.2.3.4/udp/5/quic-v1")),
            Transport::Quic
        );
        let relayed = a(
            "/ip4/1.2.3.4/tcp/5/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        assert_eq!(Transport::of(&relayed), Transport::Relay);
        assert_eq!(address_key(&relayed), None);
        // One IPv6 /64 is one address; the next /64 is another.
        let k1 = address_key(&a("/ip6/2001:db8:1:2::1/tcp/5"));
        let k2 = address_key(&a("/ip6/2001:db8:1:2:ffff::9/udp/5/quic-v1"));
        let k3 = address_key(&a("/ip6/2001:db8:1:3::1/tcp/5"));
        assert_eq!(k1, k2);
        assert_ne!(k1, k3);
        assert_eq!(
            address_key(&a("/ip6/::ffff:10.0.0.1/tcp/1")),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn one_address_fills_only_its_own_pending_slots_of_one_transport() {
        let mut l = InboundCounter::new(CAPS);
        let tcp = a("/ip4/10.0.0.1/tcp/1000");
        for i in 0..3 {
            l.on_pending(c(i), &tcp).unwrap();
        }
        assert!(matches!(
            l.on_pending(c(3), &tcp),
            Err(Exceeded::PendingPerAddress {
                count: 3,
                cap: 3,
                ..
            })
        ));
        // The same host over QUIC, and another host over TCP, still get in.
        l.on_pending(c(4), &a("/ip4/10.0.0.1/udp/1000/quic-v1"))
            .unwrap();
        l.on_pending(c(5), &a("/ip4/10.0.0.2/tcp/1000")).unwrap();
        assert_eq!(l.counts().pending_tcp, 4);
        assert_eq!(l.counts().pending_quic, 1);
        // A slot frees when its handshake ends, whichever way.
        l.on_gone(c(0));
        l.on_pending(c(6), &tcp).unwrap();
    }

    #[test]
    fn the_transport_cap_bounds_many_addresses() {
        let mut l = InboundCounter::new(CAPS);
        for i in 0..6 {
            l.on_pending(c(i), &a(&format!("/ip4/10.0.0.{i}/tcp/1")))
                .unwrap();
        }
        assert!(matches!(
            l.on_pending(c(9), &a("/ip4/10.0.1.1/tcp/1")),
            Err(Exceeded::PendingPerTransport {
                transport: Transport::Tcp,
                count: 6,
                ..
            })
        ));
        // QUIC has its own budget.
        l.on_pending(c(10), &a("/ip4/10.0.1.1/udp/1/quic-v1"))
            .unwrap();
        // A relayed connection counts for its transport only.
        let relayed = a(
            "/ip4/10.0.0.1/tcp/5/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        l.on_pending(c(11), &relayed).unwrap();
        assert_eq!(l.counts().pending_other, 1);
    }

    #[test]
    fn established_connections_are_capped_per_address_and_counted_until_closed() {
        let mut l = InboundCounter::new(CAPS);
        let r = a("/ip4/10.0.0.1/udp/1/quic-v1");
        for i in 0..2 {
            l.on_pending(c(i), &r).unwrap();
            l.check_established(c(i), &r).unwrap();
            l.on_established(c(i), &r);
        }
        // Established connections do not hold pending slots.
        assert_eq!(l.counts().pending_quic, 0);
        assert_eq!(l.counts().established_incoming, 2);
        l.on_pending(c(2), &r).unwrap();
        assert!(matches!(
            l.check_established(c(2), &r),
            Err(Exceeded::EstablishedPerAddress { count: 2, .. })
        ));
        l.on_gone(c(2));
        // Another address is not affected; a closed connection frees its slot.
        let other = a("/ip4/10.0.0.2/udp/1/quic-v1");
        l.check_established(c(3), &other).unwrap();
        l.on_gone(c(0));
        l.check_established(c(4), &r).unwrap();
        // Closing twice, or closing what was never counted, changes nothing.
        l.on_gone(c(0));
        l.on_gone(c(99));
        assert_eq!(l.counts().established_incoming, 1);
        assert_eq!(l.counts().pending_quic, 0);
    }

    #[test]
    fn warnings_are_rate_limited_and_carry_the_count() {
        let mut w = WarnLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.record(t0), Some(1));
        for i in 1..=5 {
            assert_eq!(w.record(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(w.record(t0 + Duration::from_secs(10)), Some(6));
        assert_eq!(w.record(t0 + Duration::from_secs(11)), None);
    }
}
