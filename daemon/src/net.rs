//! The discovery and control plane: one event loop owns the libp2p `Swarm` (QUIC with a TCP
//! fallback, identify, Kademlia, mDNS, gossipsub, ping, AutoNAT, relay client + DCUtR, an
//! optional relay server, the capability exchange, the membership protocol, and
//! `libp2p_stream` for the data plane). Everything else talks to it through the cloneable
//! [`Client`]: commands go over a bounded channel with a oneshot reply; gossip and connection
//! events come back on bounded broadcast channels.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub,
    identify, kad, mdns, noise, ping, relay, tcp, yamux,
};
use potluck_proto::{DecodeError, PROTOCOL_VERSION, decode_limited, v1};
use prost::Message as _;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::bootstrap::{Backoff, BootstrapDialer};
use crate::capability::{self, PeerRecord, RECORD_LIMIT};
use crate::config::{Config, KadMode};
use crate::gate::Gate;
use crate::limits::{self, InboundCounts};
use crate::membership::{self, Invite, MEMBERSHIP_LIMIT, MembershipError, SwarmState};
use crate::wire::ProtoCodec;

/// The identify protocol version: peers announcing another one are refused.
pub fn identify_protocol() -> String {
    format!("/potluck/{PROTOCOL_VERSION}")
}
pub const CAPABILITY_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/capability/1");
pub const MEMBERSHIP_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/membership/1");
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/kad/1.0.0");
/// The gossip topic on which every peer re-publishes its capability record.
pub const CAPABILITY_TOPIC: &str = "potluck/capabilities/1";
/// Largest gossip message; per-run topics share it. Bulk data belongs on the data plane.
pub const GOSSIP_LIMIT: usize = 256 * 1024;
/// Gossip messages buffered for slow subscribers (at most 64 MiB at the size limit).
const GOSSIP_QUEUE: usize = 256;
const COMMAND_QUEUE: usize = 256;
const BROADCAST_QUEUE: usize = 1024;
const MAX_PEER_TABLE: usize = 10_000;
const MAX_ADDRS_PER_PEER: usize = 16;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(NetworkBehaviour)]
pub struct Inner {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    autonat: autonat::Behaviour,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    capability:
        request_response::Behaviour<ProtoCodec<v1::CapabilityExchange, v1::CapabilityExchange>>,
    stream: libp2p_stream::Behaviour,
}

/// The whole composed behaviour. Only the limits and `membership` run outside the gate.
/// `inbound` comes first: it must see every incoming handshake, whoever denies it.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    inbound: limits::Behaviour,
    limits: connection_limits::Behaviour,
    membership:
        request_response::Behaviour<ProtoCodec<v1::MembershipRequest, v1::MembershipResponse>>,
    gate: Gate<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the network event loop has stopped")]
    Stopped,
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: String, reason: String },
    #[error("gossip: {0}")]
    Gossip(String),
    #[error("membership: {0}")]
    Membership(#[from] MembershipError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot persist swarm state: {0}")]
    Persist(std::io::Error),
}

/// A message received on a subscribed gossip topic (other than Potluck's own topics).
#[derive(Debug, Clone)]
pub struct GossipMessage {
    pub topic: String,
    /// The signed author of the message.
    pub source: Option<PeerId>,
    pub data: Vec<u8>,
}

/// Connection-level events, for observers (the lead's run logic, tests).
#[derive(Debug, Clone)]
pub enum NetEvent {
    Connected {
        peer: PeerId,
        connection: ConnectionId,
        /// Whether the connection runs only the membership protocol.
        gated: bool,
    },
    Disconnected {
        peer: PeerId,
        connection: ConnectionId,
        /// How long the connection lived.
        lifetime: Duration,
    },
    /// A capability record was accepted (new or refreshed).
    Record { peer: PeerId },
}

/// A peer as the `peers` command reports it.
#[derive(Debug, Clone)]
pub struct PeerSummary {
    pub peer_id: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub connected: bool,
    pub record: Option<PeerRecord>,
    pub record_age: Option<Duration>,
}

/// What kind of swarm this daemon is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwarmMode {
    Public,
    Owner,
    Member { owner: PeerId },
}

impl std::fmt::Display for SwarmMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwarmMode::Public => write!(f, "public"),
            SwarmMode::Owner => write!(f, "private (owner)"),
            SwarmMode::Member { owner } => write!(f, "private (member of {owner})"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    pub connected_peers: usize,
    pub known_peers: usize,
    pub uptime: Duration,
    pub swarm: SwarmMode,
    pub capabilities: v1::Capabilities,
    /// Incoming connections handshaking and established, and how many limits denied.
    pub inbound: InboundCounts,
}

/// A created invite.
#[derive(Debug, Clone)]
pub struct CreatedInvite {
    pub text: String,
    pub id: String,
    pub expires_at_ms: u64,
}

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

enum Command {
    Status(oneshot::Sender<NodeStatus>),
    Peers(oneshot::Sender<Vec<PeerSummary>>),
    Dial(Multiaddr, Reply<()>),
    Subscribe(String, Reply<bool>),
    Unsubscribe(String, Reply<bool>),
    Publish(String, Vec<u8>, Reply<()>),
    SetTrainThroughput(f64),
    CreateInvite(Duration, Reply<CreatedInvite>),
    RevokeInvite(String, Reply<()>),
    RemoveMember(PeerId, Reply<()>),
    Join(Invite, Reply<PeerId>),
}

