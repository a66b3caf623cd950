//! Daemon settings: a plain struct with defaults, filled from a TOML file, then `POTLUCK_*`
//! environment variables, then command-line flags, each layer overriding the last. Every
//! value goes through one parser per key, so a bad value is reported once, naming the key and
//! where it came from, whichever layer supplied it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use potluck_worker::DeviceSpec;

use crate::bootstrap::Backoff;
use crate::limits::InboundCaps;
use crate::ratelimit::RateCaps;

/// How the daemon writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Kademlia mode. Kademlia starts as a client until an external address is confirmed, which
/// never happens on loopback or a private LAN, so a reachable daemon must say `server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KadMode {
    Server,
    Client,
    Auto,
}

/// Validated daemon settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Identity, membership, invites and the control socket live here.
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to announce as this node's public (external) addresses. A relay server
    /// serves only once it has one; without this list it announces its listen addresses.
    pub external: Vec<Multiaddr>,
    pub mdns: bool,
    pub log_format: LogFormat,
    /// Serve as a circuit relay for peers behind NAT (public nodes only).
    pub relay_server: bool,
    pub kad_mode: KadMode,
    /// Start as the owner of a private swarm (closed by membership) unless the data dir
    /// already holds a membership of someone else's swarm.
    pub private: bool,
    /// Also serve the control API on this loopback TCP address, guarded by the token in
    /// `<data_dir>/control.token`.
    pub control_tcp: Option<SocketAddr>,
    /// How often the capability record is re-published on gossip.
    pub capability_interval: Duration,
    /// Connections a non-member may hold open without presenting a membership.
    pub membership_deadline: Duration,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Caps on incoming connections per transport and per remote address (see `limits`).
    pub inbound: InboundCaps,
    /// The longest wait between two dials of an unreachable bootstrap peer.
    pub bootstrap_redial_max: Duration,
    /// Peers the daemon dials on its own when it learns of them (beyond those Kademlia finds).
    pub target_peers: u32,
    /// Committed checkpoints of a run kept on disk, the newest first; the last commit's is
    /// never pruned.
    pub keep_checkpoints: usize,
    /// The least time a replica looks for its run's coordinator after losing it (the
    /// window is three round deadlines, and at least three times this).
    pub failover_min: Duration,
    /// Serve `/metrics` (Prometheus), `/api/state` (JSON) and the dashboard here; off when
    /// `None`. A non-loopback address requires the bearer token in `<data_dir>/http.token`.
    pub http_listen: Option<SocketAddr>,
    /// Read the HTTP bearer token from this file (which must exist) instead of
    /// `<data_dir>/http.token`; with it, a token is required on loopback too.
    pub http_token_file: Option<PathBuf>,
    /// Where this daemon trains: the CPU, or a CUDA GPU (a build with the `cuda` feature).
    pub device: DeviceSpec,
    /// Upload and download caps of the data plane (bytes per second; `None`: unlimited).
    pub rate_caps: RateCaps,
    /// The memory a training step may take on its device, in MiB (`None`: no cap).
    pub memory_limit_mb: Option<u64>,
    /// Threads of the worker's CPU math (`None`: one per core).
    pub cpu_threads: Option<usize>,
    /// Weekly windows in which training pauses (`pause_schedule`, see `train::pause`).
    pub pause_schedule: crate::train::pause::Schedule,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            listen: vec![
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .expect("static multiaddr"),
                "/ip4/0.0.0.0/tcp/4001".parse().expect("static multiaddr"),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            mdns: true,
            log_format: LogFormat::Human,
            relay_server: false,
            kad_mode: KadMode::Server,
            private: false,
            control_tcp: None,
            capability_interval: Duration::from_secs(10),
            membership_deadline: Duration::from_millis(1000),
            max_connections: 512,
            max_connections_per_peer: 4,
            inbound: InboundCaps::default(),
            bootstrap_redial_max: Backoff::default().max,
            target_peers: 16,
            keep_checkpoints: 3,
            failover_min: Duration::from_secs(40),
            http_listen: None,
            http_token_file: None,
            device: DeviceSpec::Cpu,
            rate_caps: RateCaps::default(),
            memory_limit_mb: None,
            cpu_threads: None,
            pause_schedule: Default::default(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(state) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(state);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/potluck"),
        None => PathBuf::from("/var/lib/potluck"),
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Env(String),
    Flag,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "config file {}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag => write!(f, "command line"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value for `{key}` (from {origin}): {reason}")]
    Invalid {
        key: String,
        origin: Source,
        reason: String,
    },
    #[error("unknown setting `{key}` in {origin}")]
    Unknown { key: String, origin: Source },
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// A raw value before it is parsed for its key.
#[derive(Debug, Clone)]
pub enum RawValue {
    Str(String),
    List(Vec<String>),
    Bool(bool),
    Int(i64),
}

