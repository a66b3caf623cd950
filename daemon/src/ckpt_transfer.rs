//! Checkpoint transfer between peers: the `/potluck/ckpt/1` protocol, a read-only server of
//! the checkpoint directories a daemon holds, and a verified multi-source fetcher.
//!
//! The fetcher drives the coordinator crate's pure [`Download`] state machine: it asks
//! several peers at once for the manifest's pieces, checks every piece against the signed
//! manifest before writing it, bans for the rest of the transfer a peer that served a bad
//! piece, and writes into a hidden partial directory next to the destination. An
//! interrupted fetch (cancelled, killed, or left without sources) resumes: the next fetch
//! re-hashes what the partial directory holds and asks only for the missing pieces. A
//! finished checkpoint is verified once more as a whole, synced, and renamed into place.
//!
//! Wire format (one stream carries any number of request/answer pairs, in turn):
//! - request, 56 bytes: `"PCK1" | op u8 | 3 zero bytes | root [32] | file u32 | len u32 |
//!   offset u64` (little endian). `op` 1 asks for the signed manifest (`manifest.pb`), 2 for
//!   the signed run manifest (`run.pb`), 3 for `len` bytes of file number `file` (an index
//!   into the manifest's sorted file list) at `offset`.
//! - answer: `status u8 | 3 zero bytes | len u32 | len bytes`. Status 0 carries the data;
//!   any other status is an error code followed by a short UTF-8 reason.
//!
//! Requests name files by index into a manifest the server decoded and checked itself, so a
//! request cannot name any other path; ranges must lie inside the file and be no longer
//! than the checkpoint's longest piece, so nothing is allocated before a request is known
//! to be valid. Every read and write has a deadline, and each peer may hold only a few
//! streams at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use potluck_coordinator::Hash32;
use potluck_coordinator::failover::{MAX_RUN_MANIFEST_BYTES, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, MANIFEST_FILE, MAX_MANIFEST_BYTES, RUN_FILE, SignedManifest,
};
use potluck_coordinator::store::write_atomic;
use potluck_coordinator::transfer::{Download, DownloadConfig, PieceRejected, SourceId};
use potluck_coordinator::verify::{check_manifest_against_run, verified_pieces, verify_content};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::ratelimit::{Limited, RateLimiter};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The checkpoint chunk protocol.
pub const CKPT_PROTOCOL: StreamProtocol = StreamProtocol::new("/potluck/ckpt/1");

const MAGIC: [u8; 4] = *b"PCK1";
/// Length of an encoded request.
pub const REQUEST_LEN: usize = 56;
const ANSWER_HEAD_LEN: usize = 8;
/// Longest error reason a server sends or a fetcher reads.
pub const MAX_REASON_LEN: usize = 1024;
/// How deep below the served directory checkpoint directories are looked for
/// (`runs/<run id>/checkpoints/<round>` is 3 deep).
const MAX_SCAN_DEPTH: usize = 3;
/// Directories visited per scan at most, so a huge tree cannot stall the server.
const MAX_SCAN_DIRS: usize = 4096;
/// An unknown root triggers a rescan at most this often.
const RESCAN_INTERVAL: Duration = Duration::from_millis(200);
/// Most requests a fetch keeps outstanding per source (the streams a server grants one
/// peer by default).
pub const MAX_IN_FLIGHT_PER_SOURCE: usize = 8;
/// Verified piece bytes waiting to be written, at most.
const MAX_PENDING_WRITE_BYTES: u64 = 64 << 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Manifest = 1,
    RunManifest = 2,
    Range = 3,
}

/// One request of the checkpoint protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireRequest {
    pub op: Op,
    pub root: Hash32,
    pub file: u32,
    pub len: u32,
    pub offset: u64,
}

impl WireRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = self.op as u8;
        b[8..40].copy_from_slice(&self.root.0);
        b[40..44].copy_from_slice(&self.file.to_le_bytes());
        b[44..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Parses a request; the error is the reason sent back.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, &'static str> {
        if b[..4] != MAGIC {
            return Err("not a checkpoint protocol request (bad magic)");
        }
        if b[5..8] != [0, 0, 0] {
            return Err("reserved request bytes are not zero");
        }
        let op = match b[4] {
            1 => Op::Manifest,
            2 => Op::RunManifest,
            3 => Op::Range,
            _ => return Err("unknown request op"),
        };
        let mut root = [0u8; 32];
        root.copy_from_slice(&b[8..40]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&b[48..56]);
        Ok(WireRequest {
            op,
            root: Hash32(root),
            file: u32_at(40),
            len: u32_at(44),
            offset: u64::from_le_bytes(off),
        })
    }
}

/// Status codes of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// This peer holds no checkpoint with that root.
    UnknownRoot = 1,
    /// The request is malformed or out of bounds.
    BadRequest = 2,
    /// The peer holds the checkpoint but could not read it.
    Unavailable = 3,
}

