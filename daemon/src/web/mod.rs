//! The daemon's HTTP listener (`http_listen`): Prometheus metrics at `/metrics`, the JSON
//! state at `/api/state` and the live dashboard at `/`, on one axum server. It only reads:
//! the network's peer table and status through the `Client`, the training service's status,
//! traffic and events, and a [`state::Tracker`] it feeds itself. Off unless configured;
//! loopback by default; on any other address every endpoint but the static page requires
//! `Authorization: Bearer <token>` with the token of `<data_dir>/http.token`.

pub mod conn;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinHandle;

use crate::net::Client;
use crate::train::TrainService;
use crate::train::runs::{LedgerReport, list_ledgers};
use state::{NodeView, RoundBytes, State, Tracker};

/// The token file of a non-loopback listener.
pub const TOKEN_FILE: &str = "http.token";
/// The dashboard: one static page, no build step, no dependencies.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Requests served at once; more get 503 (each one asks the network loop for its tables).
const MAX_CONCURRENT_REQUESTS: usize = 16;
/// How long a request waits for the network loop's answer.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often peers and round timings are sampled between requests, so that a peer that
/// leaves and a round that ends are noticed even when nobody is looking.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Rounds of byte counts in the JSON state.
const ROUND_BYTES_SHOWN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read or create the HTTP token {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a bearer token file (at most 1 KiB; surrounding white space ignored; at least 16
/// characters, or guessing it would be too easy).
pub fn read_token(path: &Path) -> Result<String, WebError> {
    let bytes = crate::fsutil::read_limited(path, 1024).map_err(|source| WebError::Token {
        path: path.to_path_buf(),
        source,
    })?;
    let t = String::from_utf8_lossy(&bytes).trim().to_string();
    if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(WebError::Token {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not one word of at least 16 characters; write a new one (or remove \
                 <data_dir>/http.token to get one)",
            ),
        });
    }
    Ok(t)
}