/// Every key, as written in TOML; the environment variable is `POTLUCK_` + upper case.
pub const KEYS: &[&str] = &[
    "data_dir",
    "listen",
    "bootstrap",
    "external",
    "mdns",
    "log_format",
    "relay_server",
    "kad_mode",
    "private",
    "control_tcp",
    "capability_interval_secs",
    "membership_deadline_ms",
    "max_connections",
    "max_connections_per_peer",
    "max_pending_incoming",
    "max_pending_incoming_per_ip",
    "max_established_incoming_per_ip",
    "bootstrap_redial_max_secs",
    "target_peers",
    "keep_checkpoints",
    "failover_min_secs",
    "http_listen",
    "http_token_file",
    "device",
    "upload_bytes_per_sec",
    "download_bytes_per_sec",
    "memory_limit_mb",
    "cpu_threads",
    "pause_schedule",
];

/// Port of `http_listen = "on"` (loopback).
pub const DEFAULT_HTTP_PORT: u16 = 9464;

/// The TOML file is small by nature; refuse anything absurd before reading it.
const CONFIG_FILE_LIMIT: u64 = 1 << 20;

impl Config {
    /// Sets one key from a raw value, validating it.
    pub fn set(&mut self, key: &str, value: RawValue, source: &Source) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            key: key.to_string(),
            origin: source.clone(),
            reason,
        };
        match key {
            "data_dir" => {
                let s = as_str(&value).map_err(bad)?;
                if s.is_empty() {
                    return Err(bad("must not be empty".into()));
                }
                self.data_dir = PathBuf::from(s);
            }
            "listen" => self.listen = as_addrs(&value).map_err(bad)?,
            "bootstrap" => self.bootstrap = as_addrs(&value).map_err(bad)?,
            "external" => self.external = as_addrs(&value).map_err(bad)?,
            "mdns" => self.mdns = as_bool(&value).map_err(bad)?,
            "relay_server" => self.relay_server = as_bool(&value).map_err(bad)?,
            "private" => self.private = as_bool(&value).map_err(bad)?,
            "log_format" => {
                self.log_format = match as_str(&value).map_err(bad)?.as_str() {
                    "human" => LogFormat::Human,
                    "json" => LogFormat::Json,
                    other => return Err(bad(format!("`{other}` is not `human` or `json`"))),
                }
            }
            "kad_mode" => {
                self.kad_mode = match as_str(&value).map_err(bad)?.as_str() {
                    "server" => KadMode::Server,
                    "client" => KadMode::Client,
                    "auto" => KadMode::Auto,
                    other => {
                        return Err(bad(format!(
                            "`{other}` is not `server`, `client` or `auto`"
                        )));
                    }
                }
            }
            "control_tcp" => {
                let s = as_str(&value).map_err(bad)?;
                if s.is_empty() {
                    self.control_tcp = None;
                } else {
                    let addr: SocketAddr = s
                        .parse()
                        .map_err(|e| bad(format!("`{s}` is not an IP:port address ({e})")))?;
                    if !addr.ip().is_loopback() {
                        return Err(bad(format!(
                            "`{s}` is not a loopback address; the control API never listens publicly"
                        )));
                    }
                    self.control_tcp = Some(addr);
                }
            }
            "capability_interval_secs" => {
                let n = as_int(&value, 1, 3600).map_err(bad)?;
                self.capability_interval = Duration::from_secs(n);
            }
            "membership_deadline_ms" => {
                let n = as_int(&value, 50, 1900).map_err(bad)?;
                self.membership_deadline = Duration::from_millis(n);
            }
            "max_connections" => {
                self.max_connections = as_int(&value, 1, 100_000).map_err(bad)? as u32
            }
            "max_connections_per_peer" => {
                self.max_connections_per_peer = as_int(&value, 1, 64).map_err(bad)? as u32
            }
            "max_pending_incoming" => {
                self.inbound.pending_per_transport = as_int(&value, 1, 100_000).map_err(bad)? as u32
            }
            "max_pending_incoming_per_ip" => {
                self.inbound.pending_per_address = as_int(&value, 1, 100_000).map_err(bad)? as u32
            }
            "max_established_incoming_per_ip" => {
                self.inbound.established_per_address =
                    as_int(&value, 1, 100_000).map_err(bad)? as u32
            }
            "bootstrap_redial_max_secs" => {
                let n = as_int(&value, 1, 3600).map_err(bad)?;
                self.bootstrap_redial_max = Duration::from_secs(n);
            }
            "target_peers" => self.target_peers = as_int(&value, 0, 10_000).map_err(bad)? as u32,
            "keep_checkpoints" => {
                self.keep_checkpoints = as_int(&value, 1, 1_000_000).map_err(bad)? as usize
            }
            "failover_min_secs" => {
                self.failover_min = Duration::from_secs(as_int(&value, 1, 3600).map_err(bad)?)
            }
            "http_listen" => {
                let s = as_str(&value).map_err(bad)?;
                self.http_listen = match s.trim() {
                    "" | "off" => None,
                    // The usual Prometheus exporter port, on loopback.
                    "on" => Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT))),
                    a => Some(a.parse().map_err(|e| {
                        bad(format!(
                            "`{a}` is not an IP:port address, `on` or `off` ({e})"
                        ))
                    })?),
                };
            }
            "http_token_file" => {
                let s = as_str(&value).map_err(bad)?;
                self.http_token_file = (!s.is_empty()).then(|| PathBuf::from(s));
            }
            "device" => self.device = parse_device(&as_str(&value).map_err(bad)?).map_err(bad)?,
            // 0 means no cap; a bucket needs at least 1 KiB/s.
            "upload_bytes_per_sec" => {
                self.rate_caps.upload = nonzero(as_int_or_zero(&value, 1024, 1 << 40).map_err(bad)?)
            }
            "download_bytes_per_sec" => {
                self.rate_caps.download =
                    nonzero(as_int_or_zero(&value, 1024, 1 << 40).map_err(bad)?)
            }
            "memory_limit_mb" => {
                self.memory_limit_mb = nonzero(as_int_or_zero(&value, 16, 1 << 24).map_err(bad)?)
            }
            "cpu_threads" => {
                self.cpu_threads =
                    nonzero(as_int_or_zero(&value, 1, 4096).map_err(bad)?).map(|n| n as usize)
            }
            "pause_schedule" => {
                let entries = match &value {
                    RawValue::List(l) => l.clone(),
                    // An environment variable: entries separated by `;` (a day list has
                    // commas).
                    RawValue::Str(s) => s
                        .split(';')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(String::from)
                        .collect(),
                    other => {
                        return Err(bad(format!("expected a list of strings, found {other:?}")));
                    }
                };
                self.pause_schedule = crate::train::pause::Schedule::parse(&entries)
                    .map_err(|e| bad(e.to_string()))?;
            }
            _ => {
                return Err(ConfigError::Unknown {
                    key: key.to_string(),
                    origin: source.clone(),
                });
            }
        }
        Ok(())
    }

    /// Applies a TOML file.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = crate::fsutil::read_limited(path, CONFIG_FILE_LIMIT)
            .map_err(|e| file_err(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| file_err("not UTF-8".into()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        let source = Source::File(path.to_path_buf());
        for (key, value) in table {
            let raw = match value {
                toml::Value::String(s) => RawValue::Str(s),
                toml::Value::Boolean(b) => RawValue::Bool(b),
                toml::Value::Integer(i) => RawValue::Int(i),
                toml::Value::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            toml::Value::String(s) => out.push(s),
                            other => {
                                return Err(ConfigError::Invalid {
                                    key,
                                    origin: source,
                                    reason: format!("expected a list of strings, found {other}"),
                                });
                            }
                        }
                    }
                    RawValue::List(out)
                }
                other => {
                    return Err(ConfigError::Invalid {
                        key,
                        origin: source,
                        reason: format!("unsupported value {other}"),
                    });
                }
            };
            self.set(&key, raw, &source)?;
        }
        Ok(())
    }

    /// Applies `POTLUCK_<KEY>` variables from `vars` (lists are comma-separated).
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("POTLUCK_") else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            // Variables the CLI itself reads are not daemon settings.
            if !KEYS.contains(&key.as_str()) {
                continue;
            }
            self.set(&key, RawValue::Str(value), &Source::Env(name.clone()))?;
        }
        Ok(())
    }
}