impl Status {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::UnknownRoot,
            2 => Status::BadRequest,
            3 => Status::Unavailable,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Limits of the checkpoint server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Streams one peer may hold open at once; more are closed at once.
    pub max_streams_per_peer: usize,
    /// Streams of all peers together.
    pub max_streams: usize,
    /// How long a stream may sit without a request before it is closed.
    pub idle_timeout: Duration,
    /// Deadline for writing one answer.
    pub write_timeout: Duration,
    /// The daemon's upload cap (and download cap, for the requests) that answers go through.
    pub rates: RateLimiter,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_streams_per_peer: MAX_IN_FLIGHT_PER_SOURCE,
            max_streams: 64,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            rates: RateLimiter::unlimited(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the checkpoint protocol is already being served by this daemon")]
    AlreadyServing,
}

/// One checkpoint directory being served.
#[derive(Debug)]
struct Served {
    dir: PathBuf,
    content: CheckpointContent,
    /// The longest range a request may ask for: the checkpoint's longest piece.
    max_range: u64,
}

#[derive(Debug, Default)]
struct Index {
    by_root: HashMap<Hash32, Arc<Served>>,
    /// Manifests already decoded, by directory, with the manifest file's mtime and size.
    cache: HashMap<PathBuf, (Option<SystemTime>, u64, Arc<Served>, Hash32)>,
    /// When the last completed scan began.
    last_scan: Option<Instant>,
}

#[derive(Debug)]
struct ServerInner {
    root_dir: PathBuf,
    opts: ServeOptions,
    index: Mutex<Index>,
    scan_lock: tokio::sync::Mutex<()>,
    per_peer: Mutex<HashMap<PeerId, usize>>,
    streams: Arc<Semaphore>,
    served_bytes: AtomicU64,
    refused_requests: AtomicU64,
    refused_streams: AtomicU64,
}

/// Handle of a running checkpoint server. Cheap to clone; serving stops with the network.
#[derive(Debug, Clone)]
pub struct CheckpointServer {
    inner: Arc<ServerInner>,
}

/// Serves, read-only, every checkpoint directory (one holding a valid signed `manifest.pb`)
/// found up to three levels below `root_dir` (hidden entries are skipped, so partial
/// downloads are never served). New checkpoints are found when a peer asks for a root not
/// yet known, or on [`CheckpointServer::rescan`].
pub fn serve_checkpoints(
    mut control: libp2p_stream::Control,
    root_dir: PathBuf,
    opts: ServeOptions,
) -> Result<CheckpointServer, ServeError> {
    let mut incoming = control
        .accept(CKPT_PROTOCOL)
        .map_err(|_| ServeError::AlreadyServing)?;
    let server = CheckpointServer {
        inner: Arc::new(ServerInner {
            root_dir,
            streams: Arc::new(Semaphore::new(opts.max_streams.max(1))),
            opts,
            index: Mutex::new(Index::default()),
            scan_lock: tokio::sync::Mutex::new(()),
            per_peer: Mutex::new(HashMap::new()),
            served_bytes: AtomicU64::new(0),
            refused_requests: AtomicU64::new(0),
            refused_streams: AtomicU64::new(0),
        }),
    };
    let s = server.clone();
    tokio::spawn(async move {
        s.rescan().await;
        while let Some((peer, stream)) = incoming.next().await {
            let Some(permit) = s.admit(peer) else {
                s.inner.refused_streams.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "too many checkpoint streams; closing one");
                drop(stream);
                continue;
            };
            let s = s.clone();
            let stream = s.inner.opts.rates.wrap(stream);
            tokio::spawn(async move {
                s.serve_stream(peer, stream).await;
                s.release(peer);
                drop(permit);
            });
        }
    });
    Ok(server)
}

impl CheckpointServer {
    /// Looks for checkpoint directories again; returns how many are served.
    pub async fn rescan(&self) -> usize {
        let _one_at_a_time = self.inner.scan_lock.lock().await;
        self.scan_now().await
    }

    async fn scan_now(&self) -> usize {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.rescan_blocking())
            .await
            .unwrap_or(0)
    }

    /// Roots of the checkpoints being served.
    pub fn roots(&self) -> Vec<Hash32> {
        self.inner
            .index
            .lock()
            .map(|i| i.by_root.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Piece and manifest bytes sent so far.
    pub fn served_bytes(&self) -> u64 {
        self.inner.served_bytes.load(Ordering::Relaxed)
    }

    /// Requests answered with an error so far.
    pub fn refused_requests(&self) -> u64 {
        self.inner.refused_requests.load(Ordering::Relaxed)
    }

    /// Streams closed at once because a peer (or all peers) held too many.
    pub fn refused_streams(&self) -> u64 {
        self.inner.refused_streams.load(Ordering::Relaxed)
    }

    fn admit(&self, peer: PeerId) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = self.inner.streams.clone().try_acquire_owned().ok()?;
        let mut per = self.inner.per_peer.lock().ok()?;
        let n = per.entry(peer).or_insert(0);
        if *n >= self.inner.opts.max_streams_per_peer {
            return None;
        }
        *n += 1;
        Some(permit)
    }

    fn release(&self, peer: PeerId) {
        if let Ok(mut per) = self.inner.per_peer.lock()
            && let Some(n) = per.get_mut(&peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&peer);
            }
        }
    }

    async fn serve_stream(&self, peer: PeerId, mut stream: CkptStream) {
        let opts = &self.inner.opts;
        loop {
            let mut buf = [0u8; REQUEST_LEN];
            match tokio::time::timeout(opts.idle_timeout, stream.read_exact(&mut buf)).await {
                Ok(Ok(())) => {}
                // End of stream, reset, or idle: nothing to answer.
                Ok(Err(_)) | Err(_) => return,
            }
            let (status, body, keep_open) = match WireRequest::decode(&buf) {
                Ok(req) => match self.answer(&req).await {
                    Ok(body) => (Status::Ok, body, true),
                    Err((status, reason)) => (status, reason.into_bytes(), true),
                },
                // A stream that sent garbage is out of step: answer once, then close.
                Err(reason) => (Status::BadRequest, reason.as_bytes().to_vec(), false),
            };
            if status != Status::Ok {
                self.inner.refused_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, ?status, reason = %String::from_utf8_lossy(&body),
                    "refused a checkpoint request");
            }
            let write = async {
                let mut head = [0u8; ANSWER_HEAD_LEN];
                head[0] = status as u8;
                head[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
                stream.write_all(&head).await?;
                stream.write_all(&body).await?;
                stream.flush().await
            };
            match tokio::time::timeout(opts.write_timeout, write).await {
                Ok(Ok(())) => {
                    if status == Status::Ok {
                        self.inner
                            .served_bytes
                            .fetch_add(body.len() as u64, Ordering::Relaxed);
                    }
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!(%peer, "checkpoint answer could not be sent in time");
                    return;
                }
            }
            if !keep_open {
                let _ = tokio::time::timeout(opts.write_timeout, stream.close()).await;
                return;
            }
        }
    }

    fn find(&self, root: &Hash32) -> Option<Arc<Served>> {
        self.inner
            .index
            .lock()
            .ok()
            .and_then(|i| i.by_root.get(root).cloned())
    }

    /// The checkpoint with `root`, rescanning when it is unknown: a scan that began after
    /// the request arrived is needed before a root is called unknown, so a checkpoint
    /// written just before it was asked for is always found. Scans run one at a time and at
    /// most every [`RESCAN_INTERVAL`], so unknown roots cannot keep the disk busy.
    async fn lookup(&self, root: &Hash32) -> Option<Arc<Served>> {
        if let Some(s) = self.find(root) {
            return Some(s);
        }
        let asked = Instant::now();
        let _one_at_a_time = self.inner.scan_lock.lock().await;
        if let Some(s) = self.find(root) {
            return Some(s);
        }
        let last = self.inner.index.lock().ok().and_then(|i| i.last_scan);
        if last.is_some_and(|t| t >= asked) {
            return None;
        }
        if let Some(t) = last {
            tokio::time::sleep_until((t + RESCAN_INTERVAL).into()).await;
        }
        self.scan_now().await;
        self.find(root)
    }

    async fn answer(&self, req: &WireRequest) -> Result<Vec<u8>, (Status, String)> {
        let served = self.lookup(&req.root).await.ok_or_else(|| {
            (
                Status::UnknownRoot,
                format!(
                    "this peer holds no checkpoint with root {}",
                    req.root.short()
                ),
            )
        })?;
        let bad = |r: String| (Status::BadRequest, r);
        let (path, offset, len) = match req.op {
            Op::Manifest | Op::RunManifest => {
                if req.file != 0 || req.len != 0 || req.offset != 0 {
                    return Err(bad("manifest requests carry no range".into()));
                }
                let (name, limit) = if req.op == Op::Manifest {
                    (MANIFEST_FILE, MAX_MANIFEST_BYTES)
                } else {
                    (RUN_FILE, MAX_RUN_MANIFEST_BYTES)
                };
                let path = served.dir.join(name);
                let len = regular_file_len(&path)
                    .filter(|n| *n <= limit as u64)
                    .ok_or_else(|| (Status::Unavailable, format!("{name} cannot be read")))?;
                (path, 0, len)
            }
            Op::Range => {
                let f = served
                    .content
                    .files
                    .get(req.file as usize)
                    .ok_or_else(|| bad(format!("no file number {}", req.file)))?;
                let len = u64::from(req.len);
                if len == 0 || len > served.max_range {
                    return Err(bad(format!(
                        "range of {len} bytes: ranges are 1 to {} bytes",
                        served.max_range
                    )));
                }
                if req.offset.checked_add(len).is_none_or(|end| end > f.size) {
                    return Err(bad(format!(
                        "range {}+{len} lies outside {} ({} bytes)",
                        req.offset, f.path, f.size
                    )));
                }
                (served.dir.join(&f.path), req.offset, len)
            }
        };
        tokio::task::spawn_blocking(move || read_range(&path, offset, len))
            .await
            .map_err(|e| (Status::Unavailable, format!("read task failed: {e}")))?
            .map_err(|e| (Status::Unavailable, format!("cannot read: {e}")))
    }
}

