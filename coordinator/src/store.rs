//! Persistence of the coordinator: its state snapshot and its ledger of signed manifests,
//! as files written atomically (write to a temporary file, fsync, rename, fsync the
//! directory), so that a crash or a full disk at any point leaves the last committed
//! version readable. This module does file I/O and nothing else: no sockets, no clock.
//!
//! Layout of a coordinator's data directory:
//! - `state.json`: the [`RunSnapshot`] (JSON: read back with a size limit, validated by
//!   [`RunMachine::resume`]).
//! - `ledger/<round, 20 digits>.pb`: one [`SignedManifest`] per committed round, round 0
//!   (the genesis checkpoint) first.
//! - `checkpoints/<round, 20 digits>/`: checkpoint directories, pruned by [`prune_checkpoints`].
//!
//! Faults can be injected at each step of a write ([`Fault`]) so that tests can stop the
//! coordinator after every persistence step and check what a restart finds.

use crate::Hash32;
use crate::failover::SignedRunManifest;
use crate::manifest::{ManifestError, SignedManifest};
use crate::round::{RunMachine, RunSnapshot};
use crate::verify::{VerifyError, check_link, check_manifest_against_run, verify_chain};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest state file read back.
pub const MAX_STATE_BYTES: u64 = 256 << 20;
pub const STATE_FILE: &str = "state.json";
pub const LEDGER_DIR: &str = "ledger";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const TMP_SUFFIX: &str = ".tmp";

/// Why a store operation failed. A failure never damages the last committed version.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("ledger: {0}")]
    Chain(#[from] VerifyError),
    #[error("{path}: copy does not have the expected hash (file changed while copying?)")]
    CopyMismatch { path: PathBuf },
    #[error("simulated crash after step {0:?}")]
    Crashed(WriteStep),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The steps of an atomic write, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    CreateTemp,
    WriteData,
    SyncData,
    Rename,
    SyncDir,
}

impl WriteStep {
    pub const ALL: [WriteStep; 5] = [
        WriteStep::CreateTemp,
        WriteStep::WriteData,
        WriteStep::SyncData,
        WriteStep::Rename,
        WriteStep::SyncDir,
    ];
}

/// A fault to inject into an atomic write (tests); [`Fault::None`] in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// The process dies right after this step: nothing is cleaned up.
    CrashAfter(WriteStep),
    /// This step fails with an I/O error (e.g. the disk is full); the writer cleans up.
    FailAt(WriteStep),
}

fn injected(fault: Fault, step: WriteStep) -> Result<(), StoreError> {
    match fault {
        Fault::FailAt(s) if s == step => Err(StoreError::Io {
            path: PathBuf::from(format!("<injected failure at {step:?}>")),
            source: std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
        }),
        _ => Ok(()),
    }
}

fn crashed(fault: Fault, step: WriteStep) -> Result<(), StoreError> {
    match fault {
        Fault::CrashAfter(s) if s == step => Err(StoreError::Crashed(step)),
        _ => Ok(()),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically: after a crash at any point `path` holds either its
/// old content or `bytes`, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_with(path, bytes, Fault::None)
}

/// [`write_atomic`] with a fault injected.
pub fn write_atomic_with(path: &Path, bytes: &[u8], fault: Fault) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    let dir = path.parent().unwrap_or(Path::new("."));
    let cleanup = |e: StoreError| {
        if !matches!(e, StoreError::Crashed(_)) {
            let _ = fs::remove_file(&tmp);
        }
        e
    };
    injected(fault, WriteStep::CreateTemp)?;
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    crashed(fault, WriteStep::CreateTemp)?;
    injected(fault, WriteStep::WriteData).map_err(cleanup)?;
    f.write_all(bytes).map_err(io(&tmp)).map_err(cleanup)?;
    crashed(fault, WriteStep::WriteData)?;
    injected(fault, WriteStep::SyncData).map_err(cleanup)?;
    f.sync_all().map_err(io(&tmp)).map_err(cleanup)?;
    drop(f);
    crashed(fault, WriteStep::SyncData)?;
    injected(fault, WriteStep::Rename).map_err(cleanup)?;
    fs::rename(&tmp, path).map_err(io(path)).map_err(cleanup)?;
    crashed(fault, WriteStep::Rename)?;
    injected(fault, WriteStep::SyncDir)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    crashed(fault, WriteStep::SyncDir)?;
    Ok(())
}

