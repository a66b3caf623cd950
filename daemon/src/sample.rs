//! `potluck sample`: text from a model on disk, so a user can see what a base, a base with
//! PEFT adapters, or a swarm's checkpoint writes. The directory says which it is: a
//! `config.json` whose `format` is the worker's checkpoint format is a Potluck checkpoint
//! (the worker's own model, sampled by `potluck_worker::sample`, tokens as bytes unless a
//! `tokenizer.json` is given or lies beside it); any other `config.json` is a Hugging Face
//! base, loaded memory-mapped by `hf::load_model`, its adapters (if asked for) read by
//! `hf::export::load_peft`, and sampled with the key/value cache of `hf::generate`.
//!
//! The boundary: this module resolves paths and flags, tokenises the prompt, checks what a
//! file could get wrong before any model runs on it (a prompt past the context, token ids
//! past the vocabulary, a tokenizer that is not this model's) and detokenises; the choice of
//! each token belongs to the worker's generators. Every file it reads is size-checked before
//! it is read; every failure is a [`SampleError`] that says what to do.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::Args;
use potluck_worker::hf::generate::{GenerateConfig, Sampling};
use potluck_worker::hf::{self, HfError};
use potluck_worker::sample::{MAX_SAMPLE_TOKENS, SampleConfig};
use potluck_worker::{DeviceSpec, Replica, Tokenizer, WorkerError};
use serde::Serialize;

/// Largest prompt accepted, in bytes of text (before tokenising).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;
/// Most tokens one sample generates (a Hugging Face base also stops at its context's end).
pub const MAX_NEW_TOKENS: usize = MAX_SAMPLE_TOKENS;
/// The tokenizer's file name in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// `potluck sample`'s command line.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// A Hugging Face model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json) or a Potluck checkpoint directory.
    pub path: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) to
    /// put on the Hugging Face base first.
    #[arg(long, value_name = "DIR")]
    pub adapters: Option<PathBuf>,
    /// The tokenizer.json to use (default: the one in PATH; a checkpoint without one and a
    /// 256-token vocabulary is sampled as bytes).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Tokens to generate at most (a Hugging Face base also stops at its end-of-text token
    /// and at the end of its context).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Nucleus sampling: draw from the smallest set of most likely tokens whose
    /// probabilities sum to at least this, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Softmax temperature, positive.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Pick the most likely token every time (deterministic; ignores the seed).
    #[arg(long, conflicts_with_all = ["top_p", "temperature"])]
    pub greedy: bool,
    /// Seed of the sampling stream: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run on this device: cpu, cuda (the first GPU) or cuda:N (needs a `cuda` build).
    #[arg(long, value_name = "cpu|cuda|cuda:N", default_value = "cpu")]
    pub device: String,
    /// Print the result as JSON (token ids included).
    #[arg(long)]
    pub json: bool,
}

/// What `potluck sample` can fail on, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// PATH is not a model directory.
    #[error(
        "{path} {reason}: give a Hugging Face model directory (config.json, model.safetensors, \
         tokenizer.json) or a Potluck checkpoint directory"
    )]
    NotAModel {
        /// The path given.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A flag's value is out of range or does not apply to this kind of model.
    #[error("{0}")]
    Usage(String),
    // The wrapped errors are named `error`, not `source`: each message is whole on its own
    // line, where a source would print twice in the binary's `{:#}` chain.
    /// Loading or running the Hugging Face base failed.
    #[error("the Hugging Face model in {path}: {error}")]
    Hf {
        /// The base's directory.
        path: PathBuf,
        /// What went wrong.
        error: HfError,
    },
    /// The adapters do not load onto this base.
    #[error("the adapters in {dir} do not load onto this base: {error}{}", adapter_hint(.error))]
    Adapters {
        /// The adapter directory.
        dir: PathBuf,
        /// What went wrong.
        error: HfError,
    },
    /// Loading or running the Potluck checkpoint failed.
    #[error("the Potluck checkpoint in {path}: {error}")]
    Checkpoint {
        /// The checkpoint's directory.
        path: PathBuf,
        /// What went wrong.
        error: WorkerError,
    },
    /// The tokenizer is missing, unreadable or fails on the prompt.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The tokenizer produced an id the model has no embedding for.
    #[error(
        "the tokenizer gives token id {id}, past the model's vocabulary of {vocab}: it is not \
         this model's tokenizer (pass the right one with --tokenizer)"
    )]
    Vocab {
        /// The id.
        id: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// The prompt fills the model's context: nothing could be generated.
    #[error(
        "the prompt is {tokens} tokens and the model's context is {context}: shorten the prompt \
         to fewer than {context} tokens"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// The model's `max_position_embeddings`.
        context: usize,
    },
}

