//! The bytes benchmark's engine: N replicas in one process on one device, trained as a
//! swarm would train them, with every exchange carried out by the daemon's own code and its
//! bytes counted as the daemon counts them. No sockets and no clocks: what differs from a
//! real swarm is only that frames are handed over in memory.
//!
//! One exchange ([`Exchange::run`]) is the daemon's sharded reduction: member `s` of the
//! sorted member list reduces slice `s` ([`slice_ranges`]); every member sends it its
//! encoded slice (the daemon's `ErrorFeedback::compress_slices` for DiLoCo, f32 for plain
//! data parallel), the reducer decodes them, validates and averages them with
//! [`reduce_slice`], re-encodes the mean with [`reduce_codec`] and sends it to every
//! member, who decode it. Bytes are the frames' payloads as [`seal_payload`] puts them on
//! the wire (zstd level 1 when it pays, as the daemon seals them), counted at the sender
//! and again at the receiver; a member's frames to itself cost nothing, as in the daemon.
//! Frame headers and signatures (a fixed size per frame) are not in the byte counts; the
//! number of frames is reported beside them.
//!
//! Modes: plain data parallel (the gradients of every replica averaged every step through
//! the same reduction, f32, then applied by the inner AdamW: the replicas stay identical,
//! so one replica computes every shard's gradient and applies the mean once), and DiLoCo
//! with any codec (`none` for f32): H inner steps per replica on its own shard, the
//! pseudo-gradient exchanged, the outer Nesterov step applied from the same mean by every
//! replica.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_daemon::dataplane::seal_payload;
use potluck_daemon::train::plan::slice_ranges;
use potluck_daemon::train::reduce::{Aggregation, reduce_codec, reduce_slice};
use potluck_proto::v1::FrameHeader;
use potluck_worker::compress::{self, Codec, ErrorFeedback};
use potluck_worker::{
    Dataset, DeviceSpec, ModelConfig, OuterOptimizer, Replica, TrainConfig, pseudo_gradient,
};
use serde_json::json;

/// What a run trains: one of the benchmark's modes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// (a) plain data parallel: f32 gradients reduced every step.
    DataParallel,
    /// (b) and (c): DiLoCo with this codec (`Codec::None` is f32).
    DiLoCo(Codec),
}

impl Mode {
    /// `a` (or `dp`) for data parallel, `b` for DiLoCo f32, or a codec spec
    /// ([`Codec::parse`]: `none`, `int8`, `topk`, `sign`, with parameters) for DiLoCo.
    pub fn parse(s: &str) -> Result<Mode> {
        match s.trim() {
            "a" | "dp" => Ok(Mode::DataParallel),
            "b" => Ok(Mode::DiLoCo(Codec::None)),
            spec => Ok(Mode::DiLoCo(
                Codec::parse(spec).with_context(|| format!("mode {spec}"))?,
            )),
        }
    }

    /// A label for tables and JSON.
    pub fn label(&self) -> String {
        match self {
            Mode::DataParallel => "a:data-parallel".into(),
            Mode::DiLoCo(Codec::None) => "b:diloco-f32".into(),
            Mode::DiLoCo(c) => format!("c:diloco-{}", codec_name(c)),
        }
    }
}

fn codec_name(c: &Codec) -> String {
    match c {
        Codec::None => "none".into(),
        Codec::Int8 { block } => format!("int8:{block}"),
        Codec::TopK { chunk, k, bits } => format!("topk:{chunk}:{k}:{bits}"),
        Codec::Sign { block } => format!("sign:{block}"),
    }
}

/// Settings shared by every run of a comparison.
#[derive(Clone, Debug)]
pub struct Settings {
    pub replicas: usize,
    pub model: ModelConfig,
    pub model_name: String,
    /// Inner steps per DiLoCo round (H); also how often every mode is evaluated.
    pub inner_steps: usize,
    /// Training tokens of a run, over all replicas (the same for every mode).
    pub total_tokens: u64,
    pub batch: usize,
    pub seq: usize,
    pub lr: f32,
    pub warmup: u64,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    /// Held-out batches per evaluation.
    pub eval_batches: usize,
    pub device: DeviceSpec,
}

