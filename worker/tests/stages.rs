//! Pipeline cuts and the MoE router -> experts -> combine cut.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{batch, micro};
use potluck_worker::Model;
use potluck_worker::model::moe_combine;

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check_split(n_stages: usize) {
    let mut cfg = micro(vec![0, 2], 3);
    cfg.tie_embeddings = true;
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 21).unwrap();
    let (x, y) = batch(cfg.vocab, 2, 8, 7);

    let w = model.weights(true).unwrap();
    let (loss, _) = model.loss(&w, &x, &y).unwrap();
    let full_loss = loss.to_scalar::<f64>().unwrap();
    let grads = loss.backward().unwrap();
    let reference = model.collect_grads(&grads, |_| true).unwrap();

    let stages = model.split_stages(n_stages).unwrap();
    assert_eq!(stages.len(), n_stages);
    // Forward through every stage, keeping each stage's input.
    let mut inputs = vec![x.clone()];
    let mut split_loss = 0f64;
    for (i, s) in stages.iter().enumerate() {
        let target = if s.head { Some(&y) } else { None };
        let out = model.stage_forward(s, &inputs[i], target).unwrap();
        split_loss += out.aux as f64 + out.ce.unwrap_or(0.0) as f64;
        assert_eq!(out.ce.is_some(), s.head);
        if let Some(h) = out.hidden {
            inputs.push(h);
        }
    }
    assert!(
        (split_loss - full_loss).abs() < 1e-5 * full_loss.abs(),
        "{split_loss} vs {full_loss}"
    );

    // Backward from the last stage to the first, passing input gradients down.
    let mut summed: HashMap<String, Vec<f64>> = HashMap::new();
    let mut grad_out: Option<Tensor> = None;
    for (i, s) in stages.iter().enumerate().rev() {
        let target = if s.head { Some(&y) } else { None };
        let back = model
            .stage_backward(s, &inputs[i], grad_out.as_ref(), target)
            .unwrap();
        for (name, g) in back.param_grads {
            assert!(model.stage_owns(s, &name));
            let g = to_vec(&g);
            summed
                .entry(name)
                .and_modify(|acc| acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b))
                .or_insert(g);
        }
        grad_out = back.input_grad;
        assert_eq!(grad_out.is_some(), !s.embed);
    }
    assert_eq!(summed.len(), reference.len());
    for (name, g) in &reference {
        let got = summed.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let d = max_rel_diff(&to_vec(g), got);
        assert!(d < 1e-9, "{name}: relative difference {d}");
    }
}

#[test]
fn two_stage_split_matches_unsplit() {
    check_split(2);
}

#[test]
fn three_stage_split_matches_unsplit() {
    check_split(3);
}

#[test]
fn stage_refuses_bad_input() {
    let cfg = micro(vec![0], 2);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 1).unwrap();
    let stages = model.split_stages(2).unwrap();
    let wrong = Tensor::zeros((2, 4, cfg.d_model + 1), DType::F64, &Device::Cpu).unwrap();
    assert!(model.stage_forward(&stages[1], &wrong, None).is_err());
    let ok = Tensor::zeros((2, 4, cfg.d_model), DType::F64, &Device::Cpu).unwrap();
    // A middle stage without an output gradient has nothing to differentiate.
    assert!(model.stage_backward(&stages[0], &ok, None, None).is_err());
    assert!(model.split_stages(3).is_err());
    assert!(model.split_stages(0).is_err());
}

fn normed_tokens(n: usize, d: usize) -> Var {
    let vals: Vec<f64> = (0..n * d)
        .map(|i| ((i * 7919 % 101) as f64 / 50.0) - 1.0)
        .collect();
    Var::from_tensor(&Tensor::from_vec(vals, (n, d), &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn moe_with_a_missing_expert_is_valid_and_differentiable() {
    let cfg = micro(vec![0], 1);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 4).unwrap();
    let w = model.weights(true).unwrap();
    let x = normed_tokens(24, cfg.d_model);
    let routing = model.moe_route(&w, 0, x.as_tensor()).unwrap();
    assert!(routing.tokens.iter().all(|t| !t.is_empty()));
    let mut outputs = Vec::new();
    for e in 0..cfg.n_experts {
        let idx = routing.index(e).unwrap().unwrap();
        let xe = x.as_tensor().index_select(&idx, 0).unwrap();
        outputs.push(Some(model.expert_forward(&w, 0, e, &xe).unwrap()));
    }
    let full = moe_combine(&routing, &outputs).unwrap();
    outputs[0] = None;
    let partial = moe_combine(&routing, &outputs).unwrap();
    assert_eq!(partial.dims(), &[24, cfg.d_model]);
    let pv = to_vec(&partial);
    assert!(pv.iter().all(|v| v.is_finite()));
    // Tokens not routed to expert 0 are unchanged; the others lost only that contribution.
    let fv = to_vec(&full);
    let d = cfg.d_model;
    for tok in 0..24u32 {
        let row = tok as usize * d..(tok as usize + 1) * d;
        let same = fv[row.clone()].iter().zip(&pv[row]).all(|(a, b)| a == b);
        assert_eq!(same, !routing.tokens[0].contains(&tok), "token {tok}");
    }
    let obj = (partial.sum_all().unwrap() + &routing.aux).unwrap();
    let grads = obj.backward().unwrap();
    let by_name: HashMap<String, Tensor> = model
        .collect_grads(&grads, |_| true)
        .unwrap()
        .into_iter()
        .collect();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(by_name.contains_key("layers.0.moe.router.weight"));
    assert!(by_name.contains_key("layers.0.moe.experts.1.w_up.weight"));
    assert!(!by_name.contains_key("layers.0.moe.experts.0.w_up.weight"));
    for g in by_name.values() {
        assert!(to_vec(g).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn remote_expert_backward_matches_in_graph_gradients() {
    let cfg = micro(vec![0], 1);
    let model = Model::with_dtypes(&cfg, &Device::Cpu, DType::F64, DType::F64, 8).unwrap();
    let w = model.weights(true).unwrap();
    let x = normed_tokens(20, cfg.d_model);
    let routing = model.moe_route(&w, 0, x.as_tensor()).unwrap();
    let e = 2;
    let idx = routing.index(e).unwrap().unwrap();
    let xe = x.as_tensor().index_select(&idx, 0).unwrap();
    let ye = model.expert_forward(&w, 0, e, &xe).unwrap();
    let mut outputs: Vec<Option<Tensor>> = vec![None; cfg.n_experts];
    outputs[e] = Some(ye.clone());
    let y = moe_combine(&routing, &outputs).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    // d(sum y)/d(y_e) is the gate of each routed token, broadcast over the width.
    let gate = routing.gates(e).unwrap().unwrap().detach();
    let grad_ye = gate
        .unsqueeze(1)
        .unwrap()
        .broadcast_as(ye.dims())
        .unwrap()
        .contiguous()
        .unwrap();
    let (gx, pgrads) = model.expert_backward(0, e, &xe.detach(), &grad_ye).unwrap();
    assert_eq!(gx.dims(), xe.dims());
    assert_eq!(pgrads.len(), 3);
    let in_graph: HashMap<String, Tensor> = model
        .collect_grads(&grads, |_| true)
        .unwrap()
        .into_iter()
        .collect();
    for (name, g) in pgrads {
        let d = max_rel_diff(&to_vec(&in_graph[&name]), &to_vec(&g));
        assert!(d < 1e-12, "{name}: {d}");
    }
    assert!(
        model
            .expert_backward(0, cfg.n_experts, &xe, &grad_ye)
            .is_err()
    );
}
