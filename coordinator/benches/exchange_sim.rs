//! How the simulated exchange's cost grows with the number of peers: one JSON object per
//! line with the wall time and peak memory of one clean exchange among N peers (N = 10, 100,
//! 1,000 by default, or the counts given as arguments). Each N runs in a process of its own
//! (this binary re-runs itself), so the peak memory is that exchange's alone.
//!
//! `cargo bench -p potluck-coordinator --bench exchange_sim`

use std::process::Command;
use std::time::Instant;

use potluck_coordinator::sim::{SimConfig, run};

/// The process's peak resident memory in KiB (Linux), or 0 where it cannot be read.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn one(peers: usize) {
    let cfg = SimConfig::clean(peers, 7);
    let started = Instant::now();
    let r = run(&cfg);
    let wall = started.elapsed();
    let agree = r
        .peers
        .iter()
        .all(|p| p.applied.first() == r.peers[0].applied.first());
    println!(
        "{}",
        serde_json::json!({
            "bench": "exchange_sim",
            "peers": peers,
            "frames": r.frames,
            "wall_ms": wall.as_secs_f64() * 1e3,
            "peak_rss_kib": peak_rss_kib(),
            "simulated_ms": r.end.as_secs_f64() * 1e3,
            "peak_queued_events": r.peak_queued,
            "violations": r.violations.len(),
            "agree": agree,
        })
    );
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is a peer count.
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if let [peers] = counts[..]
        && std::env::var_os("EXCHANGE_SIM_CHILD").is_some()
    {
        one(peers);
        return;
    }
    let counts = if counts.is_empty() {
        vec![10, 100, 1000]
    } else {
        counts
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("exchange_sim: cannot find this binary: {e}");
            std::process::exit(1);
        }
    };
    for n in counts {
        let status = Command::new(&exe)
            .arg(n.to_string())
            .env("EXCHANGE_SIM_CHILD", "1")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("exchange_sim: the run with {n} peers failed");
            std::process::exit(1);
        }
    }
}
