//! Text generation from a Hugging Face base (with or without adapters): the prompt goes
//! through [`HfModel::forward_cached`] once, then one token at a time against the key/value
//! cache, each next token chosen greedily or by nucleus (top-p) sampling from a seeded
//! ChaCha8 stream, so a sample is reproducible from its seed.
//!
//! The boundary: token ids in, token ids out. Tokenising the prompt and detokenising the
//! output, and the `potluck sample` command line, belong to the caller (the daemon).

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{HfError, HfModel};

type Result<T> = std::result::Result<T, HfError>;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among equals).
    Greedy,
    /// Nucleus sampling: the smallest set of most likely tokens whose probabilities (at
    /// `temperature`) sum to at least `top_p`, renormalised, sampled from a ChaCha8 stream
    /// seeded with `seed`.
    TopP {
        /// In (0, 1].
        top_p: f64,
        /// Positive and finite.
        temperature: f64,
        /// The stream's seed.
        seed: u64,
    },
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// The choice rule.
    pub sampling: Sampling,
    /// Stop after generating this token (it is included in the output).
    pub eos: Option<u32>,
}

impl GenerateConfig {
    fn validate(&self) -> Result<()> {
        if let Sampling::TopP {
            top_p, temperature, ..
        } = self.sampling
        {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(HfError::config(
                    "top_p",
                    format!("{top_p} must be in (0, 1]"),
                ));
            }
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(HfError::config(
                    "temperature",
                    format!("{temperature} must be finite and positive"),
                ));
            }
        }
        Ok(())
    }
}

/// Picks a token from one row of logits.
pub fn choose(logits: &[f32], sampling: Sampling, rng: &mut ChaCha8Rng) -> Result<u32> {
    if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
        return Err(HfError::Input("logits are empty or NaN".into()));
    }
    let argmax = || {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    match sampling {
        Sampling::Greedy => Ok(argmax()),
        Sampling::TopP {
            top_p, temperature, ..
        } => {
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
            let mut probs: Vec<(u32, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, ((v as f64 - max) / temperature).exp()))
                .collect();
            let total: f64 = probs.iter().map(|p| p.1).sum();
            // Most likely first; equal probabilities by id, so the order is deterministic.
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0.0;
            let mut n = 0;
            for (_, p) in &probs {
                kept += p / total;
                n += 1;
                if kept >= top_p {
                    break;
                }
            }
            let nucleus = &probs[..n];
            let mass: f64 = nucleus.iter().map(|p| p.1).sum();
            let mut r = rng.random::<f64>() * mass;
            for (id, p) in nucleus {
                if r < *p {
                    return Ok(*id);
                }
                r -= p;
            }
            Ok(nucleus[n - 1].0)
        }
    }
}

/// Generates up to `cfg.max_new_tokens` tokens after `prompt` with a key/value cache and
/// returns them (the prompt not included).
pub fn generate(model: &HfModel, prompt: &[u32], cfg: &GenerateConfig) -> Result<Vec<u32>> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(HfError::Input("an empty prompt".into()));
    }
    let max = model.config().max_positions;
    if prompt.len() + cfg.max_new_tokens > max {
        return Err(HfError::Input(format!(
            "{} prompt tokens and {} new ones pass max_position_embeddings ({max})",
            prompt.len(),
            cfg.max_new_tokens
        )));
    }
    let seed = match cfg.sampling {
        Sampling::TopP { seed, .. } => seed,
        Sampling::Greedy => 0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cache = model.new_cache();
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    let mut next = Tensor::from_slice(prompt, (1, prompt.len()), model.device())?;
    for _ in 0..cfg.max_new_tokens {
        let logits = model.forward_cached(&next, &mut cache)?;
        let t = logits.dim(1)?;
        let last = logits
            .narrow(1, t - 1, 1)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let id = choose(&last, cfg.sampling, &mut rng)?;
        out.push(id);
        if Some(id) == cfg.eos {
            break;
        }
        next = Tensor::from_slice(&[id], (1, 1), model.device())?;
    }
    Ok(out)
}
