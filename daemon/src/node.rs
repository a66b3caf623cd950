//! One running daemon: the data dir, the identity, the network event loop and the control
//! API, started together and shut down together. `potluck daemon` runs one `Node` until a
//! signal; tests run several in one process.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::control::{self, ControlError, ControlService};
use crate::identity::{self, IdentityError};
use crate::net::{self, Client, NetError};
use crate::train::{TrainError, TrainService};
use crate::web::WebServer;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Checkpoints(#[from] crate::ckpt_transfer::ServeError),
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
    #[error("cannot train on the configured device: {0}")]
    Device(String),
    #[error("invalid rate cap: {0}")]
    Rates(String),
    #[error(transparent)]
    Threads(#[from] crate::threads::ThreadsError),
}

/// A running daemon.
pub struct Node {
    client: Client,
    train: TrainService,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    web: Option<WebServer>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer", &self.client.local_peer_id())
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Node {
    /// Starts a daemon. Must run inside a Tokio runtime.
    pub async fn start(config: Config) -> Result<Self, NodeError> {
        let dir = config.data_dir.clone();
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| NodeError::DataDir {
                    path: dir.clone(),
                    source,
                })?;
        }
        // Before any tensor operation: the math's thread pool is made once per process.
        if let Some(n) = config.cpu_threads {
            crate::threads::apply(n)?;
        }
        let device = config.device;
        // Open the device now: a daemon told to use a GPU it cannot use stops here, before it takes its data dir,, saying
        // why, instead of failing its first run.
        device
            .device()
            .map_err(|e| NodeError::Device(e.to_string()))?;
        let key = identity::load_or_create(&dir)?;
        // Bind the control socket before the network: it doubles as the data dir's lock.
        let listener = control::bind_unix(&dir).await?;
        let tcp = match config.control_tcp {
            Some(addr) => Some((addr, control::load_or_create_token(&dir)?)),
            None => None,
        };
        // One bucket per direction for the whole daemon: tensor frames and checkpoint
        // transfers share it.
        let rates = crate::ratelimit::RateLimiter::new(config.rate_caps)
            .map_err(|e| NodeError::Rates(e.to_string()))?;
        let settings = crate::train::TrainSettings {
            keep_checkpoints: config.keep_checkpoints,
            failover_min: config.failover_min,
            rates: rates.clone(),
            limits: crate::train::session::ResourceLimits {
                memory_limit_mb: config.memory_limit_mb,
                cpu_threads: config.cpu_threads,
            },
            pause_schedule: config.pause_schedule.clone(),
        };
        let http = match (config.http_listen, &config.http_token_file) {
            (Some(addr), Some(file)) => Some((addr, Some(crate::web::read_token(file)?))),
            // Loopback is this machine's own business; anywhere else needs the token.
            (Some(addr), None) if addr.ip().is_loopback() => Some((addr, None)),
            (Some(addr), None) => Some((addr, Some(crate::web::load_or_create_token(&dir)?))),
            (None, _) => None,
        };
        let http = match http {
            Some((addr, token)) => Some((WebServer::bind(addr).await?, token)),
            None => None,
        };
        let (client, mut event_loop) = net::build(config, key.clone())?;
        let mut swarm_registry = None;
        if http.is_some() {
            let mut registry = prometheus_client::registry::Registry::default();
            event_loop = event_loop.with_metrics(libp2p::metrics::Metrics::new(&mut registry));
            swarm_registry = Some(registry);
        }
        let train =
            TrainService::start(key, client.stream_control(), device, dir.clone(), settings)?;
        let runs = dir.join(crate::train::checkpoint::RUNS_DIR);
        let serve = crate::ckpt_transfer::ServeOptions {
            rates,
            ..Default::default()
        };
        crate::ckpt_transfer::serve_checkpoints(client.stream_control(), runs, serve)?;
        // Measure the reference training step off the runtime; the figure joins the
        // capability record when it is ready.
        let measuring = client.clone();
        tokio::spawn(async move {
            match tokio::task::spawn_blocking(move || crate::train::reference::measure(&device))
                .await
            {
                Ok(Ok(tps)) => {
                    tracing::info!(tokens_per_sec = tps, "reference training step measured");
                    let _ = measuring.set_train_throughput(tps).await;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "reference training step failed"),
                Err(e) => tracing::warn!(error = %e, "reference training step panicked"),
            }
        });
        let (shutdown, rx) = watch::channel(false);
        let web = match http {
            Some((listener, token)) => Some(
                WebServer::start(
                    listener,
                    token,
                    swarm_registry,
                    client.clone(),
                    train.clone(),
                    rx.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(event_loop.run(stopped(rx.clone()))));
        let registry = crate::train::runs::Runs::new(train.clone());
        // A run this daemon took part in before it stopped goes on.
        let resuming = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = resuming.resume().await {
                tracing::error!(error = %e, "the previous run was not resumed");
            }
        });
        let service = ControlService::new(client.clone(), registry);
        let unix_rx = rx.clone();
        let svc = service.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = control::serve_unix(listener, svc, stopped(unix_rx)).await {
                tracing::error!(error = %e, "control API stopped");
            }
        }));
        if let Some((addr, token)) = tcp {
            tasks.push(tokio::spawn(async move {
                if let Err(e) = control::serve_tcp(addr, token, service, stopped(rx)).await {
                    tracing::error!(error = %e, %addr, "TCP control API stopped");
                }
            }));
        }
        Ok(Self {
            client,
            train,
            shutdown,
            tasks,
            web,
            data_dir: dir,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Where the metrics, the JSON state and the dashboard are served, when they are.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.web.as_ref().map(WebServer::addr)
    }

    /// The daemon's training service (runs it coordinates or joins).
    pub fn train(&self) -> TrainService {
        self.train.clone()
    }

    /// Stops the network and the control API, waits for both, and removes the socket.
    pub async fn shutdown(self) {
        self.train.shutdown();
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(w) = self.web {
            w.join().await;
        }
        let _ = std::fs::remove_file(control::socket_path(&self.data_dir));
        tracing::info!("daemon stopped");
    }
}

#[cfg(all(test, not(feature = "cuda")))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gpu_this_build_cannot_use_stops_the_daemon_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            mdns: false,
            device: potluck_worker::DeviceSpec::Cuda(0),
            ..Config::default()
        };
        let e = Node::start(cfg).await.unwrap_err().to_string();
        assert!(e.contains("device") && e.contains("`cuda` feature"), "{e}");
        assert!(
            !control::socket_path(dir.path()).exists(),
            "it stopped before taking the data dir"
        );
    }

    #[tokio::test]
    async fn an_http_port_in_use_stops_the_daemon_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            mdns: false,
            http_listen: Some(addr),
            ..Config::default()
        };
        let e = Node::start(cfg).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("cannot listen for HTTP on {addr}")),
            "{e}"
        );
        // Nothing was left running: the data dir can be taken again.
        drop(taken);
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
            mdns: false,
            http_listen: Some(addr),
            ..Config::default()
        };
        let node = Node::start(cfg).await.unwrap();
        assert_eq!(node.http_addr(), Some(addr));
        node.shutdown().await;
    }
}
