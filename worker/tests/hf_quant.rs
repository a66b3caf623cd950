//! Quantised frozen bases (`potluck_worker::hf::quant`): round-trip error bounds of int8 and
//! NF4 with double quantisation, NF4's codebook values exact, candle's dequantisation equal
//! to the host reference, a quantised base's logits close to the f32 base's, and QLoRA
//! (adapters on an NF4 base) reaching within 2% of the loss of LoRA on a bf16 base at
//! equal steps; an NF4 Mixtral holds its experts in NF4 and trains adapters on them. The
//! memory figures of TinyLlama- and Llama-3-8B-shaped bases are an
//! ignored test that prints JSON (`--ignored --nocapture`).

use candle_core::{DType, Device, Tensor};
use potluck_worker::hf::parity::Expected;
use potluck_worker::hf::quant::{
    HostQuant, NF4_BLOCK, NF4_CODEBOOK, QTensor, dequantize_host, quantize_host,
};
use potluck_worker::hf::{self, HfLoraConfig, HfModel, QuantFormat};
use potluck_worker::{AdamW, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod hf_common;
use hf_common::{fixture, values};

/// Normal values (Box-Muller) times `scale`, with a few large outliers as real weights have.
fn gaussian(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
            let out = if i % 997 == 0 { 8.0 } else { 1.0 };
            (z * out) as f32 * scale
        })
        .collect()
}

#[test]
fn int8_round_trip_is_within_half_a_step_per_row() {
    let (rows, cols) = (48, 200);
    let w = gaussian(rows * cols, 0.02, 1);
    let q = quantize_host(&w, rows, cols, QuantFormat::Int8);
    let back = dequantize_host(&q, rows, cols);
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = absmax / 254.0 * (1.0 + 1e-5);
        for c in 0..cols {
            let err = (row[c] - back[r * cols + c]).abs();
            assert!(err <= bound, "row {r} col {c}: error {err} > {bound}");
        }
    }
    // Candle's dequantisation computes the same values as the host reference.
    let t = QTensor::from_host(&q, rows, cols, DType::F32, &Device::Cpu).expect("upload");
    assert_eq!(values(&t.dequantize().expect("dequantize")), back);
}

#[test]
fn nf4_round_trip_is_within_the_codebook_gap_per_block() {
    // 9,600 values: 150 blocks, the last group partial, every size path exercised.
    let (rows, cols) = (48, 200);
    let w = gaussian(rows * cols, 0.02, 2);
    let q = quantize_host(&w, rows, cols, QuantFormat::Nf4);
    let back = dequantize_host(&q, rows, cols);
    let absmaxes: Vec<f32> = w
        .chunks(NF4_BLOCK)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    let largest = absmaxes.iter().fold(0f32, |m, a| m.max(*a));
    // Half the widest gap between neighbouring levels, plus the absmax's own error (half a
    // step of its 8-bit code, a step being at most the largest absmax / 127).
    let half_gap = NF4_CODEBOOK
        .windows(2)
        .map(|p| (p[1] - p[0]) / 2.0)
        .fold(0f32, f32::max);
    let mut sq = 0f64;
    for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
        let bound = half_gap * absmaxes[i / NF4_BLOCK] + largest / 254.0 + 1e-7;
        let err = (a - b).abs();
        assert!(err <= bound, "value {i}: error {err} > {bound}");
        sq += ((a - b) as f64).powi(2);
    }
    let norm: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum();
    let rel = (sq / norm).sqrt();
    println!("nf4 relative rms error on gaussian weights: {rel:.4}");
    assert!(rel < 0.15, "relative rms error {rel}");
    let t = QTensor::from_host(&q, rows, cols, DType::F32, &Device::Cpu).expect("upload");
    assert_eq!(values(&t.dequantize().expect("dequantize")), back);
}

#[test]
fn nf4_codebook_values_and_int8_integers_come_back_exactly() {
    // Every block holds -2 and 2, so every absmax is 2: the double quantisation of equal
    // absmaxes is exact, and so is every level times 2.
    let w: Vec<f32> = (0..4 * 256).map(|i| 2.0 * NF4_CODEBOOK[i % 16]).collect();
    let q = quantize_host(&w, 4, 256, QuantFormat::Nf4);
    assert_eq!(dequantize_host(&q, 4, 256), w);
    let t = QTensor::from_host(&q, 4, 256, DType::F32, &Device::Cpu).expect("upload");
    assert_eq!(values(&t.dequantize().expect("dequantize")), w);
    // Int8: integers up to 127 in rows whose absmax is 127.
    let w: Vec<f32> = (0..3 * 255).map(|i| (i % 255) as f32 - 127.0).collect();
    let q = quantize_host(&w, 3, 255, QuantFormat::Int8);
    assert_eq!(dequantize_host(&q, 3, 255), w);
    // A zero weight stays zero in both formats (no division by a zero absmax).
    for fmt in [QuantFormat::Int8, QuantFormat::Nf4] {
        let q = quantize_host(&[0.0; 130], 2, 65, fmt);
        assert!(dequantize_host(&q, 2, 65).iter().all(|&v| v == 0.0));
    }
    if let HostQuant::Nf4 { codes, .. } = quantize_host(&[0.0; 65], 1, 65, QuantFormat::Nf4) {
        assert_eq!(codes.len(), 64, "65 values take two whole blocks");
    }
}

