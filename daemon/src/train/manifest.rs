//! Run manifests: what a training run is, as a TOML file a user writes and as the canonical
//! bytes whose blake3 hash is the run id.
//!
//! The TOML names a model preset (or a full model table), the data source, the inner and outer
//! optimizer settings, H, the update codec, the round deadline and the minimum number of
//! peers. [`RunManifest::resolve`] turns it into a [`ResolvedRun`], with every default filled
//! in; the canonical encoding is the JSON of that resolved struct (struct fields in declaration
//! order, no maps), so two peers that agree on the resolved settings agree on the run id.

use std::path::{Path, PathBuf};

use potluck_coordinator::aggregate::Aggregation;
use potluck_worker::adapters::AdapterConfig;
use potluck_worker::compress::Codec;
use potluck_worker::{Dataset, ModelConfig, SyntheticCorpus, SyntheticSpec, TrainConfig};
use serde::{Deserialize, Serialize};

/// Upper bound on a manifest's size, checked before parsing.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Upper bound on the text a run may read from a path.
pub const MAX_DATA_BYTES: u64 = 4 << 30;

/// Whether runs overlap communication with computation unless their manifest says.
pub const DEFAULT_OVERLAP: bool = false;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("run manifest is {0} bytes, more than the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("run manifest is not valid TOML for a run: {0}")]
    Parse(String),
    #[error("run manifest key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("run data: {0}")]
    Data(String),
    #[error("run base: {0}")]
    Base(String),
}

/// The model of a run: a preset name or a full table.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Preset(String),
    Full(Box<ModelConfig>),
}

/// Where a run's data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `builtin` for the synthetic corpus, or a path to a text file or directory.
    pub source: String,
    /// Bytes of the training split (builtin) and of the held-out split.
    pub train_bytes: usize,
    pub eval_bytes: usize,
    /// Number of data shards the coordinator assigns.
    pub shards: u64,
    /// Held-out fraction for path sources.
    pub eval_fraction: f64,
    /// blake3 of the token stream (hex); empty in a user's file means "compute it", and a
    /// peer whose data hashes otherwise refuses to train.
    #[serde(default)]
    pub hash: String,
    /// The synthetic source's parameters (builtin only).
    #[serde(default)]
    pub synthetic: Option<SyntheticSpec>,
    /// A Hugging Face `tokenizer.json` for a path source (bytes when absent). Every peer
    /// needs the same file: `hash` covers the tokens it produces, so a peer whose tokenizer
    /// differs refuses to train.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Root (hex) of the run's data package: the source's files and the tokenizer, hashed
    /// as one checkpoint-style content (see [`super::datapack`]). Empty in a user's file
    /// means "compute it"; a peer without the data fetches the package from the swarm by
    /// this root. The built-in corpus has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root: String,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            source: "builtin".into(),
            train_bytes: 600_000,
            eval_bytes: 40_000,
            shards: 12,
            eval_fraction: 0.05,
            hash: String::new(),
            synthetic: None,
            tokenizer: None,
            root: String::new(),
        }
    }
}

/// The frozen Hugging Face base an adapter run fine-tunes: a directory with `config.json`,
/// `model.safetensors` (or a sharded index and its shards) and, usually, `tokenizer.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSpec {
    /// The base's directory on the starter's disk (peers without it fetch it by `root`).
    pub path: String,
    /// Root (hex) of the base's files hashed as one checkpoint-style content (see
    /// [`super::basepack`]). Empty in a user's file means "compute it"; a peer whose copy
    /// has another root does not use it, and a starter whose files have another root than
    /// the one written here is refused.
    #[serde(default)]
    pub root: String,
    /// The base's vocabulary size, read from its `config.json` when the run is pinned.
    #[serde(default)]
    pub vocab: usize,
}

/// Inner optimizer overrides of a manifest; unset keys keep [`TrainConfig::default`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerSpec {
    pub lr: Option<f32>,
    pub warmup_steps: Option<u64>,
    pub weight_decay: Option<f32>,
    pub grad_clip: Option<f32>,
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
}

/// Outer optimizer settings (Nesterov, as in DiLoCo).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OuterSpec {
    pub lr: f32,
    pub momentum: f32,
}

