//! Text sampling from the worker's own transformer ([`Model`]), for showing what a model has
//! learned (`potluck demo` prints a sample from the round-0 model beside one from the final
//! checkpoint). The Hugging Face bases have their own cached generator (`hf::generate`); this
//! one has no key/value cache and runs the full forward pass over the last `context` tokens
//! for every new token, which is what a model of a few hundred thousand parameters and a
//! sample of a few dozen tokens can afford, and keeps it exactly the function training runs.
//!
//! With `top_p` below 1 the choice is nucleus sampling, by the same rule as the Hugging Face
//! generator ([`crate::hf::generate::choose`]), so `potluck sample` means one thing by
//! `--top-p` whichever kind of model it reads.
//!
//! The boundary: token ids in, token ids out; tokenising and printing belong to the caller.

use candle_core::{IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::hf::generate::{Sampling, choose as hf_choose};
use crate::{Model, WorkerError};

/// The most tokens one call generates: the cost is one full forward pass per token.
pub const MAX_SAMPLE_TOKENS: usize = 4096;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleConfig {
    /// Tokens to generate (at most [`MAX_SAMPLE_TOKENS`]).
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (the lowest id among equals); a positive value samples
    /// from the softmax of `logits / temperature`.
    pub temperature: f32,
    /// In (0, 1]: below 1 (and at a positive temperature) the token is drawn from the
    /// smallest set of most likely tokens whose probabilities sum to at least `top_p`;
    /// 1 draws from the whole softmax.
    pub top_p: f32,
    /// Seed of the ChaCha8 stream the samples are drawn from, so a sample is reproducible.
    pub seed: u64,
}

/// Generates `cfg.max_new_tokens` tokens after `prompt` and returns them (the prompt not
/// included). A prompt longer than the model's context is cut to its last `context` tokens.
pub fn sample(model: &Model, prompt: &[u32], cfg: &SampleConfig) -> Result<Vec<u32>, WorkerError> {
    let mc = model.config();
    if prompt.is_empty() {
        return Err(WorkerError::Config(
            "sampling needs a non-empty prompt".into(),
        ));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= mc.vocab) {
        return Err(WorkerError::Config(format!(
            "prompt token {bad} is outside the vocabulary {}",
            mc.vocab
        )));
    }
    if cfg.max_new_tokens > MAX_SAMPLE_TOKENS {
        return Err(WorkerError::Config(format!(
            "{} new tokens asked for; at most {MAX_SAMPLE_TOKENS}",
            cfg.max_new_tokens
        )));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
        return Err(WorkerError::Config(format!(
            "temperature {} must be finite and non-negative",
            cfg.temperature
        )));
    }
    if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
        return Err(WorkerError::Config(format!(
            "top_p {} must be in (0, 1]",
            cfg.top_p
        )));
    }
    let w = model.weights(false)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut seq = prompt.to_vec();
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    for _ in 0..cfg.max_new_tokens {
        let window = &seq[seq.len().saturating_sub(mc.context)..];
        let t = window.len();
        let ids = Tensor::from_slice(window, (1, t), model.device())?;
        let logits: Vec<f32> = model
            .logits(&w, &ids)?
            .i((0, t - 1))?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let next = choose(&logits, cfg.temperature, cfg.top_p, &mut rng)?;
        out.push(next);
        seq.push(next);
    }
    Ok(out)
}