#[test]
fn quantized_bases_give_logits_close_to_the_f32_base() {
    let dir = fixture("llama");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let base = hf::load_model(&dir, Some(DType::F32), &Device::Cpu).expect("model");
    let want = values(&base.forward(&ids).expect("forward"));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let dense_bytes = base.base_bytes();
    let loss = |m: &HfModel| {
        m.loss(&ids)
            .and_then(|l| Ok(l.to_scalar::<f32>()?))
            .expect("loss")
    };
    let want_loss = loss(&base);
    // This base is tiny and random (width 16): its logits move ~5x the weights' relative
    // error (int8 ~0.4% rms, NF4 ~10%), so the bounds follow the formats' own error; the
    // loss is the steadier figure.
    for (fmt, limit, loss_limit) in [
        (QuantFormat::Int8, 0.03, 0.005),
        (QuantFormat::Nf4, 0.6, 0.05),
    ] {
        let q = hf::load_quantized(&dir, Some(DType::F32), fmt, &Device::Cpu).expect("load");
        let got = values(&q.forward(&ids).expect("forward"));
        let rel = want
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        println!(
            "{fmt:?}: max logit difference {rel:.4} of the largest logit; base {} -> {} bytes",
            dense_bytes,
            q.base_bytes()
        );
        let l = loss(&q);
        let dl = (l - want_loss).abs() / want_loss;
        println!("{fmt:?}: loss {want_loss:.4} -> {l:.4} ({dl:.4} relative)");
        assert!(rel < limit, "{fmt:?}: logits differ by {rel} relative");
        assert!(dl < loss_limit, "{fmt:?}: loss differs by {dl} relative");
        assert!(rel > 0.0, "{fmt:?}: quantisation changed nothing");
        assert!(q.base_bytes() < dense_bytes);
    }
}