impl Default for OuterSpec {
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

impl OuterSpec {
    /// Checks the ranges: a run manifest's TOML and a peer's canonical JSON both go through
    /// here (the JSON once took an infinite momentum; found by the run_manifest fuzz target).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |key, reason: String| ManifestError::Invalid { key, reason };
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(invalid(
                "outer.lr",
                format!("{} must be in (0, 10]", self.lr),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(invalid(
                "outer.momentum",
                format!("{} must be in [0, 1)", self.momentum),
            ));
        }
        Ok(())
    }
}

/// A run manifest as written in TOML.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunManifest {
    pub name: String,
    pub seed: Option<u64>,
    pub model: Option<ModelSpec>,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub inner: InnerSpec,
    #[serde(default)]
    pub outer: OuterSpec,
    /// Inner steps per round (H).
    pub inner_steps: Option<usize>,
    pub rounds: Option<u64>,
    /// `none`, `int8`, `topk`, `sign` or with parameters (`int8:BLOCK`, `topk:CHUNK:K:BITS`,
    /// `sign:BLOCK`; see the worker's `compress` module).
    pub compression: Option<String>,
    pub round_deadline_secs: Option<u64>,
    pub min_peers: Option<usize>,
    /// Exchange each round's update during the next round's training, applying it one
    /// round late (see docs/ARCHITECTURE.md, "Overlap").
    pub overlap: Option<bool>,
    /// `diloco` (the default) or `data-parallel`.
    pub mode: Option<RunMode>,
    /// How each slice's reducer combines the accepted contributions: `mean` (the default),
    /// `trimmed-mean[:TRIM]` or `centred-clip[:TAU:ITERS]` (the coordinator crate's
    /// `robust` module). The default is `mean` whatever the swarm: whether a daemon is in
    /// the public swarm is its own setting, not the run's, and a default that followed it
    /// would give one manifest two run ids. A run meant for the public swarm should say
    /// `centred-clip` (the rule `Aggregation::PUBLIC_DEFAULT` names; docs/ARCHITECTURE.md).
    pub aggregation: Option<String>,
    /// Any text that tells this run apart from another of the same settings (a new run id);
    /// `potluck run start --fresh` sets a random one.
    pub instance: Option<String>,
    /// The frozen base of an adapter run (with `[adapters]`).
    pub base: Option<BaseSpec>,
    /// LoRA adapters on `[base]`, PEFT's names: the only parameters the run trains and
    /// exchanges.
    pub adapters: Option<AdapterConfig>,
}

/// The longest `instance` text.
pub const MAX_INSTANCE_CHARS: usize = 128;

/// How the replicas of a run train together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunMode {
    /// DiLoCo: H inner AdamW steps alone, then one sharded exchange of the (compressed)
    /// pseudo-gradients and an outer Nesterov step.
    #[default]
    Diloco,
    /// Plain data parallel, the baseline DiLoCo is measured against: every inner step, the
    /// replicas' f32 gradients are averaged by the same sharded reduction and every replica
    /// applies the mean with its inner AdamW. The outer optimizer is not used.
    DataParallel,
}

impl RunMode {
    /// Whether this is the default mode (which the canonical encoding leaves out, so that the
    /// ids of DiLoCo runs did not change when data-parallel runs were added).
    pub fn is_diloco(&self) -> bool {
        *self == RunMode::Diloco
    }
}

/// A manifest with every default filled in and every value checked: what the run id hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedRun {
    pub name: String,
    /// The worker's own model; for an adapter run (`base` set), the default preset, unused.
    pub model: ModelConfig,
    pub data: DataSpec,
    pub inner: TrainConfig,
    pub outer: OuterSpec,
    pub inner_steps: usize,
    pub rounds: u64,
    pub compression: String,
    pub round_deadline_secs: u64,
    pub min_peers: usize,
    /// Whether the outer update is applied one round late, its exchange overlapping the
    /// next round's training. Left out of the canonical encoding when off, so that the ids
    /// of runs from before the setting existed do not change.
    #[serde(default, skip_serializing_if = "is_false")]
    pub overlap: bool,
    #[serde(default, skip_serializing_if = "RunMode::is_diloco")]
    pub mode: RunMode,
    /// The reducers' rule, in its canonical text (`Aggregation`'s display). Left out of the
    /// canonical encoding when it is `mean`, so that the ids of runs from before the setting
    /// existed do not change; any other rule is part of the run id, so every replica reduces
    /// with the same one.
    #[serde(default = "mean_text", skip_serializing_if = "is_mean_text")]
    pub aggregation: String,
    /// Tells this run apart from another of the same settings. Left out of the canonical
    /// encoding when unset, so that older run ids do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The frozen base of an adapter run; `None` (and left out of the encoding) when the
    /// run trains the worker's own model, `model` above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseSpec>,
    /// The adapters an adapter run trains on `base`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<AdapterConfig>,
}

