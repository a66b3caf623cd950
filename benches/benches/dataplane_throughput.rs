//! Data-plane throughput on loopback with incompressible payloads: frames sealed by the
//! daemon's codec (`seal_payload`: blake3 of the payload, zstd level 1 as the daemon asks
//! for it, which large frames try on a sample first) and written and read with `write_frame` /
//! `read_frame` (length limits, hash check) over one libp2p QUIC stream, against the same
//! bytes written raw on one stream of a plain `quinn` connection with the same transport
//! settings, in the same run: every run of ours has its own quinn run right beside it (in
//! alternating order), and the summary gives the median of those paired ratios and their
//! range. On a busy machine wall times swing by 2x; the summary's `cpu_ratio`s (median of
//! the quinn run's CPU seconds over ours, per pair) are steadier, and where the transfer is
//! CPU-bound (loopback on few cores) they estimate the ratio an idle machine would show.
//! Prints one JSON object per run and a summary.
//!
//! Run: `cargo bench -p potluck-benches --bench dataplane_throughput`
//! (env `POTLUCK_BENCH_MB` total MiB per run, default 256; `POTLUCK_BENCH_FRAME_MB` frame
//! size, default 4; `POTLUCK_BENCH_REPS`, default 5).

mod common;

use std::time::Instant;

use common::{env_num, incompressible, libp2p_pair, median, process_cpu_secs, quinn_pair};
use futures::{AsyncWriteExt, StreamExt};
use libp2p::StreamProtocol;
use potluck_daemon::dataplane::{Limits, read_frame, seal_payload, write_frame};
use potluck_proto::v1::{FrameHeader, FrameKind};
use serde_json::json;

const PROTO: StreamProtocol = StreamProtocol::new("/potluck/bench/dataplane/1");

/// What travels over the libp2p stream.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The daemon's path: `seal_payload` with zstd level 1 (tried on a sample of a large
    /// frame first), `write_frame`, `read_frame`.
    Full,
    /// Framing and hashing, no compression attempt (`seal_payload(.., None)`).
    NoZstd,
    /// The payload bytes alone, no framing: what libp2p itself costs.
    Raw,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Full => "libp2p+framing+codec",
            Mode::NoZstd => "libp2p+framing_no_zstd",
            Mode::Raw => "libp2p_raw",
        }
    }
}

async fn run_libp2p(
    a: &mut libp2p_stream::Control,
    b: &mut libp2p_stream::Control,
    a_peer: libp2p::PeerId,
    payloads: &[Vec<u8>],
    frames: usize,
    mode: Mode,
) -> anyhow::Result<(f64, u64)> {
    let mut incoming = a.accept(PROTO)?;
    let frame_len = payloads[0].len();
    let recv = tokio::spawn(async move {
        let (_, mut s) = incoming
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no stream"))?;
        let mut got = 0u64;
        if mode == Mode::Raw {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = futures::AsyncReadExt::read(&mut s, &mut buf).await?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
        } else {
            let limits = Limits {
                max_header: 64 * 1024,
                max_payload: frame_len,
            };
            while let Some(f) = read_frame(&mut s, &limits).await? {
                got += f.payload.len() as u64;
            }
        }
        anyhow::Ok((Instant::now(), got))
    });
    let start = Instant::now();
    let mut s = b.open_stream(a_peer, PROTO).await?;
    let mut wire_bytes = 0u64;
    for i in 0..frames {
        let payload = &payloads[i % payloads.len()];
        if mode == Mode::Raw {
            s.write_all(payload).await?;
            wire_bytes += payload.len() as u64;
            continue;
        }
        let mut header = FrameHeader {
            run_id: vec![1; 32],
            round: i as u64,
            kind: FrameKind::Contribution as i32,
            len: frame_len as u64 / 4,
            ..Default::default()
        };
        let level = (mode == Mode::Full).then_some(1);
        let wire = seal_payload(&mut header, payload, level);
        wire_bytes += write_frame(&mut s, &header, &wire).await?;
    }
    s.close().await?;
    let (end, got) = recv.await??;
    anyhow::ensure!(got == (frames * frame_len) as u64, "received {got} bytes");
    Ok(((end - start).as_secs_f64(), wire_bytes))
}

