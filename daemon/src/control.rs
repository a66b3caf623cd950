//! The local control API: a tonic gRPC service (`potluck.v1.Control`) served on a Unix socket
//! in the data dir (mode 0600, so only the daemon's user can reach it) and, when configured,
//! on a loopback TCP address where every call must carry the token from
//! `<data_dir>/control.token`. Also the client side the CLI uses. Training runs are started,
//! joined and watched through [`Runs`], which keeps them going after the call returns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::PeerId;
use potluck_proto::{PROTOCOL_VERSION, v1};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::capability::SOFTWARE_VERSION;
use crate::net::{Client, NetError, PeerSummary, SwarmMode};
use crate::train::runs::{RunInvite, Runs, RunsError};

/// The control socket's file name inside the data dir.
pub const SOCKET_FILE: &str = "control.sock";
/// The TCP control token's file name inside the data dir.
pub const TOKEN_FILE: &str = "control.token";
/// Longest invite lifetime the API accepts.
const MAX_INVITE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no daemon is running with data dir {data_dir} (no control socket at {socket}); start one \
         with `potluck daemon --data-dir {data_dir}`"
    )]
    NoDaemon { data_dir: PathBuf, socket: PathBuf },
    #[error("a daemon is already running with data dir {0}")]
    AlreadyRunning(PathBuf),
    #[error("control API I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control API transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the daemon answered: {0}")]
    Rpc(#[from] Status),
}

fn net_status(e: NetError) -> Status {
    match e {
        NetError::Stopped => Status::unavailable(e.to_string()),
        NetError::Membership(_) | NetError::Refused(_) => {
            Status::failed_precondition(e.to_string())
        }
        NetError::Dial { .. } => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn runs_status(e: RunsError) -> Status {
    match e {
        RunsError::Busy { .. } => Status::failed_precondition(e.to_string()),
        RunsError::Manifest(_) => Status::invalid_argument(e.to_string()),
        RunsError::ShuttingDown => Status::unavailable(e.to_string()),
        RunsError::Train(_) | RunsError::Resume(_) => Status::failed_precondition(e.to_string()),
    }
}

/// The service implementation: a thin translation onto the network [`Client`] and the
/// daemon's [`Runs`].
#[derive(Debug, Clone)]
pub struct ControlService {
    client: Client,
    runs: Runs,
}

impl ControlService {
    pub fn new(client: Client, runs: Runs) -> Self {
        Self { client, runs }
    }
}

/// An output directory from the CLI: absolute (the CLI resolves relative ones against its
/// own working directory), or none when empty.
fn out_dir(s: &str) -> Result<Option<PathBuf>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "output dir {s} must be an absolute path"
        )));
    }
    Ok(Some(p))
}

fn parse_run_id(s: &str) -> Result<[u8; 32], Status> {
    let s = s.trim();
    let bytes = hex::decode(s)
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "run id '{}' is not 64 hex digits",
                s.chars().take(80).collect::<String>()
            ))
        })?;
    let mut id = [0u8; 32];
    id.copy_from_slice(&bytes);
    Ok(id)
}

/// Addresses worth giving a friend: announced external ones first, then listen addresses
/// that are not wildcards.
fn invite_addrs(s: &crate::net::NodeStatus) -> Vec<libp2p::Multiaddr> {
    use libp2p::multiaddr::Protocol;
    let mut out: Vec<libp2p::Multiaddr> = Vec::new();
    for a in s.external_addrs.iter().chain(&s.listen_addrs) {
        let wildcard = a.iter().any(|p| match p {
            Protocol::Ip4(ip) => ip.is_unspecified(),
            Protocol::Ip6(ip) => ip.is_unspecified(),
            _ => false,
        });
        if !wildcard && !out.contains(a) {
            out.push(a.clone());
        }
    }
    out.truncate(crate::train::runs::MAX_INVITE_ADDRS);
    out
}

fn pause_response(
    train: &crate::train::TrainService,
    now: Option<crate::train::pause::PauseCause>,
) -> v1::PauseResponse {
    v1::PauseResponse {
        paused: now.is_some(),
        reason: now.map(|c| c.as_str().to_string()).unwrap_or_default(),
        schedule: train.pause_schedule(),
    }
}