/// `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub(crate) fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    match s.trim() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < 64)
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("`{other}` is not `cpu`, `cuda` or `cuda:N` (N < 64)")),
    }
}

fn as_str(v: &RawValue) -> Result<String, String> {
    match v {
        RawValue::Str(s) => Ok(s.clone()),
        other => Err(format!("expected a string, found {other:?}")),
    }
}

fn as_bool(v: &RawValue) -> Result<bool, String> {
    match v {
        RawValue::Bool(b) => Ok(*b),
        RawValue::Str(s) => match s.as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(format!("`{other}` is not a boolean (true/false)")),
        },
        other => Err(format!("expected a boolean, found {other:?}")),
    }
}

fn as_int(v: &RawValue, min: u64, max: u64) -> Result<u64, String> {
    let n: i64 = match v {
        RawValue::Int(i) => *i,
        RawValue::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an integer"))?,
        other => return Err(format!("expected an integer, found {other:?}")),
    };
    let n = u64::try_from(n).map_err(|_| format!("{n} is negative"))?;
    if n < min || n > max {
        return Err(format!("{n} is outside {min}..={max}"));
    }
    Ok(n)
}

/// 0, or an integer in `min..=max`.
fn as_int_or_zero(v: &RawValue, min: u64, max: u64) -> Result<u64, String> {
    match as_int(v, 0, max)? {
        0 => Ok(0),
        n if n < min => Err(format!("{n} is below {min} (0 means no limit)")),
        n => Ok(n),
    }
}

fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}

fn as_addrs(v: &RawValue) -> Result<Vec<Multiaddr>, String> {
    let items: Vec<String> = match v {
        RawValue::List(l) => l.clone(),
        RawValue::Str(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        other => return Err(format!("expected a list of multiaddrs, found {other:?}")),
    };
    if items.len() > 64 {
        return Err(format!("{} addresses; at most 64 are allowed", items.len()));
    }
    items
        .iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| format!("`{s}` is not a multiaddr ({e})"))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("potluck.toml");
        std::fs::write(
            &file,
            "mdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/1\"]\nlog_format = \"json\"\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.apply_file(&file).unwrap();
        assert!(!c.mdns);
        assert_eq!(c.log_format, LogFormat::Json);
        c.apply_env([("POTLUCK_MDNS".to_string(), "true".to_string())])
            .unwrap();
        assert!(c.mdns);
        c.set("log_format", RawValue::Str("human".into()), &Source::Flag)
            .unwrap();
        assert_eq!(c.log_format, LogFormat::Human);
        assert_eq!(c.listen.len(), 1);
    }

    #[test]
    fn connection_caps_and_redial_pace_are_settings() {
        let mut c = Config::default();
        c.apply_env([
            ("POTLUCK_MAX_PENDING_INCOMING".to_string(), "40".to_string()),
            (
                "POTLUCK_MAX_PENDING_INCOMING_PER_IP".to_string(),
                "4".to_string(),
            ),
            (
                "POTLUCK_MAX_ESTABLISHED_INCOMING_PER_IP".to_string(),
                "9".to_string(),
            ),
            (
                "POTLUCK_BOOTSTRAP_REDIAL_MAX_SECS".to_string(),
                "120".to_string(),
            ),
        ])
        .unwrap();
        assert_eq!(
            c.inbound,
            InboundCaps {
                pending_per_transport: 40,
                pending_per_address: 4,
                established_per_address: 9,
            }
        );
        assert_eq!(c.bootstrap_redial_max, Duration::from_secs(120));
        assert!(
            c.set("bootstrap_redial_max_secs", RawValue::Int(0), &Source::Flag)
                .is_err()
        );
    }

    #[test]
    fn http_listener_is_off_by_default_and_loopback_when_on() {
        let mut c = Config::default();
        assert_eq!(c.http_listen, None);
        c.set("http_listen", RawValue::Str("on".into()), &Source::Flag)
            .unwrap();
        let a = c.http_listen.unwrap();
        assert!(a.ip().is_loopback());
        assert_eq!(a.port(), DEFAULT_HTTP_PORT);
        c.apply_env([(
            "POTLUCK_HTTP_LISTEN".to_string(),
            "0.0.0.0:9000".to_string(),
        )])
        .unwrap();
        assert_eq!(c.http_listen, Some("0.0.0.0:9000".parse().unwrap()));
        c.set("http_listen", RawValue::Str("off".into()), &Source::Flag)
            .unwrap();
        assert_eq!(c.http_listen, None);
    }

    #[test]
    fn device_is_cpu_or_a_cuda_ordinal() {
        let mut c = Config::default();
        assert_eq!(c.device, DeviceSpec::Cpu);
        for (text, want) in [
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("cpu", DeviceSpec::Cpu),
        ] {
            c.set("device", RawValue::Str(text.into()), &Source::Flag)
                .unwrap();
            assert_eq!(c.device, want);
        }
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:64", "metal"] {
            let e = c
                .set("device", RawValue::Str(bad.into()), &Source::Flag)
                .unwrap_err()
                .to_string();
            assert!(e.contains("`device`"), "{e}");
        }
    }

    #[test]
    fn caps_are_off_by_default_and_zero_turns_them_off() {
        let mut c = Config::default();
        assert_eq!(c.rate_caps, RateCaps::default());
        assert_eq!((c.memory_limit_mb, c.cpu_threads), (None, None));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "upload_bytes_per_sec = 1000000\ndownload_bytes_per_sec = 2048\n\
             memory_limit_mb = 512\ncpu_threads = 2\n",
        )
        .unwrap();
        c.apply_file(&file).unwrap();
        assert_eq!(
            c.rate_caps,
            RateCaps {
                upload: Some(1_000_000),
                download: Some(2048)
            }
        );
        assert_eq!((c.memory_limit_mb, c.cpu_threads), (Some(512), Some(2)));
        c.apply_env([
            ("POTLUCK_UPLOAD_BYTES_PER_SEC".to_string(), "0".to_string()),
            ("POTLUCK_CPU_THREADS".to_string(), "0".to_string()),
        ])
        .unwrap();
        assert_eq!(c.rate_caps.upload, None);
        assert_eq!(c.cpu_threads, None);
        for (key, bad) in [
            ("upload_bytes_per_sec", 100),
            ("download_bytes_per_sec", -1),
            ("memory_limit_mb", 4),
            ("cpu_threads", 5000),
        ] {
            let e = c
                .set(key, RawValue::Int(bad), &Source::Flag)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn pause_schedule_comes_from_a_list_or_a_variable_and_bad_entries_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "pause_schedule = [\"Mon-Fri 18:00-23:00 +01:00\", \"Sat,Sun 10:00-02:00\"]\n",
        )
        .unwrap();
        let mut c = Config::default();
        assert!(c.pause_schedule.is_empty(), "no schedule by default");
        c.apply_file(&file).unwrap();
        assert_eq!(
            c.pause_schedule,
            crate::train::pause::Schedule::parse(&[
                "Mon-Fri 18:00-23:00 +01:00",
                "Sat,Sun 10:00-02:00"
            ])
            .unwrap()
        );
        c.apply_env([(
            "POTLUCK_PAUSE_SCHEDULE".to_string(),
            "Mon,Tue 09:00-10:00; daily 01:00-02:00".to_string(),
        )])
        .unwrap();
        assert_eq!(
            c.pause_schedule,
            crate::train::pause::Schedule::parse(&["Mon,Tue 09:00-10:00", "daily 01:00-02:00"])
                .unwrap()
        );
        std::fs::write(&file, "pause_schedule = [\"Mon 18:00-25:00\"]\n").unwrap();
        let msg = c.apply_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("`pause_schedule`") && msg.contains("25:00"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut c = Config::default();
        let err = c
            .apply_env([("POTLUCK_LISTEN".to_string(), "not-an-addr".to_string())])
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`listen`") && msg.contains("POTLUCK_LISTEN"),
            "{msg}"
        );

        let err = c
            .set(
                "control_tcp",
                RawValue::Str("0.0.0.0:9".into()),
                &Source::Flag,
            )
            .unwrap_err();
        assert!(err.to_string().contains("control_tcp"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "max_connections = -3\n").unwrap();
        assert!(
            c.apply_file(&file)
                .unwrap_err()
                .to_string()
                .contains("max_connections")
        );
        // The last commit's checkpoint is never pruned: 0 is refused.
        std::fs::write(&file, "keep_checkpoints = 0\n").unwrap();
        assert!(
            c.apply_file(&file)
                .unwrap_err()
                .to_string()
                .contains("keep_checkpoints")
        );
        std::fs::write(&file, "keep_checkpoints = 1\n").unwrap();
        c.apply_file(&file).unwrap();
        assert_eq!(c.keep_checkpoints, 1);
        std::fs::write(&file, "max_pending_incoming_per_ip = 0\n").unwrap();
        assert!(
            c.apply_file(&file)
                .unwrap_err()
                .to_string()
                .contains("max_pending_incoming_per_ip")
        );
        std::fs::write(&file, "http_listen = \"127.0.0.1:99999\"\n").unwrap();
        assert!(
            c.apply_file(&file)
                .unwrap_err()
                .to_string()
                .contains("http_listen")
        );
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        assert!(
            c.apply_file(&file)
                .unwrap_err()
                .to_string()
                .contains("no_such_key")
        );
    }
}
