//! Training data: tokenizers (bytes by default, a Hugging Face `tokenizer.json` when given),
//! a synthetic corpus from a Markov source whose entropy rate is computed exactly (so a test
//! can say how close to the best possible loss a model got), text files and directories, and
//! the split into numbered shards (the coordinator picks the shard) plus a held-out split.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::WorkerError;
use crate::checkpoint::read_limited;

/// Largest `tokenizer.json` accepted.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Turns text into token ids.
#[derive(Debug, Clone, Default)]
pub enum Tokenizer {
    /// One token per byte; vocabulary 256.
    #[default]
    Byte,
    /// A Hugging Face tokenizer loaded from `tokenizer.json`.
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, WorkerError> {
        let bytes = read_limited(path, MAX_TOKENIZER_BYTES)?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            WorkerError::Tokenizer(format!(
                "{} is not a usable tokenizer.json: {e}",
                path.display()
            ))
        })?;
        Ok(Tokenizer::HuggingFace(Box::new(tok)))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids of raw bytes. The byte tokenizer takes them as they are; a Hugging Face
    /// tokenizer sees them as UTF-8 (invalid sequences replaced).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>, WorkerError> {
        match self {
            Tokenizer::Byte => Ok(bytes.iter().map(|&b| b as u32).collect()),
            Tokenizer::HuggingFace(t) => {
                let text = String::from_utf8_lossy(bytes);
                let enc = t
                    .encode(text.as_ref(), false)
                    .map_err(|e| WorkerError::Tokenizer(format!("encode failed: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, WorkerError> {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::HuggingFace(t) => t
                .decode(ids, false)
                .map_err(|e| WorkerError::Tokenizer(format!("decode failed: {e}"))),
        }
    }
}

/// The bytes a synthetic source emits, symbol `i` being `SYMBOLS[i]`.
const SYMBOLS: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .";

/// Parameters of the synthetic Markov source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Seed of the transition table (the source itself).
    pub seed: u64,
    /// Distinct symbols (2..=64), emitted as printable bytes.
    pub alphabet: usize,
    /// Markov order: the next symbol depends on this many previous ones (1..=4).
    pub order: usize,
    /// Preferred successors per context (1..=alphabet).
    pub branching: usize,
    /// Probability mass spread uniformly over every symbol (0 < s < 1); it makes the chain
    /// irreducible and aperiodic, so the entropy rate is well defined from any start.
    pub smoothing: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            seed: 1,
            alphabet: 8,
            order: 2,
            branching: 3,
            smoothing: 0.05,
        }
    }
}

/// A random finite-state (order-k Markov) source with an exactly computed entropy rate.
#[derive(Debug, Clone)]
pub struct SyntheticCorpus {
    spec: SyntheticSpec,
    /// `cdf[s * alphabet + c]`: cumulative next-symbol probabilities of context `s`.
    cdf: Vec<f64>,
    entropy_rate: f64,
    /// `H(X_m | X_0..X_{m-1})` for `m` in `1..order`, from the stationary distribution: what
    /// a prediction costs at best when it sees fewer than `order` symbols of context.
    short_context: Vec<f64>,
}