fn peer_info(p: PeerSummary) -> v1::PeerInfo {
    v1::PeerInfo {
        peer_id: p.peer_id.to_base58(),
        addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
        connected: p.connected,
        capabilities: p.record.map(|r| r.capabilities),
        record_age_ms: p.record_age.map(|d| d.as_millis() as u64).unwrap_or(0),
    }
}

/// The caps a daemon runs under, as `status` shows them.
fn resource_caps(train: &crate::train::TrainService) -> v1::ResourceCaps {
    let (up, down) = train.rates().stats();
    let limits = train.resource_limits();
    v1::ResourceCaps {
        upload_bytes_per_sec: up.cap.unwrap_or(0),
        download_bytes_per_sec: down.cap.unwrap_or(0),
        uploaded_bytes: up.bytes,
        downloaded_bytes: down.bytes,
        upload_wait_secs: up.waited_secs,
        download_wait_secs: down.waited_secs,
        memory_limit_mb: limits.memory_limit_mb.unwrap_or(0),
        cpu_threads: limits.cpu_threads.unwrap_or(0) as u32,
    }
}

#[tonic::async_trait]
impl v1::control_server::Control for ControlService {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let s = self.client.status().await.map_err(net_status)?;
        Ok(Response::new(v1::StatusResponse {
            peer_id: s.peer_id.to_base58(),
            software_version: SOFTWARE_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION,
            listen_addrs: s.listen_addrs.iter().map(|a| a.to_string()).collect(),
            external_addrs: s.external_addrs.iter().map(|a| a.to_string()).collect(),
            connected_peers: s.connected_peers as u32,
            known_peers: s.known_peers as u32,
            uptime_secs: s.uptime.as_secs(),
            swarm: s.swarm.to_string(),
            capabilities: Some(s.capabilities),
            inbound: Some(v1::InboundConnections {
                pending_tcp: s.inbound.pending_tcp,
                pending_quic: s.inbound.pending_quic,
                pending_other: s.inbound.pending_other,
                established: s.inbound.established_incoming,
                denied: s.inbound.denied,
            }),
            caps: Some(resource_caps(self.runs.train())),
            paused: self
                .runs
                .train()
                .paused()
                .map(|c| c.as_str().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn peers(
        &self,
        _: Request<v1::PeersRequest>,
    ) -> Result<Response<v1::PeersResponse>, Status> {
        let peers = self.client.peers().await.map_err(net_status)?;
        Ok(Response::new(v1::PeersResponse {
            peers: peers.into_iter().map(peer_info).collect(),
        }))
    }

    async fn id(&self, _: Request<v1::IdRequest>) -> Result<Response<v1::IdResponse>, Status> {
        let s = self.client.status().await.map_err(net_status)?;
        Ok(Response::new(v1::IdResponse {
            peer_id: s.peer_id.to_base58(),
            listen_addrs: s.listen_addrs.iter().map(|a| a.to_string()).collect(),
        }))
    }

    async fn create_invite(
        &self,
        req: Request<v1::CreateInviteRequest>,
    ) -> Result<Response<v1::CreateInviteResponse>, Status> {
        let ttl = Duration::from_secs(req.into_inner().ttl_secs);
        if ttl.is_zero() || ttl > MAX_INVITE_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl must be between 1 s and {} s",
                MAX_INVITE_TTL.as_secs()
            )));
        }
        let inv = self.client.create_invite(ttl).await.map_err(net_status)?;
        Ok(Response::new(v1::CreateInviteResponse {
            invite: inv.text,
            invite_id: inv.id,
            expires_at_ms: inv.expires_at_ms,
        }))
    }

    async fn revoke_invite(
        &self,
        req: Request<v1::RevokeInviteRequest>,
    ) -> Result<Response<v1::RevokeInviteResponse>, Status> {
        self.client
            .revoke_invite(&req.into_inner().invite_id)
            .await
            .map_err(net_status)?;
        Ok(Response::new(v1::RevokeInviteResponse {}))
    }