impl Settings {
    /// Inner steps per replica: the total tokens shared by the replicas, whole rounds only.
    pub fn steps(&self) -> Result<usize> {
        let per_step = (self.replicas * self.batch * self.seq) as u64;
        let steps = (self.total_tokens / per_step.max(1)) as usize;
        let steps = steps - steps % self.inner_steps.max(1);
        if self.replicas < 2 || self.inner_steps == 0 || steps == 0 {
            bail!(
                "{} tokens over {} replicas of {}x{} and H = {} give no whole round (2 or more \
                 replicas needed)",
                self.total_tokens,
                self.replicas,
                self.batch,
                self.seq,
                self.inner_steps
            );
        }
        Ok(steps)
    }

    fn train_config(&self, seed: u64, steps: usize) -> TrainConfig {
        TrainConfig {
            lr: self.lr,
            warmup_steps: self.warmup,
            total_steps: steps as u64,
            batch_size: self.batch,
            seq_len: self.seq,
            seed,
            ..TrainConfig::default()
        }
    }
}

/// The sharded exchange among `n` members over vectors of one length, with its counters.
pub struct Exchange {
    members: Vec<PeerId>,
    ranges: Vec<Range<usize>>,
    /// Bytes each member sent.
    pub sent: Vec<u64>,
    /// Bytes each member received.
    pub received: Vec<u64>,
    /// Frames that crossed between two members.
    pub frames: u64,
    /// Contributions the reducers refused (the daemon's validation), over all exchanges.
    pub rejected: u64,
}

impl Exchange {
    /// Members with fixed identities (so their order, which the reduction's sums follow,
    /// is the same in every run), reducing vectors of `len` values.
    pub fn new(n: usize, len: usize) -> Result<Self> {
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let mut secret = [0u8; 32];
            secret[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            members.push(Keypair::ed25519_from_bytes(secret)?.public().to_peer_id());
        }
        // The coordinator lists members in a fixed order; member i reduces slice i.
        members.sort();
        Ok(Exchange {
            ranges: slice_ranges(len, n),
            members,
            sent: vec![0; n],
            received: vec![0; n],
            frames: 0,
            rejected: 0,
        })
    }

    /// The slices each member encodes its contribution in.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    fn carry(&mut self, from: usize, to: usize, payload: &[u8]) {
        if from == to {
            return;
        }
        let wire = seal_payload(&mut FrameHeader::default(), payload, Some(1)).len() as u64;
        self.sent[from] += wire;
        self.received[to] += wire;
        self.frames += 1;
    }

    /// One exchange: `payloads[m][s]` is member m's encoded slice s, `tokens[m]` what its
    /// update was trained on. Returns the mean every member decodes.
    pub fn run(
        &mut self,
        codec: Codec,
        payloads: &[Vec<Vec<u8>>],
        tokens: &[u64],
    ) -> Result<Vec<f32>> {
        let n = self.members.len();
        if payloads.len() != n || tokens.len() != n || payloads.iter().any(|p| p.len() != n) {
            bail!("an exchange of {n} members needs {n} slices from each of them");
        }
        let len = self.ranges.last().map_or(0, |r| r.end);
        let mut mean = vec![0f32; len];
        for (s, range) in self.ranges.clone().into_iter().enumerate() {
            let mut got: BTreeMap<PeerId, (u64, Vec<f32>)> = BTreeMap::new();
            for (m, (slices, t)) in payloads.iter().zip(tokens).enumerate() {
                self.carry(m, s, &slices[s]);
                let v = compress::decode(&slices[s], range.len())
                    .with_context(|| format!("member {m}'s slice {s}"))?;
                got.insert(self.members[m], (*t, v));
            }
            let mut rejected = Vec::new();
            let (avg, contributors) =
                reduce_slice(&got, range.len(), Aggregation::Mean, &mut rejected);
            self.rejected += rejected.len() as u64;
            let reduced = compress::encode(reduce_codec(codec, contributors.len()), &avg);
            for m in 0..n {
                self.carry(s, m, &reduced);
            }
            mean[range.clone()].copy_from_slice(
                &compress::decode(&reduced, range.len()).context("a reduced slice")?,
            );
        }
        Ok(mean)
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Measured {
    pub mode: Mode,
    pub seed: u64,
    pub params: usize,
    pub steps: usize,
    pub tokens: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames: u64,
    pub rejected: u64,
    /// (inner step, held-out loss) after every H steps.
    pub curve: Vec<(usize, f64)>,
    pub eval_loss: f64,
    pub seconds: f64,
}

impl Measured {
    /// Bytes on the wire, both directions, every member.
    pub fn bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }

    /// How much the held-out loss fell over the last tenth of the steps, as a fraction of
    /// its value there (the point of the curve at or before 90% of the steps).
    pub fn last_tenth_drop(&self) -> Option<f64> {
        let at = self.steps * 9 / 10;
        let before = self.curve.iter().rev().find(|(s, _)| *s <= at)?.1;
        Some((before - self.eval_loss) / before)
    }

    /// One JSON line.
    pub fn to_json(&self, s: &Settings) -> serde_json::Value {
        json!({
            "bench": "swarm_bytes",
            "mode": self.mode.label(),
            "seed": self.seed,
            "replicas": s.replicas,
            "model": s.model_name,
            "params": self.params,
            "inner_steps": s.inner_steps,
            "steps": self.steps,
            "train_tokens": self.tokens,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "bytes_on_wire": self.bytes(),
            "frames": self.frames,
            "rejected_contributions": self.rejected,
            "eval_loss": self.eval_loss,
            "eval_loss_curve": self.curve.iter().map(|(st, l)| json!([st, (l * 1e4).round() / 1e4])).collect::<Vec<_>>(),
            "last_tenth_drop": self.last_tenth_drop(),
            "seconds": self.seconds,
        })
    }
}

