//! The local control API: a tonic gRPC service (`potluck.v1.Control`) served on a Unix socket
//! in the data dir (mode 0600, so only the daemon's user can reach it) and, when configured,
//! on a loopback TCP address where every call must carry the token from
//! `<data_dir>/control.token`. Also the client side the CLI uses.

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
use crate::net::{Client, NetError, PeerSummary};

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

/// The service implementation: a thin translation onto the network [`Client`].
#[derive(Debug, Clone)]
pub struct ControlService {
    client: Client,
}

impl ControlService {
    pub fn new(client: Client) -> Self {
        Self { client }
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