    async fn remove_member(
        &self,
        req: Request<v1::RemoveMemberRequest>,
    ) -> Result<Response<v1::RemoveMemberResponse>, Status> {
        let peer: PeerId = req
            .into_inner()
            .peer_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("not a peer id: {e}")))?;
        self.client.remove_member(peer).await.map_err(net_status)?;
        Ok(Response::new(v1::RemoveMemberResponse {}))
    }

    async fn join(
        &self,
        req: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let owner = self
            .client
            .join(&req.into_inner().invite)
            .await
            .map_err(net_status)?;
        Ok(Response::new(v1::JoinResponse {
            owner_peer_id: owner.to_base58(),
        }))
    }

    async fn start_run(
        &self,
        req: Request<v1::StartRunRequest>,
    ) -> Result<Response<v1::StartRunResponse>, Status> {
        let req = req.into_inner();
        let out = out_dir(&req.out_dir)?;
        let mut successors = Vec::with_capacity(req.successors.len());
        for s in req
            .successors
            .iter()
            .take(crate::train::runs::MAX_SUCCESSORS + 1)
        {
            successors.push(s.parse().map_err(|_| {
                Status::invalid_argument(format!("successor {s:?} is not a peer id"))
            })?);
        }
        if successors.len() > crate::train::runs::MAX_SUCCESSORS {
            return Err(Status::invalid_argument(format!(
                "at most {} successors",
                crate::train::runs::MAX_SUCCESSORS
            )));
        }
        let started = self
            .runs
            .start(&req.manifest_toml, out, successors, req.coordinate_only)
            .await
            .map_err(runs_status)?;
        Ok(Response::new(v1::StartRunResponse {
            run_id: hex::encode(started.run_id),
            name: started.name,
            rounds: started.rounds,
        }))
    }

    async fn join_run(
        &self,
        req: Request<v1::JoinRunRequest>,
    ) -> Result<Response<v1::JoinRunResponse>, Status> {
        let req = req.into_inner();
        let coordinator: PeerId = req
            .coordinator_peer_id
            .trim()
            .parse()
            .map_err(|e| Status::invalid_argument(format!("not a peer id: {e}")))?;
        let run_id = parse_run_id(&req.run_id)?;
        let out = out_dir(&req.out_dir)?;
        self.runs.ensure_idle().map_err(runs_status)?;
        if req.coordinator_addrs.len() > crate::train::runs::MAX_INVITE_ADDRS {
            return Err(Status::invalid_argument(format!(
                "at most {} coordinator addresses",
                crate::train::runs::MAX_INVITE_ADDRS
            )));
        }
        let mut addrs = Vec::new();
        for a in &req.coordinator_addrs {
            let a: libp2p::Multiaddr = a
                .parse()
                .map_err(|e| Status::invalid_argument(format!("address {a}: {e}")))?;
            addrs.push(crate::train::runs::with_peer(a, coordinator));
        }
        self.join_coordinator(coordinator, run_id, &addrs, out)
            .await?;
        Ok(Response::new(v1::JoinRunResponse {
            run_id: hex::encode(run_id),
        }))
    }

    async fn run_status(
        &self,
        _: Request<v1::RunStatusRequest>,
    ) -> Result<Response<v1::RunStatusResponse>, Status> {
        let v = self.runs.view();
        Ok(Response::new(v1::RunStatusResponse {
            known: v.known,
            active: v.active,
            run_id: v.run_id,
            name: v.name,
            role: v.role,
            coordinator_peer_id: v.coordinator,
            state: v.state,
            round: v.round,
            rounds: v.rounds,
            committed_round: v.committed_round,
            committed_root: v.committed_root,
            train_loss: v.train_loss,
            eval_loss: v.eval_loss,
            peers: v.peers,
            bytes_sent: v.bytes_sent,
            bytes_received: v.bytes_received,
            rejected_updates: v.rejected_updates,
            error: v.error,
            out_dir: v.out_dir,
            elapsed_secs: v.elapsed_secs,
            checkpoint_root: v.checkpoint_root,
            round_bytes: v
                .round_bytes
                .iter()
                .map(|&(round, sent, received)| v1::RoundBytes {
                    round,
                    sent,
                    received,
                })
                .collect(),
            round_timings: v
                .round_timings
                .iter()
                .map(|t| v1::RoundTiming {
                    round: t.round,
                    overlap: t.overlap,
                    wall_ms: t.wall_ms,
                    train_ms: t.train_ms,
                    local_ms: t.local_ms,
                    persist_ms: t.persist_ms,
                    network_wait_ms: t.network_wait_ms,
                    coordination_ms: t.coordination_ms,
                    network_wait_share: t.network_wait_share,
                })
                .collect(),
            reassigned_slices: v.reassigned_slices,
            missing_slices: v.missing_slices,
            disagreed_rounds: v.disagreed_rounds,
            paused: v.paused,
            waiting: v.waiting,
            rejected_by_reason: v
                .rejected_by_reason
                .into_iter()
                .map(|(reason, count)| v1::RejectedCount { reason, count })
                .collect(),
        }))
    }

    async fn pause(
        &self,
        _: Request<v1::PauseRequest>,
    ) -> Result<Response<v1::PauseResponse>, Status> {
        let train = self.runs.train();
        let now = train.pause().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pause_response(train, now)))
    }

    async fn resume(
        &self,
        _: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::PauseResponse>, Status> {
        let train = self.runs.train();
        let now = train
            .resume()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pause_response(train, now)))
    }

    async fn create_run_invite(
        &self,
        req: Request<v1::CreateRunInviteRequest>,
    ) -> Result<Response<v1::CreateRunInviteResponse>, Status> {
        let ttl = Duration::from_secs(req.into_inner().ttl_secs);
        if ttl.is_zero() || ttl > MAX_INVITE_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl must be between 1 s and {} s",
                MAX_INVITE_TTL.as_secs()
            )));
        }
        let run_id = self.runs.coordinating().ok_or_else(|| {
            Status::failed_precondition(
                "this daemon coordinates no run now: start one with `potluck run start FILE` \
                 (an invite names the run it admits to)",
            )
        })?;
        let s = self.client.status().await.map_err(net_status)?;
        let addrs = invite_addrs(&s);
        if addrs.is_empty() {
            return Err(Status::failed_precondition(
                "this daemon has no address to give out yet (not listening, or only on \
                 wildcards): check `potluck status`",
            ));
        }
        let (swarm_invite, swarm_invite_id, expires_at_ms) = match s.swarm {
            SwarmMode::Owner => {
                let inv = self.client.create_invite(ttl).await.map_err(net_status)?;
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&inv.text)
                    .map_err(|e| Status::internal(format!("membership invite: {e}")))?;
                (Some(bytes), inv.id, inv.expires_at_ms)
            }
            // A public swarm needs no token; a member cannot invite into its owner's swarm,
            // so its invites work for peers that are members already.
            SwarmMode::Public | SwarmMode::Member { .. } => (None, String::new(), 0),
        };
        let invite = RunInvite {
            run_id,
            coordinator: s.peer_id,
            addrs,
            swarm_invite,
        };
        Ok(Response::new(v1::CreateRunInviteResponse {
            invite: invite.encode(),
            run_id: hex::encode(run_id),
            swarm_invite_id,
            expires_at_ms,
        }))
    }

    async fn accept_run_invite(
        &self,
        req: Request<v1::AcceptRunInviteRequest>,
    ) -> Result<Response<v1::AcceptRunInviteResponse>, Status> {
        let req = req.into_inner();
        let inv =
            RunInvite::parse(&req.invite).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let out = out_dir(&req.out_dir)?;
        let me = self.client.local_peer_id();
        if inv.coordinator == me {
            return Err(Status::invalid_argument(
                "this invite is for a run this daemon coordinates itself",
            ));
        }
        // Joining the swarm changes this daemon's membership for good: refuse first when
        // the run could not be joined anyway.
        self.runs.ensure_idle().map_err(runs_status)?;
        let mut joined_swarm = false;
        if let Some(text) = inv.swarm_invite_text() {
            let owner = crate::membership::Invite::parse(&text)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
                .owner;
            match self.client.status().await.map_err(net_status)?.swarm {
                SwarmMode::Public => {
                    self.client.join(&text).await.map_err(net_status)?;
                    joined_swarm = true;
                }
                SwarmMode::Member { owner: o } if o == owner => {}
                mode => {
                    return Err(Status::failed_precondition(format!(
                        "this daemon is in a {mode} swarm, and the invite is for the private \
                         swarm of {owner}: run a separate daemon (another --data-dir) to join it"
                    )));
                }
            }
        }
        self.join_coordinator(inv.coordinator, inv.run_id, &inv.dial_addrs(), out)
            .await?;
        Ok(Response::new(v1::AcceptRunInviteResponse {
            run_id: hex::encode(inv.run_id),
            coordinator_peer_id: inv.coordinator.to_base58(),
            joined_swarm,
        }))
    }
}