/// Longest `inner.seq_len` an adapter run accepts before its base is read; the base's own
/// `max_position_embeddings` is checked when the run is pinned and when a replica loads it.
pub const MAX_ADAPTER_SEQ_LEN: usize = 1 << 17;

/// The model the inner settings are checked against: the run's own, or for an adapter run
/// (whose `model` is the unused default) one whose context is [`MAX_ADAPTER_SEQ_LEN`].
fn inner_bounds(model: &ModelConfig, adapters: bool) -> ModelConfig {
    let mut m = model.clone();
    if adapters {
        m.context = MAX_ADAPTER_SEQ_LEN;
    }
    m
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn mean_text() -> String {
    Aggregation::Mean.to_string()
}

fn is_mean_text(s: &str) -> bool {
    s == mean_text()
}

/// The embedded default run of `potluck demo`: a small MoE model on the built-in corpus,
/// tuned to learn visibly in about a minute on 2 cores (docs/BENCHMARKS.md, "The demo").
pub const DEMO_MANIFEST: &str = r#"
name = "demo"
seed = 7
model = "tiny"
inner_steps = 25
rounds = 16
compression = "sign"
round_deadline_secs = 300
min_peers = 2

[inner]
lr = 0.003
warmup_steps = 10
batch_size = 8
seq_len = 64

# Plain averaging of the replicas' updates: over 16 short rounds an outer momentum (DiLoCo's
# 0.9, or 0.3) delays leaving the uniform-prediction plateau and costs most of the run.
[outer]
lr = 1.0
momentum = 0.0
"#;

impl RunManifest {
    /// Parses a manifest, refusing oversized input before parsing.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(text.len()));
        }
        toml::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))
    }

    /// Fills in defaults and checks every value.
    pub fn resolve(&self) -> Result<ResolvedRun, ManifestError> {
        let invalid = |key, reason: String| ManifestError::Invalid { key, reason };
        let model = match &self.model {
            None => ModelConfig::tiny(),
            Some(ModelSpec::Preset(p)) => match p.as_str() {
                "tiny" => ModelConfig::tiny(),
                "small" => ModelConfig::small(),
                "base" => ModelConfig::base(),
                other => {
                    return Err(invalid(
                        "model",
                        format!("unknown preset '{other}': use tiny, small, base or a table"),
                    ));
                }
            },
            Some(ModelSpec::Full(m)) => (**m).clone(),
        };
        model
            .validate()
            .map_err(|e| invalid("model", e.to_string()))?;
        let mut inner = TrainConfig::default();
        let i = &self.inner;
        inner.lr = i.lr.unwrap_or(inner.lr);
        inner.warmup_steps = i.warmup_steps.unwrap_or(inner.warmup_steps);
        inner.weight_decay = i.weight_decay.unwrap_or(inner.weight_decay);
        inner.grad_clip = i.grad_clip.unwrap_or(inner.grad_clip);
        inner.batch_size = i.batch_size.unwrap_or(inner.batch_size);
        inner.seq_len = i.seq_len.unwrap_or(inner.seq_len.min(model.context));
        inner.seed = self.seed.unwrap_or(0);
        let inner_steps = self.inner_steps.unwrap_or(25);
        if inner_steps == 0 || inner_steps > 100_000 {
            return Err(invalid(
                "inner_steps",
                format!("{inner_steps} must be in 1..=100000"),
            ));
        }
        let rounds = self.rounds.unwrap_or(10);
        if rounds == 0 || rounds > 1_000_000 {
            return Err(invalid(
                "rounds",
                format!("{rounds} must be in 1..=1000000"),
            ));
        }
        inner.total_steps = rounds * inner_steps as u64;
        inner
            .validate(&inner_bounds(&model, self.base.is_some()))
            .map_err(|e| invalid("inner", e.to_string()))?;
        let mode = self.mode.unwrap_or_default();
        let compression = self.compression.clone().unwrap_or_else(|| {
            match mode {
                RunMode::Diloco => "topk",
                RunMode::DataParallel => "none",
            }
            .into()
        });
        let codec =
            Codec::parse(&compression).map_err(|e| invalid("compression", e.to_string()))?;
        if mode == RunMode::DataParallel && codec != Codec::None {
            return Err(invalid(
                "compression",
                format!(
                    "{codec} is not available in data-parallel mode, which averages exact f32 \
                     gradients: use \"none\" or leave it out"
                ),
            ));
        }
        if mode == RunMode::DataParallel && self.overlap == Some(true) {
            return Err(invalid(
                "overlap",
                "data-parallel mode exchanges every step and has no outer update to delay: \
                 leave overlap out"
                    .into(),
            ));
        }
        self.outer.validate()?;
        let round_deadline_secs = self.round_deadline_secs.unwrap_or(300);
        if !(1..=86_400).contains(&round_deadline_secs) {
            return Err(invalid(
                "round_deadline_secs",
                format!("{round_deadline_secs} must be in 1..=86400"),
            ));
        }
        let min_peers = self.min_peers.unwrap_or(2);
        if !(1..=10_000).contains(&min_peers) {
            return Err(invalid(
                "min_peers",
                format!("{min_peers} must be in 1..=10000"),
            ));
        }
        let mut data = self.data.clone();
        if data.shards == 0 || data.shards > 1 << 20 {
            return Err(invalid(
                "data.shards",
                format!("{} must be in 1..=1048576", data.shards),
            ));
        }
        if data.source == "builtin" && data.synthetic.is_none() {
            data.synthetic = Some(SyntheticSpec::default());
        }
        data.root.make_ascii_lowercase();
        if data.source == "builtin" && !data.root.is_empty() {
            return Err(invalid(
                "data.root",
                "applies to a path source; the built-in corpus is generated".into(),
            ));
        }
        if !data.root.is_empty()
            && (data.root.len() != 64 || !data.root.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid(
                "data.root",
                format!("{:?} is not a 64-digit hex hash", data.root),
            ));
        }
        if data.source == "builtin" && data.tokenizer.is_some() {
            return Err(invalid(
                "data.tokenizer",
                "applies to a path source; the built-in corpus is bytes".into(),
            ));
        }
        let aggregation = match &self.aggregation {
            None => Aggregation::Mean,
            Some(text) => text
                .parse::<Aggregation>()
                .map_err(|e| invalid("aggregation", e.to_string()))?,
        };
        if let Some(i) = &self.instance
            && (i.is_empty() || i.chars().count() > MAX_INSTANCE_CHARS)
        {
            return Err(invalid(
                "instance",
                format!("must be 1 to {MAX_INSTANCE_CHARS} characters"),
            ));
        }
        let (base, adapters) = match (&self.base, &self.adapters) {
            (None, None) => (None, None),
            (Some(base), Some(adapters)) => {
                if self.model.is_some() {
                    return Err(invalid(
                        "model",
                        "an adapter run trains adapters on [base], not a model of its own: \
                         leave `model` out"
                            .into(),
                    ));
                }
                adapters
                    .validate()
                    .map_err(|e| invalid("adapters", e.to_string()))?;
                let mut base = base.clone();
                if base.path.is_empty() {
                    return Err(invalid(
                        "base.path",
                        "names no directory: give the base's directory (config.json, \
                         model.safetensors, tokenizer.json)"
                            .into(),
                    ));
                }
                base.root.make_ascii_lowercase();
                if !base.root.is_empty()
                    && (base.root.len() != 64 || !base.root.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(invalid(
                        "base.root",
                        format!("{:?} is not a 64-digit hex hash", base.root),
                    ));
                }
                (Some(base), Some(adapters.clone()))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "adapters",
                    "[base] needs an [adapters] section (rank, alpha, dropout, \
                     target_modules): only adapters are trained on a base"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "base",
                    "[adapters] needs a [base] section naming the base's directory".into(),
                ));
            }
        };
        Ok(ResolvedRun {
            name: self.name.clone(),
            model,
            data,
            inner,
            outer: self.outer.clone(),
            inner_steps,
            rounds,
            compression: codec.to_string(),
            round_deadline_secs,
            min_peers,
            overlap: self.overlap.unwrap_or(DEFAULT_OVERLAP),
            mode,
            aggregation: aggregation.to_string(),
            instance: self.instance.clone(),
            base,
            adapters,
        })
    }
}