async fn run_quinn(payloads: &[Vec<u8>], frames: usize) -> anyhow::Result<f64> {
    let pair = quinn_pair().await?;
    let server = pair.server.clone();
    let recv = tokio::spawn(async move {
        let (_, mut r) = server.accept_bi().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Some(n) = r.read(&mut buf).await? {
            got += n as u64;
        }
        anyhow::Ok((Instant::now(), got))
    });
    let start = Instant::now();
    let (mut w, _r) = pair.client.open_bi().await?;
    for i in 0..frames {
        w.write_all(&payloads[i % payloads.len()]).await?;
    }
    w.finish()?;
    let (end, got) = recv.await??;
    let frame_len = payloads[0].len();
    anyhow::ensure!(got == (frames * frame_len) as u64, "received {got} bytes");
    Ok((end - start).as_secs_f64())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let total_mb = env_num("POTLUCK_BENCH_MB", 256);
    let frame_mb = env_num("POTLUCK_BENCH_FRAME_MB", 4).max(1);
    let reps = env_num("POTLUCK_BENCH_REPS", 5).max(1);
    let frame_len = frame_mb << 20;
    let frames = (total_mb / frame_mb).max(1);
    let bytes = (frames * frame_len) as f64;
    let payloads: Vec<Vec<u8>> = (0..4)
        .map(|i| incompressible(frame_len, 0x1234_5678 + i))
        .collect();
    let modes = [Mode::Full, Mode::NoZstd, Mode::Raw];
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut pairs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut cpu_pairs: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut plain = Vec::new();
    for rep in 0..reps {
        for (k, mode) in modes.iter().enumerate() {
            // Each run of ours is paired with a plain-quinn run right beside it, in
            // alternating order, so that the two share the machine's load of that moment
            // and neither always goes first.
            let quinn_first = (rep + k) % 2 == 1;
            let mut q = (0.0, 0.0);
            if quinn_first {
                q = quinn_gbps(&payloads, frames, bytes, rep).await?;
            }
            // A fresh pair per run, so that each run starts on a new connection, as the
            // quinn runs do.
            let (mut a, mut b, a_peer) = libp2p_pair().await?;
            let cpu0 = process_cpu_secs();
            let (secs, wire) = run_libp2p(&mut a, &mut b, a_peer, &payloads, frames, *mode).await?;
            let cpu = process_cpu_secs() - cpu0;
            let gbps = bytes * 8.0 / secs / 1e9;
            println!(
                "{}",
                json!({"bench": "dataplane_throughput", "path": mode.name(), "rep": rep,
                       "payload_bytes": bytes as u64, "wire_bytes": wire,
                       "frame_bytes": frame_len, "secs": secs, "cpu_secs": cpu,
                       "gbit_per_s": gbps})
            );
            if !quinn_first {
                q = quinn_gbps(&payloads, frames, bytes, rep).await?;
            }
            ours[k].push(gbps);
            pairs[k].push(gbps / q.0);
            // Left out where /proc could not be read (not Linux).
            if cpu > 0.0 && q.1 > 0.0 {
                cpu_pairs[k].push(q.1 / cpu);
            }
            plain.push(q.0);
        }
    }
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        [v[0], v[v.len() - 1]]
    };
    let spreads: Vec<[f64; 2]> = pairs.iter().map(|v| spread(v)).collect();
    let paired: Vec<f64> = pairs.iter_mut().map(|v| median(v)).collect();
    let cpu_paired: Vec<f64> = cpu_pairs.iter_mut().map(|v| median(v)).collect();
    let p = median(&mut plain);
    let meds: Vec<f64> = ours.iter_mut().map(|v| median(v)).collect();
    println!(
        "{}",
        json!({"bench": "dataplane_throughput", "summary": true, "reps": reps,
               "payload_bytes": bytes as u64, "frame_bytes": frame_len,
               "median_gbit_per_s_plain_quinn": p,
               "median_gbit_per_s_full": meds[0],
               "median_gbit_per_s_no_zstd": meds[1],
               "median_gbit_per_s_libp2p_raw": meds[2],
               "ratio": meds[0] / p,
               "ratio_no_zstd": meds[1] / p,
               "ratio_libp2p_raw": meds[2] / p,
               "paired_ratio": paired[0],
               "paired_ratio_no_zstd": paired[1],
               "paired_ratio_libp2p_raw": paired[2],
               "paired_ratio_range": spreads[0],
               "paired_ratio_no_zstd_range": spreads[1],
               "paired_ratio_libp2p_raw_range": spreads[2],
               "cpu_ratio": cpu_paired[0],
               "cpu_ratio_no_zstd": cpu_paired[1],
               "cpu_ratio_libp2p_raw": cpu_paired[2],
               "goal_ratio": 0.9})
    );
    Ok(())
}

/// One plain-quinn run, printed; returns its Gbit/s and the CPU seconds it took.
async fn quinn_gbps(
    payloads: &[Vec<u8>],
    frames: usize,
    bytes: f64,
    rep: usize,
) -> anyhow::Result<(f64, f64)> {
    let cpu0 = process_cpu_secs();
    let secs = run_quinn(payloads, frames).await?;
    let cpu = process_cpu_secs() - cpu0;
    let gbps = bytes * 8.0 / secs / 1e9;
    println!(
        "{}",
        json!({"bench": "dataplane_throughput", "path": "plain_quinn", "rep": rep,
               "payload_bytes": bytes as u64, "secs": secs, "cpu_secs": cpu,
               "gbit_per_s": gbps})
    );
    Ok((gbps, cpu))
}
