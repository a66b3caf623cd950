//! Discovery across real interfaces, with `potluck daemon` processes in their own network
//! namespaces joined by veth pairs: three peers on a bridge find each other by mDNS alone;
//! and a peer behind a masquerading NAT router (nft) is reached through a relay. Needs root
//! and iproute2 (and nft for the NAT test); skips with a message otherwise.
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
        self.daemon_with(ns, dir, ip, &[]);
    }

    fn daemon_with(&mut self, ns: &str, dir: &Path, ip: &str, extra: &[&str]) {
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
            .args(extra)
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

fn veth(host: &str, hub: &str, name: &str, ip: &str) {
    let (inside, outside) = (format!("vx{name}"), format!("bx{name}"));
    must(&[
        "ip", "-n", host, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
    ]);
    must(&["ip", "-n", host, "link", "set", &outside, "netns", hub]);
    must(&["ip", "-n", hub, "link", "set", &outside, "master", "br0"]);
    must(&["ip", "-n", hub, "link", "set", &outside, "up"]);
    must(&["ip", "-n", host, "addr", "add", ip, "dev", &inside]);
    must(&["ip", "-n", host, "link", "set", &inside, "up"]);
}

fn wait_id(dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(id) = peer_id(dir) {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "daemon in {} never started",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A relay R and a public peer P on a public bridge; a router N masquerades a private peer
/// H behind it and drops everything from H to P, so P and H can only meet through R's
/// circuit relay. H listens on the relay; P learns H's circuit address from H's capability
/// record and connects through it.
#[test]
fn nat_peer_is_reached_through_a_relay() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED nat_peer_is_reached_through_a_relay: {why}");
        return;
    }
    if !sh(&["nft", "--version"]) {
        eprintln!("SKIPPED nat_peer_is_reached_through_a_relay: nft not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut lab = Lab {
        names: vec![],
        children: vec![],
    };
    let hub = lab.ns("nhub");
    must(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
    must(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    let relay = lab.ns("relay");
    let public = lab.ns("pub");
    let router = lab.ns("router");
    let private = lab.ns("priv");
    veth(&relay, &hub, "r", "10.88.0.1/24");
    veth(&public, &hub, "p", "10.88.0.2/24");
    veth(&router, &hub, "n", "10.88.0.3/24");
    must(&[
        "ip", "-n", &router, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
    ]);
    must(&[
        "ip", "-n", &router, "link", "set", "eth0", "netns", &private,
    ]);
    must(&[
        "ip",
        "-n",
        &router,
        "addr",
        "add",
        "192.168.50.1/24",
        "dev",
        "lan0",
    ]);
    must(&["ip", "-n", &router, "link", "set", "lan0", "up"]);
    must(&[
        "ip",
        "-n",
        &private,
        "addr",
        "add",
        "192.168.50.2/24",
        "dev",
        "eth0",
    ]);
    must(&["ip", "-n", &private, "link", "set", "eth0", "up"]);
    must(&[
        "ip",
        "-n",
        &private,
        "route",
        "add",
        "default",
        "via",
        "192.168.50.1",
    ]);
    must(&[
        "ip",
        "netns",
        "exec",
        &router,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    let rules = "table ip potluck_nat {\n\
        chain masq { type nat hook postrouting priority 100; oifname \"vxn\" masquerade; }\n\
        chain block_public { type filter hook forward priority 0; ip daddr 10.88.0.2 drop; }\n\
    }\n";
    let rules_file = tmp.path().join("nat.nft");
    std::fs::write(&rules_file, rules).unwrap();
    must(&[
        "ip",
        "netns",
        "exec",
        &router,
        "nft",
        "-f",
        rules_file.to_str().unwrap(),
    ]);

    let mk = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let (rd, pd, hd) = (mk("relay"), mk("pub"), mk("priv"));
    lab.daemon_with(&relay, &rd, "10.88.0.1", &["--relay-server", "--no-mdns"]);
    let rid = wait_id(&rd);
    let boot = format!("/ip4/10.88.0.1/tcp/4001/p2p/{rid}");
    lab.daemon_with(
        &public,
        &pd,
        "10.88.0.2",
        &["--no-mdns", "--bootstrap", &boot],
    );
    let circuit = format!("{boot}/p2p-circuit");
    lab.daemon_with(
        &private,
        &hd,
        "192.168.50.2",
        &["--no-mdns", "--bootstrap", &boot, "--listen", &circuit],
    );
    let (pid, hid) = (wait_id(&pd), wait_id(&hd));

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p_sees_h = peers(&pd).into_iter().any(|p| {
            p["peer_id"].as_str() == Some(hid.as_str())
                && p["connected"].as_bool() == Some(true)
                && p["capabilities"]["cpu_count"].as_u64().unwrap_or(0) >= 1
        });
        let h_sees_p = peers(&hd).into_iter().any(|p| {
            p["peer_id"].as_str() == Some(pid.as_str()) && p["connected"].as_bool() == Some(true)
        });
        if p_sees_h && h_sees_p {
            break;
        }
        if Instant::now() > deadline {
            for d in [&rd, &pd, &hd] {
                eprintln!("{}: {:?}", d.display(), peers(d));
                eprintln!(
                    "{}",
                    std::fs::read_to_string(d.with_extension("log")).unwrap_or_default()
                );
            }
            panic!("the public peer never connected to the NATed peer through the relay");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