/// Copies `from` to `to` atomically, checking the copied bytes' blake3 against `expect`.
pub fn copy_atomic(from: &Path, to: &Path, expect: Option<Hash32>) -> Result<(), StoreError> {
    let tmp = tmp_path(to);
    let result = (|| {
        let mut src = File::open(from).map_err(io(from))?;
        let mut dst = File::create(&tmp).map_err(io(&tmp))?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(io(from))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n]).map_err(io(&tmp))?;
        }
        if expect.is_some_and(|e| Hash32::from(h.finalize()) != e) {
            return Err(StoreError::CopyMismatch {
                path: from.to_path_buf(),
            });
        }
        dst.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, to).map_err(io(to))?;
        let dir = to.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).map_err(io(path))?;
    if buf.len() as u64 > limit {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(Some(buf))
}

/// Removes temporary files a crash left behind in `dir`.
fn remove_stale_temps(dir: &Path) -> Result<(), StoreError> {
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
            fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// The coordinator's state file.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// The state file in `data_dir` (created if missing).
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        remove_stale_temps(data_dir)?;
        Ok(StateStore {
            path: data_dir.join(STATE_FILE),
        })
    }

    pub fn save(&self, snap: &RunSnapshot) -> Result<(), StoreError> {
        self.save_with(snap, Fault::None)
    }

    pub fn save_with(&self, snap: &RunSnapshot, fault: Fault) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(snap).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic_with(&self.path, &bytes, fault)
    }

    /// The last saved snapshot, or `None` for a new coordinator.
    pub fn load(&self) -> Result<Option<RunSnapshot>, StoreError> {
        let Some(bytes) = read_limited(&self.path, MAX_STATE_BYTES)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            })
    }
}

/// A run machine whose every change is persisted before its actions can be seen: each
/// event is applied to a copy, the copy is saved, and only then does it replace the
/// current state. A failed save (full disk) leaves both memory and disk at the last
/// committed state and returns the error; the event may be retried.
#[derive(Debug)]
pub struct PersistentRun {
    machine: RunMachine,
    store: StateStore,
    /// Injected into the next save only (tests).
    pub next_fault: Fault,
}

impl PersistentRun {
    /// Resumes the run saved in `data_dir`, or starts `fresh()` when there is none.
    pub fn open(data_dir: &Path, fresh: impl FnOnce() -> RunMachine) -> Result<Self, StoreError> {
        let store = StateStore::open(data_dir)?;
        let machine = match store.load()? {
            Some(snap) => RunMachine::resume(snap).map_err(|e| StoreError::Corrupt {
                path: store.path.clone(),
                reason: e.to_string(),
            })?,
            None => {
                let m = fresh();
                store.save(&m.snapshot())?;
                m
            }
        };
        Ok(PersistentRun {
            machine,
            store,
            next_fault: Fault::None,
        })
    }

    pub fn machine(&self) -> &RunMachine {
        &self.machine
    }

    /// Applies `f` to a copy of the machine, persists the copy, then adopts it.
    pub fn apply<T>(&mut self, f: impl FnOnce(&mut RunMachine) -> T) -> Result<T, StoreError> {
        let mut next = self.machine.clone();
        let out = f(&mut next);
        let fault = std::mem::take(&mut self.next_fault);
        self.store.save_with(&next.snapshot(), fault)?;
        self.machine = next;
        Ok(out)
    }

    /// The oldest action not yet carried out. Carry it out, then [`Self::ack_action`]: after
    /// a crash an action may be delivered twice, never zero times (receivers treat repeats
    /// as no-ops).
    pub fn peek_action(&self) -> Option<&crate::round::Action> {
        self.machine.peek_action()
    }

    /// Marks the oldest pending action as carried out.
    pub fn ack_action(&mut self) -> Result<(), StoreError> {
        self.apply(|m| {
            m.poll_action();
        })
    }
}

/// The ledger: every committed round's signed manifest, checked link by link.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    run: SignedRunManifest,
    entries: Vec<SignedManifest>,
}

/// The file name of the ledger entry for `round`.
pub fn entry_name(round: u64) -> String {
    format!("{round:020}.pb")
}

