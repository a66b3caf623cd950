//! The fused ops (`potluck_worker::fused`) against the plain candle formulation computed in
//! f64 on the CPU, on seeded random inputs of several shapes (row lengths that are not
//! multiples of a warp included): forward values, gradients, and the flat AdamW step. The
//! same checks run on the CPU (CI) and, ignored, on a CUDA GPU:
//! `cargo test -p potluck-worker --features cuda --test fused -- --ignored cuda_`.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use candle_core::{DType, Device, Tensor, Var};
use potluck_worker::fused;

thread_local! {
    /// The inputs' generator: candle's CPU `randn` cannot be seeded, and a rare draw once
    /// took a bf16 gradient past its tolerance in CI. Each check starts it from its own seed
    /// ([`reseed`]), so every run checks the same inputs.
    static NORMALS: std::cell::RefCell<rand_chacha::ChaCha8Rng> =
        std::cell::RefCell::new(rand::SeedableRng::seed_from_u64(0));
}

fn reseed(seed: u64) {
    NORMALS.with(|r| *r.borrow_mut() = rand::SeedableRng::seed_from_u64(seed));
}

/// Normal samples of standard deviation `std` (Box-Muller), f64 on the CPU.
fn normal(shape: impl Into<candle_core::Shape>, std: f64) -> Tensor {
    use rand::Rng;
    let shape = shape.into();
    let v: Vec<f64> = NORMALS.with(|r| {
        let mut r = r.borrow_mut();
        (0..shape.elem_count())
            .map(|_| {
                let u: f64 = 1.0 - r.random::<f64>();
                let t: f64 = r.random::<f64>();
                std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * t).cos()
            })
            .collect()
    });
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A tensor's values on the host, as f64, flattened.
fn host_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `||a - b|| / ||b||`, both read back as f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = host_f64(a);
    let b = host_f64(b);
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Forward and gradient tolerance of a compute dtype.
fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        _ => 2e-2,
    }
}

const SHAPES: &[&[usize]] = &[
    &[1, 1, 1, 1],
    &[2, 3, 5, 5],
    &[4, 7, 7],
    &[1, 2, 33, 33],
    &[2, 1, 64, 64],
    &[1, 2, 130, 130],
];

fn check_softmax(device: &Device, dt: DType) {
    reseed(1);
    for &dims in SHAPES {
        let t = dims[dims.len() - 1];
        let scale = 1.0 / (t as f64).sqrt() * 3.0;
        let x64 = normal(dims, 2.0);
        let w64 = normal(dims, 1.0);
        // The reference sees the same (rounded) inputs as the op under test.
        let x64 = x64.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
        let xv = Var::from_tensor(&x64.to_dtype(dt).unwrap().to_device(device).unwrap()).unwrap();
        let y = fused::causal_softmax(xv.as_tensor(), scale).unwrap();
        assert_eq!(y.dtype(), dt);
        assert_eq!(y.dims(), dims);
        let acc = if dt == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let w = w64.to_dtype(acc).unwrap().to_device(device).unwrap();
        let loss = (y.to_dtype(acc).unwrap() * &w).unwrap().sum_all().unwrap();
        let gx = loss
            .backward()
            .unwrap()
            .get(xv.as_tensor())
            .unwrap()
            .clone();

        let rv = Var::from_tensor(&x64).unwrap();
        let r = fused::causal_softmax_reference(rv.as_tensor(), scale).unwrap();
        let rloss = (&r * &w64).unwrap().sum_all().unwrap();
        let rg = rloss
            .backward()
            .unwrap()
            .get(rv.as_tensor())
            .unwrap()
            .clone();

        let e = rel_err(&y, &r);
        assert!(
            e < tolerance(dt),
            "{device:?} {dt:?} {dims:?}: forward error {e}"
        );
        let e = rel_err(&gx, &rg);
        assert!(
            e < 2.0 * tolerance(dt),
            "{device:?} {dt:?} {dims:?}: gradient error {e}"
        );
        // Masked entries are exactly zero, forward and backward.
        let y = host_f64(&y);
        let g = host_f64(&gx);
        for (r, (row, grow)) in y.chunks(t).zip(g.chunks(t)).enumerate() {
            let i = r % t;
            assert!(
                row[i + 1..].iter().all(|&v| v == 0.0),
                "row {r} sees the future"
            );
            assert!(grow[i + 1..].iter().all(|&v| v == 0.0), "row {r} gradient");
        }
    }
}

/// The flat AdamW step against its plain formulation in f64, and the sum of squares against
/// an f64 sum, at lengths around a block's work.
fn check_optimizer(device: &Device, dt: DType) {
    reseed(2);
    for n in [1usize, 255, 1000, 257 * 1031] {
        let r = |std: f64| normal(n, std);
        let (theta, g, m) = (r(1.0), r(0.1), r(0.01));
        let v = r(0.001).sqr().unwrap();
        let mask = r(1.0).ge(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let round = |t: &Tensor| t.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
        let (theta, g, m, v) = (round(&theta), round(&g), round(&m), round(&v));
        let (clip, b1, b2, lr, wd, eps, t) = (0.7f64, 0.9f64, 0.95f64, 1e-3, 0.1, 1e-8, 3);
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let k = fused::AdamWConsts {
            g1: clip * (1.0 - b1),
            b1,
            g2: clip * clip * (1.0 - b2),
            b2,
            inv_bc2: 1.0 / bc2,
            eps,
            step: lr / bc1,
            decay: -lr * wd,
        };
        let on = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(device).unwrap();
        let mv = Tensor::cat(&[&m, &v], 0).unwrap();
        let out = fused::adamw_flat(&on(&theta), &on(&g), &on(&mv), &on(&mask), &k).unwrap();
        assert_eq!(out.dims(), [3 * n]);
        let m2 = ((&m * b1).unwrap() + (&g * k.g1).unwrap()).unwrap();
        let v2 = ((&v * b2).unwrap() + (g.sqr().unwrap() * k.g2).unwrap()).unwrap();
        let upd = (m2.clone() / ((&v2 * k.inv_bc2).unwrap().sqrt().unwrap() + eps).unwrap())
            .unwrap()
            * k.step;
        let dec = ((&mask * k.decay).unwrap() + 1.0).unwrap();
        let theta2 = ((&theta * dec).unwrap() - upd.unwrap()).unwrap();
        let tol = if dt == DType::F64 { 1e-12 } else { 1e-6 };
        for (j, want) in [theta2, m2, v2].iter().enumerate() {
            let got = out.narrow(0, j * n, n).unwrap();
            let e = rel_err(&got, want);
            assert!(e < tol, "{device:?} {dt:?} n={n} part {j}: error {e}");
        }
        let want: f64 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let got: f64 = fused::sum_squares(&on(&g))
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "{device:?} {dt:?} n={n}: sum of squares {got} vs {want}"
        );
    }
}