impl SyntheticCorpus {
    /// Builds the source: transition table from `spec.seed`, stationary distribution by power
    /// iteration to f64 precision, and the entropy rate `sum_s pi(s) H(P(.|s))`.
    pub fn new(spec: SyntheticSpec) -> Result<Self, WorkerError> {
        let a = spec.alphabet;
        if !(2..=64).contains(&a) || !(1..=4).contains(&spec.order) {
            return Err(WorkerError::Data(
                "alphabet must be 2..=64 and order 1..=4".into(),
            ));
        }
        if spec.branching == 0 || spec.branching > a {
            return Err(WorkerError::Data(
                "branching must be in 1..=alphabet".into(),
            ));
        }
        if !(spec.smoothing > 0.0 && spec.smoothing < 1.0) {
            return Err(WorkerError::Data("smoothing must be in (0, 1)".into()));
        }
        let states = a.pow(spec.order as u32);
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut probs = vec![0f64; states * a];
        for s in 0..states {
            let mut symbols: Vec<usize> = (0..a).collect();
            for i in 0..spec.branching {
                let j = rng.random_range(i..a);
                symbols.swap(i, j);
            }
            let weights: Vec<f64> = (0..spec.branching)
                .map(|_| rng.random_range(0.1..1.0))
                .collect();
            let total: f64 = weights.iter().sum();
            let row = &mut probs[s * a..(s + 1) * a];
            for p in row.iter_mut() {
                *p = spec.smoothing / a as f64;
            }
            for (w, &c) in weights.iter().zip(&symbols) {
                row[c] += (1.0 - spec.smoothing) * w / total;
            }
        }
        // Stationary distribution of contexts; context s followed by c becomes (s*a + c) mod S.
        let mut pi = vec![1.0 / states as f64; states];
        for _ in 0..100_000 {
            let mut next = vec![0f64; states];
            for s in 0..states {
                for c in 0..a {
                    next[(s * a + c) % states] += pi[s] * probs[s * a + c];
                }
            }
            let diff: f64 = next.iter().zip(&pi).map(|(x, y)| (x - y).abs()).sum();
            pi = next;
            if diff < 1e-15 {
                break;
            }
        }
        let mut entropy_rate = 0f64;
        for s in 0..states {
            let h: f64 = probs[s * a..(s + 1) * a]
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| -p * p.ln())
                .sum();
            entropy_rate += pi[s] * h;
        }
        // The first `j` symbols of a stationary context are its `j` most significant base-`a`
        // digits: H(X_0..X_{j-1}) from the marginal of `pi`, and the conditional entropies
        // as differences.
        let joint_entropy = |j: usize| -> f64 {
            let div = a.pow((spec.order - j) as u32);
            let mut marginal = vec![0f64; a.pow(j as u32)];
            for (s, p) in pi.iter().enumerate() {
                marginal[s / div] += p;
            }
            marginal
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| -p * p.ln())
                .sum()
        };
        let short_context = (1..spec.order)
            .map(|m| joint_entropy(m + 1) - joint_entropy(m))
            .collect();
        let mut cdf = probs;
        for s in 0..states {
            let mut acc = 0f64;
            for c in 0..a {
                acc += cdf[s * a + c];
                cdf[s * a + c] = acc;
            }
        }
        Ok(SyntheticCorpus {
            spec,
            cdf,
            entropy_rate,
            short_context,
        })
    }

    /// The source's entropy rate in nats per byte: the lowest expected loss any model can
    /// reach on its output.
    pub fn entropy_rate_nats_per_byte(&self) -> f64 {
        self.entropy_rate
    }

    /// The lowest expected loss per prediction, in nats per byte, on windows of `seq_len`
    /// next-byte predictions cut from a stationary stream with nothing seen before the window
    /// (how `eval_loss` measures): the first `order - 1` predictions lack part of their
    /// context, so this lies above the entropy rate, by less the longer the window.
    pub fn window_floor_nats_per_byte(&self, seq_len: usize) -> f64 {
        if seq_len == 0 {
            return self.entropy_rate;
        }
        let short: f64 = self.short_context.iter().take(seq_len).sum();
        let full = seq_len.saturating_sub(self.short_context.len());
        (short + full as f64 * self.entropy_rate) / seq_len as f64
    }

    /// The source's parameters.
    pub fn spec(&self) -> &SyntheticSpec {
        &self.spec
    }

    /// `len` bytes of stream number `stream` (distinct streams are independent samples of the
    /// same source), after a burn-in so the start is close to stationary.
    pub fn generate(&self, len: usize, stream: u64) -> Vec<u8> {
        let a = self.spec.alphabet;
        let states = self.cdf.len() / a;
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed ^ 0x5eed_0000_0000_0000 ^ stream);
        rng.set_stream(stream);
        let mut s = rng.random_range(0..states);
        let mut out = Vec::with_capacity(len);
        for i in 0..len + 1024 {
            let u: f64 = rng.random();
            let row = &self.cdf[s * a..(s + 1) * a];
            let c = row.iter().position(|&x| u < x).unwrap_or(a - 1);
            s = (s * a + c) % states;
            if i >= 1024 {
                out.push(SYMBOLS[c]);
            }
        }
        out
    }
}