/// Trains one mode from the seed's initial weights on `data` (one shard per replica) and
/// measures it.
pub fn run(data: &Dataset, s: &Settings, mode: Mode, seed: u64) -> Result<Measured> {
    let steps = s.steps()?;
    if data.num_shards() != s.replicas as u64 {
        bail!(
            "the data has {} shards for {} replicas",
            data.num_shards(),
            s.replicas
        );
    }
    let started = Instant::now();
    let tc = s.train_config(seed, steps);
    let fresh = || Replica::new(&s.model, &tc, &s.device).context("a replica");
    let mut curve = Vec::new();
    let eval = |r: &Replica| -> Result<f64> { Ok(r.eval_loss(data, s.eval_batches)? as f64) };
    let (params, mut ex, tokens, eval_loss);
    match mode {
        Mode::DataParallel => {
            // Identical replicas applying identical means stay identical: one stands for all.
            let mut r = fresh()?;
            params = r.num_params();
            ex = Exchange::new(s.replicas, params)?;
            let mut t = 0u64;
            for step in 1..=steps {
                let mut payloads = Vec::with_capacity(s.replicas);
                let mut toks = Vec::with_capacity(s.replicas);
                for shard in 0..s.replicas {
                    let g = r.compute_gradients(data, shard as u64)?;
                    payloads.push(
                        ex.ranges()
                            .iter()
                            .map(|rg| compress::encode(Codec::None, &g.grads[rg.clone()]))
                            .collect(),
                    );
                    toks.push(g.tokens);
                    t += g.tokens;
                }
                let mean = ex.run(Codec::None, &payloads, &toks)?;
                r.apply_gradients(&mean)?;
                if step % s.inner_steps == 0 {
                    curve.push((step, eval(&r)?));
                }
            }
            tokens = t;
            eval_loss = curve.last().map_or(f64::NAN, |c| c.1);
        }
        Mode::DiLoCo(codec) => {
            let mut reps = (0..s.replicas)
                .map(|_| fresh())
                .collect::<Result<Vec<_>>>()?;
            params = reps[0].num_params();
            ex = Exchange::new(s.replicas, params)?;
            let mut efs: Vec<ErrorFeedback> = (0..s.replicas)
                .map(|_| ErrorFeedback::new(params))
                .collect();
            let mut outer = OuterOptimizer::new(s.outer_lr, s.outer_momentum, params);
            let mut theta = reps[0].flat_params()?;
            let mut t = 0u64;
            for round in 1..=steps / s.inner_steps {
                let mut payloads = Vec::with_capacity(s.replicas);
                let mut toks = Vec::with_capacity(s.replicas);
                for (m, (r, ef)) in reps.iter_mut().zip(&mut efs).enumerate() {
                    let st = r.train_steps(data, m as u64, s.inner_steps)?;
                    let delta = pseudo_gradient(&theta, &r.flat_params()?)?;
                    payloads.push(ef.compress_slices(codec, &delta, ex.ranges())?);
                    toks.push(st.tokens);
                    t += st.tokens;
                }
                let mean = ex.run(codec, &payloads, &toks)?;
                theta = outer.step(&theta, &mean)?;
                for r in &mut reps {
                    r.set_flat_params(&theta)?;
                }
                curve.push((round * s.inner_steps, eval(&reps[0])?));
            }
            tokens = t;
            eval_loss = curve.last().map_or(f64::NAN, |c| c.1);
        }
    }
    Ok(Measured {
        mode,
        seed,
        params,
        steps,
        tokens,
        bytes_sent: ex.sent.iter().sum(),
        bytes_received: ex.received.iter().sum(),
        frames: ex.frames,
        rejected: ex.rejected,
        curve,
        eval_loss,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Mean and sample standard deviation.
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The comparison's table (markdown): per mode and seed, bytes, ratio to (a) of the same
/// seed, loss, loss ratio to (a), and whether (a) was still learning.
pub fn table(results: &[Measured]) -> String {
    let mut out = String::from(
        "| mode | seed | bytes on wire | (a)/this bytes | eval loss | loss / (a) | last-tenth drop |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let a = results
            .iter()
            .find(|x| x.mode == Mode::DataParallel && x.seed == r.seed);
        let ratio = a.map_or("-".into(), |a| {
            format!("{:.1}x", a.bytes() as f64 / r.bytes() as f64)
        });
        let loss = a.map_or("-".into(), |a| format!("{:.4}", r.eval_loss / a.eval_loss));
        let drop = r
            .last_tenth_drop()
            .map_or("-".into(), |d| format!("{:.2}%", d * 100.0));
        out.push_str(&format!(
            "| {} | {} | {} | {ratio} | {:.4} | {loss} | {drop} |\n",
            r.mode.label(),
            r.seed,
            r.bytes(),
            r.eval_loss
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("a").unwrap(), Mode::DataParallel);
        assert_eq!(Mode::parse("b").unwrap(), Mode::DiLoCo(Codec::None));
        assert_eq!(Mode::parse("sign").unwrap(), Mode::DiLoCo(Codec::SIGN));
        assert!(Mode::parse("zip").is_err());
    }

    #[test]
    fn an_exchange_averages_and_counts_both_ends() {
        let mut ex = Exchange::new(3, 10).unwrap();
        let ranges = ex.ranges().to_vec();
        let vals: Vec<Vec<f32>> = (0..3).map(|m| vec![m as f32; 10]).collect();
        let payloads: Vec<Vec<Vec<u8>>> = vals
            .iter()
            .map(|v| {
                ranges
                    .iter()
                    .map(|r| compress::encode(Codec::None, &v[r.clone()]))
                    .collect()
            })
            .collect();
        let mean = ex.run(Codec::None, &payloads, &[1, 1, 1]).unwrap();
        assert!(mean.iter().all(|x| (*x - 1.0).abs() < 1e-6), "{mean:?}");
        // 3 slices, each sent by 2 other members and returned to 2 others.
        assert_eq!(ex.frames, 12);
        assert_eq!(ex.sent.iter().sum::<u64>(), ex.received.iter().sum::<u64>());
        assert!(ex.sent.iter().all(|b| *b > 0) && ex.received.iter().all(|b| *b > 0));
        // A malformed payload is an error, not a silent zero.
        let mut bad = payloads.clone();
        bad[1][0] = vec![0xff; 3];
        assert!(ex.run(Codec::None, &bad, &[1, 1, 1]).is_err());
    }
}