/// The multi-tensor optimizer step (`fused::MultiTensor`) against the plain AdamW formula
/// in f64: many parameters of lengths around a block's work (so blocks cover several
/// parameters and parameters span several blocks), some without a gradient, gradients in
/// `grad_dt`, compute copies in `copy_dt` written at offsets into one buffer whose gaps
/// must stay untouched; and the sum of squares against an f64 sum. With `aligned`, every
/// length and gap is a multiple of four, so that the GPU kernel's four-element body runs
/// (blocks still begin and end inside tensors); without, most tensors take its scalar path.
fn check_multi(device: &Device, grad_dt: DType, copy_dt: Option<DType>, aligned: bool) {
    reseed(3);
    let mut sizes = vec![
        1usize,
        7,
        255,
        256,
        257,
        4095,
        4096,
        4097,
        1000,
        257 * 131,
        70_001,
    ];
    sizes.extend((0..300).map(|i| 1 + (i * 7919) % 600));
    let gap = if aligned {
        sizes.iter_mut().for_each(|n| *n = n.next_multiple_of(4));
        4
    } else {
        1
    };
    let total: usize = sizes.iter().sum();
    let r = |n: usize, std: f64| normal(n, std);
    let round = |t: &Tensor, dt: DType| t.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap();
    let on = |t: &Tensor, dt: DType| t.to_dtype(dt).unwrap().to_device(device).unwrap();
    let copy_len = total + gap * sizes.len();
    const POISON: f64 = 7.0;
    let copy_buf = copy_dt.map(|dt| {
        Tensor::full(POISON, copy_len, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(device)
            .unwrap()
    });
    let (mut params, mut thetas, mut gs, mut masks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut copy_off = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let theta = round(&r(n, 1.0), DType::F32);
        let g = round(&r(n, 0.1), grad_dt);
        let has_grad = i % 5 != 3;
        let decay = i % 2 == 0;
        params.push(fused::MultiParam {
            master: Var::from_tensor(&on(&theta, DType::F32))
                .unwrap()
                .as_tensor()
                .clone(),
            grad: has_grad.then(|| on(&g, grad_dt)),
            copy: copy_buf.as_ref().map(|c| (c.clone(), copy_off)),
            decay,
        });
        copy_off += n + gap;
        thetas.push(theta);
        gs.push(if has_grad {
            g
        } else {
            Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap()
        });
        masks.push(Tensor::full(if decay { 1f64 } else { 0.0 }, n, &Device::Cpu).unwrap());
    }
    let theta = Tensor::cat(&thetas, 0).unwrap();
    let g = Tensor::cat(&gs, 0).unwrap();
    let mask = Tensor::cat(&masks, 0).unwrap();
    let m = round(&r(total, 0.01), DType::F32);
    let v = round(&r(total, 0.001).sqr().unwrap(), DType::F32);
    let (clip, b1, b2, lr, wd, eps, t) = (0.7f64, 0.9f64, 0.95f64, 1e-3, 0.1, 1e-8, 3);
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let k = fused::AdamWConsts {
        g1: clip * (1.0 - b1),
        b1,
        g2: clip * clip * (1.0 - b2),
        b2,
        inv_bc2: 1.0 / bc2,
        eps,
        step: lr / bc1,
        decay: -lr * wd,
    };
    let mv = on(&Tensor::cat(&[&m, &v], 0).unwrap(), DType::F32);
    let multi = fused::MultiTensor::new(params.clone()).unwrap();
    assert_eq!(multi.total(), total);
    let want_ss: f64 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    let got_ss = multi.sum_squares().unwrap();
    assert!(
        (got_ss - want_ss).abs() <= 1e-12 * want_ss,
        "{device:?} {grad_dt:?}: sum of squares {got_ss} vs {want_ss}"
    );
    multi.adamw(&mv, &k).unwrap();
    let m2 = ((&m * b1).unwrap() + (&g * k.g1).unwrap()).unwrap();
    let v2 = ((&v * b2).unwrap() + (g.sqr().unwrap() * k.g2).unwrap()).unwrap();
    let upd = (m2.clone() / ((&v2 * k.inv_bc2).unwrap().sqrt().unwrap() + eps).unwrap()).unwrap()
        * k.step;
    let dec = ((&mask * k.decay).unwrap() + 1.0).unwrap();
    let theta2 = ((&theta * dec).unwrap() - upd.unwrap()).unwrap();
    let masters: Vec<Tensor> = params.iter().map(|p| p.master.clone()).collect();
    let got_theta = Tensor::cat(&masters, 0).unwrap();
    let what = format!("{device:?} grads {grad_dt:?} copies {copy_dt:?} aligned {aligned}");
    // Element by element too: one element left out of the update would hide in a norm.
    for (i, (got, want)) in host_f64(&got_theta)
        .into_iter()
        .zip(host_f64(&theta2))
        .enumerate()
    {
        assert!(
            (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "{what}: weight {i} is {got}, expected {want}"
        );
    }
    for (name, got, want) in [
        ("weights", got_theta.clone(), theta2),
        ("m", mv.narrow(0, 0, total).unwrap(), m2),
        ("v", mv.narrow(0, total, total).unwrap(), v2),
    ] {
        let e = rel_err(&got, &want);
        assert!(e < 1e-6, "{what}: {name} error {e}");
    }
    if let (Some(buf), Some(dt)) = (&copy_buf, copy_dt) {
        let mut off = 0;
        for (p, &n) in params.iter().zip(&sizes) {
            let got = buf.narrow(0, off, n).unwrap();
            let want = p.master.to_dtype(dt).unwrap();
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{what}: compute copy error {e}");
            let poison: f64 = buf
                .narrow(0, off + n, gap)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(poison, POISON * gap as f64, "{what}: a gap was written");
            off += n + gap;
        }
    }
}

/// Runs `op` on `inputs` (f64 values, rounded to `dt` and moved to `device`) and `reference`
/// on the same values in f64 on the CPU; compares the outputs and the gradients of
/// `sum(out * r)` for a random `r` with respect to every input in `grads`.
fn check_op(
    device: &Device,
    dt: DType,
    what: &str,
    inputs: &[Tensor],
    grads: &[usize],
    op: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap())
        .collect();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(device).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts);
    assert_eq!(y.dtype(), dt, "{what}");
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let r64 = normal(y.dims(), 1.0);
    let r = r64.to_dtype(acc).unwrap().to_device(device).unwrap();
    let g = (y.to_dtype(acc).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let rvars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let rts: Vec<Tensor> = rvars.iter().map(|v| v.as_tensor().clone()).collect();
    let want = reference(&rts);
    let rg = (&want * &r64)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(&y, &want);
    assert!(
        e < tolerance(dt),
        "{what} {device:?} {dt:?}: forward error {e}"
    );
    for &i in grads {
        let got = g.get(vars[i].as_tensor()).unwrap();
        let want = rg.get(rvars[i].as_tensor()).unwrap();
        let e = rel_err(got, want);
        assert!(
            e < 2.0 * tolerance(dt),
            "{what} {device:?} {dt:?}: gradient {i} error {e}"
        );
    }
}

/// RMSNorm, the unmasked softmax, SwiGLU's gate (gate and input apart, and packed in rows),
/// and the attention heads' split (with and without RoPE) and merge against their plain
/// formulations.
fn check_row_ops(device: &Device, dt: DType) {
    reseed(4);
    let randn = |dims: &[usize], std: f64| normal(dims, std);
    for dims in [
        &[1usize, 5][..],
        &[3, 5],
        &[2, 7, 33],
        &[4, 384],
        &[9, 8],
        &[70, 130],
    ] {
        let d = dims[dims.len() - 1];
        let x = randn(dims, 1.5);
        let w = (randn(&[d], 0.3) + 1.0).unwrap();
        check_op(
            device,
            dt,
            &format!("rms-norm {dims:?}"),
            &[x, w],
            &[0, 1],
            |t| fused::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| fused::rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(),
        );
        // The plain (unmasked) softmax over the last dimension, as the MoE router uses it.
        check_op(
            device,
            dt,
            &format!("softmax {dims:?}"),
            &[randn(dims, 2.0)],
            &[0],
            |t| fused::softmax_last_dim(&t[0]).unwrap(),
            |t| candle_nn::ops::softmax(&t[0], candle_core::D::Minus1).unwrap(),
        );
        let (g, u) = (randn(dims, 2.0), randn(dims, 1.0));
        check_op(
            device,
            dt,
            &format!("swiglu {dims:?}"),
            &[g, u],
            &[0, 1],
            |t| fused::swiglu_gate(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        );
        // Gate and input packed in each row (`[.., 2d]`): halves of 5, 33 and 130 values
        // take the one-a-thread kernel on a GPU, 8 and 384 the four-a-thread one.
        let mut packed = dims.to_vec();
        *packed.last_mut().unwrap() = 2 * d;
        let last = packed.len() - 1;
        check_op(
            device,
            dt,
            &format!("swiglu packed {packed:?}"),
            &[randn(&packed, 2.0)],
            &[0],
            |t| fused::swiglu_packed(&t[0]).unwrap(),
            |t| {
                let (g, u) = (
                    t[0].narrow(last, 0, d).unwrap(),
                    t[0].narrow(last, d, d).unwrap(),
                );
                (g.silu().unwrap() * u).unwrap()
            },
        );
    }
    // A gate and an input that start one element into their buffers: a multiple of four
    // elements, but not aligned to four, so the GPU takes the one-a-thread kernel.
    let buf = randn(&[2, 17], 1.0)
        .to_dtype(dt)
        .unwrap()
        .to_device(device)
        .unwrap();
    let g = buf.get(0).unwrap().narrow(0, 1, 16).unwrap();
    let u = buf.get(1).unwrap().narrow(0, 1, 16).unwrap();
    let got = host_f64(&fused::swiglu_gate(&g, &u).unwrap());
    let want = host_f64(&(g.silu().unwrap() * &u).unwrap());
    let tol = if dt == DType::BF16 { 2e-2 } else { 1e-6 };
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{device:?} {dt:?} swiglu one in: {a} vs {b}"
        );
    }
    for dims in [
        [1usize, 1, 1, 2],
        [2, 3, 5, 8],
        [2, 2, 33, 64],
        [1, 3, 70, 6],
    ] {
        let (t, half) = (dims[2], dims[3] / 2);
        let angle = |f: fn(f64) -> f64| {
            let v: Vec<f64> = (0..t * half)
                .map(|k| f((k / half) as f64 * 0.37 / (1.0 + (k % half) as f64)))
                .collect();
            Tensor::from_vec(v, (t, half), &Device::Cpu).unwrap()
        };
        let (cos, sin) = (angle(f64::cos), angle(f64::sin));
        let on = |c: &Tensor| c.to_dtype(dt).unwrap().to_device(device).unwrap();
        let (cd, sd) = (on(&cos), on(&sin));
        let (cr, sr) = (
            cos.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap(),
            sin.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap(),
        );
        // dims are [B, H, T, hd]; the projection's output is [B * T, H * hd].
        let [b, h, _, hd] = dims;
        let tokens = [b * t, h * hd];
        check_op(
            device,
            dt,
            &format!("split heads with rope {dims:?}"),
            &[randn(&tokens, 1.0)],
            &[0],
            |x| fused::split_heads(&x[0], b, t, h, Some((&cd, &sd))).unwrap(),
            |x| fused::split_heads_reference(&x[0], b, t, h, Some((&cr, &sr))).unwrap(),
        );
        check_op(
            device,
            dt,
            &format!("split heads {dims:?}"),
            &[randn(&tokens, 1.0)],
            &[0],
            |x| fused::split_heads(&x[0], b, t, h, None).unwrap(),
            |x| fused::split_heads_reference(&x[0], b, t, h, None).unwrap(),
        );
        check_op(
            device,
            dt,
            &format!("merge heads {dims:?}"),
            &[randn(&dims, 1.0)],
            &[0],
            |x| fused::merge_heads(&x[0]).unwrap(),
            |x| {
                x[0].transpose(1, 2)
                    .unwrap()
                    .reshape((b * t, h * hd))
                    .unwrap()
            },
        );
    }
    // An input that starts one element into its buffer (on a GPU, the kernel with one pair
    // a thread; aligned inputs take the one with two) against the same values realigned.
    let (b, t, h, hd) = (2usize, 5usize, 3usize, 8usize);
    let n = b * t * h * hd;
    let table = |f: fn(f64) -> f64| {
        let v: Vec<f64> = (0..t * hd / 2).map(|k| f(k as f64 * 0.1)).collect();
        Tensor::from_vec(v, (t, hd / 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
            .to_device(device)
            .unwrap()
    };
    let (cos, sin) = (table(f64::cos), table(f64::sin));
    let buf = randn(&[n + 1], 1.0)
        .to_dtype(dt)
        .unwrap()
        .to_device(device)
        .unwrap();
    let shifted = buf
        .narrow(0, 1, n)
        .unwrap()
        .reshape((b * t, h * hd))
        .unwrap();
    let fresh = shifted.copy().unwrap();
    for rope in [None, Some((&cos, &sin))] {
        let got = fused::split_heads(&shifted, b, t, h, rope).unwrap();
        let want = fused::split_heads(&fresh, b, t, h, rope).unwrap();
        let e = rel_err(&got, &want);
        assert!(
            e < tolerance(dt),
            "{device:?} {dt:?}: shifted input, error {e}"
        );
    }
    // A shape that is not a whole number of heads is refused.
    let x = randn(&[6, 10], 1.0).to_device(device).unwrap();
    assert!(fused::split_heads(&x, 2, 3, 3, None).is_err());
}

/// `a @ b^T` (`fused::matmul_t`, when `transposed`) or `a @ b` (`fused::matmul`) on random
/// inputs of dims `ad` and `bd`, values and both gradients, against candle's plain product.
fn check_product(
    device: &Device,
    dt: DType,
    what: &str,
    ad: &[usize],
    bd: &[usize],
    transposed: bool,
) {
    let plain_b = |b: &Tensor| {
        if transposed {
            b.t().unwrap()
        } else {
            b.clone()
        }
    };
    check_op(
        device,
        dt,
        &format!("{what} {ad:?} x {bd:?}"),
        &[normal(ad, 1.0), normal(bd, 1.0)],
        &[0, 1],
        |t| match transposed {
            true => fused::matmul_t(&t[0], &t[1]).unwrap(),
            false => fused::matmul(&t[0], &t[1]).unwrap(),
        },
        |t| t[0].matmul(&plain_b(&t[1])).unwrap(),
    );
}

/// `a @ b^T` (linear layers, stacked experts, attention scores) against `a.matmul(b.t())`,
/// at sizes that are not multiples of a tile.
fn check_matmul_t(device: &Device, dt: DType) {
    reseed(5);
    let randn = |dims: &[usize]| normal(dims, 1.0);
    for (a, b) in [
        (&[1usize, 1][..], &[1usize, 1][..]),
        (&[5, 3], &[7, 3]),
        (&[33, 70], &[130, 70]),
        (&[3, 17, 9], &[3, 5, 9]),
        (&[2, 3, 33, 8], &[2, 3, 33, 8]),
    ] {
        check_product(device, dt, "matmul-t", a, b, true);
    }
    assert!(fused::matmul_t(&randn(&[2, 3]), &randn(&[2, 4])).is_err());
    // `a @ b` (attention's `probs @ v`): its backward runs the two other products, `g @ b^T`
    // and `a^T @ g`.
    for (a, b) in [
        (&[1usize, 1][..], &[1usize, 1][..]),
        (&[5, 3], &[3, 7]),
        (&[33, 70], &[70, 130]),
        (&[2, 3, 33, 33], &[2, 3, 33, 8]),
    ] {
        check_product(device, dt, "matmul", a, b, false);
    }
    // Causal attention's products by triangular blocks (`matmul_t_causal`, `matmul_causal`):
    // values and the gradients of q, k and v against the plain products, with lengths under,
    // at and past one block (`TRI_BLOCK`, 128) and not multiples of it.
    for (bh, t, hd) in [
        (&[1usize, 1][..], 1usize, 1usize),
        (&[2, 3], 7, 5),
        (&[1, 2], 128, 8),
        (&[2, 1], 130, 16),
        (&[1, 1], 300, 64),
    ] {
        let dims = [bh, &[t, hd]].concat();
        let scale = 1.0 / (hd as f64).sqrt();
        check_op(
            device,
            dt,
            &format!("causal attention products {dims:?}"),
            &[randn(&dims), randn(&dims), randn(&dims)],
            &[0, 1, 2],
            |x| {
                let s = fused::matmul_t_causal(&x[0], &x[1]).unwrap();
                let p = fused::causal_softmax(&s, scale).unwrap();
                fused::matmul_causal(&p, &x[2]).unwrap()
            },
            |x| {
                let s = x[0].matmul(&x[1].t().unwrap()).unwrap();
                let p = fused::causal_softmax_reference(&s, scale).unwrap();
                p.matmul(&x[2]).unwrap()
            },
        );
    }
    let sq = randn(&[2, 4, 4]);
    assert!(fused::matmul_causal(&randn(&[2, 4, 3]), &randn(&[2, 3, 4])).is_err());
    assert!(fused::matmul_causal(&sq, &randn(&[2, 3, 4])).is_err());
    assert!(fused::matmul_t_causal(&sq, &randn(&[2, 5, 4])).is_err());
    assert!(fused::matmul(&randn(&[2, 3]), &randn(&[2, 3])).is_err());
    assert!(fused::matmul(&randn(&[2, 2, 3]), &randn(&[3, 3, 2])).is_err());
    let mixed = randn(&[2, 3]).to_dtype(DType::F32).unwrap();
    assert!(
        fused::matmul(&mixed, &randn(&[3, 2])).is_err(),
        "f32 with f64 is refused"
    );
}

/// Split TF32 f32 products ([`fused::F32Products::Split`], the GPU default) against plain
/// f32 ones and single TF32 ones, all measured against the f64 product of the same f32
/// inputs: the split's error must stay at the level of f32's, and far below TF32's (which
/// shows the check can tell them apart). Shapes of the `base` model's products, one that
/// is not a tile multiple, a batched one, both transposes, and the experts' grouped
/// product; then values and gradients at sizes that split. Restores the process-wide
/// switches it changes.
#[cfg(feature = "cuda")]
fn check_split_products(device: &Device) {
    use fused::F32Products;
    reseed(11);
    let errors = |x: &Tensor, y: &Tensor, f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
        let (x32, y32) = (
            x.to_dtype(DType::F32).unwrap(),
            y.to_dtype(DType::F32).unwrap(),
        );
        let want = f(
            &x32.to_dtype(DType::F64).unwrap(),
            &y32.to_dtype(DType::F64).unwrap(),
        );
        let (xg, yg) = (
            x32.to_device(device).unwrap(),
            y32.to_device(device).unwrap(),
        );
        let run = |exact: bool, tf32: bool| {
            fused::set_f32_products(if exact {
                F32Products::Exact
            } else {
                F32Products::Split
            });
            candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
            let e = rel_err(&f(&xg, &yg), &want);
            candle_core::cuda::set_gemm_reduced_precision_f32(false);
            fused::set_f32_products(F32Products::Split);
            e
        };
        (run(true, false), run(false, false), run(true, true))
    };
    type Product = Box<dyn Fn(&Tensor, &Tensor) -> Tensor>;
    let cases: Vec<(String, Tensor, Tensor, Product)> = vec![
        (
            "x @ w^T [8192, 768] x [1536, 768]".into(),
            normal(&[8192, 768][..], 1.0),
            normal(&[1536, 768][..], 0.03),
            Box::new(|a, b| fused::matmul_t(a, b).unwrap()),
        ),
        (
            "x @ w^T [333, 1537] x [177, 1537]".into(),
            normal(&[333, 1537][..], 1.0),
            normal(&[177, 1537][..], 1.0),
            Box::new(|a, b| fused::matmul_t(a, b).unwrap()),
        ),
        (
            "a @ b [2, 3, 200, 300] x [2, 3, 300, 130]".into(),
            normal(&[2, 3, 200, 300][..], 0.05).abs().unwrap(),
            normal(&[2, 3, 300, 130][..], 1.0),
            Box::new(|a, b| fused::matmul(a, b).unwrap()),
        ),
        (
            "attention scores q @ k^T [2, 12, 512, 64] x [2, 12, 512, 64]^T".into(),
            normal(&[2, 12, 512, 64][..], 1.0),
            normal(&[2, 12, 512, 64][..], 1.0),
            Box::new(|a, b| fused::matmul_t(a, b).unwrap()),
        ),
        (
            "grouped [3000, 768] x [8, 1536, 768]".into(),
            normal(&[3000, 768][..], 1.0),
            normal(&[8, 1536, 768][..], 0.03),
            Box::new(|a, b| {
                fused::grouped_matmul_t(a, b, &[900, 0, 17, 1000, 3, 580, 500, 0]).unwrap()
            }),
        ),
    ];
    for (what, x, y, f) in &cases {
        let (exact, split, tf32) = errors(x, y, f.as_ref());
        eprintln!(
            "f32 products {what}: error exact {exact:.3e}, split {split:.3e}, tf32 {tf32:.3e}"
        );
        assert!(
            split <= 8.0 * exact + 1e-9,
            "{what}: split error {split:e} against f32's {exact:e}"
        );
        assert!(
            tf32 > 30.0 * split,
            "{what}: TF32 error {tf32:e} is not far above the split's {split:e}"
        );
    }
    // Values and gradients at sizes that split (output sides at least 128, none a multiple
    // of a tile): the gradients' products take both transposes, and the experts' weight
    // gradient splits each expert's rows on their own. Attention's shapes: the scores split
    // over the head dimension of 64 (forward), and so does the gradient of the
    // probabilities, `do @ v^T` (backward of `probs @ v`, whose output of 64 columns stays
    // on the f32 units).
    let randn = |dims: &[usize]| normal(dims, 1.0);
    let products: [(&str, &[usize], &[usize], bool); 4] = [
        ("split matmul-t", &[200, 300], &[150, 300], true),
        ("split matmul", &[2, 130, 257], &[2, 257, 140], false),
        ("split scores", &[2, 3, 200, 64], &[2, 3, 150, 64], true),
        ("probs @ v", &[2, 3, 200, 150], &[2, 3, 150, 64], false),
    ];
    for (what, ad, bd, transposed) in products {
        check_product(device, DType::F32, what, ad, bd, transposed);
    }
    let counts = [300usize, 0, 130, 257];
    check_op(
        device,
        DType::F32,
        "split grouped matmul [687, 150] x [4, 200, 150]",
        &[randn(&[687, 150]), randn(&[4, 200, 150])],
        &[0, 1],
        |t| fused::grouped_matmul_t(&t[0], &t[1], &counts).unwrap(),
        |t| one_product_per_expert(t, &counts),
    );
}

/// The experts' grouped products and both gradients on 2, 4 and 8 CUDA streams against the
/// same products one after another on the device's stream (`fused::set_expert_streams`),
/// in f32 (split, every side at least 128) and bf16: a side stream that started before its
/// operands were split or the output was allocated, or a device stream that read the output
/// before every side stream had written its block, would differ.
#[cfg(feature = "cuda")]
fn check_expert_streams(device: &Device) {
    reseed(12);
    let default = fused::expert_streams();
    let counts = [300usize, 0, 130, 257, 410, 180, 0, 222];
    let rows: usize = counts.iter().sum();
    let (x, w) = (
        normal(&[rows, 150][..], 1.0),
        normal(&[8, 200, 150][..], 1.0),
    );
    let r = normal(&[rows, 200][..], 1.0);
    for dt in [DType::F32, DType::BF16] {
        let run = |streams: usize| {
            fused::set_expert_streams(streams);
            let xv = Var::from_tensor(&x.to_dtype(dt).unwrap().to_device(device).unwrap());
            let wv = Var::from_tensor(&w.to_dtype(dt).unwrap().to_device(device).unwrap());
            let (xv, wv) = (xv.unwrap(), wv.unwrap());
            let y = fused::grouped_matmul_t(xv.as_tensor(), wv.as_tensor(), &counts).unwrap();
            let rd = r.to_dtype(DType::F32).unwrap().to_device(device).unwrap();
            let g = (y.to_dtype(DType::F32).unwrap() * rd)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = g.get(xv.as_tensor()).unwrap().clone();
            let dw = g.get(wv.as_tensor()).unwrap().clone();
            [y, dx, dw]
        };
        let serial = run(1);
        for streams in [2, 4, fused::MAX_EXPERT_STREAMS] {
            // Several times: a missing wait shows only when a stream runs behind.
            for _ in 0..3 {
                for (what, (got, want)) in ["value", "dx", "dw"]
                    .iter()
                    .zip(run(streams).iter().zip(&serial))
                {
                    let e = rel_err(got, want);
                    eprintln!("expert streams {streams} {dt:?} {what}: {e:.3e}");
                    let bound = tolerance(dt) / 10.0;
                    assert!(e < bound, "{streams} streams {dt:?}: {what} differs by {e}");
                }
            }
        }
    }
    fused::set_expert_streams(default);
}

/// The reference of `fused::grouped_matmul_t(&t[0], &t[1], counts)`: one plain product per
/// expert on its rows, concatenated.
fn one_product_per_expert(t: &[Tensor], counts: &[usize]) -> Tensor {
    let mut out = Vec::new();
    let mut at = 0;
    for (g, &m) in counts.iter().enumerate() {
        if m > 0 {
            let x = t[0].narrow(0, at, m).unwrap();
            out.push(x.matmul(&t[1].get(g).unwrap().t().unwrap()).unwrap());
        }
        at += m;
    }
    Tensor::cat(&out, 0).unwrap()
}

/// The experts' grouped products (`fused::grouped_matmul_t`) against one plain product per
/// expert on its rows, values and both gradients: experts without rows (first, inside and
/// last), one expert holding every row, and widths that are not tile multiples.
fn check_grouped_matmul(device: &Device, dt: DType) {
    reseed(6);
    let randn = |dims: &[usize]| normal(dims, 1.0);
    for (counts, n, k) in [
        (vec![1usize], 1usize, 1usize),
        (vec![3, 0, 5, 2], 7, 3),
        (vec![0, 40, 0, 0, 29, 1, 0, 0], 33, 70),
        (vec![0, 0, 17], 130, 9),
    ] {
        let rows: usize = counts.iter().sum();
        let e = counts.len();
        let reference = |t: &[Tensor]| one_product_per_expert(t, &counts);
        check_op(
            device,
            dt,
            &format!("grouped matmul {counts:?} x [{e}, {n}, {k}]"),
            &[randn(&[rows, k]), randn(&[e, n, k])],
            &[0, 1],
            |t| fused::grouped_matmul_t(&t[0], &t[1], &counts).unwrap(),
            reference,
        );
    }
    let (x, w) = (randn(&[5, 3]), randn(&[2, 4, 3]));
    assert!(
        fused::grouped_matmul_t(&x, &w, &[2, 2]).is_err(),
        "rows must add up"
    );
    assert!(
        fused::grouped_matmul_t(&x, &w, &[5]).is_err(),
        "one count per expert"
    );
    assert!(fused::grouped_matmul_t(&x, &randn(&[2, 4, 2]), &[2, 3]).is_err());
}

/// The number of CUDA streams is clamped, so no setting can leave the experts' products
/// without a stream. (Nothing on the CPU reads it.)
#[test]
fn expert_streams_are_clamped_to_one_through_the_maximum() {
    let default = fused::expert_streams();
    for (asked, got) in [(0, 1), (1, 1), (3, 3), (100, fused::MAX_EXPERT_STREAMS)] {
        fused::set_expert_streams(asked);
        assert_eq!(fused::expert_streams(), got, "asked for {asked}");
    }
    fused::set_expert_streams(default);
}

#[test]
fn fused_grouped_matmul_matches_one_product_per_expert_on_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        check_grouped_matmul(&Device::Cpu, dt);
    }
}