/// The handle every other part of the daemon uses to reach the network.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    peer_id: PeerId,
    gossip: broadcast::Sender<GossipMessage>,
    events: broadcast::Sender<NetEvent>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A handle to open and accept raw libp2p streams (the data plane). Streams run only on
    /// connections that passed the membership gate.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Messages of subscribed topics. A receiver that falls more than 256 messages behind
    /// loses the oldest ones (`RecvError::Lagged`).
    pub fn gossip_messages(&self) -> broadcast::Receiver<GossipMessage> {
        self.gossip.subscribe()
    }

    /// Connection and record events; a receiver more than 1024 events behind loses the
    /// oldest ones.
    pub fn events(&self) -> broadcast::Receiver<NetEvent> {
        self.events.subscribe()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn status(&self) -> Result<NodeStatus, NetError> {
        self.call(Command::Status).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerSummary>, NetError> {
        self.call(Command::Peers).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|r| Command::Dial(addr, r)).await?
    }

    /// Subscribes to a gossip topic; true when newly subscribed.
    pub async fn subscribe(&self, topic: &str) -> Result<bool, NetError> {
        let t = topic.to_string();
        self.call(|r| Command::Subscribe(t, r)).await?
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<bool, NetError> {
        let t = topic.to_string();
        self.call(|r| Command::Unsubscribe(t, r)).await?
    }

    /// Publishes on a gossip topic (at most [`GOSSIP_LIMIT`] bytes).
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), NetError> {
        let t = topic.to_string();
        self.call(|r| Command::Publish(t, data, r)).await?
    }

    /// THE HOOK for the training-throughput figure: the worker's reference step reports its
    /// tokens per second here; the new figure goes out with the next capability record.
    pub async fn set_train_throughput(&self, tokens_per_sec: f64) -> Result<(), NetError> {
        self.tx
            .send(Command::SetTrainThroughput(tokens_per_sec))
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Owner only: creates a one-time invite valid for `ttl`.
    pub async fn create_invite(&self, ttl: Duration) -> Result<CreatedInvite, NetError> {
        self.call(|r| Command::CreateInvite(ttl, r)).await?
    }

    pub async fn revoke_invite(&self, id: &str) -> Result<(), NetError> {
        let id = id.to_string();
        self.call(|r| Command::RevokeInvite(id, r)).await?
    }

    pub async fn remove_member(&self, peer: PeerId) -> Result<(), NetError> {
        self.call(|r| Command::RemoveMember(peer, r)).await?
    }

    /// Redeems an invite with its owner; on success this daemon is a member of that private
    /// swarm (stored in the data dir) and returns the owner's peer id.
    pub async fn join(&self, invite: &str) -> Result<PeerId, NetError> {
        let inv = Invite::parse(invite)?;
        self.call(|r| Command::Join(inv, r)).await?
    }
}

struct PeerEntry {
    record: Option<PeerRecord>,
    received: Option<Instant>,
    /// Connections that run the full protocol set.
    full_connections: usize,
    addrs: BTreeSet<Multiaddr>,
}

struct PendingJoin {
    invite: Invite,
    reply: Reply<PeerId>,
}

/// The event loop: owns the swarm; stops when every `Client` is dropped or on `shutdown`.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    key: Keypair,
    config: Config,
    peers: HashMap<PeerId, PeerEntry>,
    local_caps: v1::Capabilities,
    gossip_tx: broadcast::Sender<GossipMessage>,
    events_tx: broadcast::Sender<NetEvent>,
    cap_topic: gossipsub::IdentTopic,
    member_topic: Option<gossipsub::IdentTopic>,
    mode: SwarmMode,
    state: SwarmState,
    own_membership: Option<v1::Signed>,
    pending_join: Option<PendingJoin>,
    /// Relayed listen addresses not listening yet, with their relay.
    pending_circuits: Vec<(PeerId, Multiaddr)>,
    circuit_listeners: HashMap<libp2p::core::transport::ListenerId, (PeerId, Multiaddr)>,
    conn_info: HashMap<ConnectionId, (Multiaddr, Instant, bool)>,
    redials: HashMap<PeerId, (Instant, u32)>,
    bootstrap: BootstrapDialer,
    version_refused: HashSet<PeerId>,
    bootstrapped: bool,
    last_publish: Option<Instant>,
    publish_count: u64,
    started: Instant,
    /// libp2p's own Prometheus metrics, when the daemon serves metrics.
    swarm_metrics: Option<libp2p::metrics::Metrics>,
}

/// A stream's QUIC receive window under a download cap: a quarter of a second of the cap
/// (at least 64 KiB, at most quinn's default of 10 MB). The cap holds reads back; this
/// bounds what a peer can push ahead of them (one window per open stream), so the link,
/// not only the application, carries the capped rate. The connection's window stays at its
/// default so that one capped stream never blocks the control messages beside it.
fn capped_stream_window(rate: u64) -> u32 {
    (rate / 4).clamp(64 << 10, 10_000_000) as u32
}