impl ControlService {
    /// Dials the coordinator's addresses (a failed dial is not fatal: the swarm may know
    /// another way) and joins its run in the background.
    async fn join_coordinator(
        &self,
        coordinator: PeerId,
        run_id: [u8; 32],
        addrs: &[libp2p::Multiaddr],
        out: Option<PathBuf>,
    ) -> Result<(), Status> {
        for a in addrs {
            if let Err(e) = self.client.dial(a.clone()).await {
                tracing::debug!(addr = %a, error = %e, "dialing the coordinator failed");
            }
        }
        self.runs
            .join(coordinator, run_id, out)
            .await
            .map_err(runs_status)
    }
}

/// Adds (client side) or checks (server side) the bearer token of the TCP control API.
#[derive(Debug, Clone, Default)]
pub struct TokenAuth {
    token: Option<String>,
}

impl Interceptor for TokenAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Status::internal("token is not valid ASCII"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[derive(Debug, Clone)]
struct RequireToken(String);

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare every byte so the time taken says nothing about the token.
        let ok = given.len() == self.0.len()
            && given
                .bytes()
                .zip(self.0.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong control token"))
        }
    }
}

pub type ControlClient = v1::control_client::ControlClient<InterceptedService<Channel, TokenAuth>>;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Binds the control socket, refusing when a live daemon already holds it and replacing a
/// stale socket left by a crash.
pub async fn bind_unix(data_dir: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    let path = socket_path(data_dir);
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(ControlError::AlreadyRunning(data_dir.to_path_buf()));
        }
        std::fs::remove_file(&path).map_err(|source| ControlError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| ControlError::Io {
        path: path.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ControlError::Io { path, source })?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    service: ControlService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(16)
        .add_service(v1::control_server::ControlServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// Loads or creates the TCP control token.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, ControlError> {
    let path = data_dir.join(TOKEN_FILE);
    match crate::fsutil::read_limited(&path, 1024) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            let token = hex::encode(bytes);
            crate::fsutil::write_atomic(&path, token.as_bytes(), 0o600)
                .map_err(|source| ControlError::Io { path, source })?;
            Ok(token)
        }
        Err(source) => Err(ControlError::Io { path, source }),
    }
}