/// A small deterministic generator for index patterns (the values come from `randn`).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }

    /// `count` row indices below `r`, each `r` (the zero row) one time in `zero_one_in`.
    fn row_ids(&mut self, count: usize, r: usize, zero_one_in: usize) -> Vec<u32> {
        (0..count)
            .map(|_| {
                if self.below(zero_one_in) == 0 {
                    r as u32
                } else {
                    self.below(r) as u32
                }
            })
            .collect()
    }
}

/// The router's top-k choice (`fused::router_topk`) against the host rule, on rows full of
/// ties (probabilities drawn from four values), for expert counts and `k` around a warp.
fn check_topk(device: &Device) {
    let mut rng = Lcg(17);
    for (n, e, k) in [
        (1usize, 1usize, 1usize),
        (33, 8, 2),
        (100, 5, 5),
        (70, 40, 3),
        (9, 64, 1),
    ] {
        let p: Vec<f32> = (0..n * e).map(|_| rng.below(4) as f32 / 4.0).collect();
        let probs = Tensor::from_vec(p.clone(), (n, e), device).unwrap();
        let got = fused::router_topk(&probs, k).unwrap();
        assert_eq!(got.dims(), [n, k]);
        let got: Vec<u32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            got,
            fused::topk_host(&p, e, k),
            "{device:?} n {n} e {e} k {k}"
        );
    }
    let probs = Tensor::zeros((3, 4), DType::F32, device).unwrap();
    assert!(fused::router_topk(&probs, 5).is_err());
    assert!(fused::router_topk(&probs, 0).is_err());
}