/// The length of `path` if it is a regular file (not a link).
fn regular_file_len(path: &Path) -> Option<u64> {
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_file().then_some(m.len())
}

fn read_range(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    // Links are refused so that a checkpoint directory cannot point outside itself.
    if regular_file_len(path).is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not a regular file",
        ));
    }
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

impl ServerInner {
    fn rescan_blocking(&self) -> usize {
        let began = Instant::now();
        let dirs = find_checkpoint_dirs(&self.root_dir);
        let old_cache = self
            .index
            .lock()
            .map(|i| i.cache.clone())
            .unwrap_or_default();
        let mut cache = HashMap::new();
        let mut by_root = HashMap::new();
        for dir in dirs {
            let mpath = dir.join(MANIFEST_FILE);
            let Ok(meta) = std::fs::symlink_metadata(&mpath) else {
                continue;
            };
            let mtime = meta.modified().ok();
            let entry = match old_cache.get(&dir) {
                Some(e) if e.0 == mtime && e.1 == meta.len() => Some(e.clone()),
                _ => load_served(&dir, &mpath).map(|(s, root)| (mtime, meta.len(), s, root)),
            };
            if let Some(e) = entry {
                by_root.entry(e.3).or_insert_with(|| e.2.clone());
                cache.insert(dir, e);
            }
        }
        let n = by_root.len();
        if let Ok(mut i) = self.index.lock() {
            i.by_root = by_root;
            i.cache = cache;
            i.last_scan = Some(began);
        }
        n
    }
}

fn load_served(dir: &Path, mpath: &Path) -> Option<(Arc<Served>, Hash32)> {
    let len = regular_file_len(mpath)?;
    if len > MAX_MANIFEST_BYTES as u64 {
        return None;
    }
    let bytes = std::fs::read(mpath).ok()?;
    let m = match SignedManifest::decode(&bytes) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "not serving a checkpoint with an invalid manifest"
            );
            return None;
        }
    };
    let content = m.body().content.clone();
    let max_range = content.pieces().iter().map(|p| p.len).max().unwrap_or(0);
    Some((
        Arc::new(Served {
            dir: dir.to_path_buf(),
            content,
            max_range,
        }),
        m.body().root,
    ))
}

/// Directories holding a `manifest.pb`, up to [`MAX_SCAN_DEPTH`] below `root` (which
/// counts too), skipping hidden names and links.
fn find_checkpoint_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut level = vec![root.to_path_buf()];
    let mut visited = 0usize;
    for depth in 0..=MAX_SCAN_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            visited += 1;
            if visited > MAX_SCAN_DIRS {
                tracing::warn!(
                    root = %root.display(),
                    "too many directories to scan for checkpoints"
                );
                return out;
            }
            if dir.join(MANIFEST_FILE).is_file() {
                out.push(dir);
                continue;
            }
            if depth == MAX_SCAN_DEPTH {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let hidden = e.file_name().to_string_lossy().starts_with('.');
                if !hidden && e.file_type().is_ok_and(|t| t.is_dir()) {
                    next.push(e.path());
                }
            }
        }
        next.sort();
        level = next;
    }
    out
}

// ---------------------------------------------------------------------------------------
// Fetcher
// ---------------------------------------------------------------------------------------

