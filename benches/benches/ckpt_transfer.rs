//! Checkpoint transfer throughput on loopback: `fetch_checkpoint` pulling a checkpoint of
//! incompressible tensors from a peer running `serve_checkpoints` (every piece verified,
//! written to disk, the whole checkpoint checked again, synced and renamed), against the
//! same number of bytes sent memory to memory on one stream of a plain `quinn` connection
//! with the same transport settings, alternating in the same run. Prints one JSON object
//! per run and a summary.
//!
//! Run: `cargo bench -p potluck-benches --bench ckpt_transfer`
//! (env `POTLUCK_BENCH_MB` checkpoint MiB, default 256; `POTLUCK_BENCH_REPS`, default 5).

mod common;

use std::path::Path;
use std::time::Instant;

use common::{env_num, incompressible, libp2p_pair, median, paired_ratio, quinn_pair};
use potluck_coordinator::failover::{RunManifest, SignedRunManifest};
use potluck_coordinator::manifest::{
    CheckpointContent, DEFAULT_CHUNK_SIZE, ManifestBody, SignedManifest, SignerRole, public_key,
};
use potluck_coordinator::store::write_manifest_files;
use potluck_daemon::ckpt_transfer::{FetchOptions, fetch_checkpoint, serve_checkpoints};
use serde_json::json;

/// Writes a signed checkpoint of `mib` MiB of f32 tensors (16 MiB each) into `dir`.
fn write_checkpoint(dir: &Path, mib: usize) -> anyhow::Result<(SignedManifest, SignedRunManifest)> {
    std::fs::create_dir_all(dir)?;
    let tensor = 16usize << 20;
    let n = mib.div_ceil(16).max(1);
    let mut json = String::from("{");
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#""t{i:04}":{{"dtype":"F32","shape":[{}],"data_offsets":[{},{}]}}"#,
            tensor / 4,
            i * tensor,
            (i + 1) * tensor
        ));
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors"))?);
    use std::io::Write;
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(json.as_bytes())?;
    for i in 0..n {
        f.write_all(&incompressible(tensor, 0xabcd + i as u64))?;
    }
    f.flush()?;
    drop(f);
    std::fs::write(dir.join("config.json"), br#"{"model":"bench"}"#)?;
    let content = CheckpointContent::scan(dir, DEFAULT_CHUNK_SIZE)?;
    let sk = [9u8; 32];
    let pk = public_key(&sk);
    let run = SignedRunManifest::create(
        RunManifest {
            name: "bench".into(),
            genesis_root: content.root(),
            coordinator_keys: vec![pk],
            settings: Vec::new(),
        },
        &sk,
    )?;
    let mut m = SignedManifest::new(ManifestBody {
        run_id: run.run_id(),
        round: 0,
        parent: None,
        root: content.root(),
        content,
        contributors: Vec::new(),
        coordinator_key: pk,
    });
    m.sign(SignerRole::Coordinator, &sk)?;
    write_manifest_files(dir, &m, &run)?;
    Ok((m, run))
}

async fn run_quinn(bytes: u64) -> anyhow::Result<f64> {
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
    let chunk = incompressible(1 << 20, 77);
    let start = Instant::now();
    let (mut w, _r) = pair.client.open_bi().await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    w.finish()?;
    let (end, got) = recv.await??;
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok((end - start).as_secs_f64())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mib = env_num("POTLUCK_BENCH_MB", 256);
    let reps = env_num("POTLUCK_BENCH_REPS", 5).max(1);
    let tmp = tempfile::tempdir()?;
    let served = tmp.path().join("served");
    let (m, run) = write_checkpoint(&served.join("ckpt"), mib)?;
    let bytes = m.body().content.total_bytes();
    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("fetch_checkpoint", Vec::new()),
        ("fetch_checkpoint_no_final_verify", Vec::new()),
        ("plain_quinn", Vec::new()),
    ];
    for rep in 0..reps {
        for (i, final_verify) in [(0usize, true), (1, false)] {
            let (a, b, a_peer) = libp2p_pair().await?;
            serve_checkpoints(a, served.clone(), Default::default())?;
            let dest = tmp.path().join(format!("fetched-{rep}-{i}"));
            let opts = FetchOptions {
                final_verify,
                ..FetchOptions::default()
            };
            let start = Instant::now();
            let r = fetch_checkpoint(&b, &[a_peer], &m, &run, &dest, &opts).await?;
            let secs = start.elapsed().as_secs_f64();
            anyhow::ensure!(r.fetched_bytes == bytes, "fetched {}", r.fetched_bytes);
            std::fs::remove_dir_all(&dest)?;
            let gbps = bytes as f64 * 8.0 / secs / 1e9;
            println!(
                "{}",
                json!({"bench": "ckpt_transfer", "path": results[i].0, "rep": rep,
                       "bytes": bytes, "pieces": r.total_pieces, "secs": secs,
                       "gbit_per_s": gbps})
            );
            results[i].1.push(gbps);
        }
        let secs = run_quinn(bytes).await?;
        let gbps = bytes as f64 * 8.0 / secs / 1e9;
        println!(
            "{}",
            json!({"bench": "ckpt_transfer", "path": "plain_quinn", "rep": rep,
                   "bytes": bytes, "secs": secs, "gbit_per_s": gbps})
        );
        results[2].1.push(gbps);
    }
    let paired = [
        paired_ratio(&results[0].1, &results[2].1),
        paired_ratio(&results[1].1, &results[2].1),
    ];
    let meds: Vec<f64> = results.iter_mut().map(|(_, v)| median(v)).collect();
    println!(
        "{}",
        json!({"bench": "ckpt_transfer", "summary": true, "reps": reps, "bytes": bytes,
               "median_gbit_per_s_fetch": meds[0],
               "median_gbit_per_s_fetch_no_final_verify": meds[1],
               "median_gbit_per_s_plain_quinn": meds[2],
               "ratio": meds[0] / meds[2],
               "ratio_no_final_verify": meds[1] / meds[2],
               "paired_ratio": paired[0],
               "paired_ratio_no_final_verify": paired[1]})
    );
    Ok(())
}