/// The batched experts' routing on the device (`fused::route_counts`, `fused::route_layout`)
/// against the same ops on the CPU (which a proptest in `model.rs` holds to the plain rule):
/// with and without drops, both block rules, token counts that are not multiples of the
/// kernel's block and expert counts from one to past a warp; and its refusals.
fn check_routing(device: &Device) {
    use fused::RowBlocks::{Aligned, Uniform};
    let mut rng = Lcg(23);
    for (n, e, k, capacity, blocks) in [
        (1usize, 1usize, 1usize, 1usize, Aligned(1)),
        (8192, 8, 2, 8192, Aligned(128)),
        (1000, 8, 2, 200, Aligned(16)),
        (333, 5, 3, 150, Uniform),
        (2049, 64, 4, 100, Aligned(128)),
        (77, 40, 2, 3, Aligned(5)),
        (5000, 32, 3, 300, Aligned(64)),
        (3000, 33, 2, 150, Uniform),
    ] {
        let p: Vec<f32> = (0..n * e).map(|_| rng.below(4) as f32 / 4.0).collect();
        let choice = fused::topk_host(&p, e, k);
        let run = |dev: &Device| {
            let choice = Tensor::from_vec(choice.clone(), (n, k), dev).unwrap();
            let counts = fused::route_counts(&choice, e, capacity).unwrap();
            let host: Vec<u32> = counts.to_vec1().unwrap();
            let kept: Vec<usize> = host[..e].iter().map(|&c| c as usize).collect();
            let layout = fused::route_layout(&choice, &counts, &kept, capacity, blocks).unwrap();
            (host, layout.to_vec1::<u32>().unwrap())
        };
        let (want_counts, want) = run(&Device::Cpu);
        let (got_counts, got) = run(device);
        let what = format!("{device:?} n {n} e {e} k {k} capacity {capacity} {blocks:?}");
        assert_eq!(got_counts, want_counts, "{what}");
        assert_eq!(got.len(), want.len(), "{what}");
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(first.is_none(), "{what}: first difference at {first:?}");
    }
    let choice = Tensor::zeros((4, 2), DType::U32, device).unwrap();
    assert!(fused::route_counts(&choice, 0, 1).is_err());
    assert!(fused::route_counts(&choice, 5000, 1).is_err());
    let floats = Tensor::zeros((4, 2), DType::F32, device).unwrap();
    assert!(fused::route_counts(&floats, 4, 1).is_err());
    let counts = fused::route_counts(&choice, 4, 1).unwrap();
    assert!(fused::route_layout(&choice, &counts, &[1, 1, 1], 1, Aligned(1)).is_err());
    // Kept counts that are not the ones read back (one row short): the CPU refuses them; the
    // GPU cannot tell without a read-back, and lays out only the rows it was sized for.
    let short = fused::route_layout(&choice, &counts, &[0, 0, 0, 0], 1, Aligned(1));
    if device.is_cpu() {
        assert!(short.is_err());
    } else {
        assert_eq!(short.unwrap().to_vec1::<u32>().unwrap().len(), 2 * 8 + 1);
    }
}