/// Settings of a fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Requests outstanding per source, each on its own stream; at most
    /// [`MAX_IN_FLIGHT_PER_SOURCE`], the streams a server grants one peer by default.
    pub max_in_flight_per_source: usize,
    /// Deadline for one request: opening the stream if needed, asking, reading the answer.
    pub request_timeout: Duration,
    /// A source that fails this many requests in a row (no answer, broken stream) is
    /// dropped from the transfer.
    pub max_consecutive_failures: u32,
    /// The run the checkpoint must belong to, when the caller knows it (an invite).
    pub expected_run_id: Option<Hash32>,
    /// Cancels the fetch; verified pieces stay in the partial directory for a resume.
    pub cancel: CancellationToken,
    /// Receives progress after each verified piece.
    pub progress: Option<watch::Sender<FetchProgress>>,
    /// Check the finished checkpoint as a whole (sizes, every hash, whole-file hashes)
    /// before moving it into place.
    pub final_verify: bool,
    /// The daemon's download cap (and upload cap, for the requests).
    pub rates: RateLimiter,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_in_flight_per_source: 4,
            request_timeout: Duration::from_secs(30),
            max_consecutive_failures: 3,
            expected_run_id: None,
            cancel: CancellationToken::new(),
            progress: None,
            final_verify: true,
            rates: RateLimiter::unlimited(),
        }
    }
}

/// Progress of a fetch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchProgress {
    /// Verified bytes, those found on disk at the start included.
    pub verified_bytes: u64,
    pub total_bytes: u64,
    /// Bytes fetched and accepted by this fetch.
    pub fetched_bytes: u64,
}

/// How a source fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceOutcome {
    /// Usable to the end.
    Good,
    /// Served a bad piece or broke the protocol: banned for this transfer.
    Banned { reason: String },
    /// Could not serve (does not hold the checkpoint, unreachable): dropped.
    Dropped { reason: String },
}

/// One source of a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub peer: PeerId,
    /// Bytes of verified pieces it served.
    pub served_bytes: u64,
    pub outcome: SourceOutcome,
}

/// What a completed fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    pub root: Hash32,
    pub dest: PathBuf,
    pub total_bytes: u64,
    pub total_pieces: usize,
    /// Pieces found intact in the partial directory and not fetched again.
    pub resumed_pieces: usize,
    pub resumed_bytes: u64,
    /// Pieces fetched and accepted now.
    pub fetched_pieces: usize,
    pub fetched_bytes: u64,
    /// Pieces refused (bad hash or length).
    pub rejected_pieces: usize,
    pub sources: Vec<SourceReport>,
    pub elapsed: Duration,
}

/// Why a fetch failed. Verified pieces are kept for a resume unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no peer to fetch checkpoint {root} from: name at least one other peer that holds it")]
    NoSources { root: Hash32 },
    #[error("the manifest does not belong to the run manifest: {0}")]
    Mismatch(String),
    #[error("checkpoint belongs to run {got}, expected run {expected}: check the invite or run id")]
    WrongRun { expected: Hash32, got: Hash32 },
    #[error("{path} already exists: remove it or fetch into another directory")]
    DestinationExists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no peer served a valid manifest for checkpoint {root}: {reasons}")]
    NoManifest { root: Hash32, reasons: String },
    #[error(
        "no peer can serve the rest of checkpoint {root}: {verified_bytes} of {total_bytes} \
         bytes are verified and kept in {partial}; fetch again from other peers to resume \
         ({reasons})"
    )]
    Stalled {
        root: Hash32,
        verified_bytes: u64,
        total_bytes: u64,
        partial: PathBuf,
        reasons: String,
        sources: Vec<SourceReport>,
    },
    #[error(
        "fetch of checkpoint {root} cancelled: {verified_bytes} of {total_bytes} bytes are \
         verified and kept in {partial}; the next fetch resumes from there"
    )]
    Cancelled {
        root: Hash32,
        verified_bytes: u64,
        total_bytes: u64,
        partial: PathBuf,
    },
    #[error(
        "the fetched checkpoint failed its final check ({reason}); the partial directory was \
         removed: fetch again"
    )]
    FinalCheck { reason: String },
}

fn fio(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The hidden directory a fetch into `dest` writes to until it is complete.
pub fn partial_dir(dest: &Path) -> Result<PathBuf, FetchError> {
    let name = dest.file_name().ok_or_else(|| FetchError::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the destination must name a directory",
        ),
    })?;
    let mut p = std::ffi::OsString::from(".");
    p.push(name);
    p.push(".partial");
    Ok(dest.with_file_name(p))
}

/// Why one request failed.
#[derive(Debug)]
enum ReqError {
    /// The stream broke or timed out: try again, maybe elsewhere.
    Transport(String),
    /// The source answered with an error: it cannot serve this.
    Refused(Status, String),
    /// The source broke the protocol: ban it.
    Misbehaved(String),
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::Transport(s) => write!(f, "{s}"),
            ReqError::Refused(st, s) => write!(f, "refused ({st:?}): {s}"),
            ReqError::Misbehaved(s) => write!(f, "protocol violation: {s}"),
        }
    }
}

/// The deadline of one piece request under this daemon's download cap: every request in
/// flight shares the cap, so a piece may wait behind all the others before its own bytes
/// come; without that allowance a cap below a few hundred KB/s would time out every
/// request and drop every source.
fn capped_request_timeout(
    base: Duration,
    download_cap: Option<u64>,
    requests_in_flight: usize,
    piece_bytes: u64,
) -> Duration {
    match download_cap {
        Some(rate) if rate > 0 => {
            let queued = piece_bytes.saturating_mul(requests_in_flight as u64);
            base + Duration::from_secs_f64(queued as f64 / rate as f64)
        }
        _ => base,
    }
}