/// One batch: input ids and next-token target ids, each `batch * seq_len`, row-major.
pub type Batch = (Vec<u32>, Vec<u32>);

/// Token streams split into numbered training shards and a held-out evaluation split.
#[derive(Debug, Clone)]
pub struct Dataset {
    train: Vec<u32>,
    eval: Vec<u32>,
    vocab: usize,
    num_shards: u64,
}

impl Dataset {
    /// A dataset from token ids. Every id must be below `vocab`.
    pub fn from_tokens(
        train: Vec<u32>,
        eval: Vec<u32>,
        vocab: usize,
        num_shards: u64,
    ) -> Result<Self, WorkerError> {
        if num_shards == 0 || num_shards > train.len() as u64 {
            return Err(WorkerError::Data(format!(
                "{num_shards} shards for {} training tokens",
                train.len()
            )));
        }
        if let Some(bad) = train.iter().chain(&eval).find(|&&t| t as usize >= vocab) {
            return Err(WorkerError::Data(format!(
                "token {bad} is outside the vocabulary {vocab}"
            )));
        }
        Ok(Dataset {
            train,
            eval,
            vocab,
            num_shards,
        })
    }

    /// The built-in corpus: `train_len` bytes for training (stream 0) and an independent
    /// `eval_len`-byte held-out stream (stream 1), byte tokenizer.
    pub fn synthetic(
        corpus: &SyntheticCorpus,
        train_len: usize,
        eval_len: usize,
        num_shards: u64,
    ) -> Result<Self, WorkerError> {
        let tok = |b: Vec<u8>| b.into_iter().map(u32::from).collect::<Vec<u32>>();
        Self::from_tokens(
            tok(corpus.generate(train_len, 0)),
            tok(corpus.generate(eval_len, 1)),
            256,
            num_shards,
        )
    }

    /// Text from a file, or every regular file under a directory (recursively, in path
    /// order), tokenized; the last `eval_fraction` of the tokens is held out. Reading stops
    /// with an error past `max_bytes` in total.
    pub fn from_path(
        path: &Path,
        tokenizer: &Tokenizer,
        num_shards: u64,
        eval_fraction: f64,
        max_bytes: u64,
    ) -> Result<Self, WorkerError> {
        let files = text_files(path)?;
        Self::from_files(&files, tokenizer, num_shards, eval_fraction, max_bytes)
    }