/// Rows gathered by index (`fused::gather_rows`, and summed over several index lists by
/// `fused::gather_rows_sum`) against the same rows read on the host:
/// repeated rows, zero rows (index `r`), rows whose width in bytes takes each word size of
/// the GPU kernel (16, 8, 4, 2 bytes and, for f64, 8), and inputs that start at an offset.
fn check_gather(device: &Device, dt: DType) {
    reseed(9);
    let mut rng = Lcg(5);
    for (r, d, m) in [
        (1usize, 1usize, 1usize),
        (7, 768, 40),
        (9, 5, 33),
        (6, 3, 17),
        (12, 2, 70),
        (300, 64, 1000),
    ] {
        let x = normal(&[r + 1, d], 1.0).to_dtype(dt).unwrap();
        let ids = rng.row_ids(m, r, 6);
        // Rows 0..r or 1..=r of the buffer on the device: an input that starts one row in.
        for start in [0, 1] {
            let xs = x.narrow(0, start, r).unwrap();
            let got = fused::gather_rows(
                &x.to_device(device).unwrap().narrow(0, start, r).unwrap(),
                &Tensor::from_vec(ids.clone(), m, device).unwrap(),
            )
            .unwrap();
            let host = host_f64(&xs);
            let want: Vec<f64> = ids
                .iter()
                .flat_map(|&i| {
                    let i = i as usize;
                    if i < r {
                        host[i * d..(i + 1) * d].to_vec()
                    } else {
                        vec![0.0; d]
                    }
                })
                .collect();
            assert_eq!(got.dims(), [m, d]);
            assert_eq!(
                host_f64(&got),
                want,
                "{device:?} {dt:?} r {r} d {d} m {m} start {start}"
            );
        }
        // Sums over one to three index lists (`fused::gather_rows_sum`), in f32 on a GPU.
        if dt == DType::U32 {
            continue;
        }
        let xs = x.narrow(0, 0, r).unwrap();
        let host = host_f64(&xs);
        for lists in 1..=3 {
            let ids = rng.row_ids(lists * m, r, 4);
            let got = fused::gather_rows_sum(
                &xs.to_device(device).unwrap(),
                &Tensor::from_vec(ids.clone(), (lists, m), device).unwrap(),
            )
            .unwrap();
            assert_eq!(got.dims(), [m, d]);
            let got = host_f64(&got);
            let tol = if dt == DType::BF16 { 1e-2 } else { 1e-6 };
            for i in 0..m {
                for c in 0..d {
                    let want: f64 = (0..lists)
                        .map(|j| ids[j * m + i] as usize)
                        .filter(|&id| id < r)
                        .map(|id| host[id * d + c])
                        .sum();
                    let e = (got[i * d + c] - want).abs();
                    assert!(
                        e <= tol * (1.0 + want.abs()),
                        "{device:?} {dt:?} sum of {lists}: row {i} col {c} {} vs {want}",
                        got[i * d + c]
                    );
                }
            }
        }
    }
    let x = Tensor::zeros((4, 2), DType::F32, device).unwrap();
    let flat = Tensor::zeros(3, DType::U32, device).unwrap();
    assert!(
        fused::gather_rows_sum(&x, &flat).is_err(),
        "ids must be [lists, rows]"
    );
}