/// Serves the API on loopback TCP, every call checked against `token`.
pub async fn serve_tcp(
    addr: SocketAddr,
    token: String,
    service: ControlService,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(16)
        .add_service(v1::control_server::ControlServer::with_interceptor(
            service,
            RequireToken(token),
        ))
        .serve_with_shutdown(addr, shutdown)
        .await
}

/// Connects to the daemon whose data dir is `data_dir`.
pub async fn connect_unix(data_dir: &Path) -> Result<ControlClient, ControlError> {
    let path = socket_path(data_dir);
    let no_daemon = || ControlError::NoDaemon {
        data_dir: data_dir.to_path_buf(),
        socket: path.clone(),
    };
    match tokio::net::UnixStream::connect(&path).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(no_daemon());
        }
        Err(source) => return Err(ControlError::Io { path, source }),
    }
    let p = path.clone();
    // The URI is required by the HTTP/2 layer but never resolved: the connector below
    // always opens the Unix socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await?;
    Ok(v1::control_client::ControlClient::with_interceptor(
        channel,
        TokenAuth::default(),
    ))
}

/// Connects to a daemon's loopback TCP control API with `token`.
pub async fn connect_tcp(addr: SocketAddr, token: String) -> Result<ControlClient, ControlError> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(v1::control_client::ControlClient::with_interceptor(
        channel,
        TokenAuth { token: Some(token) },
    ))
}