impl ResolvedRun {
    /// The canonical bytes of the run: what the run id hashes and what peers are sent.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Serialising plain structs (no maps) to JSON cannot fail and is deterministic.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The run id: blake3 of the canonical bytes.
    pub fn id(&self) -> [u8; 32] {
        *blake3::hash(&self.canonical_bytes()).as_bytes()
    }

    /// Parses canonical bytes received from a peer (size-limited) and checks that they hash
    /// to `expected_id`.
    pub fn from_canonical(bytes: &[u8], expected_id: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        if blake3::hash(bytes).as_bytes().as_slice() != expected_id {
            return Err(ManifestError::Invalid {
                key: "run_id",
                reason: "the manifest does not hash to the run id".into(),
            });
        }
        let run: ResolvedRun =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        run.model.validate().map_err(|e| ManifestError::Invalid {
            key: "model",
            reason: e.to_string(),
        })?;
        run.outer.validate()?;
        run.inner
            .validate(&inner_bounds(&run.model, run.base.is_some()))
            .map_err(|e| ManifestError::Invalid {
                key: "inner",
                reason: e.to_string(),
            })?;
        match (&run.base, &run.adapters) {
            (None, None) => {}
            (Some(_), Some(a)) => a.validate().map_err(|e| ManifestError::Invalid {
                key: "adapters",
                reason: e.to_string(),
            })?,
            _ => {
                return Err(ManifestError::Invalid {
                    key: "base",
                    reason: "a run names both a base and its adapters, or neither".into(),
                });
            }
        }
        run.aggregation
            .parse::<Aggregation>()
            .map_err(|e| ManifestError::Invalid {
                key: "aggregation",
                reason: e.to_string(),
            })?;
        Ok(run)
    }