/// The MoE combine and the router's gates against their plain formulations, with dropped
/// slots, rows that no slot reads, and sizes that are not multiples of a warp.
fn check_moe_ops(device: &Device, dt: DType) {
    reseed(7);
    let randn = |dims: &[usize], std: f64| normal(dims, std);
    let mut rng = Lcg(11);
    for (n, k, e, d) in [
        (1usize, 1usize, 1usize, 1usize),
        (5, 2, 4, 3),
        (37, 2, 8, 70),
        (64, 3, 5, 33),
        // Rows of a multiple of four: the four-a-thread kernels on a GPU.
        (40, 2, 8, 64),
    ] {
        // Each (token, slot) reads a distinct row of y, or nothing (id r) about a fifth of
        // the time; some rows are read by nobody.
        let r = n * k + 3;
        let mut free: Vec<usize> = (0..r).collect();
        let mut ids = vec![r as u32; k * n];
        let mut back = vec![(k * n) as u32; r];
        let mut choice = vec![0u32; n * k];
        for t in 0..n {
            let mut experts: Vec<usize> = (0..e).collect();
            for j in 0..k {
                let x = experts.swap_remove(rng.below(experts.len()));
                let dropped = rng.below(5) == 0;
                choice[t * k + j] = (x + if dropped { e } else { 0 }) as u32;
                if !dropped {
                    let row = free.swap_remove(rng.below(free.len()));
                    ids[j * n + t] = row as u32;
                    back[row] = (j * n + t) as u32;
                }
            }
        }
        let ids = Tensor::from_vec(ids, k * n, device).unwrap();
        let ids_cpu = ids.to_device(&Device::Cpu).unwrap();
        let back = Tensor::from_vec(back, r, device).unwrap();
        check_op(
            device,
            dt,
            &format!("moe-combine n {n} k {k} d {d}"),
            &[randn(&[r, d], 1.0), randn(&[n, k], 0.5)],
            &[0, 1],
            |t| fused::moe_combine(&t[0], &t[1], &ids, &back).unwrap(),
            |t| fused::moe_combine_reference(&t[0], &t[1], &ids_cpu).unwrap(),
        );
        let choice = Tensor::from_vec(choice, n * k, device).unwrap();
        let choice_cpu = choice.to_device(&Device::Cpu).unwrap();
        // Probabilities: positive rows summing to one.
        let logits = randn(&[n, e], 1.5);
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1).unwrap();
        check_op(
            device,
            dt,
            &format!("router-gates n {n} k {k} e {e}"),
            &[probs],
            &[0],
            |t| fused::router_gates(&t[0], &choice, k).unwrap(),
            |t| fused::router_gates_reference(&t[0], &choice_cpu, k).unwrap(),
        );
    }
}