/// Loads the bearer token of a non-loopback listener, creating it (32 random bytes, hex,
/// mode 0600, written atomically) on first use.
pub fn load_or_create_token(data_dir: &Path) -> Result<String, WebError> {
    let path = data_dir.join(TOKEN_FILE);
    match read_token(&path) {
        Ok(t) => Ok(t),
        Err(WebError::Token { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            let token = hex::encode(bytes);
            crate::fsutil::write_atomic(&path, token.as_bytes(), 0o600)
                .map_err(|source| WebError::Token { path, source })?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

#[derive(Clone)]
struct Web {
    client: Client,
    train: TrainService,
    tracker: Arc<Mutex<Tracker>>,
    token: Option<Arc<str>>,
    permits: Arc<Semaphore>,
    /// The last ledger report, with the run and committed round it was taken at: checking
    /// a ledger reads and verifies every entry, so it is redone only after a commit.
    ledger: Arc<tokio::sync::Mutex<Option<(String, u64, LedgerReport)>>>,
    /// libp2p's metrics, filled by the network loop.
    swarm: Option<Arc<prometheus_client::registry::Registry>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Resident memory of this process, in bytes.
fn resident_memory() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = sysinfo::System::new();
    sys.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[pid]),
        false,
        sysinfo::ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory())
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
enum GatherError {
    #[error("the network loop did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
}

impl Web {
    /// Takes one snapshot: asks the network loop for its status and peers, reads the
    /// training service, and lets the tracker see both.
    async fn gather(&self) -> Result<State, GatherError> {
        let status = tokio::time::timeout(GATHER_TIMEOUT, self.client.status())
            .await
            .map_err(|_| GatherError::Timeout(GATHER_TIMEOUT))??;
        let listed = tokio::time::timeout(GATHER_TIMEOUT, self.client.peers())
            .await
            .map_err(|_| GatherError::Timeout(GATHER_TIMEOUT))??;
        let run = self.train.status();
        let traffic = self.train.traffic();
        let per_peer = traffic.per_peer();
        let round_bytes: Vec<RoundBytes> = {
            let per_round = traffic.per_round();
            let skip = per_round.len().saturating_sub(ROUND_BYTES_SHOWN);
            per_round
                .into_iter()
                .skip(skip)
                .map(|(round, (sent, received))| RoundBytes {
                    round,
                    sent,
                    received,
                })
                .collect()
        };
        let ledger = self.ledger(&run.run_id, run.committed_round).await;
        let now = now_ms();
        let (peers, history) = {
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            t.handle_peers(&listed, &run.peers, &per_peer, now);
            t.handle_timings(&run.run_id, &run.round_timings);
            (t.peers(), t.history())
        };
        Ok(State {
            generated_at_ms: now,
            node: NodeView {
                peer_id: status.peer_id.to_string(),
                swarm: status.swarm.to_string(),
                listen_addrs: status.listen_addrs.iter().map(|a| a.to_string()).collect(),
                uptime_secs: status.uptime.as_secs_f64(),
                capabilities: (&status.capabilities).into(),
                resident_memory_bytes: resident_memory(),
                rate_caps: crate::web::state::RateCapView::of(self.train.rates()),
            },
            peers,
            run,
            history,
            round_bytes,
            ledger,
        })
    }

    /// The run's ledger as checked after its last commit (off the async runtime).
    async fn ledger(&self, run_id: &str, committed: u64) -> Option<LedgerReport> {
        if run_id.is_empty() {
            return None;
        }
        // One check at a time; concurrent requests wait for it and share it.
        let mut cached = self.ledger.lock().await;
        if let Some((run, round, report)) = cached.as_ref()
            && run == run_id
            && *round == committed
        {
            return Some(report.clone());
        }
        let dir = self.train.data_dir().to_path_buf();
        let id = run_id.to_string();
        let found = tokio::task::spawn_blocking(move || list_ledgers(&dir, Some(&id))).await;
        match found {
            Ok(Ok(mut reports)) if reports.len() == 1 => {
                let report = reports.remove(0);
                *cached = Some((run_id.to_string(), committed, report.clone()));
                Some(report)
            }
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no ledger to show");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "checking the ledger panicked");
                None
            }
        }
    }
}

/// The HTTP listener of a daemon.
#[derive(Debug)]
pub struct WebServer {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl WebServer {
    /// Binds the listener; done before the daemon starts anything else, so that a port in
    /// use stops it at once.
    pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, WebError> {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| WebError::Bind { addr, source })
    }

    /// Serves on `listener` (from [`WebServer::bind`]) until `shutdown` turns true. `token`,
    /// when given, is required on every endpoint but the static page; `swarm` is libp2p's
    /// registry.
    pub async fn start(
        listener: tokio::net::TcpListener,
        token: Option<String>,
        swarm: Option<prometheus_client::registry::Registry>,
        client: Client,
        train: TrainService,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, WebError> {
        let bound = listener.local_addr().map_err(|source| WebError::Bind {
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        let web = Web {
            client,
            train,
            tracker: Arc::new(Mutex::new(Tracker::default())),
            token: token.map(Arc::from),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            ledger: Arc::default(),
            swarm: swarm.map(Arc::new),
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(follow_events(
            web.clone(),
            web.train.subscribe(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(sample(web.clone(), shutdown.clone())));
        let app = router(web);
        let mut stop = shutdown;
        tasks.push(tokio::spawn(async move {
            let listener = conn::BoundedListener::new(
                listener,
                conn::MAX_CONNECTIONS,
                conn::CONNECTION_LIFETIME,
            );
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the HTTP listener stopped");
            }
        }));
        tracing::info!(addr = %bound, token = web_token_note(bound), "serving metrics and the dashboard");
        Ok(WebServer { addr: bound, tasks })
    }

    /// The address it listens on (with the port the OS chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for its tasks after the shutdown signal.
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn web_token_note(addr: SocketAddr) -> &'static str {
    if addr.ip().is_loopback() {
        "none (loopback)"
    } else {
        "required (http.token)"
    }
}

fn router(web: Web) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/state", get(api_state))
        .route_layer(middleware::from_fn_with_state(web.clone(), require_token));
    Router::new()
        .route("/", get(dashboard))
        .merge(guarded)
        .layer(middleware::from_fn_with_state(web.clone(), limit))
        .with_state(web)
}

/// At most [`MAX_CONCURRENT_REQUESTS`] at once; the rest are told to come back.
async fn limit(AxState(web): AxState<Web>, req: Request, next: Next) -> Response {
    match web.permits.clone().try_acquire_owned() {
        Ok(permit) => {
            let r = next.run(req).await;
            drop(permit);
            r
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy; try again\n").into_response(),
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry `Authorization: Bearer <token>`.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same_token(t.trim().as_bytes(), token.as_bytes()))
}

async fn require_token(AxState(web): AxState<Web>, req: Request, next: Next) -> Response {
    match &web.token {
        Some(token) if !authorized(req.headers(), token) => {
            let mut r = (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer <data_dir>/http.token)\n",
            )
                .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        _ => next.run(req).await,
    }
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD,
    )
        .into_response()
}

fn unavailable(e: GatherError) -> Response {
    tracing::warn!(error = %e, "no snapshot for an HTTP request");
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
}

async fn metrics(AxState(web): AxState<Web>) -> Response {
    let state = match web.gather().await {
        Ok(s) => s,
        Err(e) => return unavailable(e),
    };
    let text = {
        let t = web.tracker.lock().unwrap_or_else(|p| p.into_inner());
        crate::metrics::render(&state, &t, web.swarm.as_deref())
    };
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn api_state(AxState(web): AxState<Web>) -> Response {
    match web.gather().await {
        Ok(s) => match serde_json::to_vec(&s) {
            Ok(body) => (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        },
        Err(e) => unavailable(e),
    }
}

/// Feeds run events to the tracker: the loss curve and the commit counters.
async fn follow_events(
    web: Web,
    mut events: broadcast::Receiver<crate::train::RunEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match ev {
            Ok(ev) => {
                let run_id = web.train.status().run_id;
                let mut t = web.tracker.lock().unwrap_or_else(|p| p.into_inner());
                t.handle_event(&run_id, &ev, now_ms());
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "the dashboard missed run events");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Samples peers and timings every second.
async fn sample(web: Web, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if let Err(e) = web.gather().await {
            // The network loop stops before this task during shutdown.
            tracing::debug!(error = %e, uptime = ?started.elapsed(), "sampling failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "secret-token"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret-token"),
        );
        assert!(authorized(&h, "secret-token"));
        assert!(!authorized(&h, "secret-tokeN"));
        assert!(!authorized(&h, "secret-token-longer"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic secret-token"),
        );
        assert!(!authorized(&h, "secret-token"));
    }

    #[test]
    fn token_is_created_once_and_a_short_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_token(dir.path()).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(load_or_create_token(dir.path()).unwrap(), a);
        std::fs::write(dir.path().join(TOKEN_FILE), "short").unwrap();
        let e = load_or_create_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("16 characters"), "{e}");
        let other = dir.path().join("given");
        assert!(read_token(&other).is_err(), "a given file is never created");
        std::fs::write(&other, "two words-but-long-enough\n").unwrap();
        assert!(read_token(&other).is_err());
        std::fs::write(&other, "one-long-enough-word\n").unwrap();
        assert_eq!(read_token(&other).unwrap(), "one-long-enough-word");
    }
}