/// Builds the swarm, starts listening and returns the handle and the loop to spawn.
pub fn build(config: Config, key: Keypair) -> Result<(Client, EventLoop), NetError> {
    let peer_id = key.public().to_peer_id();
    let own_membership = membership::load_own(&config.data_dir).map_err(NetError::Persist)?;
    let state = SwarmState::load(&config.data_dir).map_err(NetError::Persist)?;
    let mode = match &own_membership {
        Some(signed) => {
            let owner = membership::owner_in(signed)?;
            membership::verify(signed, &owner, &peer_id, now_ms()).map_err(|e| {
                NetError::Refused(format!(
                    "the stored membership {} is not valid ({e}); delete it and join again",
                    config.data_dir.join(membership::MEMBERSHIP_FILE).display()
                ))
            })?;
            SwarmMode::Member { owner }
        }
        None if config.private => SwarmMode::Owner,
        None => SwarmMode::Public,
    };

    let cfg = config.clone();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_quic_config(|mut q| {
            if let Some(rate) = cfg.rate_caps.download {
                q.max_stream_data = capped_stream_window(rate);
            }
            q
        })
        .with_dns()
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_behaviour(|key, relay_client| make_behaviour(&cfg, key, relay_client))
        .map_err(|e| NetError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();

    // Relayed listen addresses wait for a connection to their relay: asking the relay client
    // to listen while the bootstrap dial to the same relay is in flight makes its own dial
    // lose the race and the listener close at once.
    let mut circuits = Vec::new();
    for addr in &config.listen {
        if let Some(relay) = circuit_relay(addr) {
            circuits.push((relay, addr.clone()));
            let relay_part: Multiaddr = addr
                .iter()
                .take_while(|p| !matches!(p, Protocol::P2pCircuit))
                .collect();
            if let Err(e) = swarm.dial(relay_part) {
                tracing::debug!(%addr, error = %e, "cannot dial relay yet");
            }
            continue;
        }
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }

    let cap_topic = gossipsub::IdentTopic::new(CAPABILITY_TOPIC);
    let member_topic = match &mode {
        SwarmMode::Public => None,
        SwarmMode::Owner => Some(member_topic(&peer_id)),
        SwarmMode::Member { owner } => Some(member_topic(owner)),
    };
    {
        let b = swarm.behaviour_mut();
        b.gate.set_open(mode == SwarmMode::Public);
        if let SwarmMode::Member { owner } = &mode {
            b.gate.admit(*owner);
        }
        for m in &state.members {
            if let Ok(p) = m.parse::<PeerId>()
                && !state.is_removed(&p)
            {
                b.gate.admit(p);
            }
        }
        let gs = &mut b.gate.inner_mut().gossipsub;
        gs.subscribe(&cap_topic)
            .map_err(|e| NetError::Gossip(e.to_string()))?;
        if let Some(t) = &member_topic {
            gs.subscribe(t)
                .map_err(|e| NetError::Gossip(e.to_string()))?;
        }
    }

    for addr in &config.external {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        if let Some(Protocol::P2p(peer)) = addr.iter().last() {
            swarm
                .behaviour_mut()
                .gate
                .inner_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
    }
    // The event loop's first tick dials them all, then again until each one answers.
    let bootstrap = BootstrapDialer::new(
        &config.bootstrap,
        Backoff {
            max: config.bootstrap_redial_max,
            ..Backoff::default()
        },
        Instant::now(),
    );

    let control = swarm.behaviour().gate.inner().stream.new_control();
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (gossip_tx, _) = broadcast::channel(GOSSIP_QUEUE);
    let (events_tx, _) = broadcast::channel(BROADCAST_QUEUE);
    let client = Client {
        tx,
        control,
        peer_id,
        gossip: gossip_tx.clone(),
        events: events_tx.clone(),
    };
    tracing::info!(peer = %peer_id, swarm = %mode, "network started");
    let ev = EventLoop {
        swarm,
        commands,
        key,
        config,
        peers: HashMap::new(),
        local_caps: capability::measure_local(),
        gossip_tx,
        events_tx,
        cap_topic,
        member_topic,
        mode,
        state,
        own_membership,
        pending_join: None,
        pending_circuits: circuits,
        circuit_listeners: HashMap::new(),
        conn_info: HashMap::new(),
        redials: HashMap::new(),
        bootstrap,
        version_refused: HashSet::new(),
        bootstrapped: false,
        last_publish: None,
        publish_count: 0,
        started: Instant::now(),
        swarm_metrics: None,
    };
    Ok((client, ev))
}

fn member_topic(owner: &PeerId) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("potluck/members/1/{owner}"))
}

fn make_behaviour(
    config: &Config,
    key: &Keypair,
    relay_client: relay::client::Behaviour,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let identify = identify::Behaviour::new(
        identify::Config::new(identify_protocol(), key.public())
            .with_agent_version(format!("potluck/{}", capability::SOFTWARE_VERSION)),
    );
    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
    kad.set_mode(match config.kad_mode {
        KadMode::Server => Some(kad::Mode::Server),
        KadMode::Client => Some(kad::Mode::Client),
        KadMode::Auto => None,
    });
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(GOSSIP_LIMIT)
        .heartbeat_interval(Duration::from_millis(700))
        .build()?;
    let gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_cfg,
    )?;
    let mdns = if config.mdns {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };
    let relay_server = config
        .relay_server
        .then(|| relay::Behaviour::new(peer_id, relay::Config::default()));
    let rr_cfg = request_response::Config::default()
        .with_request_timeout(Duration::from_secs(10))
        .with_max_concurrent_streams(32);
    let capability = request_response::Behaviour::with_codec(
        ProtoCodec::new("capability exchange", RECORD_LIMIT),
        [(CAPABILITY_PROTOCOL, ProtocolSupport::Full)],
        rr_cfg.clone(),
    );
    let membership = request_response::Behaviour::with_codec(
        ProtoCodec::new("membership", MEMBERSHIP_LIMIT),
        [(MEMBERSHIP_PROTOCOL, ProtocolSupport::Full)],
        rr_cfg.with_request_timeout(Duration::from_secs(5)),
    );
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_outgoing(Some(64)),
    );
    let inner = Inner {
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        kad,
        gossipsub,
        mdns: mdns.into(),
        autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
        relay_server: relay_server.into(),
        capability,
        stream: libp2p_stream::Behaviour::new(),
    };
    Ok(Behaviour {
        inbound: limits::Behaviour::new(config.inbound),
        limits,
        membership,
        gate: Gate::new(inner, true, config.membership_deadline),
    })
}