    /// The reducers' aggregation rule (checked when the run was resolved or received).
    pub fn aggregation(&self) -> Aggregation {
        self.aggregation.parse().unwrap_or_default()
    }

    /// The update codec.
    pub fn codec(&self) -> Codec {
        Codec::parse(&self.compression).unwrap_or(Codec::None)
    }

    /// Builds the run's dataset from its source and checks it against the manifest's data
    /// hash (when set). Returns the dataset and its hash.
    pub fn load_data(&self) -> Result<(Dataset, String), ManifestError> {
        let d = &self.data;
        let data = if d.source == "builtin" {
            let spec = d.synthetic.clone().unwrap_or_default();
            let corpus =
                SyntheticCorpus::new(spec).map_err(|e| ManifestError::Data(e.to_string()))?;
            Dataset::synthetic(&corpus, d.train_bytes, d.eval_bytes, d.shards)
                .map_err(|e| ManifestError::Data(e.to_string()))?
        } else {
            let files = potluck_worker::data::text_files(&PathBuf::from(&d.source))
                .map_err(|e| ManifestError::Data(e.to_string()))?;
            self.tokenize(&files, d.tokenizer.as_ref().map(PathBuf::from).as_deref())?
        };
        self.checked(data, &format!("'{}'", d.source))
    }

    /// Builds the run's dataset from a data package directory ([`super::datapack`]) instead
    /// of the source path, and checks it against the manifest's data hash.
    pub fn load_data_from_package(&self, dir: &Path) -> Result<(Dataset, String), ManifestError> {
        let (texts, tokenizer) = super::datapack::package_texts(dir, &self.data)?;
        let data = self.tokenize(&texts, tokenizer.as_deref())?;
        self.checked(data, &format!("the data package {}", dir.display()))
    }

    /// Tokenizes `files` in order with the tokenizer at `tokenizer` (bytes when `None`).
    fn tokenize(
        &self,
        files: &[PathBuf],
        tokenizer: Option<&Path>,
    ) -> Result<Dataset, ManifestError> {
        let d = &self.data;
        let tokenizer = match tokenizer {
            Some(path) => potluck_worker::Tokenizer::from_file(path)
                .map_err(|e| ManifestError::Data(e.to_string()))?,
            None => potluck_worker::Tokenizer::Byte,
        };
        if let Some(base) = &self.base {
            if tokenizer.vocab_size() > base.vocab {
                return Err(ManifestError::Data(format!(
                    "the tokenizer has {} tokens but the base's vocabulary only {}: give the \
                     base's own tokenizer.json as `data.tokenizer`",
                    tokenizer.vocab_size(),
                    base.vocab
                )));
            }
        } else if tokenizer.vocab_size() > self.model.vocab {
            return Err(ManifestError::Data(format!(
                "the tokenizer has {} tokens but the model's vocabulary only {}: raise \
                 the model's `vocab`",
                tokenizer.vocab_size(),
                self.model.vocab
            )));
        }
        Dataset::from_files(files, &tokenizer, d.shards, d.eval_fraction, MAX_DATA_BYTES)
            .map_err(|e| ManifestError::Data(e.to_string()))
    }

    /// Checks `data` (read from `from`) against the pinned hash; returns it with its hash.
    fn checked(&self, data: Dataset, from: &str) -> Result<(Dataset, String), ManifestError> {
        let hash = dataset_hash(&data);
        if !self.data.hash.is_empty() && self.data.hash != hash {
            return Err(ManifestError::Data(format!(
                "data from {from} hashes to {hash}, but the run expects {}: this peer's copy \
                 differs",
                self.data.hash
            )));
        }
        Ok((data, hash))
    }

