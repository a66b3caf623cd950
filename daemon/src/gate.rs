//! The membership gate: a `NetworkBehaviour` wrapper that decides, per connection, whether
//! the wrapped behaviours (identify, Kademlia, gossipsub, capability exchange, streams) may
//! run on it at all. A connection from a peer not yet admitted gets libp2p's `dummy` handler
//! in place of the inner one, so none of those protocols is ever negotiated on it: the
//! remote cannot ask for addresses, gossip or records. Only protocols outside the gate (the
//! membership protocol) run there, and the gate closes the connection when the peer is not
//! admitted within a deadline. Admission happens after the fact, so an admitted peer
//! reconnects to get the full protocol set; `libp2p` cannot swap a live connection's handler.
//!
//! In a public swarm the gate is open and only forwards.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use either::Either;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::{
    CloseConnection, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour,
    NotifyHandler, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

pub struct Gate<B: NetworkBehaviour> {
    inner: B,
    open: bool,
    admitted: HashSet<PeerId>,
    deadline: Duration,
    /// Connections running only the ungated protocols, with when they were decided.
    gated: HashMap<ConnectionId, (PeerId, Instant)>,
    /// Connections handed to the inner behaviour, per peer.
    full: HashMap<PeerId, HashSet<ConnectionId>>,
    pending: VecDeque<ToSwarm<B::ToSwarm, THandlerInEvent<Self>>>,
    waker: Option<Waker>,
}

