//! Hashing and verification throughput of checkpoint manifests, per core (blake3 is used
//! single-threaded here, as the coordinator does): raw blake3 over 1 MiB chunks, building
//! a manifest's content hashes from a safetensors file, and verifying a directory against
//! them. Run: `cargo bench -p potluck-benches --bench coordinator_hash`; criterion prints
//! GiB/s for each.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use potluck_coordinator::manifest::{CheckpointContent, DEFAULT_CHUNK_SIZE};
use potluck_coordinator::verify::verify_content;
use std::hint::black_box;
use std::path::Path;

const SIZE: usize = 64 << 20;

/// A single-tensor safetensors file of `SIZE` bytes of data, written without the
/// safetensors crate: 8-byte length, JSON padded with spaces to 8 bytes, data.
fn write_safetensors(path: &Path) {
    let n = SIZE / 4;
    let mut json = format!(r#"{{"w":{{"dtype":"F32","shape":[{n}],"data_offsets":[0,{SIZE}]}}}}"#);
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + SIZE);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..SIZE / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, out).expect("write bench file");
}

fn bench(c: &mut Criterion) {
    let data: Vec<u8> = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = c.benchmark_group("coordinator_hash");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("blake3_1MiB_chunks_64MiB", |b| {
        b.iter(|| {
            for ch in data.chunks(DEFAULT_CHUNK_SIZE as usize) {
                black_box(blake3::hash(ch));
            }
        })
    });

    let dir = tempfile::tempdir().expect("tempdir");
    write_safetensors(&dir.path().join("model.safetensors"));
    std::fs::write(dir.path().join("config.json"), b"{}").expect("config");
    g.bench_function("manifest_scan_64MiB", |b| {
        b.iter(|| black_box(CheckpointContent::scan(dir.path(), DEFAULT_CHUNK_SIZE).expect("scan")))
    });
    let content = CheckpointContent::scan(dir.path(), DEFAULT_CHUNK_SIZE).expect("scan");
    g.bench_function("verify_dir_64MiB", |b| {
        b.iter(|| black_box(verify_content(dir.path(), &content).expect("verify")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