    /// The entropy rate of the built-in source in nats per byte: the best eval loss any model
    /// can reach on it. `None` for other data.
    pub fn entropy_floor(&self) -> Option<f64> {
        self.builtin_corpus()
            .map(|c| c.entropy_rate_nats_per_byte())
    }

    /// The best eval loss any model can reach on the built-in source as `eval_loss` measures
    /// it, in windows of `inner.seq_len` predictions that see nothing before the window: a
    /// little above [`ResolvedRun::entropy_floor`]. `None` for other data.
    pub fn window_floor(&self) -> Option<f64> {
        self.builtin_corpus()
            .map(|c| c.window_floor_nats_per_byte(self.inner.seq_len))
    }

    /// The built-in source of a run on it; `None` for other data.
    fn builtin_corpus(&self) -> Option<SyntheticCorpus> {
        let spec = self.data.synthetic.clone()?;
        if self.data.source != "builtin" {
            return None;
        }
        SyntheticCorpus::new(spec).ok()
    }

    /// Whether the data is pinned: the token hash is set, and for a path source the package
    /// root too.
    pub fn is_pinned(&self) -> bool {
        !self.data.hash.is_empty()
            && (self.data.source == "builtin" || !self.data.root.is_empty())
            && self.base.as_ref().is_none_or(|b| !b.root.is_empty())
    }

    /// Whether the run trains adapters on a frozen base rather than the worker's own model.
    pub fn is_adapter_run(&self) -> bool {
        self.base.is_some()
    }

    /// The manifest with the data hash pinned, as the run's starter publishes it: loads the
    /// data, and checks it against the hash when one is already set. The run id covers the
    /// hash, so pin before taking the id.
    /// A path source's package root is pinned too (checked when already set).
    /// An adapter run's base is pinned first (its root, checked when already set, and its
    /// vocabulary), since the data's tokenizer is checked against it.
    pub fn pin_data(mut self) -> Result<Self, ManifestError> {
        if let Some(base) = self.base.take() {
            let base = super::basepack::pin_base(base, &self.inner)?;
            self.data.tokenizer = super::basepack::data_tokenizer(&base, &self.data)?;
            self.base = Some(base);
        }
        let (_, hash) = self.load_data()?;
        self.data.hash = hash;
        if self.data.source != "builtin" {
            let root = super::datapack::package_root(&self.data)?.to_hex();
            if !self.data.root.is_empty() && self.data.root != root {
                return Err(ManifestError::Data(format!(
                    "the files of '{}' have the package root {root}, but the run expects {}: \
                     this peer's copy differs",
                    self.data.source, self.data.root
                )));
            }
            self.data.root = root;
        }
        Ok(self)
    }
}