    /// Text from `files`, read and tokenized in the order given (each file on its own, as
    /// [`Self::from_path`] does); the last `eval_fraction` of the tokens is held out.
    pub fn from_files(
        files: &[PathBuf],
        tokenizer: &Tokenizer,
        num_shards: u64,
        eval_fraction: f64,
        max_bytes: u64,
    ) -> Result<Self, WorkerError> {
        if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
            return Err(WorkerError::Data("eval_fraction must be in (0, 1)".into()));
        }
        if files.is_empty() {
            return Err(WorkerError::Data("no text files given".into()));
        }
        let mut tokens = Vec::new();
        let mut total = 0u64;
        for f in files {
            let left = max_bytes.saturating_sub(total);
            let bytes = read_limited(f, left).map_err(|_| {
                WorkerError::Data(format!(
                    "text input is larger than the limit of {max_bytes} bytes (at {})",
                    f.display()
                ))
            })?;
            total += bytes.len() as u64;
            tokens.extend(tokenizer.encode_bytes(&bytes)?);
        }
        let n_eval = ((tokens.len() as f64) * eval_fraction).ceil() as usize;
        if tokens.len() < 4 || n_eval >= tokens.len() {
            return Err(WorkerError::Data("too little text to split".into()));
        }
        let eval = tokens.split_off(tokens.len() - n_eval);
        Self::from_tokens(tokens, eval, tokenizer.vocab_size(), num_shards)
    }

    /// Vocabulary size the tokens were produced with.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Number of training shards.
    pub fn num_shards(&self) -> u64 {
        self.num_shards
    }

    /// The tokens of training shard `shard` (contiguous, near-equal slices of the stream).
    pub fn shard_tokens(&self, shard: u64) -> Result<&[u32], WorkerError> {
        if shard >= self.num_shards {
            return Err(WorkerError::Data(format!(
                "shard {shard} does not exist (there are {})",
                self.num_shards
            )));
        }
        let len = self.train.len() as u128;
        let n = self.num_shards as u128;
        let start = (shard as u128 * len / n) as usize;
        let end = ((shard as u128 + 1) * len / n) as usize;
        Ok(&self.train[start..end])
    }

    /// The held-out tokens.
    pub fn eval_tokens(&self) -> &[u32] {
        &self.eval
    }

    /// A batch of `batch` random windows of shard `shard`: inputs and next-token targets,
    /// each `batch * seq_len` ids, row-major.
    pub fn sample_batch(
        &self,
        shard: u64,
        batch: usize,
        seq_len: usize,
        rng: &mut impl Rng,
    ) -> Result<Batch, WorkerError> {
        let tokens = self.shard_tokens(shard)?;
        if tokens.len() < seq_len + 1 {
            return Err(WorkerError::Data(format!(
                "shard {shard} has {} tokens, fewer than one window of {}",
                tokens.len(),
                seq_len + 1
            )));
        }
        let mut inputs = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let start = rng.random_range(0..=tokens.len() - seq_len - 1);
            inputs.extend_from_slice(&tokens[start..start + seq_len]);
            targets.extend_from_slice(&tokens[start + 1..start + seq_len + 1]);
        }
        Ok((inputs, targets))
    }

    /// Up to `max_batches` full batches of consecutive windows of the held-out split, the
    /// same on every call.
    pub fn eval_batches(
        &self,
        batch: usize,
        seq_len: usize,
        max_batches: usize,
    ) -> Result<Vec<Batch>, WorkerError> {
        let windows = self.eval.len().saturating_sub(1) / seq_len.max(1);
        let n_batches = (windows / batch.max(1)).min(max_batches);
        if n_batches == 0 {
            return Err(WorkerError::Data(format!(
                "held-out split of {} tokens holds no batch of {batch} x {seq_len}",
                self.eval.len()
            )));
        }
        let mut out = Vec::with_capacity(n_batches);
        for b in 0..n_batches {
            let mut inputs = Vec::with_capacity(batch * seq_len);
            let mut targets = Vec::with_capacity(batch * seq_len);
            for r in 0..batch {
                let start = (b * batch + r) * seq_len;
                inputs.extend_from_slice(&self.eval[start..start + seq_len]);
                targets.extend_from_slice(&self.eval[start + 1..start + seq_len + 1]);
            }
            out.push((inputs, targets));
        }
        Ok(out)
    }
}

/// The text files of a path source in the order [`Dataset::from_path`] reads them: the file
/// itself, or every regular file under the directory (recursively), sorted by path.
pub fn text_files(path: &Path) -> Result<Vec<PathBuf>, WorkerError> {
    let mut files = Vec::new();
    collect_files(path, &mut files, 0)?;
    files.sort();
    if files.is_empty() {
        return Err(WorkerError::Data(format!(
            "no files under {}",
            path.display()
        )));
    }
    Ok(files)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<(), WorkerError> {
    if depth > 32 {
        return Err(WorkerError::Data(format!(
            "{} is nested too deeply",
            path.display()
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| WorkerError::io(path, e))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
    } else if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| WorkerError::io(path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| WorkerError::io(path, e))?;
            collect_files(&entry.path(), out, depth + 1)?;
        }
    }
    Ok(())
}