/// Picks a token from one row of logits.
fn choose(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    rng: &mut ChaCha8Rng,
) -> Result<u32, WorkerError> {
    if logits.is_empty() || logits.iter().any(|v| !v.is_finite()) {
        return Err(WorkerError::NonFinite(
            "the model's logits are empty or not finite".into(),
        ));
    }
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    if temperature == 0.0 {
        return Ok(best as u32);
    }
    if top_p < 1.0 {
        let rule = Sampling::TopP {
            top_p: f64::from(top_p),
            temperature: f64::from(temperature),
            // Unused by `choose`: the stream is `rng`.
            seed: 0,
        };
        return hf_choose(logits, rule, rng).map_err(|e| WorkerError::Config(e.to_string()));
    }
    // Softmax in f64 from the maximum, so no weight overflows.
    let max = logits[best] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - max) / temperature as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return Ok(i as u32);
        }
        r -= w;
    }
    // Rounding left a sliver past the last weight: the most likely token.
    Ok(best as u32)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::ModelConfig;

    fn model() -> Model {
        let cfg = ModelConfig {
            context: 16,
            ..ModelConfig::tiny()
        };
        Model::new(&cfg, &Device::Cpu, DType::F32, 3).unwrap()
    }

    fn cfg(n: usize, temperature: f32, seed: u64) -> SampleConfig {
        SampleConfig {
            max_new_tokens: n,
            temperature,
            top_p: 1.0,
            seed,
        }
    }

    #[test]
    fn greedy_follows_the_models_argmax_at_every_step() {
        let m = model();
        let prompt = b"abcab".map(u32::from).to_vec();
        let got = sample(&m, &prompt, &cfg(6, 0.0, 0)).unwrap();
        assert_eq!(got.len(), 6);
        let w = m.weights(false).unwrap();
        let mut seq = prompt.clone();
        for &tok in &got {
            let ids = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
            let row: Vec<f32> = m
                .logits(&w, &ids)
                .unwrap()
                .i((0, seq.len() - 1))
                .unwrap()
                .to_vec1()
                .unwrap();
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row[tok as usize], max, "token {tok} is not the argmax");
            seq.push(tok);
        }
    }

    #[test]
    fn a_seed_reproduces_its_sample_and_another_seed_differs() {
        let m = model();
        let prompt = [97u32, 98, 99];
        let a = sample(&m, &prompt, &cfg(24, 1.0, 5)).unwrap();
        assert_eq!(a, sample(&m, &prompt, &cfg(24, 1.0, 5)).unwrap());
        // An untrained model is close to uniform over 256 bytes: two seeds that agreed on
        // 24 draws would mean the seed is ignored.
        assert_ne!(a, sample(&m, &prompt, &cfg(24, 1.0, 6)).unwrap());
        assert!(a.iter().all(|&t| t < 256));
    }

    #[test]
    fn a_prompt_longer_than_the_context_is_windowed() {
        let m = model();
        let long: Vec<u32> = (0..40).map(|i| 97 + i % 8).collect();
        let got = sample(&m, &long, &cfg(20, 0.0, 0)).unwrap();
        // The last 16 tokens alone give the same continuation.
        assert_eq!(got, sample(&m, &long[24..], &cfg(20, 0.0, 0)).unwrap());
    }

    #[test]
    fn bad_requests_are_refused() {
        let m = model();
        for (prompt, c, what) in [
            (vec![], cfg(1, 0.0, 0), "non-empty"),
            (vec![256], cfg(1, 0.0, 0), "vocabulary"),
            (vec![1], cfg(MAX_SAMPLE_TOKENS + 1, 0.0, 0), "at most"),
            (vec![1], cfg(1, -1.0, 0), "temperature"),
            (vec![1], cfg(1, f32::NAN, 0), "temperature"),
            (
                vec![1],
                SampleConfig {
                    top_p: 0.0,
                    ..cfg(1, 1.0, 0)
                },
                "top_p",
            ),
            (
                vec![1],
                SampleConfig {
                    top_p: 1.5,
                    ..cfg(1, 1.0, 0)
                },
                "top_p",
            ),
        ] {
            let e = sample(&m, &prompt, &c).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert!(choose(&[0.0, f32::NAN], 1.0, 1.0, &mut rng).is_err());
        assert!(choose(&[], 0.0, 1.0, &mut rng).is_err());
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.5 keeps the first alone, 0.8
        // the first two; 1.0 draws from all four.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let draw = |p: f32, rng: &mut ChaCha8Rng| -> std::collections::BTreeSet<u32> {
            (0..400)
                .map(|_| choose(&logits, 1.0, p, rng).unwrap())
                .collect()
        };
        assert_eq!(draw(0.5, &mut rng), [0].into());
        assert_eq!(draw(0.8, &mut rng), [0, 1].into());
        assert_eq!(draw(1.0, &mut rng), [0, 1, 2, 3].into());
    }
}
