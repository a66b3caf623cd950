//! Discovery across real interfaces: three `potluck daemon` processes in their own network
//! namespaces, joined by veth pairs on a bridge, find each other by mDNS alone (no
//! bootstrap addresses) and list each other with capability records. Needs root and
//! iproute2; skips with a message otherwise.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_potluck");

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(sh(args), "command failed: {}", args.join(" "));
}

fn can_run() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    if !sh(&["ip", "-V"]) {
        return Err("iproute2 `ip` not found".into());
    }
    Ok(())
}

/// Namespaces that are deleted on drop, even when the test fails.
struct Lab {
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.names {
            sh(&["ip", "netns", "del", n]);
        }
    }
}

impl Lab {
    fn ns(&mut self, name: &str) -> String {
        let n = format!("pl{}-{name}", std::process::id());
        must(&["ip", "netns", "add", &n]);
        self.names.push(n.clone());
        must(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        n
    }

    fn daemon(&mut self, ns: &str, dir: &Path, ip: &str) {
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN, "daemon", "--data-dir"])
            .arg(dir)
            .args([
                "--listen",
                &format!("/ip4/{ip}/udp/4001/quic-v1"),
                "--listen",
                &format!("/ip4/{ip}/tcp/4001"),
            ])
            .env("POTLUCK_CAPABILITY_INTERVAL_SECS", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }
}

fn peers(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["peers", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    if !out.status.success() {
        return vec![];
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn peer_id(dir: &Path) -> Option<String> {
    let out = Command::new(BIN)
        .args(["id", "--data-dir"])
        .arg(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn mdns_discovery_across_veth_namespaces() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED mdns_discovery_across_veth_namespaces: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab {
        names: vec![],
        children: vec![],
    };
    let hub = lab.ns("hub");
    must(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
    must(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    let mut dirs = Vec::new();
    for i in 1..=3 {
        let host = lab.ns(&format!("h{i}"));
        let (inside, outside) = (format!("v{i}"), format!("b{i}"));
        must(&[
            "ip", "-n", &host, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
        ]);
        must(&["ip", "-n", &host, "link", "set", &outside, "netns", &hub]);
        must(&["ip", "-n", &hub, "link", "set", &outside, "master", "br0"]);
        must(&["ip", "-n", &hub, "link", "set", &outside, "up"]);
        let ip = format!("10.77.0.{i}");
        must(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            &inside,
        ]);
        must(&["ip", "-n", &host, "link", "set", &inside, "up"]);
        let dir = tmp.path().join(format!("d{i}"));
        std::fs::create_dir(&dir).unwrap();
        lab.daemon(&host, &dir, &ip);
        dirs.push(dir);
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| {
            loop {
                if let Some(id) = peer_id(d) {
                    break id;
                }
                assert!(
                    Instant::now() < deadline,
                    "daemon in {} never started",
                    d.display()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = dirs.iter().enumerate().all(|(i, d)| {
            let list = peers(d);
            ids.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .all(|(_, id)| {
                    list.iter().any(|p| {
                        p["peer_id"].as_str() == Some(id.as_str())
                            && p["capabilities"]["cpu_count"].as_u64().unwrap_or(0) >= 1
                            && p["addrs"].as_array().is_some_and(|a| {
                                a.iter()
                                    .any(|x| x.as_str().is_some_and(|s| s.contains("10.77.0.")))
                            })
                    })
                })
        });
        if all {
            break;
        }
        if Instant::now() > deadline {
            for d in &dirs {
                eprintln!("{}: {:?}", d.display(), peers(d));
                eprintln!(
                    "{}",
                    std::fs::read_to_string(d.with_extension("log")).unwrap_or_default()
                );
            }
            panic!("daemons did not find each other over the bridge by mDNS within 30 s");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