/// What to do about adapters that do not fit: shapes or modules the base does not have
/// mean another base's adapters.
fn adapter_hint(e: &HfError) -> &'static str {
    match e {
        HfError::Shape { .. } | HfError::MissingTensor { .. } => {
            " (were they trained on another base?)"
        }
        HfError::Config { field, .. } if field == "target_modules" => {
            " (were they trained on another architecture?)"
        }
        _ => "",
    }
}

/// Which kind of model a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A Hugging Face base.
    HfBase,
    /// A Hugging Face base with PEFT adapters.
    HfAdapted,
    /// The worker's own model, from a Potluck checkpoint.
    Checkpoint,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// `--max-new-tokens` were generated.
    Length,
    /// The model wrote its end-of-text token.
    Eos,
    /// The model's context is full.
    Context,
}

/// One sample.
#[derive(Debug, Clone, Serialize)]
pub struct Sampled {
    /// What was sampled.
    pub model: ModelKind,
    /// The prompt's token ids.
    pub prompt_tokens: Vec<u32>,
    /// The generated token ids (an end-of-text token included).
    pub tokens: Vec<u32>,
    /// The generated tokens as text.
    pub completion: String,
    /// The prompt and the generated tokens as text.
    pub text: String,
    /// Why it stopped.
    pub stop: Stop,
}

/// Runs `potluck sample` and prints its result.
pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    let s = sample(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        if s.stop == Stop::Context {
            eprintln!(
                "note: stopped after {} tokens at the end of the model's context",
                s.tokens.len()
            );
        }
        println!("{}", s.text);
    }
    Ok(())
}

/// Generates one sample as `args` asks.
pub fn sample(args: &SampleArgs) -> Result<Sampled, SampleError> {
    if args.prompt.is_empty() {
        return Err(SampleError::Usage(
            "--prompt is empty: give text to continue".into(),
        ));
    }
    if args.prompt.len() > MAX_PROMPT_BYTES {
        return Err(SampleError::Usage(format!(
            "--prompt is {} bytes, more than the limit of {MAX_PROMPT_BYTES}",
            args.prompt.len()
        )));
    }
    if args.max_new_tokens == 0 || args.max_new_tokens > MAX_NEW_TOKENS {
        return Err(SampleError::Usage(format!(
            "--max-new-tokens {} must be in 1..={MAX_NEW_TOKENS}",
            args.max_new_tokens
        )));
    }
    if !args.greedy {
        if !(args.top_p > 0.0 && args.top_p <= 1.0) {
            return Err(SampleError::Usage(format!(
                "--top-p {} must be in (0, 1]",
                args.top_p
            )));
        }
        if !(args.temperature.is_finite() && args.temperature > 0.0) {
            return Err(SampleError::Usage(format!(
                "--temperature {} must be positive and finite (--greedy for the most likely \
                 token)",
                args.temperature
            )));
        }
    }
    let device = crate::config::parse_device(&args.device)
        .map_err(|e| SampleError::Usage(format!("--device: {e}")))?;
    let config = read_config(&args.path)?;
    if is_checkpoint(&config) {
        sample_checkpoint(args, &device)
    } else {
        sample_hf(args, &device, &config)
    }
}

/// The text of `dir/config.json`, bounded, with a [`SampleError::NotAModel`] for a path
/// that is no model directory at all.
fn read_config(dir: &Path) -> Result<String, SampleError> {
    let not = |reason: &str| SampleError::NotAModel {
        path: dir.into(),
        reason: reason.into(),
    };
    if !dir.exists() {
        return Err(not("does not exist"));
    }
    if !dir.is_dir() {
        return Err(not("is not a directory"));
    }
    let path = dir.join(hf::CONFIG_FILE);
    if !path.is_file() {
        return Err(not("has no config.json"));
    }
    let io = |e: std::io::Error| not(&format!("has a config.json that cannot be read ({e})"));
    let limit = hf::config::MAX_CONFIG_BYTES;
    // One byte past the limit at most, whatever the file claims or becomes while read.
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut text))
        .map_err(io)?;
    if text.len() as u64 > limit {
        return Err(not(&format!(
            "has a config.json of more than {limit} bytes"
        )));
    }
    String::from_utf8(text).map_err(|_| not("has a config.json that is not UTF-8 text"))
}