/// Sends `req` on `stream` and reads the answer; an OK answer longer than `max_body`, or of
/// another length than `exact`, is a protocol violation.
async fn exchange(
    stream: &mut CkptStream,
    req: &WireRequest,
    max_body: u64,
    exact: Option<u64>,
) -> Result<Vec<u8>, ReqError> {
    let t = |e: std::io::Error| ReqError::Transport(e.to_string());
    stream.write_all(&req.encode()).await.map_err(t)?;
    stream.flush().await.map_err(t)?;
    let mut head = [0u8; ANSWER_HEAD_LEN];
    stream.read_exact(&mut head).await.map_err(t)?;
    let status = Status::from_u8(head[0])
        .ok_or_else(|| ReqError::Misbehaved(format!("unknown status {}", head[0])))?;
    let len = u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
    if status != Status::Ok {
        if len > MAX_REASON_LEN as u64 {
            return Err(ReqError::Misbehaved(format!("error reason of {len} bytes")));
        }
        let mut reason = vec![0u8; len as usize];
        stream.read_exact(&mut reason).await.map_err(t)?;
        return Err(ReqError::Refused(
            status,
            String::from_utf8_lossy(&reason).into_owned(),
        ));
    }
    if len > max_body || exact.is_some_and(|e| e != len) {
        return Err(ReqError::Misbehaved(format!(
            "answered {len} bytes where {} were asked for",
            exact.unwrap_or(max_body)
        )));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).await.map_err(t)?;
    Ok(body)
}

/// A checkpoint stream: its bytes count against the daemon's rate caps.
type CkptStream = Limited<libp2p::Stream>;

/// Opens checkpoint streams through the daemon's rate caps.
#[derive(Clone)]
struct Dialer {
    control: libp2p_stream::Control,
    rates: RateLimiter,
}

impl Dialer {
    async fn open(&mut self, peer: PeerId) -> Result<CkptStream, ReqError> {
        let stream = self
            .control
            .open_stream(peer, CKPT_PROTOCOL)
            .await
            .map_err(|e| ReqError::Transport(format!("cannot open a stream: {e}")))?;
        Ok(self.rates.wrap(stream))
    }
}

/// Fetches the signed manifest and run manifest of checkpoint `root` from the first of
/// `sources` that serves valid ones: the manifest must have that root and carry valid
/// signatures, and the run manifest must be the one whose coordinator signed it.
pub async fn fetch_manifest(
    control: &libp2p_stream::Control,
    sources: &[PeerId],
    root: Hash32,
    opts: &FetchOptions,
) -> Result<(SignedManifest, SignedRunManifest), FetchError> {
    if sources.is_empty() {
        return Err(FetchError::NoSources { root });
    }
    let mut reasons = Vec::new();
    for peer in sources {
        let mut dialer = Dialer {
            control: control.clone(),
            rates: opts.rates.clone(),
        };
        let attempt = async {
            let mut s = dialer.open(*peer).await?;
            let ask = |op| WireRequest {
                op,
                root,
                file: 0,
                len: 0,
                offset: 0,
            };
            let mb = exchange(&mut s, &ask(Op::Manifest), MAX_MANIFEST_BYTES as u64, None).await?;
            let rb = exchange(
                &mut s,
                &ask(Op::RunManifest),
                MAX_RUN_MANIFEST_BYTES as u64,
                None,
            )
            .await?;
            let _ = s.close().await;
            let m = SignedManifest::decode(&mb)
                .map_err(|e| ReqError::Misbehaved(format!("manifest: {e}")))?;
            if m.body().root != root {
                return Err(ReqError::Misbehaved(format!(
                    "served the manifest of root {} instead",
                    m.body().root.short()
                )));
            }
            let run = SignedRunManifest::decode(&rb)
                .map_err(|e| ReqError::Misbehaved(format!("run manifest: {e}")))?;
            check_manifest_against_run(&run, &m)
                .map_err(|e| ReqError::Misbehaved(format!("run manifest: {e}")))?;
            Ok((m, run))
        };
        match tokio::time::timeout(opts.request_timeout, attempt).await {
            Ok(Ok((m, run))) => {
                if let Some(exp) = opts.expected_run_id
                    && exp != run.run_id()
                {
                    reasons.push(format!(
                        "{peer}: checkpoint of run {}",
                        run.run_id().short()
                    ));
                    continue;
                }
                return Ok((m, run));
            }
            Ok(Err(e)) => reasons.push(format!("{peer}: {e}")),
            Err(_) => reasons.push(format!("{peer}: timed out")),
        }
    }
    Err(FetchError::NoManifest {
        root,
        reasons: reasons.join("; "),
    })
}