impl EventLoop {
    /// Records swarm and protocol events into libp2p's metrics (served at `/metrics`).
    pub fn with_metrics(mut self, metrics: libp2p::metrics::Metrics) -> Self {
        self.swarm_metrics = Some(metrics);
        self
    }

    /// Runs until `shutdown` resolves or every `Client` is dropped.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut publish = tokio::time::interval(self.config.capability_interval);
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut bootstrap = tokio::time::interval(Duration::from_secs(30));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    if let Some(m) = &self.swarm_metrics {
                        crate::metrics::record_swarm(m, &ev);
                    }
                    self.on_swarm_event(ev)
                }
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = publish.tick() => self.publish_record(),
                _ = tick.tick() => self.on_tick(),
                _ = bootstrap.tick() => self.bootstrap(),
                () = &mut shutdown => break,
            }
        }
        tracing::info!("network stopped");
    }

    fn gate(&mut self) -> &mut Gate<Inner> {
        &mut self.swarm.behaviour_mut().gate
    }

    fn inner(&mut self) -> &mut Inner {
        self.swarm.behaviour_mut().gate.inner_mut()
    }

    fn bootstrap(&mut self) {
        if self.swarm.connected_peers().next().is_some() {
            let _ = self.inner().kad.bootstrap();
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.gate().expire(now);
        self.dial_bootstrap(now);
        // Records of peers we no longer hear from are dropped after six publish intervals.
        let stale = self.config.capability_interval * 6;
        self.peers.retain(|_, e| {
            e.full_connections > 0 || e.received.is_some_and(|r| now.duration_since(r) < stale)
        });
        self.redials
            .retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(10));
        // Only there to log each refusal once; a flood of fresh peer ids must not grow it.
        if self.version_refused.len() > MAX_PEER_TABLE {
            self.version_refused.clear();
        }
    }

    /// Carries out the bootstrap dials that are due.
    fn dial_bootstrap(&mut self, now: Instant) {
        while let Some(d) = self.bootstrap.poll_dial(now) {
            let opts = DialOpts::from(d.addr.clone());
            let conn = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => self.bootstrap.dialing(d.index, conn),
                Err(e) => {
                    tracing::warn!(addr = %d.addr, error = %e, "cannot dial bootstrap peer");
                    self.bootstrap.dial_refused(d.index, now, &mut rand::rng());
                }
            }
        }
    }

    fn own_record(&self) -> PeerRecord {
        let mut addrs: Vec<Multiaddr> = self
            .swarm
            .external_addresses()
            .cloned()
            .chain(self.swarm.listeners().filter(|a| dialable(a)).cloned())
            .collect();
        addrs.dedup();
        addrs.truncate(capability::MAX_RECORD_ADDRS);
        PeerRecord {
            peer_id: *self.swarm.local_peer_id(),
            capabilities: self.local_caps.clone(),
            addrs,
            issued_at_ms: now_ms(),
        }
    }

    fn publish_record(&mut self) {
        let bytes = self.own_record().to_wire().encode_to_vec();
        let topic = self.cap_topic.clone();
        self.last_publish = Some(Instant::now());
        if let Err(e) = self.inner().gossipsub.publish(topic, bytes) {
            tracing::debug!(error = %e, "capability record not published");
        }
        // The owner repeats recent removals now and then, for members that missed them.
        self.publish_count = self.publish_count.wrapping_add(1);
        if self.mode == SwarmMode::Owner
            && self.publish_count.is_multiple_of(5)
            && let Some(t) = self.member_topic.clone()
        {
            for signed in self.state.signed_removals().into_iter().take(16) {
                let _ = self
                    .inner()
                    .gossipsub
                    .publish(t.clone(), signed.encode_to_vec());
            }
        }
    }

    fn entry(&mut self, peer: PeerId) -> Option<&mut PeerEntry> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEER_TABLE {
            return None;
        }
        Some(self.peers.entry(peer).or_insert_with(|| PeerEntry {
            record: None,
            received: None,
            full_connections: 0,
            addrs: BTreeSet::new(),
        }))
    }

    fn accept_record(&mut self, rec: v1::CapabilityRecord, sender: PeerId) {
        // A removed member's records may still be relayed by a member that has not heard of
        // the removal yet.
        if sender == *self.swarm.local_peer_id() || self.state.is_removed(&sender) {
            return;
        }
        let rec = match PeerRecord::from_wire(rec, &sender) {
            Ok(r) => r,
            Err(e @ DecodeError::Version { .. }) => {
                if self.version_refused.insert(sender) {
                    tracing::warn!(peer = %sender, error = %e, "refusing peer: incompatible protocol version");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(peer = %sender, error = %e, "invalid capability record");
                return;
            }
        };
        let connected;
        {
            let Some(entry) = self.entry(sender) else {
                return;
            };
            if entry
                .record
                .as_ref()
                .is_some_and(|old| old.issued_at_ms > rec.issued_at_ms)
            {
                return;
            }
            for a in rec.addrs.iter().take(MAX_ADDRS_PER_PEER) {
                if entry.addrs.len() < MAX_ADDRS_PER_PEER {
                    entry.addrs.insert(a.clone());
                }
            }
            connected = entry.full_connections > 0;
            entry.record = Some(rec.clone());
            entry.received = Some(Instant::now());
        }
        let _ = self.events_tx.send(NetEvent::Record { peer: sender });
        for a in &rec.addrs {
            self.inner().kad.add_address(&sender, a.clone());
        }
        let connected_count = self
            .peers
            .values()
            .filter(|e| e.full_connections > 0)
            .count();
        if !connected
            && (connected_count as u32) < self.config.target_peers
            && !rec.addrs.is_empty()
        {
            let opts = DialOpts::peer_id(sender)
                .addresses(rec.addrs.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(peer = %sender, error = %e, "dial failed");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                // A relay server is public by definition; unless told otherwise it
                // announces where it listens, which also enables the relay service.
                if self.config.relay_server && self.config.external.is_empty() && dialable(&address)
                {
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                tracing::warn!(?addresses, ?reason, "listener closed");
                // A relay reservation ends with the relay connection: listen again once we
                // are back in touch with the relay.
                if let Some((relay, circuit)) = self.circuit_listeners.remove(&listener_id) {
                    self.pending_circuits.push((relay, circuit));
                }
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.bootstrap
                    .connected(peer_id, connection_id, Instant::now());
                self.on_connected(peer_id, connection_id, endpoint)
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.bootstrap.disconnected(
                    peer_id,
                    num_established,
                    Instant::now(),
                    &mut rand::rng(),
                );
                let info = self.conn_info.remove(&connection_id);
                if let Some((_, opened, gated)) = info {
                    if !gated && let Some(e) = self.peers.get_mut(&peer_id) {
                        e.full_connections = e.full_connections.saturating_sub(1);
                    }
                    let _ = self.events_tx.send(NetEvent::Disconnected {
                        peer: peer_id,
                        connection: connection_id,
                        lifetime: opened.elapsed(),
                    });
                }
                tracing::debug!(peer = %peer_id, "connection closed");
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                if let Some((addr, wait)) =
                    self.bootstrap
                        .dial_failed(connection_id, Instant::now(), &mut rand::rng())
                {
                    tracing::info!(%addr, %error, retry_in = ?wait, "bootstrap peer unreachable");
                }
                if let (Some(p), Some(join)) = (peer_id, self.pending_join.as_ref())
                    && join.invite.owner == p
                    && self.swarm.connected_peers().all(|c| *c != p)
                    && let Some(j) = self.pending_join.take()
                {
                    self.fail_join(
                        j,
                        NetError::Dial {
                            addr: p.to_string(),
                            reason: error.to_string(),
                        },
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Membership(ev)) => self.on_membership(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gate(ev)) => self.on_inner(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::Inbound(never)) => match never {},
            _ => {}
        }
    }

    fn on_connected(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        endpoint: libp2p::core::ConnectedPoint,
    ) {
        let gated = self.swarm.behaviour().gate.is_gated(&conn);
        let addr = endpoint.get_remote_address().clone();
        if !gated {
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_circuits)
                .into_iter()
                .partition(|(relay, _)| *relay == peer);
            self.pending_circuits = waiting;
            for (relay, circuit) in ready {
                match self.swarm.listen_on(circuit.clone()) {
                    Ok(id) => {
                        self.circuit_listeners.insert(id, (relay, circuit));
                    }
                    Err(e) => tracing::warn!(%circuit, error = %e, "cannot listen on relay"),
                }
            }
        }
        self.conn_info
            .insert(conn, (addr.clone(), Instant::now(), gated));
        let _ = self.events_tx.send(NetEvent::Connected {
            peer,
            connection: conn,
            gated,
        });
        tracing::debug!(%peer, %addr, gated, "connection established");
        if !gated && let Some(e) = self.entry(peer) {
            e.full_connections += 1;
        }
        if endpoint.is_dialer() {
            let joining = self
                .pending_join
                .as_ref()
                .is_some_and(|j| j.invite.owner == peer);
            if self.mode != SwarmMode::Public || joining {
                let req = self.membership_request(&peer);
                self.swarm
                    .behaviour_mut()
                    .membership
                    .send_request(&peer, req);
            }
            if !gated {
                self.send_capability(&peer);
            }
        }
        if !self.bootstrapped && !gated {
            self.bootstrapped = self.inner().kad.bootstrap().is_ok();
        }
    }

    fn send_capability(&mut self, peer: &PeerId) {
        let req = v1::CapabilityExchange {
            protocol_version: PROTOCOL_VERSION,
            record: Some(self.own_record().to_wire()),
        };
        self.inner().capability.send_request(peer, req);
    }

    fn membership_request(&self, peer: &PeerId) -> v1::MembershipRequest {
        use v1::membership_request::Kind;
        let kind = match (&self.pending_join, &self.mode, &self.own_membership) {
            (Some(j), _, _) if &j.invite.owner == peer => Kind::RedeemToken(j.invite.token.clone()),
            (_, SwarmMode::Owner, _) => Kind::Owner(true),
            (_, _, Some(own)) => Kind::Present(own.clone()),
            _ => Kind::Owner(false),
        };
        v1::MembershipRequest {
            protocol_version: PROTOCOL_VERSION,
            kind: Some(kind),
            removals: self.state.signed_removals(),
        }
    }

    fn swarm_owner(&self) -> Option<PeerId> {
        match &self.mode {
            SwarmMode::Public => None,
            SwarmMode::Owner => Some(*self.swarm.local_peer_id()),
            SwarmMode::Member { owner } => Some(*owner),
        }
    }

    /// Checks that `peer` may be in this private swarm: the owner, or a member presenting a
    /// valid, unremoved record.
    fn check_member(
        &self,
        peer: &PeerId,
        presented: Option<&v1::Signed>,
        claims_owner: bool,
    ) -> Result<(), String> {
        let owner = self
            .swarm_owner()
            .ok_or("this daemon runs a public swarm")?;
        if claims_owner || presented.is_none() {
            return if peer == &owner {
                Ok(())
            } else {
                Err("no membership presented".into())
            };
        }
        if self.state.is_removed(peer) {
            return Err(MembershipError::Removed(peer.to_base58()).to_string());
        }
        let signed = presented.ok_or("no membership presented")?;
        membership::verify(signed, &owner, peer, now_ms())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn on_membership(
        &mut self,
        ev: request_response::Event<v1::MembershipRequest, v1::MembershipResponse>,
    ) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Request {
                        request, channel, ..
                    },
            } => {
                let resp = self.answer_membership(peer, connection_id, request);
                let accepted = resp.accepted;
                if !accepted {
                    tracing::info!(%peer, reason = %resp.reason, "membership refused");
                }
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .membership
                    .send_response(channel, resp);
            }
            Event::Message {
                peer,
                connection_id,
                message: Message::Response { response, .. },
            } => self.on_membership_response(peer, connection_id, response),
            Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "membership request failed");
                if let Some(j) = self.pending_join.take_if(|j| j.invite.owner == peer) {
                    self.fail_join(
                        j,
                        NetError::Refused(format!("the owner did not answer the invite: {error}")),
                    );
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "bad membership request");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn answer_membership(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        req: v1::MembershipRequest,
    ) -> v1::MembershipResponse {
        use v1::membership_request::Kind;
        let refuse = |reason: String| v1::MembershipResponse {
            protocol_version: PROTOCOL_VERSION,
            accepted: false,
            reason,
            ..Default::default()
        };
        if let Err(e) = potluck_proto::check_version(req.protocol_version) {
            return refuse(e.to_string());
        }
        self.apply_removals(&req.removals);
        let gated = self.swarm.behaviour().gate.is_gated(&conn);
        let mut granted = None;
        let verdict = match req.kind {
            Some(Kind::RedeemToken(token)) => {
                if self.mode != SwarmMode::Owner {
                    Err("only the swarm owner redeems invites".to_string())
                } else if self.state.is_removed(&peer) {
                    Err(MembershipError::Removed(peer.to_base58()).to_string())
                } else {
                    match self.state.redeem(&token, now_ms()) {
                        Ok(()) => {
                            let signed = membership::grant(&self.key, &peer, now_ms(), 0);
                            self.state.members.push(peer.to_base58());
                            if let Err(e) = self.state.save(&self.config.data_dir) {
                                tracing::error!(error = %e, "cannot persist swarm state");
                            }
                            tracing::info!(%peer, "invite redeemed: new member");
                            granted = Some(signed);
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            }
            Some(Kind::Present(signed)) => self.check_member(&peer, Some(&signed), false),
            Some(Kind::Owner(claims)) => self.check_member(&peer, None, claims),
            None => Err("empty membership request".to_string()),
        };
        match verdict {
            Ok(()) => {
                self.gate().admit(peer);
                v1::MembershipResponse {
                    protocol_version: PROTOCOL_VERSION,
                    accepted: true,
                    reason: String::new(),
                    granted,
                    own: self.own_membership.clone(),
                    redial: gated,
                    removals: self.state.signed_removals(),
                }
            }
            Err(reason) => refuse(reason),
        }
    }

    fn on_membership_response(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        resp: v1::MembershipResponse,
    ) {
        let join = self.pending_join.take_if(|j| j.invite.owner == peer);
        if resp.accepted {
            self.apply_removals(&resp.removals);
        }
        if !resp.accepted {
            tracing::warn!(%peer, reason = %resp.reason, "peer refused our membership");
            if let Some(j) = join {
                self.fail_join(
                    j,
                    NetError::Refused(format!("the owner refused the invite: {}", resp.reason)),
                );
            }
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        if let Some(j) = join {
            let me = *self.swarm.local_peer_id();
            let result = match resp.granted {
                Some(signed) => match membership::verify(&signed, &j.invite.owner, &me, now_ms()) {
                    Ok(_) => match membership::save_own(&self.config.data_dir, &signed) {
                        Ok(()) => {
                            self.own_membership = Some(signed);
                            self.become_member(j.invite.owner);
                            Ok(j.invite.owner)
                        }
                        Err(e) => Err(NetError::Persist(e)),
                    },
                    Err(e) => Err(NetError::Membership(e)),
                },
                None => Err(NetError::Refused("the owner granted no membership".into())),
            };
            match result {
                Ok(owner) => {
                    let _ = j.reply.send(Ok(owner));
                }
                Err(e) => {
                    self.fail_join(j, e);
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                }
            }
        }
        // The responder must itself be a member (or the owner) of our swarm.
        if let Err(reason) = self.check_member(&peer, resp.own.as_ref(), resp.own.is_none()) {
            tracing::warn!(%peer, %reason, "responder is not a member of our swarm");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        self.gate().admit(peer);
        let gated_here = self.swarm.behaviour().gate.is_gated(&conn);
        if resp.redial || gated_here {
            self.redial(peer, conn);
        }
    }

    /// Replaces a connection that was admitted after the fact by a fresh one, which the
    /// gates on both sides now hand the full protocol set.
    fn redial(&mut self, peer: PeerId, conn: ConnectionId) {
        let Some((addr, _, _)) = self.conn_info.get(&conn).cloned() else {
            return;
        };
        let (_, count) = self.redials.entry(peer).or_insert((Instant::now(), 0));
        *count += 1;
        if *count > 3 {
            tracing::warn!(%peer, "not redialing: too many redials");
            return;
        }
        self.gate().close(peer, conn);
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::Always)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "redial failed");
        }
    }

    /// A failed join leaves the daemon in the public swarm it was in.
    fn fail_join(&mut self, j: PendingJoin, err: NetError) {
        if self.mode == SwarmMode::Public {
            self.gate().set_open(true);
        }
        let _ = j.reply.send(Err(err));
    }

    fn become_member(&mut self, owner: PeerId) {
        self.mode = SwarmMode::Member { owner };
        let topic = member_topic(&owner);
        if let Err(e) = self.inner().gossipsub.subscribe(&topic) {
            tracing::warn!(error = %e, "cannot subscribe to the membership topic");
        }
        self.member_topic = Some(topic);
        tracing::info!(%owner, "joined private swarm");
    }

    fn on_inner(&mut self, ev: InnerEvent) {
        match ev {
            InnerEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != identify_protocol() {
                    tracing::warn!(
                        peer = %peer_id,
                        theirs = %info.protocol_version,
                        ours = %identify_protocol(),
                        "refusing peer: incompatible protocol version; upgrade the older side"
                    );
                    self.version_refused.insert(peer_id);
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if info.protocols.contains(&KAD_PROTOCOL) {
                    for a in info
                        .listen_addrs
                        .iter()
                        .filter(|a| dialable(a))
                        .take(MAX_ADDRS_PER_PEER)
                    {
                        self.inner().kad.add_address(&peer_id, a.clone());
                    }
                }
                if let Some(e) = self.entry(peer_id) {
                    for a in info
                        .listen_addrs
                        .into_iter()
                        .filter(dialable)
                        .take(MAX_ADDRS_PER_PEER)
                    {
                        if e.addrs.len() < MAX_ADDRS_PER_PEER {
                            e.addrs.insert(a);
                        }
                    }
                }
            }
            InnerEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                self.on_gossip(message)
            }
            InnerEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                // A new subscriber learns our record promptly instead of at the next tick.
                if topic == self.cap_topic.hash()
                    && self
                        .last_publish
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
                => {
                    self.publish_record();
                }
            InnerEvent::Capability(ev) => self.on_capability(ev),
            InnerEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.inner().kad.add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let opts = DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            InnerEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::info!(?old, ?new, "NAT status changed");
            }
            InnerEvent::Dcutr(ev) => tracing::info!(?ev, "hole punch"),
            InnerEvent::RelayClient(ev) => tracing::info!(?ev, "relay client"),
            _ => {}
        }
    }

    fn on_gossip(&mut self, message: gossipsub::Message) {
        if message.topic == self.cap_topic.hash() {
            let Some(source) = message.source else {
                return;
            };
            match decode_limited::<v1::CapabilityRecord>(
                "capability record",
                &message.data,
                RECORD_LIMIT,
            ) {
                Ok(rec) => self.accept_record(rec, source),
                Err(e) => tracing::debug!(peer = %source, error = %e, "bad capability gossip"),
            }
            return;
        }
        if self
            .member_topic
            .as_ref()
            .is_some_and(|t| t.hash() == message.topic)
        {
            match decode_limited::<v1::Signed>("member removal", &message.data, MEMBERSHIP_LIMIT) {
                Ok(signed) => self.apply_removals(std::slice::from_ref(&signed)),
                Err(e) => tracing::debug!(error = %e, "bad membership gossip"),
            }
            return;
        }
        let _ = self.gossip_tx.send(GossipMessage {
            topic: message.topic.to_string(),
            source: message.source,
            data: message.data,
        });
    }

    /// Verifies owner-signed removals and applies the new ones.
    fn apply_removals(&mut self, removals: &[v1::Signed]) {
        let Some(owner) = self.swarm_owner() else {
            return;
        };
        for signed in removals.iter().take(membership::MAX_REMOVALS) {
            match membership::verify_removal(signed, &owner) {
                Ok(peer) => self.apply_removal(peer, signed),
                Err(e) => tracing::debug!(error = %e, "invalid member removal"),
            }
        }
    }

    fn apply_removal(&mut self, peer: PeerId, proof: &v1::Signed) {
        if self.state.is_removed(&peer) || peer == *self.swarm.local_peer_id() {
            return;
        }
        self.state.record_removal(&peer, proof);
        if let Err(e) = self.state.save(&self.config.data_dir) {
            tracing::error!(error = %e, "cannot persist swarm state");
        }
        self.peers.remove(&peer);
        self.gate().expel(&peer);
        tracing::info!(%peer, "member removed from the swarm");
    }

    fn on_capability(
        &mut self,
        ev: request_response::Event<v1::CapabilityExchange, v1::CapabilityExchange>,
    ) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if let Err(e) = potluck_proto::check_version(request.protocol_version) {
                    tracing::warn!(%peer, error = %e, "refusing peer: incompatible protocol version");
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                }
                if let Some(rec) = request.record {
                    self.accept_record(rec, peer);
                }
                let resp = v1::CapabilityExchange {
                    protocol_version: PROTOCOL_VERSION,
                    record: Some(self.own_record().to_wire()),
                };
                let _ = self.inner().capability.send_response(channel, resp);
            }
            Event::Message {
                peer,
                message: Message::Response { response, .. },
                ..
            } => {
                if let Err(e) = potluck_proto::check_version(response.protocol_version) {
                    tracing::warn!(%peer, error = %e, "refusing peer: incompatible protocol version");
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                }
                if let Some(rec) = response.record {
                    self.accept_record(rec, peer);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "bad capability request");
            }
            Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "capability request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let connected = self
                    .peers
                    .values()
                    .filter(|e| e.full_connections > 0)
                    .count();
                let known = self.peers.values().filter(|e| e.record.is_some()).count();
                let _ = reply.send(NodeStatus {
                    peer_id: *self.swarm.local_peer_id(),
                    listen_addrs: self.swarm.listeners().cloned().collect(),
                    external_addrs: self.swarm.external_addresses().cloned().collect(),
                    connected_peers: connected,
                    known_peers: known,
                    uptime: self.started.elapsed(),
                    swarm: self.mode.clone(),
                    capabilities: self.local_caps.clone(),
                    inbound: self.swarm.behaviour().inbound.counts(),
                });
            }
            Command::Peers(reply) => {
                let now = Instant::now();
                let mut list: Vec<PeerSummary> = self
                    .peers
                    .iter()
                    .filter(|(_, e)| e.record.is_some() || e.full_connections > 0)
                    .map(|(p, e)| PeerSummary {
                        peer_id: *p,
                        addrs: e.addrs.iter().cloned().collect(),
                        connected: e.full_connections > 0,
                        record: e.record.clone(),
                        record_age: e.received.map(|r| now.duration_since(r)),
                    })
                    .collect();
                list.sort_by_key(|p| p.peer_id.to_base58());
                let _ = reply.send(list);
            }
            Command::Dial(addr, reply) => {
                let r = self.swarm.dial(addr.clone()).map_err(|e| NetError::Dial {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                });
                let _ = reply.send(r);
            }
            Command::Subscribe(topic, reply) => {
                let r = if self.is_reserved_topic(&topic) {
                    Err(NetError::Gossip(format!("topic {topic} is reserved")))
                } else {
                    self.inner()
                        .gossipsub
                        .subscribe(&gossipsub::IdentTopic::new(topic))
                        .map_err(|e| NetError::Gossip(e.to_string()))
                };
                let _ = reply.send(r);
            }
            Command::Unsubscribe(topic, reply) => {
                let r = if self.is_reserved_topic(&topic) {
                    Err(NetError::Gossip(format!("topic {topic} is reserved")))
                } else {
                    Ok(self
                        .inner()
                        .gossipsub
                        .unsubscribe(&gossipsub::IdentTopic::new(topic)))
                };
                let _ = reply.send(r);
            }
            Command::Publish(topic, data, reply) => {
                let r = if self.is_reserved_topic(&topic) {
                    Err(NetError::Gossip(format!("topic {topic} is reserved")))
                } else if data.len() > GOSSIP_LIMIT {
                    Err(NetError::Gossip(format!(
                        "message of {} bytes exceeds the {GOSSIP_LIMIT}-byte limit",
                        data.len()
                    )))
                } else {
                    self.inner()
                        .gossipsub
                        .publish(gossipsub::IdentTopic::new(topic), data)
                        .map(|_| ())
                        .map_err(|e| NetError::Gossip(e.to_string()))
                };
                let _ = reply.send(r);
            }
            Command::SetTrainThroughput(v) => {
                self.local_caps.train_tokens_per_sec =
                    if v.is_finite() && v > 0.0 { v } else { 0.0 };
                self.publish_record();
            }
            Command::CreateInvite(ttl, reply) => {
                let r = if self.mode != SwarmMode::Owner {
                    Err(NetError::Refused(
                        "only the owner of a private swarm creates invites (start it with --private)".into(),
                    ))
                } else {
                    let addrs: Vec<Multiaddr> = self
                        .swarm
                        .external_addresses()
                        .cloned()
                        .chain(self.swarm.listeners().filter(|a| dialable(a)).cloned())
                        .collect();
                    let (text, id, expires_at_ms) = self.state.create_invite(
                        &self.key,
                        &addrs,
                        now_ms(),
                        ttl.as_millis() as u64,
                        &mut rand::rng(),
                    );
                    self.state
                        .save(&self.config.data_dir)
                        .map(|()| CreatedInvite {
                            text,
                            id,
                            expires_at_ms,
                        })
                        .map_err(NetError::Persist)
                };
                let _ = reply.send(r);
            }
            Command::RevokeInvite(id, reply) => {
                let r = if self.mode != SwarmMode::Owner {
                    Err(NetError::Refused(
                        "only the swarm owner revokes invites".into(),
                    ))
                } else if !self.state.revoke(&id) {
                    Err(NetError::Refused(format!("no invite with id {id}")))
                } else {
                    self.state
                        .save(&self.config.data_dir)
                        .map_err(NetError::Persist)
                };
                let _ = reply.send(r);
            }
            Command::RemoveMember(peer, reply) => {
                let r = if self.mode != SwarmMode::Owner {
                    Err(NetError::Refused(
                        "only the swarm owner removes members".into(),
                    ))
                } else {
                    let signed = membership::sign_removal(&self.key, &peer, now_ms());
                    self.apply_removal(peer, &signed);
                    if let Some(t) = self.member_topic.clone()
                        && let Err(e) = self.inner().gossipsub.publish(t, signed.encode_to_vec())
                    {
                        tracing::warn!(error = %e, "removal not gossiped yet");
                    }
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Command::Join(invite, reply) => {
                if self.mode != SwarmMode::Public {
                    let _ = reply.send(Err(NetError::Refused(format!(
                        "this daemon is already in a {} swarm",
                        self.mode
                    ))));
                    return;
                }
                if invite.expires_at_ms <= now_ms() {
                    let _ = reply.send(Err(MembershipError::InviteExpired.into()));
                    return;
                }
                let owner = invite.owner;
                // From now on only members of the invite's swarm get the full protocol set.
                let public_peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for p in public_peers {
                    let _ = self.swarm.disconnect_peer_id(p);
                }
                self.peers.clear();
                let gate = self.gate();
                gate.set_open(false);
                gate.admit(owner);
                let opts = DialOpts::peer_id(owner)
                    .addresses(invite.owner_addrs.clone())
                    .condition(PeerCondition::Always)
                    .build();
                match self.swarm.dial(opts) {
                    Ok(()) => self.pending_join = Some(PendingJoin { invite, reply }),
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            addr: owner.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
        }
    }

    fn is_reserved_topic(&self, topic: &str) -> bool {
        topic == CAPABILITY_TOPIC || topic.starts_with("potluck/members/")
    }
}

/// The relay of a `/.../p2p/RELAY/p2p-circuit` listen address.
fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => relay = Some(id),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// Whether an address is worth telling others about (not a wildcard).
fn dialable(a: &Multiaddr) -> bool {
    !a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
