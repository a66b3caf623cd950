//! Host cost of one MoE layer's routing at the GPU benchmark's batch (8,192 tokens, 8
//! experts, top-2, no drops): `Model::moe_route` decides on the host, as the paths that run
//! one expert at a time (remote experts, LoRA, f32 on the CPU) need each expert's token list;
//! on a GPU this time is spent with the device idle. Batched experts no longer pay it: they
//! lay their routing out on the device (`fused::route_layout`) and read back only the
//! counts. The model width is kept small so that the router's product, which a GPU does in
//! microseconds, does not hide the host work on a CPU.
//!
//! Run with `cargo bench -p potluck-benches --bench moe_route`.

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use potluck_worker::{Model, ModelConfig};

const TOKENS: usize = 8192;

fn route(c: &mut Criterion) {
    let cfg = ModelConfig {
        d_model: 16,
        n_heads: 2,
        n_layers: 1,
        moe_layers: vec![0],
        n_experts: 8,
        top_k: 2,
        // Dropless, as in the GPU benchmark.
        capacity_factor: 4.0,
        ..ModelConfig::small()
    };
    let model = Model::new(&cfg, &Device::Cpu, DType::F32, 1).expect("model");
    let w = model.weights(false).expect("weights");
    let x = Tensor::randn(0f32, 1.0, (TOKENS, cfg.d_model), &Device::Cpu).expect("input");
    let mut group = c.benchmark_group("moe_route");
    group.throughput(Throughput::Elements(TOKENS as u64));
    group.bench_function("route_8192_tokens_8_experts_top2", |b| {
        b.iter(|| model.moe_route(&w, 0, &x).expect("route"))
    });
    group.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