impl Ledger {
    /// Reads every entry of the ledger in `dir`, in round order, without judging the chain.
    pub fn read_entries(dir: &Path) -> Result<Vec<SignedManifest>, StoreError> {
        let mut names = Vec::new();
        for e in fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let round = name
                .strip_suffix(".pb")
                .filter(|r| r.len() == 20)
                .and_then(|r| r.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    path: e.path(),
                    reason: "not a ledger entry name".into(),
                })?;
            names.push((round, e.path()));
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for (round, path) in names {
            let bytes = read_limited(&path, crate::manifest::MAX_MANIFEST_BYTES as u64)?
                .ok_or_else(|| StoreError::Corrupt {
                    path: path.clone(),
                    reason: "vanished while reading".into(),
                })?;
            let m = SignedManifest::decode(&bytes).map_err(|source| StoreError::Manifest {
                path: path.clone(),
                source,
            })?;
            if m.body().round != round {
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!("holds round {}", m.body().round),
                });
            }
            out.push(m);
        }
        Ok(out)
    }

    /// Opens (creating if needed) the ledger of `run` in `dir` and verifies its chain.
    pub fn open(dir: &Path, run: SignedRunManifest) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        remove_stale_temps(dir)?;
        let entries = Self::read_entries(dir)?;
        if !entries.is_empty() {
            verify_chain(&run, &entries)?;
        }
        Ok(Ledger {
            dir: dir.to_path_buf(),
            run,
            entries,
        })
    }

    pub fn entries(&self) -> &[SignedManifest] {
        &self.entries
    }

    pub fn head(&self) -> Option<&SignedManifest> {
        self.entries.last()
    }

    pub fn run(&self) -> &SignedRunManifest {
        &self.run
    }

    /// Appends a committed round. Refuses manifests not signed by an allowed coordinator,
    /// replays of old rounds and manifests whose parent is not the head.
    pub fn append(&mut self, m: SignedManifest) -> Result<(), StoreError> {
        self.append_with(m, Fault::None)
    }

    pub fn append_with(&mut self, m: SignedManifest, fault: Fault) -> Result<(), StoreError> {
        check_manifest_against_run(&self.run, &m)?;
        match self.entries.last() {
            Some(head) => check_link(head, &m)?,
            None => verify_chain(&self.run, std::slice::from_ref(&m))?,
        }
        write_atomic_with(
            &self.dir.join(entry_name(m.body().round)),
            &m.encode(),
            fault,
        )?;
        self.entries.push(m);
        Ok(())
    }
}