/// Fetches checkpoint `root` knowing only its root: the manifests from the first source
/// that serves valid ones ([`fetch_manifest`]), then the files from all of them
/// ([`fetch_checkpoint`]).
pub async fn fetch_root(
    control: &libp2p_stream::Control,
    sources: &[PeerId],
    root: Hash32,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<FetchReport, FetchError> {
    let (manifest, run) = fetch_manifest(control, sources, root, opts).await?;
    fetch_checkpoint(control, sources, &manifest, &run, dest, opts).await
}

/// The result of one piece request, sent by a source's worker to the fetch loop.
struct Outcome {
    source: SourceId,
    piece: usize,
    result: Result<Vec<u8>, ReqError>,
}

/// One worker: one stream to `peer`, requests taken from the source's queue in turn.
async fn source_worker(
    mut dialer: Dialer,
    peer: PeerId,
    root: Hash32,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<potluck_coordinator::transfer::Request>>>,
    results: mpsc::Sender<Outcome>,
    file_index: Arc<HashMap<String, u32>>,
    request_timeout: Duration,
) {
    let mut stream: Option<CkptStream> = None;
    let mut failed_in_a_row = 0u32;
    loop {
        let Some(req) = queue.lock().await.recv().await else {
            return;
        };
        let result = match (file_index.get(&req.file), u32::try_from(req.len)) {
            (Some(&file), Ok(len)) => {
                let wire = WireRequest {
                    op: Op::Range,
                    root,
                    file,
                    len,
                    offset: req.offset,
                };
                let attempt = async {
                    if stream.is_none() {
                        stream = Some(dialer.open(peer).await?);
                    }
                    match stream.as_mut() {
                        Some(s) => exchange(s, &wire, req.len, Some(req.len)).await,
                        None => Err(ReqError::Transport("no stream".into())),
                    }
                };
                match tokio::time::timeout(request_timeout, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(ReqError::Transport(format!(
                        "no answer within {request_timeout:?}"
                    ))),
                }
            }
            // A piece longer than the protocol can carry cannot be fetched from anyone.
            _ => Err(ReqError::Refused(
                Status::BadRequest,
                format!("piece of {} bytes cannot be requested", req.len),
            )),
        };
        let failed = matches!(
            result,
            Err(ReqError::Transport(_)) | Err(ReqError::Misbehaved(_))
        );
        if failed {
            // The stream may be out of step; a late answer must not be read as the next.
            stream = None;
        }
        if results
            .send(Outcome {
                source: req.source,
                piece: req.piece,
                result,
            })
            .await
            .is_err()
        {
            return;
        }
        // A source that refuses streams (its per-peer limit is full with another fetch)
        // must not be hammered: back off before this worker's next request.
        failed_in_a_row = if failed { failed_in_a_row + 1 } else { 0 };
        if failed_in_a_row > 0 {
            let ms = 100u64.saturating_mul(1 << failed_in_a_row.min(5));
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

struct SourceSlot {
    peer: PeerId,
    queue: Option<mpsc::Sender<potluck_coordinator::transfer::Request>>,
    failures: u32,
    outcome: SourceOutcome,
}

/// Fetches the checkpoint `manifest` describes from `sources` into `dest` (which must not
/// exist), verifying each piece before it is written, and writes `manifest.pb` and `run.pb`
/// beside the files so the result passes `potluck verify`. An earlier fetch into the same
/// `dest` that did not finish is resumed.
pub async fn fetch_checkpoint(
    control: &libp2p_stream::Control,
    sources: &[PeerId],
    manifest: &SignedManifest,
    run: &SignedRunManifest,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<FetchReport, FetchError> {
    let started = Instant::now();
    let root = manifest.body().root;
    check_manifest_against_run(run, manifest).map_err(|e| FetchError::Mismatch(e.to_string()))?;
    if let Some(expected) = opts.expected_run_id
        && expected != run.run_id()
    {
        return Err(FetchError::WrongRun {
            expected,
            got: run.run_id(),
        });
    }
    let content = manifest.body().content.clone();
    match std::fs::symlink_metadata(dest) {
        Ok(_) => {
            return Err(FetchError::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fio(dest)(e)),
    }
    let partial = partial_dir(dest)?;
    let (files, verified) = {
        let partial = partial.clone();
        let content = content.clone();
        let m = manifest.encode();
        let r = run.encode();
        let id = manifest.id();
        tokio::task::spawn_blocking(move || prepare_partial(&partial, &content, id, &m, &r))
            .await
            .map_err(|e| FetchError::Io {
                path: dest.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })??
    };
    let resumed_pieces = verified.iter().filter(|v| **v).count();

    let in_flight = opts
        .max_in_flight_per_source
        .clamp(1, MAX_IN_FLIGHT_PER_SOURCE);
    let request_timeout = capped_request_timeout(
        opts.request_timeout,
        opts.rates.caps().download,
        in_flight * sources.len().max(1),
        u64::from(content.chunk_size),
    );
    let cfg = DownloadConfig {
        max_in_flight_per_source: in_flight,
        // The workers give up first, so the state machine hears of every failure from
        // them; its own deadline is the backstop.
        request_timeout_ms: (request_timeout + Duration::from_secs(5)).as_millis() as u64,
    };
    let mut dl = Download::new(&content, &verified, cfg);
    let (_, total_bytes) = dl.progress();
    let resumed_bytes = dl.progress().0;
    let total_pieces = dl.pieces().len();

    let mut slots: BTreeMap<SourceId, SourceSlot> = BTreeMap::new();
    let mut seen = HashSet::new();
    for p in sources {
        if seen.insert(*p) {
            slots.insert(
                slots.len() as SourceId,
                SourceSlot {
                    peer: *p,
                    queue: None,
                    failures: 0,
                    outcome: SourceOutcome::Good,
                },
            );
        }
    }
    if slots.is_empty() && !dl.is_complete() {
        return Err(FetchError::NoSources { root });
    }
    let file_index: Arc<HashMap<String, u32>> = Arc::new(
        content
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.clone(), i as u32))
            .collect(),
    );
    let per_source = cfg.max_in_flight_per_source;
    let (res_tx, mut res_rx) = mpsc::channel::<Outcome>(slots.len() * per_source + 1);
    let mut workers = JoinSet::new();
    for (id, slot) in slots.iter_mut() {
        dl.add_source(*id);
        // Room beyond the in-flight limit for requests timed out but still queued.
        let (tx, rx) = mpsc::channel(per_source * 4);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..per_source {
            workers.spawn(source_worker(
                Dialer {
                    control: control.clone(),
                    rates: opts.rates.clone(),
                },
                slot.peer,
                root,
                rx.clone(),
                res_tx.clone(),
                file_index.clone(),
                request_timeout,
            ));
        }
        slot.queue = Some(tx);
    }
    drop(res_tx);

    // Detached blocking tasks rather than a JoinSet: a fetch that is dropped mid-way (its
    // task aborted) still completes the writes of every piece it verified, so a resume
    // finds them.
    let mut writes: FuturesUnordered<tokio::task::JoinHandle<Result<u64, FetchError>>> =
        FuturesUnordered::new();
    let mut pending_write_bytes = 0u64;
    let mut fetched_pieces = 0usize;
    let mut fetched_bytes = 0u64;
    let mut rejected_pieces = 0usize;
    let mut in_flight = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let epoch = Instant::now();
    let now_ms = || epoch.elapsed().as_millis() as u64;

    let failure: Option<FetchError> = loop {
        if dl.is_complete() {
            break None;
        }
        while let Some(req) = dl.poll_request(now_ms()) {
            let sent = slots
                .get(&req.source)
                .and_then(|s| s.queue.as_ref())
                .map(|q| q.try_send(req.clone()).is_ok())
                .unwrap_or(false);
            if sent {
                in_flight += 1;
            } else {
                // The source's queue is full of requests the state machine already
                // timed out: ask again after the next event.
                dl.handle_failure(req.source, req.piece);
                break;
            }
        }
        if in_flight == 0 && dl.is_stalled() {
            break Some(stalled(&dl, root, &partial, &slots));
        }
        tokio::select! {
            biased;
            _ = opts.cancel.cancelled() => {
                let (v, t) = dl.progress();
                break Some(FetchError::Cancelled {
                    root,
                    verified_bytes: v,
                    total_bytes: t,
                    partial: partial.clone(),
                });
            }
            Some(done) = writes.next(), if !writes.is_empty() => {
                match done {
                    Ok(Ok(n)) => pending_write_bytes -= n,
                    Ok(Err(e)) => break Some(e),
                    Err(e) => break Some(FetchError::Io {
                        path: partial.clone(),
                        source: std::io::Error::other(e.to_string()),
                    }),
                }
            }
            got = res_rx.recv() => {
                let Some(o) = got else {
                    break Some(stalled(&dl, root, &partial, &slots));
                };
                in_flight = in_flight.saturating_sub(1);
                let Some(slot) = slots.get_mut(&o.source) else { continue };
                match o.result {
                    Ok(data) => match dl.handle_data(o.source, o.piece, &data) {
                        Ok(()) => {
                            slot.failures = 0;
                            fetched_pieces += 1;
                            fetched_bytes += data.len() as u64;
                            let p = &dl.pieces()[o.piece];
                            let (file, offset, n) = (files[p.file].clone(), p.offset, p.len);
                            let path = partial.join(&content.files[p.file].path);
                            pending_write_bytes += n;
                            writes.push(tokio::task::spawn_blocking(move || {
                                file.write_all_at(&data, offset).map_err(fio(&path))?;
                                Ok(n)
                            }));
                            while pending_write_bytes > MAX_PENDING_WRITE_BYTES {
                                match writes.next().await {
                                    Some(Ok(Ok(n))) => pending_write_bytes -= n,
                                    Some(Ok(Err(e))) => return Err(e),
                                    Some(Err(e)) => return Err(FetchError::Io {
                                        path: partial.clone(),
                                        source: std::io::Error::other(e.to_string()),
                                    }),
                                    None => break,
                                }
                            }
                            if let Some(tx) = &opts.progress {
                                tx.send_replace(FetchProgress {
                                    verified_bytes: dl.progress().0,
                                    total_bytes,
                                    fetched_bytes,
                                });
                            }
                        }
                        Err(PieceRejected::Unsolicited { .. }) => {}
                        Err(e) => {
                            rejected_pieces += 1;
                            tracing::warn!(
                                peer = %slot.peer,
                                error = %e,
                                "banned a checkpoint source"
                            );
                            slot.outcome = SourceOutcome::Banned { reason: e.to_string() };
                            slot.queue = None;
                        }
                    },
                    Err(ReqError::Misbehaved(reason)) => {
                        tracing::warn!(peer = %slot.peer, %reason, "banned a checkpoint source");
                        dl.ban(o.source);
                        slot.outcome = SourceOutcome::Banned { reason };
                        slot.queue = None;
                    }
                    Err(ReqError::Refused(status, reason)) => {
                        tracing::info!(
                            peer = %slot.peer,
                            ?status,
                            %reason,
                            "checkpoint source cannot serve"
                        );
                        dl.handle_failure(o.source, o.piece);
                        dl.remove_source(o.source);
                        if slot.outcome == SourceOutcome::Good {
                            slot.outcome = SourceOutcome::Dropped { reason };
                        }
                        slot.queue = None;
                    }
                    Err(ReqError::Transport(reason)) => {
                        dl.handle_failure(o.source, o.piece);
                        slot.failures += 1;
                        if slot.failures >= opts.max_consecutive_failures.max(1)
                            && slot.outcome == SourceOutcome::Good
                        {
                            tracing::info!(
                                peer = %slot.peer,
                                %reason,
                                "dropped an unreachable checkpoint source"
                            );
                            dl.remove_source(o.source);
                            slot.outcome = SourceOutcome::Dropped {
                                reason: format!("unreachable: {reason}"),
                            };
                            slot.queue = None;
                        }
                    }
                }
            }
            _ = tick.tick() => dl.handle_timeout(now_ms()),
        }
    };
    workers.abort_all();
    // Every verified piece reaches the disk before returning, so a resume finds it.
    let mut write_error = None;
    while let Some(done) = writes.next().await {
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => write_error = write_error.or(Some(e)),
            Err(e) => {
                write_error = write_error.or(Some(FetchError::Io {
                    path: partial.clone(),
                    source: std::io::Error::other(e.to_string()),
                }))
            }
        }
    }
    if let Some(e) = failure.or(write_error) {
        return Err(e);
    }

    let final_verify = opts.final_verify;
    let (p2, d2, c2) = (partial.clone(), dest.to_path_buf(), content.clone());
    tokio::task::spawn_blocking(move || finish(&p2, &d2, &c2, files, final_verify))
        .await
        .map_err(|e| FetchError::Io {
            path: dest.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })??;
    let sources = slots
        .iter()
        .map(|(id, s)| SourceReport {
            peer: s.peer,
            served_bytes: dl.served(*id),
            outcome: s.outcome.clone(),
        })
        .collect();
    Ok(FetchReport {
        root,
        dest: dest.to_path_buf(),
        total_bytes,
        total_pieces,
        resumed_pieces,
        resumed_bytes,
        fetched_pieces,
        fetched_bytes,
        rejected_pieces,
        sources,
        elapsed: started.elapsed(),
    })
}

fn stalled(
    dl: &Download,
    root: Hash32,
    partial: &Path,
    slots: &BTreeMap<SourceId, SourceSlot>,
) -> FetchError {
    let (v, t) = dl.progress();
    let sources: Vec<SourceReport> = slots
        .iter()
        .map(|(id, s)| SourceReport {
            peer: s.peer,
            served_bytes: dl.served(*id),
            outcome: s.outcome.clone(),
        })
        .collect();
    let reasons = sources
        .iter()
        .map(|s| match &s.outcome {
            SourceOutcome::Good => format!("{}: no answer", s.peer),
            SourceOutcome::Banned { reason } => format!("{}: banned: {reason}", s.peer),
            SourceOutcome::Dropped { reason } => format!("{}: {reason}", s.peer),
        })
        .collect::<Vec<_>>()
        .join("; ");
    FetchError::Stalled {
        root,
        verified_bytes: v,
        total_bytes: t,
        partial: partial.to_path_buf(),
        reasons,
        sources,
    }
}

type Prepared = (Vec<Arc<std::fs::File>>, Vec<bool>);

/// Makes `partial` hold this checkpoint's files at their final sizes, keeping what an
/// earlier fetch of the same manifest left there, and says which pieces are intact.
fn prepare_partial(
    partial: &Path,
    content: &CheckpointContent,
    manifest_id: Hash32,
    manifest_bytes: &[u8],
    run_bytes: &[u8],
) -> Result<Prepared, FetchError> {
    let same = std::fs::read(partial.join(MANIFEST_FILE))
        .ok()
        .and_then(|b| SignedManifest::decode(&b).ok())
        .is_some_and(|m| m.id() == manifest_id);
    if partial.exists() && !same {
        // A partial download of another checkpoint (or of nothing yet): start afresh.
        std::fs::remove_dir_all(partial).map_err(fio(partial))?;
    }
    if let Some(parent) = partial.parent() {
        std::fs::create_dir_all(parent).map_err(fio(parent))?;
    }
    std::fs::create_dir_all(partial).map_err(fio(partial))?;
    let listed: HashSet<&str> = content.files.iter().map(|f| f.path.as_str()).collect();
    for e in std::fs::read_dir(partial).map_err(fio(partial))? {
        let e = e.map_err(fio(partial))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if !is_file
            || !(listed.contains(name.as_str()) || name == MANIFEST_FILE || name == RUN_FILE)
        {
            let p = e.path();
            if is_file || e.file_type().is_ok_and(|t| t.is_symlink()) {
                std::fs::remove_file(&p).map_err(fio(&p))?;
            } else {
                std::fs::remove_dir_all(&p).map_err(fio(&p))?;
            }
        }
    }
    let io_err = |e: potluck_coordinator::store::StoreError| FetchError::Io {
        path: partial.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    write_atomic(&partial.join(MANIFEST_FILE), manifest_bytes).map_err(io_err)?;
    write_atomic(&partial.join(RUN_FILE), run_bytes).map_err(io_err)?;
    let mut files = Vec::with_capacity(content.files.len());
    for f in &content.files {
        let path = partial.join(&f.path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(fio(&path))?;
        if file.metadata().map_err(fio(&path))?.len() != f.size {
            file.set_len(f.size).map_err(fio(&path))?;
        }
        files.push(Arc::new(file));
    }
    let verified = if same {
        verified_pieces(partial, content)
    } else {
        Vec::new()
    };
    Ok((files, verified))
}

/// Syncs the complete partial directory, checks it once more, and renames it to `dest`.
fn finish(
    partial: &Path,
    dest: &Path,
    content: &CheckpointContent,
    files: Vec<Arc<std::fs::File>>,
    final_verify: bool,
) -> Result<(), FetchError> {
    for (f, rec) in files.iter().zip(&content.files) {
        f.sync_all().map_err(fio(&partial.join(&rec.path)))?;
    }
    drop(files);
    if final_verify && let Err(e) = verify_content(partial, content) {
        let _ = std::fs::remove_dir_all(partial);
        return Err(FetchError::FinalCheck {
            reason: e.to_string(),
        });
    }
    std::fs::File::open(partial)
        .and_then(|d| d.sync_all())
        .map_err(fio(partial))?;
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(FetchError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    std::fs::rename(partial, dest).map_err(fio(dest))?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(fio(parent))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let r = WireRequest {
            op: Op::Range,
            root: Hash32([7; 32]),
            file: 3,
            len: 1 << 20,
            offset: 12345,
        };
        assert_eq!(WireRequest::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = b'X';
        assert!(WireRequest::decode(&b).is_err());
        let mut b = r.encode();
        b[4] = 9;
        assert!(WireRequest::decode(&b).is_err());
        let mut b = r.encode();
        b[6] = 1;
        assert!(WireRequest::decode(&b).is_err());
    }

    #[test]
    fn a_download_cap_stretches_each_request_deadline_by_the_queue_ahead_of_it() {
        let base = Duration::from_secs(30);
        assert_eq!(capped_request_timeout(base, None, 8, 1 << 20), base);
        // Eight 1 MiB pieces at 256 KiB/s: 32 s of queue on top of the base.
        assert_eq!(
            capped_request_timeout(base, Some(256 << 10), 8, 1 << 20),
            base + Duration::from_secs(32)
        );
    }

    #[test]
    fn partial_dir_is_hidden_beside_the_destination() {
        let p = partial_dir(Path::new("/a/b/00000000000000000003")).unwrap();
        assert_eq!(p, Path::new("/a/b/.00000000000000000003.partial"));
        assert!(partial_dir(Path::new("/")).is_err());
    }

    #[test]
    fn scan_finds_checkpoints_three_deep_and_skips_hidden_ones() {
        let t = tempfile::tempdir().unwrap();
        let mk = |rel: &str| {
            let d = t.path().join(rel);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(MANIFEST_FILE), b"x").unwrap();
        };
        mk("runs/aa/checkpoints/1");
        mk("runs/aa/checkpoints/.2.partial");
        mk("runs/bb/checkpoints/3");
        mk("runs/bb/checkpoints/3/inside"); // not a separate checkpoint
        mk("a/b/c/d/e");
        let found = find_checkpoint_dirs(&t.path().join("runs"));
        assert_eq!(
            found,
            vec![
                t.path().join("runs/aa/checkpoints/1"),
                t.path().join("runs/bb/checkpoints/3")
            ]
        );
        assert!(
            find_checkpoint_dirs(&t.path().join("a")).is_empty(),
            "too deep"
        );
        assert!(find_checkpoint_dirs(&t.path().join("missing")).is_empty());
    }

    proptest! {
        #[test]
        fn random_requests_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN)
        ) {
            let mut b = [0u8; REQUEST_LEN];
            b.copy_from_slice(&bytes);
            if let Ok(r) = WireRequest::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }
    }
}