fn train(model: &mut HfModel, ids: &Tensor, steps: u64) -> (f32, f32) {
    let mut cfg = HfLoraConfig::new(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    cfg.seed = 3;
    model.attach_lora(&cfg).expect("attach");
    let params = model.lora_params();
    let mut opt = AdamW::new(&params).expect("adamw");
    let tc = TrainConfig {
        weight_decay: 0.0,
        grad_clip: 1.0,
        ..TrainConfig::default()
    };
    let loss = |m: &HfModel| {
        m.loss(ids)
            .and_then(|l| Ok(l.to_scalar::<f32>()?))
            .expect("loss")
    };
    let start = loss(model);
    for step in 0..steps {
        let grads = model
            .train_loss(ids, step)
            .expect("train loss")
            .backward()
            .expect("backward");
        opt.step(&params, &grads, &tc, 1e-2).expect("step");
    }
    (start, loss(model))
}

#[test]
fn qlora_reaches_within_two_percent_of_bf16_lora() {
    let dir = fixture("llama");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut bf16 = hf::load_model(&dir, Some(DType::BF16), &Device::Cpu).expect("bf16");
    let mut nf4 =
        hf::load_quantized(&dir, Some(DType::BF16), QuantFormat::Nf4, &Device::Cpu).expect("nf4");
    let (b0, b1) = train(&mut bf16, &ids, 40);
    let (q0, q1) = train(&mut nf4, &ids, 40);
    println!("loss after 40 steps: bf16 base {b0:.4} -> {b1:.4}, nf4 base {q0:.4} -> {q1:.4}");
    assert!(
        b1 < 0.8 * b0 && q1 < 0.8 * q0,
        "training did not lower the loss"
    );
    let gap = (q1 - b1).abs() / b1;
    assert!(
        gap <= 0.02,
        "QLoRA's loss {q1} is {gap:.4} away from bf16 LoRA's {b1}"
    );
}

#[test]
fn qlora_trains_adapters_on_nf4_experts() {
    let dir = fixture("mixtral");
    let ids = Expected::load(&dir).expect("expected").input_ids;
    let mut model =
        hf::load_quantized(&dir, Some(DType::F32), QuantFormat::Nf4, &Device::Cpu).expect("nf4");
    // The fixture's shapes: hidden 16, 4 query and 2 key/value heads of 4, experts of 16,
    // four experts, two layers, vocabulary 64. Attention and every expert in NF4; the
    // router, norms, embedding and head stay f32.
    let nf4 = |r, c| QuantFormat::Nf4.bytes(r, c);
    let per_layer = 2 * nf4(16, 16) + 2 * nf4(8, 16) + 4 * 3 * nf4(16, 16) + 4 * (4 * 16 + 2 * 16);
    let want = 2 * per_layer + 4 * (2 * 64 * 16 + 16);
    assert_eq!(model.base_bytes(), want, "the experts are not held in NF4");
    let mut cfg = HfLoraConfig::new(&["w1", "w2", "w3"]);
    cfg.rank = 4;
    cfg.alpha = 8.0;
    assert_eq!(model.attach_lora(&cfg).expect("attach"), 24);
    let params = model.lora_params();
    let mut opt = AdamW::new(&params).expect("adamw");
    let tc = TrainConfig {
        weight_decay: 0.0,
        grad_clip: 1.0,
        ..TrainConfig::default()
    };
    let loss = |m: &HfModel| {
        m.loss(&ids)
            .and_then(|l| Ok(l.to_scalar::<f32>()?))
            .expect("loss")
    };
    let start = loss(&model);
    for step in 0..40 {
        let grads = model
            .train_loss(&ids, step)
            .expect("train loss")
            .backward()
            .expect("backward");
        opt.step(&params, &grads, &tc, 1e-2).expect("step");
    }
    let end = loss(&model);
    println!("NF4 Mixtral, expert adapters: loss {start:.4} -> {end:.4}");
    assert!(end < 0.8 * start, "loss {start} -> {end}");
    assert_eq!(model.base_bytes(), want, "training changed the base");
}

/// One projection shape of a base, and how many of it there are.
type Shapes = Vec<((usize, usize), usize)>;

/// The projections of a dense Llama-family base.
fn projections(
    hidden: usize,
    inter: usize,
    heads: usize,
    kv: usize,
    hd: usize,
    layers: usize,
) -> Shapes {
    vec![
        ((heads * hd, hidden), layers),
        ((kv * hd, hidden), 2 * layers),
        ((hidden, heads * hd), layers),
        ((inter, hidden), 2 * layers),
        ((hidden, inter), layers),
    ]
}

/// The quantised projections' bytes of TinyLlama-1.1B's and Llama-3-8B's shapes (formula),
/// and TinyLlama's measured by quantising random weights of every projection shape
/// (one layer, times the layer count: every layer has the same shapes). The embedding and
/// head stay in bf16 and are reported apart.
#[test]
#[ignore = "quantises ~44M random values (about a minute on 2 cores); run with --ignored --nocapture"]
fn memory_of_tinyllama_and_llama3_8b_shaped_bases() {
    let bases = [
        (
            "tinyllama-1.1b",
            projections(2048, 5632, 32, 4, 64, 22),
            32000usize,
            2048usize,
            22usize,
        ),
        (
            "llama-3-8b",
            projections(4096, 14336, 32, 8, 128, 32),
            128256,
            4096,
            32,
        ),
    ];
    for (name, shapes, vocab, hidden, layers) in &bases {
        let params: u64 = shapes.iter().map(|((r, c), k)| (r * c * k) as u64).sum();
        // Embedding and untied head in bf16, two norms per layer and the final one in bf16.
        let rest = (2 * vocab * hidden + (2 * layers + 1) * hidden) as u64 * 2;
        for fmt in [QuantFormat::Int8, QuantFormat::Nf4] {
            let bytes: u64 = shapes
                .iter()
                .map(|((r, c), k)| fmt.bytes(*r, *c) * *k as u64)
                .sum();
            println!(
                "{{\"bench\":\"hf_quant_memory\",\"base\":\"{name}\",\"format\":\"{fmt:?}\",\"projection_params\":{params},\"projection_bytes\":{bytes},\"bytes_per_param\":{:.6},\"bf16_embed_head_norm_bytes\":{rest},\"total_gib\":{:.3},\"bf16_total_gib\":{:.3}}}",
                bytes as f64 / params as f64,
                (bytes + rest) as f64 / (1u64 << 30) as f64,
                (2 * params + rest) as f64 / (1u64 << 30) as f64,
            );
        }
    }
    let (name, shapes, _, _, layers) = &bases[0];
    for fmt in [QuantFormat::Int8, QuantFormat::Nf4] {
        let start = std::time::Instant::now();
        let mut measured = 0u64;
        let mut formula = 0u64;
        for (i, ((r, c), k)) in shapes.iter().enumerate() {
            let per_layer = k / layers;
            let w = Tensor::from_vec(gaussian(r * c, 0.02, i as u64), (*r, *c), &Device::Cpu)
                .expect("weight")
                .to_dtype(DType::BF16)
                .expect("bf16");
            let q = QTensor::quantize(&w, fmt).expect("quantize");
            measured += q.bytes() * per_layer as u64;
            formula += fmt.bytes(*r, *c) * per_layer as u64;
        }
        assert_eq!(measured, formula);
        println!(
            "{{\"bench\":\"hf_quant_measured\",\"base\":\"{name}\",\"format\":\"{fmt:?}\",\"one_layer_bytes\":{measured},\"all_layers_bytes\":{},\"seconds_one_layer\":{:.1}}}",
            measured * *layers as u64,
            start.elapsed().as_secs_f64()
        );
    }
}