/// The router's balance loss (`fused::balance_loss`) and its gradient for the
/// probabilities against the plain ops in f64, with counts of every size from zero up.
fn check_balance_loss(device: &Device, dt: DType) {
    reseed(8);
    let mut rng = Lcg(13);
    for (n, e, k) in [
        (1usize, 1usize, 1usize),
        (7, 3, 2),
        (1000, 8, 2),
        (333, 64, 4),
    ] {
        let logits = normal(&[n, e][..], 2.0);
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1).unwrap();
        let counts: Vec<u32> = (0..e)
            .map(|_| rng.below(2 * n * k / e + 2) as u32)
            .collect();
        let want_c = Tensor::new(counts.as_slice(), &Device::Cpu).unwrap();
        let got_c = want_c.to_device(device).unwrap();
        let pv = Var::from_tensor(&probs.to_dtype(dt).unwrap().to_device(device).unwrap()).unwrap();
        let rv =
            Var::from_tensor(&probs.to_dtype(dt).unwrap().to_dtype(DType::F64).unwrap()).unwrap();
        let got = fused::balance_loss(pv.as_tensor(), &got_c, k).unwrap();
        let want = fused::balance_loss_reference(rv.as_tensor(), &want_c, k).unwrap();
        assert_eq!(
            got.dims(),
            want.dims(),
            "a scalar, as the plain ops make it"
        );
        let e_val = rel_err(&got, &want);
        assert!(
            e_val < tolerance(dt),
            "{device:?} {dt:?} balance loss {n}x{e}: {e_val}"
        );
        // Weighted so that the gradient read on the device is not 1.
        let g = got.affine(3.0, 0.0).unwrap().backward().unwrap();
        let rg = want.affine(3.0, 0.0).unwrap().backward().unwrap();
        let e_grad = rel_err(
            g.get(pv.as_tensor()).unwrap(),
            rg.get(rv.as_tensor()).unwrap(),
        );
        assert!(
            e_grad < tolerance(dt),
            "{device:?} {dt:?} balance loss gradient: {e_grad}"
        );
    }
    let p = Tensor::zeros((4, 3), DType::F32, device).unwrap();
    let bad = Tensor::zeros(4, DType::U32, device).unwrap();
    assert!(
        fused::balance_loss(&p, &bad, 2).is_err(),
        "counts for 4 experts of 3"
    );
    let floats = Tensor::zeros(3, DType::F32, device).unwrap();
    assert!(fused::balance_loss(&p, &floats, 2).is_err(), "f32 counts");
}