/// Whether a `config.json` is a Potluck checkpoint's. Anything else (invalid JSON included)
/// goes to the Hugging Face loader, whose errors name the field.
fn is_checkpoint(config: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(config)
        .ok()
        .and_then(|v| {
            v.get("format")?
                .as_str()
                .map(|f| f == potluck_worker::replica::FORMAT)
        })
        .unwrap_or(false)
}

/// The end-of-text ids of a Hugging Face `config.json`: `eos_token_id`, a number or a list.
fn eos_ids(config: &str) -> Vec<u32> {
    let v: serde_json::Value = match serde_json::from_str(config) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let id = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match v.get("eos_token_id") {
        Some(serde_json::Value::Array(list)) => list.iter().filter_map(id).collect(),
        Some(one) => id(one).into_iter().collect(),
        None => Vec::new(),
    }
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, SampleError> {
    if !path.is_file() {
        return Err(SampleError::Tokenizer {
            path: path.into(),
            reason: "not found: pass the model's tokenizer.json with --tokenizer".into(),
        });
    }
    Tokenizer::from_file(path).map_err(|e| SampleError::Tokenizer {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The prompt's ids (with the tokenizer's special tokens, as `transformers` adds them for
/// a Hugging Face base), each checked against `vocab`.
fn encode(
    tok: &Tokenizer,
    tok_path: &Path,
    prompt: &str,
    vocab: usize,
) -> Result<Vec<u32>, SampleError> {
    let bad = |reason: String| SampleError::Tokenizer {
        path: tok_path.into(),
        reason,
    };
    let ids = match tok {
        Tokenizer::Byte => prompt.bytes().map(u32::from).collect(),
        Tokenizer::HuggingFace(t) => t
            .encode(prompt, true)
            .map_err(|e| bad(format!("cannot tokenise the prompt: {e}")))?
            .get_ids()
            .to_vec(),
    };
    if ids.is_empty() {
        return Err(bad(
            "the prompt tokenises to nothing: give other text".into()
        ));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(SampleError::Vocab { id, vocab });
    }
    Ok(ids)
}

/// Text of ids, special tokens left out.
fn decode(tok: &Tokenizer, tok_path: &Path, ids: &[u32]) -> Result<String, SampleError> {
    match tok {
        Tokenizer::Byte => tok.decode(ids).map_err(|e| e.to_string()),
        Tokenizer::HuggingFace(t) => t.decode(ids, true).map_err(|e| e.to_string()),
    }
    .map_err(|reason| SampleError::Tokenizer {
        path: tok_path.into(),
        reason: format!("cannot decode the output: {reason}"),
    })
}

fn sample_hf(args: &SampleArgs, device: &DeviceSpec, config: &str) -> Result<Sampled, SampleError> {
    let hf_err = |error| SampleError::Hf {
        path: args.path.clone(),
        error,
    };
    let dev = device
        .device()
        .map_err(|e| SampleError::Usage(e.to_string()))?;
    // The tokenizer first: it is cheap, and its absence should not wait on a large load.
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| args.path.join(TOKENIZER_FILE));
    let tok = load_tokenizer(&tok_path)?;
    let mut model = hf::load_model(&args.path, None, &dev).map_err(hf_err)?;
    let kind = match &args.adapters {
        None => ModelKind::HfBase,
        Some(dir) => {
            let missing = if !dir.is_dir() {
                Some("is not a directory")
            } else if !dir.join(hf::export::ADAPTER_CONFIG).is_file() {
                Some("has no adapter_config.json")
            } else {
                None
            };
            if let Some(what) = missing {
                return Err(SampleError::Usage(format!(
                    "--adapters {} {what}: give a PEFT adapter directory \
                     (adapter_config.json, adapter_model.safetensors)",
                    dir.display()
                )));
            }
            hf::export::load_peft(&mut model, dir).map_err(|error| SampleError::Adapters {
                dir: dir.clone(),
                error,
            })?;
            ModelKind::HfAdapted
        }
    };
    let mc = model.config();
    let prompt = encode(&tok, &tok_path, &args.prompt, mc.vocab)?;
    let context = mc.max_positions;
    if prompt.len() >= context {
        return Err(SampleError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let room = context - prompt.len();
    let max_new_tokens = args.max_new_tokens.min(room);
    let eos = eos_ids(config);
    let cfg = GenerateConfig {
        max_new_tokens,
        sampling: if args.greedy {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                top_p: args.top_p,
                temperature: args.temperature,
                seed: args.seed,
            }
        },
        // `generate` stops on one id; any other end-of-text id ends the text below.
        eos: eos.first().copied(),
    };
    let mut tokens = hf::generate::generate(&model, &prompt, &cfg).map_err(hf_err)?;
    let mut stop = if max_new_tokens < args.max_new_tokens {
        Stop::Context
    } else {
        Stop::Length
    };
    if let Some(end) = tokens.iter().position(|t| eos.contains(t)) {
        tokens.truncate(end + 1);
        stop = Stop::Eos;
    }
    finish(kind, &tok, &tok_path, prompt, tokens, stop)
}

fn sample_checkpoint(args: &SampleArgs, device: &DeviceSpec) -> Result<Sampled, SampleError> {
    if let Some(dir) = &args.adapters {
        return Err(SampleError::Usage(format!(
            "--adapters {} applies to Hugging Face bases; {} is a Potluck checkpoint, which \
             holds its adapters (if any) itself",
            dir.display(),
            args.path.display()
        )));
    }
    let replica =
        Replica::load_checkpoint(&args.path, device).map_err(|error| SampleError::Checkpoint {
            path: args.path.clone(),
            error,
        })?;
    let Some(model) = replica.model() else {
        return Err(SampleError::Usage(format!(
            "{} is an adapter run's checkpoint, which `potluck sample` does not read yet: \
             sample its base directory instead",
            args.path.display()
        )));
    };
    let vocab = model.config().vocab;
    let beside = args.path.join(TOKENIZER_FILE);
    let (tok, tok_path) = match &args.tokenizer {
        Some(p) => (load_tokenizer(p)?, p.clone()),
        None if beside.is_file() => (load_tokenizer(&beside)?, beside),
        None if vocab == 256 => (Tokenizer::Byte, PathBuf::from("(bytes)")),
        None => {
            return Err(SampleError::Tokenizer {
                path: beside,
                reason: format!(
                    "not found, and the checkpoint's vocabulary is {vocab} tokens, not bytes: \
                     pass the run's tokenizer.json with --tokenizer"
                ),
            });
        }
    };
    let prompt = encode(&tok, &tok_path, &args.prompt, vocab)?;
    // The worker's sampler takes f32 settings; the flags were checked above.
    let cfg = SampleConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: if args.greedy {
            0.0
        } else {
            args.temperature as f32
        },
        top_p: if args.greedy { 1.0 } else { args.top_p as f32 },
        seed: args.seed,
    };
    let tokens = potluck_worker::sample::sample(model, &prompt, &cfg).map_err(|error| {
        SampleError::Checkpoint {
            path: args.path.clone(),
            error,
        }
    })?;
    finish(
        ModelKind::Checkpoint,
        &tok,
        &tok_path,
        prompt,
        tokens,
        Stop::Length,
    )
}

fn finish(
    model: ModelKind,
    tok: &Tokenizer,
    tok_path: &Path,
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    stop: Stop,
) -> Result<Sampled, SampleError> {
    let completion = decode(tok, tok_path, &tokens)?;
    let all: Vec<u32> = prompt_tokens.iter().chain(&tokens).copied().collect();
    let text = decode(tok, tok_path, &all)?;
    Ok(Sampled {
        model,
        prompt_tokens,
        tokens,
        completion,
        text,
        stop,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_config_is_told_from_a_hugging_face_one() {
        let ckpt = format!(
            r#"{{"format": "{}", "version": 1}}"#,
            potluck_worker::replica::FORMAT
        );
        assert!(is_checkpoint(&ckpt));
        assert!(!is_checkpoint(r#"{"architectures": ["LlamaForCausalLM"]}"#));
        assert!(!is_checkpoint(r#"{"format": "something-else"}"#));
        assert!(!is_checkpoint("not json"));
    }

    #[test]
    fn eos_ids_take_a_number_or_a_list() {
        assert_eq!(eos_ids(r#"{"eos_token_id": 2}"#), vec![2]);
        assert_eq!(
            eos_ids(r#"{"eos_token_id": [128001, 128009]}"#),
            vec![128001, 128009]
        );
        assert!(eos_ids(r#"{"eos_token_id": null}"#).is_empty());
        assert!(eos_ids(r#"{"eos_token_id": -1}"#).is_empty());
        assert!(eos_ids("{}").is_empty());
    }

    #[test]
    fn bytes_encode_within_the_vocabulary_and_past_it_are_refused() {
        let p = Path::new("(bytes)");
        assert_eq!(
            encode(&Tokenizer::Byte, p, "ab", 256).unwrap(),
            vec![97, 98]
        );
        let err = encode(&Tokenizer::Byte, p, "ab", 98).unwrap_err();
        assert!(
            matches!(err, SampleError::Vocab { id: 98, vocab: 98 }),
            "{err}"
        );
    }
}