/// Removes checkpoint directories `checkpoints/<round>` beyond the newest `keep`, never the
/// one of `last_verified_round`. A directory is first renamed to a hidden name, so a crash
/// mid-removal never leaves a half-deleted checkpoint under a round's name. Returns the
/// rounds removed.
pub fn prune_checkpoints(
    checkpoints_dir: &Path,
    keep: usize,
    last_verified_round: u64,
) -> Result<Vec<u64>, StoreError> {
    let mut rounds = Vec::new();
    for e in fs::read_dir(checkpoints_dir).map_err(io(checkpoints_dir))? {
        let e = e.map_err(io(checkpoints_dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".removing") {
            fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
            continue;
        }
        if let Ok(r) = name.parse::<u64>()
            && name.len() == 20
            && e.file_type().map_err(io(&e.path()))?.is_dir()
        {
            rounds.push(r);
        }
    }
    rounds.sort_unstable();
    let cut = rounds.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for r in rounds.into_iter().take(cut) {
        if r == last_verified_round {
            continue;
        }
        let from = checkpoints_dir.join(format!("{r:020}"));
        let to = checkpoints_dir.join(format!(".{r:020}.removing"));
        fs::rename(&from, &to).map_err(io(&from))?;
        fs::remove_dir_all(&to).map_err(io(&to))?;
        removed.push(r);
    }
    Ok(removed)
}

/// Writes `manifest.pb` and `run.pb` into the checkpoint directory `dir`, atomically, after
/// checking that the manifest is of that run and signed by an allowed coordinator.
pub fn write_manifest_files(
    dir: &Path,
    m: &SignedManifest,
    run: &SignedRunManifest,
) -> Result<(), StoreError> {
    check_manifest_against_run(run, m)?;
    write_atomic(&dir.join(crate::manifest::RUN_FILE), &run.encode())?;
    write_atomic(&dir.join(crate::manifest::MANIFEST_FILE), &m.encode())
}

/// The checkpoint directory of `round` under `data_dir`.
pub fn checkpoint_dir(data_dir: &Path, round: u64) -> PathBuf {
    data_dir.join(CHECKPOINTS_DIR).join(format!("{round:020}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerId;
    use crate::manifest::{
        CheckpointContent, FileKind, FileRecord, ManifestBody, SignerRole, public_key,
    };
    use crate::round::{Action, CommitRecord, Report, RunConfig};
    use crate::testutil::{COORD, run};

    /// In-memory content for round `r`: what the replicas' weights hash to.
    fn content(r: u64) -> CheckpointContent {
        CheckpointContent {
            chunk_size: 4096,
            files: vec![FileRecord {
                path: "w".into(),
                kind: FileKind::Opaque,
                size: 0,
                file_hash: blake3::hash(&r.to_le_bytes()).into(),
                header_len: 0,
                header_hash: Hash32::default(),
                tensors: vec![],
                chunk_hashes: vec![],
            }],
        }
    }

    fn manifest(run_id: Hash32, c: &CommitRecord) -> SignedManifest {
        let content = content(c.round);
        assert_eq!(content.root(), c.root);
        let mut m = SignedManifest::new(ManifestBody {
            run_id,
            round: c.round,
            parent: c.parent,
            root: c.root,
            content,
            contributors: c.agreeing.clone(),
            coordinator_key: public_key(&COORD),
        });
        m.sign(SignerRole::Coordinator, &COORD).unwrap();
        m
    }

    /// Which persistence operation gets which fault, counted over one life.
    struct Plan {
        at: usize,
        fault: Fault,
        ops: usize,
    }

    impl Plan {
        fn next(&mut self) -> Fault {
            let f = if self.ops == self.at {
                self.fault
            } else {
                Fault::None
            };
            self.ops += 1;
            f
        }
    }

    /// One life of a coordinator (open, drive rounds until `target` commits) in the way the
    /// daemon drives it: persist each event, carry an action out, then acknowledge it.
    fn life(
        dir: &Path,
        plan: &mut Plan,
        target: u64,
        seen: &mut Vec<CommitRecord>,
    ) -> Result<(), StoreError> {
        let run = run(content(0).root());
        let run_id = run.run_id();
        let cfg = RunConfig {
            run_id,
            min_participants: 3,
            round_duration_ms: 1_000_000,
            ..RunConfig::default()
        };
        let mut pr = PersistentRun::open(dir, || RunMachine::new(cfg, content(0).root()).unwrap())?;
        let mut ledger = Ledger::open(&dir.join(LEDGER_DIR), run)?;
        if ledger.head().is_none() {
            let genesis = CommitRecord {
                round: 0,
                root: content(0).root(),
                parent: None,
                participants: 0,
                agreeing: vec![],
            };
            ledger.append_with(manifest(run_id, &genesis), plan.next())?;
        }
        let peers: Vec<PeerId> = (0..3u8).map(|i| PeerId(vec![i])).collect();
        for p in &peers {
            pr.next_fault = plan.next();
            pr.apply(|m| m.handle_join(p.clone(), 1))?;
        }
        loop {
            while let Some(a) = pr.peek_action().cloned() {
                if let Action::Committed(c) = &a {
                    if ledger.head().is_some_and(|h| h.body().round < c.round) {
                        ledger.append_with(manifest(run_id, c), plan.next())?;
                    }
                    seen.push(c.clone());
                }
                pr.next_fault = plan.next();
                pr.ack_action()?;
            }
            if pr.machine().head().round >= target {
                break;
            }
            let Some(open) = pr.machine().open_round().cloned() else {
                break;
            };
            for p in &peers {
                let rep = Report {
                    peer: p.clone(),
                    round: open.round,
                    tokens: 5,
                    update_hash: Hash32([1; 32]),
                    weight_root: content(open.round).root(),
                };
                pr.next_fault = plan.next();
                let _ = pr.apply(|m| m.handle_report(rep, 2))?;
            }
        }
        Ok(())
    }

    fn check(dir: &Path, seen: &[CommitRecord], target: u64) {
        let run = run(content(0).root());
        let ledger = Ledger::open(&dir.join(LEDGER_DIR), run).unwrap();
        let rounds: Vec<u64> = ledger.entries().iter().map(|m| m.body().round).collect();
        assert_eq!(
            rounds,
            (0..=target).collect::<Vec<_>>(),
            "every round once, none lost"
        );
        for c in seen {
            let e = &ledger.entries()[c.round as usize];
            assert_eq!(
                (e.body().root, e.body().parent),
                (c.root, c.parent),
                "announced commit is in the ledger"
            );
        }
        let st = StateStore::open(dir).unwrap().load().unwrap().unwrap();
        assert_eq!(st.head.round, target);
    }

    /// fsync on a real disk makes the ~500 lives below take a minute; the crash points are
    /// simulated, so a memory file system (where present) tests the same logic.
    fn fast_tempdir() -> tempfile::TempDir {
        match Path::new("/dev/shm") {
            p if p.is_dir() => {
                tempfile::tempdir_in(p).unwrap_or_else(|_| tempfile::tempdir().unwrap())
            }
            _ => tempfile::tempdir().unwrap(),
        }
    }

    #[test]
    fn crash_at_every_persistence_step_loses_and_duplicates_nothing() {
        const TARGET: u64 = 2;
        let mut clean = Plan {
            at: usize::MAX,
            fault: Fault::None,
            ops: 0,
        };
        let t = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        life(t.path(), &mut clean, TARGET, &mut seen).unwrap();
        check(t.path(), &seen, TARGET);
        let total = clean.ops;
        assert!(total > 10);
        let mut crashes = 0;
        for at in 0..total {
            for step in WriteStep::ALL {
                for fault in [Fault::CrashAfter(step), Fault::FailAt(step)] {
                    let t = fast_tempdir();
                    let mut seen = Vec::new();
                    let mut plan = Plan { at, fault, ops: 0 };
                    let first = life(t.path(), &mut plan, TARGET, &mut seen);
                    if let Err(e) = &first {
                        crashes += 1;
                        if let Fault::FailAt(_) = fault {
                            assert!(!matches!(e, StoreError::Crashed(_)));
                        }
                    }
                    // Restart (after a crash, or after the disk error made the daemon stop).
                    let mut plan = Plan {
                        at: usize::MAX,
                        fault: Fault::None,
                        ops: 0,
                    };
                    life(t.path(), &mut plan, TARGET, &mut seen).unwrap();
                    check(t.path(), &seen, TARGET);
                    let temps = fs::read_dir(t.path()).unwrap().filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(TMP_SUFFIX)
                    });
                    assert_eq!(temps.count(), 0, "restart removes stale temp files");
                }
            }
        }
        assert_eq!(crashes, total * WriteStep::ALL.len() * 2);
    }

    #[test]
    fn full_disk_keeps_the_last_committed_state_in_memory_and_on_disk() {
        let t = tempfile::tempdir().unwrap();
        let cfg = RunConfig {
            min_participants: 1,
            ..RunConfig::default()
        };
        let mut pr =
            PersistentRun::open(t.path(), || RunMachine::new(cfg, Hash32([0; 32])).unwrap())
                .unwrap();
        pr.apply(|m| m.handle_join(PeerId(vec![1]), 0)).unwrap();
        let before = pr.machine().snapshot();
        pr.next_fault = Fault::FailAt(WriteStep::WriteData);
        let err = pr.apply(|m| m.handle_join(PeerId(vec![2]), 0)).unwrap_err();
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(pr.machine().snapshot(), before);
        assert_eq!(
            StateStore::open(t.path()).unwrap().load().unwrap().unwrap(),
            before
        );
        // The retried event then succeeds.
        pr.apply(|m| m.handle_join(PeerId(vec![2]), 0)).unwrap();
        assert_eq!(pr.machine().member_count(), 2);
    }

    #[test]
    fn corrupt_state_file_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(STATE_FILE), b"{\"config\": 3").unwrap();
        let err = StateStore::open(t.path()).unwrap().load().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_last_verified() {
        let t = tempfile::tempdir().unwrap();
        for r in 0..6 {
            let d = checkpoint_dir(t.path(), r);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("x"), b"1").unwrap();
        }
        let ck = t.path().join(CHECKPOINTS_DIR);
        let removed = prune_checkpoints(&ck, 2, 1).unwrap();
        assert_eq!(removed, vec![0, 2, 3]);
        for r in [1, 4, 5] {
            assert!(checkpoint_dir(t.path(), r).exists());
        }
        // keep = 0 still never removes the last verified one.
        assert_eq!(prune_checkpoints(&ck, 0, 5).unwrap(), vec![1, 4]);
        assert!(checkpoint_dir(t.path(), 5).exists());
    }
}