impl<B: NetworkBehaviour> Gate<B> {
    pub fn new(inner: B, open: bool, deadline: Duration) -> Self {
        Self {
            inner,
            open,
            admitted: HashSet::new(),
            deadline,
            gated: HashMap::new(),
            full: HashMap::new(),
            pending: VecDeque::new(),
            waker: None,
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Opens (public swarm) or closes (private swarm) the gate for new connections.
    pub fn set_open(&mut self, open: bool) {
        self.open = open;
    }

    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.open || self.admitted.contains(peer)
    }

    /// Whether `conn` runs only the ungated protocols.
    pub fn is_gated(&self, conn: &ConnectionId) -> bool {
        self.gated.contains_key(conn)
    }

    /// Lets `peer`'s future connections run the inner behaviours.
    pub fn admit(&mut self, peer: PeerId) {
        self.admitted.insert(peer);
    }

    /// Withdraws admission and closes every connection to `peer`.
    pub fn expel(&mut self, peer: &PeerId) {
        self.admitted.remove(peer);
        self.pending.push_back(ToSwarm::CloseConnection {
            peer_id: *peer,
            connection: CloseConnection::All,
        });
        self.wake();
    }

    /// Closes the gated connection `conn`.
    pub fn close(&mut self, peer: PeerId, conn: ConnectionId) {
        self.pending.push_back(ToSwarm::CloseConnection {
            peer_id: peer,
            connection: CloseConnection::One(conn),
        });
        self.wake();
    }

    /// Closes gated connections whose peer was not admitted within the deadline. Called on
    /// the event loop's timer, with `now` passed in so that the rule is testable.
    pub fn expire(&mut self, now: Instant) {
        let deadline = self.deadline;
        let overdue: Vec<(ConnectionId, PeerId)> = self
            .gated
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= deadline)
            .map(|(c, (p, _))| (*c, *p))
            .collect();
        for (conn, peer) in overdue {
            // Forget it now: a connection that never reached the swarm must not be closed
            // again on every tick.
            self.gated.remove(&conn);
            tracing::info!(%peer, "closing connection: no valid membership presented in time");
            self.close(peer, conn);
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn gate(&mut self, conn: ConnectionId, peer: PeerId) -> THandler<Self> {
        self.gated.insert(conn, (peer, Instant::now()));
        Either::Right(dummy::ConnectionHandler)
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gate<B> {
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !self.is_admitted(&peer) {
            return Ok(self.gate(connection_id, peer));
        }
        self.inner
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
            .map(Either::Left)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !self.is_admitted(&peer) {
            return Ok(self.gate(connection_id, peer));
        }
        self.inner
            .handle_established_outbound_connection(
                connection_id,
                peer,
                addr,
                role_override,
                port_use,
            )
            .map(Either::Left)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                if self.gated.contains_key(&e.connection_id) {
                    return;
                }
                let conns = self.full.entry(e.peer_id).or_default();
                let other_established = conns.len();
                conns.insert(e.connection_id);
                self.inner.on_swarm_event(FromSwarm::ConnectionEstablished(
                    ConnectionEstablished {
                        other_established,
                        ..e
                    },
                ));
            }
            FromSwarm::ConnectionClosed(e) => {
                if self.gated.remove(&e.connection_id).is_some() {
                    return;
                }
                let Some(conns) = self.full.get_mut(&e.peer_id) else {
                    // Closed by the gate's deadline after `expire` forgot it.
                    return;
                };
                if !conns.remove(&e.connection_id) {
                    return;
                }
                let remaining_established = conns.len();
                if remaining_established == 0 {
                    self.full.remove(&e.peer_id);
                }
                self.inner
                    .on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                        remaining_established,
                        ..e
                    }));
            }
            FromSwarm::AddressChange(e) => {
                if !self.gated.contains_key(&e.connection_id) {
                    self.inner.on_swarm_event(FromSwarm::AddressChange(e));
                }
            }
            other => self.inner.on_swarm_event(other),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(ev) => self
                .inner
                .on_connection_handler_event(peer_id, connection_id, ev),
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some(ev) = self.pending.pop_front() {
            return Poll::Ready(ev);
        }
        self.waker = Some(cx.waker().clone());
        loop {
            let ev = match self.inner.poll(cx) {
                Poll::Ready(ev) => ev,
                Poll::Pending => return Poll::Pending,
            };
            match ev {
                // An event for "any" connection of a peer must reach one that runs the inner
                // handler: a gated connection's dummy handler cannot take it.
                ToSwarm::NotifyHandler {
                    peer_id,
                    handler,
                    event,
                } => {
                    let target = match handler {
                        NotifyHandler::One(c) if !self.gated.contains_key(&c) => Some(c),
                        NotifyHandler::One(_) => None,
                        NotifyHandler::Any => self
                            .full
                            .get(&peer_id)
                            .and_then(|s| s.iter().next().copied()),
                    };
                    match target {
                        Some(c) => {
                            return Poll::Ready(ToSwarm::NotifyHandler {
                                peer_id,
                                handler: NotifyHandler::One(c),
                                event: Either::Left(event),
                            });
                        }
                        None => {
                            tracing::debug!(%peer_id, "dropping event for a gated connection");
                            continue;
                        }
                    }
                }
                other => return Poll::Ready(other.map_in(Either::Left)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use libp2p::swarm::dummy;

    fn poll_close(g: &mut Gate<dummy::Behaviour>) -> Option<ConnectionId> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match g.poll(&mut cx) {
            Poll::Ready(ToSwarm::CloseConnection {
                connection: CloseConnection::One(c),
                ..
            }) => Some(c),
            _ => None,
        }
    }

    #[test]
    fn non_members_get_a_dummy_handler_and_are_closed_at_the_deadline() {
        let mut g = Gate::new(dummy::Behaviour, false, Duration::from_secs(1));
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let (stranger, member) = (PeerId::random(), PeerId::random());
        g.admit(member);
        let c1 = ConnectionId::new_unchecked(1);
        let c2 = ConnectionId::new_unchecked(2);
        let h = g
            .handle_established_inbound_connection(c1, stranger, &a, &a)
            .unwrap();
        assert!(matches!(h, Either::Right(_)));
        assert!(g.is_gated(&c1));
        let h = g
            .handle_established_inbound_connection(c2, member, &a, &a)
            .unwrap();
        assert!(matches!(h, Either::Left(_)));

        let t0 = Instant::now();
        g.expire(t0);
        assert_eq!(poll_close(&mut g), None, "closed before the deadline");
        g.expire(t0 + Duration::from_secs(2));
        assert_eq!(poll_close(&mut g), Some(c1));
        assert_eq!(poll_close(&mut g), None, "the member's connection stays");
        assert!(!g.is_gated(&c1));
    }

    #[test]
    fn open_gate_admits_everyone_and_expel_closes() {
        let mut g = Gate::new(dummy::Behaviour, true, Duration::from_secs(1));
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let p = PeerId::random();
        let h = g
            .handle_established_outbound_connection(
                ConnectionId::new_unchecked(3),
                p,
                &a,
                Endpoint::Dialer,
                PortUse::New,
            )
            .unwrap();
        assert!(matches!(h, Either::Left(_)));
        g.set_open(false);
        g.expel(&p);
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        assert!(matches!(
            g.poll(&mut cx),
            Poll::Ready(ToSwarm::CloseConnection {
                connection: CloseConnection::All,
                ..
            })
        ));
        assert!(!g.is_admitted(&p));
    }
}
