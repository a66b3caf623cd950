//! The `potluck` binary as an operator runs it: three daemon processes find each other and
//! `potluck peers --json` shows the others with capability records; a restart keeps the
//! peer id; SIGTERM exits 0; bad settings and a corrupted key exit non-zero naming the key or
//! file; the CLI says so clearly when no daemon runs.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_potluck");

fn spawn_daemon(dir: &Path, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args(["daemon", "--no-mdns", "--data-dir"])
        .arg(dir)
        .args([
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(extra)
        .env("POTLUCK_CAPABILITY_INTERVAL_SECS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn cli(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn json(args: &[&str], dir: &Path) -> Option<serde_json::Value> {
    let out = cli(args, dir);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn id_of(dir: &Path) -> serde_json::Value {
    wait_for(Duration::from_secs(20), || json(&["id", "--json"], dir))
        .expect("daemon never answered")
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_processes_list_each_other_restart_keeps_id_and_sigterm_is_clean() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut a = spawn_daemon(dirs[0].path(), &[]);
    let a_id = id_of(dirs[0].path());
    let peer_a = a_id["peer_id"].as_str().unwrap().to_string();
    let boot = format!("{}/p2p/{peer_a}", a_id["listen_addrs"][0].as_str().unwrap());
    let mut b = spawn_daemon(dirs[1].path(), &["--bootstrap", &boot]);
    let mut c = spawn_daemon(dirs[2].path(), &["--bootstrap", &boot]);
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| id_of(d.path())["peer_id"].as_str().unwrap().to_string())
        .collect();

    for (i, d) in dirs.iter().enumerate() {
        let others: Vec<&String> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| s)
            .collect();
        let peers = wait_for(Duration::from_secs(20), || {
            let v = json(&["peers", "--json"], d.path())?;
            let list = v.as_array()?.clone();
            let ok = others.iter().all(|o| {
                list.iter().any(|p| {
                    p["peer_id"].as_str() == Some(o.as_str())
                        && p["capabilities"]["cpu_count"].as_u64().unwrap_or(0) >= 1
                        && p["capabilities"]["memory_bytes"].as_u64().unwrap_or(0) > 0
                        // The reference training step each peer measured at start.
                        && p["capabilities"]["train_tokens_per_sec"].as_f64().unwrap_or(0.0) > 0.0
                })
            });
            ok.then_some(list)
        });
        assert!(
            peers.is_some(),
            "daemon {i} does not list the other two with records"
        );
    }
    let status = json(&["status", "--json"], dirs[0].path()).unwrap();
    assert_eq!(status["peer_id"].as_str().unwrap(), peer_a);
    assert_eq!(
        status["capabilities"]["train_tokens_per_sec_measured"],
        serde_json::Value::Bool(true)
    );

    for child in [&mut a, &mut b, &mut c] {
        let s = sigterm(child);
        assert!(s.success(), "daemon exited with {s} on SIGTERM");
    }
    assert!(
        !dirs[0].path().join("control.sock").exists(),
        "socket left behind"
    );

    // A restarted daemon keeps its peer id.
    let mut a2 = spawn_daemon(dirs[0].path(), &[]);
    assert_eq!(id_of(dirs[0].path())["peer_id"].as_str().unwrap(), peer_a);
    assert!(sigterm(&mut a2).success());
}

#[test]
fn bad_settings_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["daemon", "--data-dir"])
        .arg(dir.path())
        .args(["--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_format"), "{err}");

    let out = Command::new(BIN)
        .args(["daemon", "--data-dir"])
        .arg(dir.path())
        .env("POTLUCK_MAX_CONNECTIONS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_connections") && err.contains("POTLUCK_MAX_CONNECTIONS"),
        "{err}"
    );

    let file = dir.path().join("potluck.toml");
    std::fs::write(&file, "listen = [\"/ip4/127.0.0.1/tcp/notaport\"]\n").unwrap();
    let out = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen") && err.contains("potluck.toml"),
        "{err}"
    );
}

#[test]
fn corrupted_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    std::fs::write(&key, b"not a key").unwrap();
    let out = Command::new(BIN)
        .args([
            "daemon",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("identity.key") && err.contains("corrupted"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&key).unwrap(),
        b"not a key",
        "key file was replaced"
    );
}

#[test]
fn cli_says_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["status", "peers", "id"] {
        let out = cli(&[cmd], dir.path());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no daemon is running"), "{cmd}: {err}");
    }
}