/// blake3 over a dataset's token ids (train then held-out), hex.
pub fn dataset_hash(data: &Dataset) -> String {
    let mut h = blake3::Hasher::new();
    for shard in 0..data.num_shards() {
        h.update(b"|shard|");
        for t in data.shard_tokens(shard).unwrap_or_default() {
            h.update(&t.to_le_bytes());
        }
    }
    h.update(b"|eval|");
    for t in data.eval_tokens() {
        h.update(&t.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// The manifest `toml` with a new random `instance`: the same settings as a new run.
pub fn fresh_instance(toml: &str) -> Result<(String, String), ManifestError> {
    if toml.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(toml.len()));
    }
    let mut table: toml::Table = toml
        .parse()
        .map_err(|e: toml::de::Error| ManifestError::Parse(e.to_string()))?;
    let instance = hex::encode(rand::random::<[u8; 8]>());
    table.insert("instance".into(), toml::Value::String(instance.clone()));
    Ok((table.to_string(), instance))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn demo_manifest_resolves_and_hashes_stably() {
        let a = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        let b = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(a.id(), b.id());
        assert!(!a.is_pinned() && a.clone().pin_data().unwrap().is_pinned());
        let back = ResolvedRun::from_canonical(&a.canonical_bytes(), &a.id()).unwrap();
        assert_eq!(back, a);
        let mut c = a.clone();
        c.rounds += 1;
        assert_ne!(c.id(), a.id());
        // The overlap setting is part of the run, and is left out of the encoding when off.
        let mut d = a.clone();
        d.overlap = !a.overlap;
        assert_ne!(d.id(), a.id());
        let off = if a.overlap { &d } else { &a };
        let text = String::from_utf8(off.canonical_bytes()).unwrap();
        assert!(!text.contains("overlap"), "{text}");
        let on = if a.overlap { &a } else { &d };
        let back = ResolvedRun::from_canonical(&on.canonical_bytes(), &on.id()).unwrap();
        assert!(back.overlap);
    }

    /// A manifest that does not name a rule, or names `mean`, hashes exactly as before the
    /// setting existed (the demo's id is pinned from the commit before it); any other rule is
    /// in the canonical bytes and the id, and comes back from them.
    #[test]
    fn aggregation_is_in_the_id_only_when_not_the_mean() {
        let plain = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(plain.aggregation(), Aggregation::Mean);
        assert_eq!(hex::encode(plain.id()), DEMO_ID_BEFORE_AGGREGATION);
        assert!(
            !String::from_utf8(plain.canonical_bytes())
                .unwrap()
                .contains("aggregation")
        );
        let mean = RunManifest::parse(&format!("aggregation = \"mean\"\n{DEMO_MANIFEST}"))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(mean.id(), plain.id());
        let clip = RunManifest::parse(&format!("aggregation = \"centred-clip\"\n{DEMO_MANIFEST}"))
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(clip.aggregation(), Aggregation::PUBLIC_DEFAULT);
        assert_eq!(clip.aggregation, "centred-clip:2:3");
        assert_ne!(clip.id(), plain.id());
        let back = ResolvedRun::from_canonical(&clip.canonical_bytes(), &clip.id()).unwrap();
        assert_eq!(back, clip);
        let tm = RunManifest::parse(&format!(
            "aggregation = \"trimmed-mean:0.25\"\n{DEMO_MANIFEST}"
        ))
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(tm.aggregation(), Aggregation::TrimmedMean { trim: 0.25 });
        assert_ne!(tm.id(), clip.id());
        let err = RunManifest::parse(&format!("aggregation = \"median\"\n{DEMO_MANIFEST}"))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("aggregation"), "{err}");
        // A peer's canonical bytes with a rule out of range are refused.
        let mut bad = clip.clone();
        bad.aggregation = "trimmed-mean:0.9".into();
        assert!(ResolvedRun::from_canonical(&bad.canonical_bytes(), &bad.id()).is_err());
    }

    /// The demo's run id at the commit before `aggregation` existed.
    const DEMO_ID_BEFORE_AGGREGATION: &str =
        "db96b8967758dfd4f9ca7a499467c8d9a91a65325220599f3336246ebcd0cc8a";

    #[test]
    fn bad_values_name_their_key() {
        let err = RunManifest::parse("name = \"x\"\ncompression = \"gzip\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("compression"), "{err}");
        let err = RunManifest::parse("name = \"x\"\n[outer]\nlr = -1.0\nmomentum = 0.9\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("outer.lr"), "{err}");
        let err = RunManifest::parse("name = \"x\"\ncompression = \"sign:0\"\n")
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("compression"), "{err}");
        assert!(RunManifest::parse("name = 3").is_err());
        assert!(RunManifest::parse(&"#".repeat(MAX_MANIFEST_BYTES + 1)).is_err());
    }

    #[test]
    fn data_parallel_mode_is_in_the_id_and_takes_f32_only() {
        let diloco = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        // The default mode is left out of the canonical bytes: DiLoCo ids did not change.
        assert!(
            !String::from_utf8(diloco.canonical_bytes())
                .unwrap()
                .contains("\"mode\"")
        );
        let text = format!("mode = \"data-parallel\"\n{DEMO_MANIFEST}")
            .replace("compression = \"sign\"\n", "");
        let dp = RunManifest::parse(&text).unwrap().resolve().unwrap();
        assert_eq!(dp.mode, RunMode::DataParallel);
        assert_eq!(dp.codec(), Codec::None);
        assert_ne!(dp.id(), diloco.id());
        let back = ResolvedRun::from_canonical(&dp.canonical_bytes(), &dp.id()).unwrap();
        assert_eq!(back, dp);
        let err = RunManifest::parse(&format!("mode = \"data-parallel\"\n{DEMO_MANIFEST}"))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("compression"), "{err}");
        assert!(
            RunManifest::parse("name = \"x\"\nmode = \"allreduce\"\n").is_err(),
            "unknown modes are refused"
        );
    }

    #[test]
    fn every_codec_name_resolves() {
        for (name, codec) in [
            ("none", Codec::None),
            ("int8:128", Codec::Int8 { block: 128 }),
            ("topk", Codec::TOPK),
            ("sign", Codec::SIGN),
            ("sign:4096", Codec::Sign { block: 4096 }),
        ] {
            let text = DEMO_MANIFEST.replace(
                "compression = \"sign\"",
                &format!("compression = \"{name}\""),
            );
            let run = RunManifest::parse(&text).unwrap().resolve().unwrap();
            assert_eq!(run.codec(), codec, "{name}");
            let back = ResolvedRun::from_canonical(&run.canonical_bytes(), &run.id()).unwrap();
            assert_eq!(back.codec(), codec, "{name}");
        }
        // Data parallel averages exact gradients: a lossy codec is refused there.
        let text = format!("mode = \"data-parallel\"\n{DEMO_MANIFEST}")
            .replace("compression = \"sign\"", "compression = \"int8\"");
        assert!(RunManifest::parse(&text).unwrap().resolve().is_err());
    }

    pub(crate) const TOKENIZER_JSON: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "!": 3},
                "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn a_path_source_takes_a_tokenizer_json_and_its_hash_covers_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text.txt");
        std::fs::write(&text, "hello world ! ".repeat(500)).unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, TOKENIZER_JSON).unwrap();
        let manifest = |extra: &str| {
            let text = format!(
                "{DEMO_MANIFEST}\n[data]\nsource = {:?}\ntrain_bytes = 0\neval_bytes = 0\n\
                 shards = 2\neval_fraction = 0.1\n{extra}",
                text.display().to_string()
            );
            RunManifest::parse(&text).unwrap().resolve()
        };
        let bytes = manifest("").unwrap();
        let words = manifest(&format!("tokenizer = {:?}", tok.display().to_string())).unwrap();
        assert_ne!(bytes.id(), words.id());
        assert!(
            !String::from_utf8_lossy(&bytes.canonical_bytes()).contains("tokenizer"),
            "runs without a tokenizer keep their ids"
        );
        let (db, hb) = bytes.load_data().unwrap();
        let (dw, hw) = words.load_data().unwrap();
        assert_eq!((db.vocab(), dw.vocab()), (256, 4));
        assert_ne!(hb, hw);
        // A peer whose tokenizer.json maps words otherwise is refused by the pinned hash.
        assert!(!words.is_pinned());
        let pinned = words.clone().pin_data().unwrap();
        assert!(
            pinned.is_pinned(),
            "the token hash and the package root are set"
        );
        let mut half = pinned.clone();
        half.data.root.clear();
        assert!(!half.is_pinned(), "a path source without its package root");
        std::fs::write(
            &tok,
            TOKENIZER_JSON.replace("\"hello\": 0, \"world\": 1", "\"hello\": 1, \"world\": 0"),
        )
        .unwrap();
        let err = pinned.load_data().unwrap_err().to_string();
        assert!(err.contains("hashes to"), "{err}");
        // A missing tokenizer says so; the built-in corpus takes none.
        std::fs::remove_file(&tok).unwrap();
        assert!(
            pinned
                .load_data()
                .unwrap_err()
                .to_string()
                .contains("tokenizer")
        );
        let err = RunManifest::parse(&format!("{DEMO_MANIFEST}\n[data]\nsource = \"builtin\"\ntrain_bytes = 1000\neval_bytes = 100\nshards = 2\neval_fraction = 0.1\ntokenizer = \"t.json\"\n"))
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("data.tokenizer"), "{err}");
    }

    #[test]
    fn tampered_canonical_bytes_are_refused() {
        let a = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        let mut bytes = a.canonical_bytes();
        bytes[10] ^= 1;
        assert!(ResolvedRun::from_canonical(&bytes, &a.id()).is_err());
    }

    #[test]
    fn a_fresh_instance_is_a_new_run_of_the_same_settings() {
        let base = RunManifest::parse(DEMO_MANIFEST)
            .unwrap()
            .resolve()
            .unwrap();
        let (toml, instance) = fresh_instance(DEMO_MANIFEST).unwrap();
        let fresh = RunManifest::parse(&toml).unwrap().resolve().unwrap();
        assert_eq!(fresh.instance.as_deref(), Some(instance.as_str()));
        assert_ne!(fresh.id(), base.id());
        let (again, _) = fresh_instance(DEMO_MANIFEST).unwrap();
        let again = RunManifest::parse(&again).unwrap().resolve().unwrap();
        assert_ne!(again.id(), fresh.id(), "each --fresh is a new run");
        assert_eq!(
            RunManifest::parse(&toml).unwrap().resolve().unwrap().id(),
            fresh.id(),
            "the same text resolves to the same run (a restart resumes it)"
        );
        let mut m = RunManifest::parse(DEMO_MANIFEST).unwrap();
        m.instance = Some("x".repeat(MAX_INSTANCE_CHARS + 1));
        assert!(m.resolve().is_err());
        m.instance = Some(String::new());
        assert!(m.resolve().is_err());
    }
}