#[test]
fn fused_moe_ops_match_the_plain_ops_on_the_cpu() {
    check_balance_loss(&Device::Cpu, DType::F32);
    check_balance_loss(&Device::Cpu, DType::F64);
    for dt in [DType::F32, DType::F64, DType::BF16] {
        check_moe_ops(&Device::Cpu, dt);
        check_gather(&Device::Cpu, DType::F32);
        check_topk(&Device::Cpu);
    }
    check_routing(&Device::Cpu);
}

proptest::proptest! {
    /// The host twin of the GPU's split: `hi` has TF32's 10-bit mantissa, `hi + lo` is the
    /// value exactly, and `lo` is at most half a TF32 step (a whole one where rounding up
    /// would overflow); infinities and NaNs pass through as `hi`.
    #[test]
    fn tf32_split_is_exact_and_hi_fits_tf32(bits in proptest::prelude::any::<u32>()) {
        let x = f32::from_bits(bits);
        let (hi, lo) = fused::tf32_split(x);
        if !x.is_finite() {
            proptest::prop_assert_eq!(hi.to_bits(), bits);
            proptest::prop_assert_eq!(lo, 0.0);
        } else {
            proptest::prop_assert!(hi.is_finite(), "{x:e} split to {hi:e}");
            proptest::prop_assert_eq!(hi.to_bits() & 0x1fff, 0);
            proptest::prop_assert_eq!(hi + lo, x);
            proptest::prop_assert_eq!((hi as f64) + (lo as f64), x as f64);
            // TF32's step at x's exponent (subnormals share the smallest normal exponent's):
            // lo is at most half of it, or less than all of it where x was truncated.
            let exponent = if x == 0.0 {
                -126.0
            } else {
                (x.abs() as f64).log2().floor().max(-126.0)
            };
            let step = 2f64.powf(exponent - 10.0);
            let near_max = x.abs() > f32::MAX * (1.0 - 1.0 / 2048.0);
            let bound = if near_max { step } else { step / 2.0 };
            proptest::prop_assert!((lo as f64).abs() <= bound, "{x:e}: lo {lo:e}");
        }
    }
}

#[test]
fn tf32_split_rounds_to_nearest_with_ties_away() {
    // 1 + 2^-11 is half a TF32 step above 1: it rounds away from zero, up to 1 + 2^-10.
    let half = 1.0 + 2f32.powi(-11);
    assert_eq!(
        fused::tf32_split(half),
        (1.0 + 2f32.powi(-10), -(2f32.powi(-11)))
    );
    assert_eq!(fused::tf32_split(-half).0, -(1.0 + 2f32.powi(-10)));
    let below = f32::from_bits(half.to_bits() - 1);
    assert_eq!(fused::tf32_split(below).0, 1.0);
    assert_eq!(fused::tf32_split(0.0), (0.0, 0.0));
    // Subnormals round on the same step as the smallest normals: 2^-136.
    let sub = |bits: u32| f32::from_bits(bits);
    assert_eq!(fused::tf32_split(sub(1)), (0.0, sub(1)));
    assert_eq!(fused::tf32_split(sub(0x1000)).0, sub(0x2000));
    assert_eq!(fused::tf32_split(sub(0x007f_ffff)).0, f32::MIN_POSITIVE);
    // The largest f32 would round to infinity: it is truncated instead.
    let (hi, lo) = fused::tf32_split(f32::MAX);
    assert!(hi.is_finite() && hi + lo == f32::MAX);
    let (hi, lo) = fused::tf32_split(f32::NAN);
    assert!(hi.is_nan() && lo == 0.0);
    assert_eq!(
        fused::tf32_split(f32::NEG_INFINITY),
        (f32::NEG_INFINITY, 0.0)
    );
}

#[test]
fn fused_matmul_t_matches_the_plain_product_on_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        check_matmul_t(&Device::Cpu, dt);
    }
}

#[test]
fn fused_row_ops_match_the_plain_ops_on_the_cpu() {
    for dt in [DType::F32, DType::F64, DType::BF16] {
        check_row_ops(&Device::Cpu, dt);
    }
}

#[test]
fn packed_swiglu_refuses_rows_that_do_not_halve() {
    for dims in [&[3usize, 7][..], &[]] {
        let t = Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let e = fused::swiglu_packed(&t).unwrap_err().to_string();
        assert!(e.contains("even last dimension"), "{dims:?}: {e}");
    }
}

#[test]
fn fused_softmax_matches_the_plain_ops_on_the_cpu() {
    for dt in [DType::F32, DType::F64, DType::BF16] {
        check_softmax(&Device::Cpu, dt);
    }
}

#[test]
fn fused_optimizer_matches_the_plain_ops_on_the_cpu() {
    for dt in [DType::F32, DType::F64] {
        check_optimizer(&Device::Cpu, dt);
    }
}

#[test]
fn multi_tensor_step_matches_the_plain_update_on_the_cpu() {
    check_multi(&Device::Cpu, DType::F32, None, false);
    check_multi(&Device::Cpu, DType::BF16, Some(DType::BF16), false);
    check_multi(&Device::Cpu, DType::F32, Some(DType::BF16), false);
    check_multi(&Device::Cpu, DType::F32, Some(DType::F32), true);
}

/// The CUDA kernels against the same f64 CPU reference.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_fused_kernels_match_the_plain_ops() {
    let device = Device::new_cuda(0).unwrap();
    for dt in [DType::F32, DType::BF16] {
        check_softmax(&device, dt);
        check_row_ops(&device, dt);
        check_matmul_t(&device, dt);
        check_grouped_matmul(&device, dt);
        if dt == DType::F32 {
            check_split_products(&device);
            check_expert_streams(&device);
        }
        check_moe_ops(&device, dt);
        if dt == DType::F32 {
            check_balance_loss(&device, dt);
        }
    }
    for dt in [DType::F32, DType::BF16, DType::F64, DType::U32] {
        check_gather(&device, dt);
    }
    check_topk(&device);
    check_routing(&device);
    for dt in [DType::F32, DType::F64] {
        check_optimizer(&device, dt);
    }
    for (g, c) in [
        (DType::F32, None),
        (DType::F32, Some(DType::F32)),
        (DType::F32, Some(DType::BF16)),
        (DType::BF16, Some(DType::BF16)),
        (DType::BF16, Some(DType::F32)),
    ] {
        for aligned in [false, true] {
            check_multi(&device, g, c, aligned);
        }
    }
    eprintln!("fused kernels match on {device:?}");
}
