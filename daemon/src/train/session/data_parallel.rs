//! Plain data parallelism, the baseline DiLoCo is measured against (run mode
//! `data-parallel`): every inner step of a round, each member computes the gradient of its
//! shard's batch, the gradients go through the same sharded reduction as DiLoCo's
//! pseudo-gradients ([`TrainService::exchange`], f32, one exchange per step told apart by
//! the frames' signed `step`), and every member applies the token-weighted mean with its
//! inner AdamW. Members that start a round on the same weights and inner-optimizer state and
//! apply the same means end it bit-identical; the round then ends as a DiLoCo round does,
//! with the state's root reported to the coordinator.
//!
//! Deadlines: what is left of the round's deadline (85% of it, as in a DiLoCo round) is
//! shared among the steps still to run, and each step's exchange gets the usual phases of
//! its share (contributions until 60%, backup reducers at 70%, the end at 85%). A member
//! that dies mid-round thus costs each later step of that round its reduction deadlines, and
//! the coordinator leaves it out of the next round.
//!
//! The inner AdamW state is the same at every replica, so it is part of the state a round's
//! root names ([`Snapshot::new`] takes it from the replica in this mode): a replica that
//! joins or resyncs mid-run takes the moments with the weights and agrees from its first
//! round.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_coordinator::exchange::{Deadlines, FINISH_BY};
use potluck_coordinator::rejections::Rejections;
use potluck_proto::v1::{RoundOpen, TrainReport};
use potluck_worker::compress::{self, Codec};
use potluck_worker::{Dataset, Gradients, OuterOptimizer, Replica};
use tokio::sync::mpsc;

use super::{
    Contributed, EVAL_BATCHES, ExchangePlan, Exchanged, Inbound, Snapshot, TrainError,
    TrainService, unix_ms,
};
use crate::train::checkpoint;
use crate::train::manifest::ResolvedRun;
use crate::train::plan::slice_ranges;

/// Runs `f` on the replica off the async runtime (training is CPU-heavy), handing it over
/// and back.
async fn blocking<T: Send + 'static>(
    rep: &mut Option<Replica>,
    f: impl FnOnce(&mut Replica) -> T + Send + 'static,
) -> Result<T, TrainError> {
    let mut moved = rep
        .take()
        .ok_or_else(|| TrainError::Other("replica missing".into()))?;
    let (back, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut moved);
        (moved, out)
    })
    .await
    .map_err(|e| TrainError::Other(format!("training task failed: {e}")))?;
    *rep = Some(back);
    Ok(out)
}

impl TrainService {
    /// One data-parallel round at a replica: `run.inner_steps` sharded exchanges of f32
    /// gradients, each mean applied with the inner AdamW. Returns `None` when this replica
    /// is not a member. `outer` is not stepped (its zero momentum is part of the state).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn dp_round(
        &self,
        run: &ResolvedRun,
        run_id: &[u8; 32],
        open: &RoundOpen,
        data: &Arc<Dataset>,
        rep: &mut Option<Replica>,
        outer: &OuterOptimizer,
        inbox: &mut mpsc::Receiver<Inbound>,
        early: &mut Vec<Inbound>,
        opened_at: &Instant,
    ) -> Result<Option<(TrainReport, Snapshot)>, TrainError> {
        let left = Duration::from_millis(
            open.deadline_unix_ms
                .saturating_sub(unix_ms())
                .min(run.round_deadline_secs * 1000),
        );
        let left = left.saturating_sub(opened_at.elapsed().min(left));
        let exchanges_end = Instant::now() + left.mul_f64(FINISH_BY);
        let Some((members, me, shard)) = self.place_in_round(open, "data parallel") else {
            return Ok(None);
        };
        let steps = run.inner_steps;
        // Every replica's schedule follows the round, whenever it joined.
        let first_step = checkpoint::swarm_step(run, open.round.saturating_sub(1));
        rep.as_mut()
            .ok_or_else(|| TrainError::Other("replica missing".into()))?
            .set_step(first_step);
        let mut update_hasher = blake3::Hasher::new();
        let (mut tokens, mut loss_sum) = (0u64, 0f64);
        let mut missing: BTreeSet<u32> = BTreeSet::new();
        let mut rejected = Rejections::new();
        let mut mean: Option<Vec<f32>> = None;
        for step in 0..steps {
            // Apply the previous step's mean and compute this step's gradient in one trip
            // off the runtime.
            let (d, prev) = (data.clone(), mean.take());
            let g: Gradients = blocking(rep, move |r| {
                if let Some(m) = prev {
                    r.apply_gradients(&m)?;
                }
                r.compute_gradients(&d, shard)
            })
            .await??;
            tokens += g.tokens;
            loss_sum += g.loss as f64;
            let ranges = slice_ranges(g.grads.len(), members.len());
            let slices: Vec<Arc<[u8]>> = ranges
                .iter()
                .map(|r| Arc::from(compress::encode(Codec::None, &g.grads[r.clone()])))
                .collect();
            for s in &slices {
                update_hasher.update(s);
            }
            // This step's share of what is left of the round.
            let now = Instant::now();
            let share = exchanges_end.saturating_duration_since(now) / (steps - step) as u32;
            let plan = ExchangePlan {
                run_id,
                round: open.round,
                members: &members,
                me,
                len: g.grads.len(),
                ranges,
                codec: Codec::None,
                aggregation: run.aggregation(),
                part: u32::try_from(step)
                    .map_err(|_| TrainError::Other("too many inner steps".into()))?,
                deadlines: Deadlines::split(now, share),
            };
            let mine = Contributed {
                slices,
                tokens: g.tokens,
            };
            let Exchanged {
                avg,
                missing: step_missing,
                rejected: step_rejected,
            } = self.exchange(&plan, Some(&mine), inbox, early).await?;
            if !step_missing.is_empty() {
                tracing::warn!(
                    round = open.round,
                    step,
                    missing = ?step_missing,
                    "gradient slices missing; applied as zero"
                );
                self.set_status(|s| s.missing_slices += step_missing.len() as u64);
            }
            missing.extend(step_missing);
            rejected.merge(step_rejected);
            mean = Some(avg);
        }
        let d = data.clone();
        let last = mean.take();
        let (new_params, eval_loss) = blocking(rep, move |r| {
            if let Some(m) = last {
                r.apply_gradients(&m)?;
            }
            Ok::<_, potluck_worker::WorkerError>((r.flat_params()?, r.eval_loss(&d, EVAL_BATCHES)?))
        })
        .await??;
        let rep = rep
            .as_ref()
            .ok_or_else(|| TrainError::Other("replica missing".into()))?;
        let snap = Snapshot::new(rep, run, open.round, new_params, outer.velocity().to_vec())?;
        let mean_loss = if steps > 0 {
            (loss_sum / steps as f64) as f32
        } else {
            0.0
        };
        self.set_status(|s| {
            s.train_loss = mean_loss;
            s.state = "waiting for the commit".into();
            s.phase = super::Phase::AwaitingCommit;
        });
        let (sent, received) = self.inner.traffic.totals();
        let (rejections, rejections_dropped) = rejected.to_proto();
        let report = TrainReport {
            run_id: run_id.to_vec(),
            round: open.round,
            tokens,
            mean_loss,
            update_hash: update_hasher.finalize().as_bytes().to_vec(),
            root: snap.root.to_vec(),
            missing_slices: missing.into_iter().collect(),
            eval_loss,
            bytes_sent: sent,
            bytes_received: received,
            rejected: Vec::new(),
            rejections,
            rejections_dropped,
        };
        Ok(Some((report, snap)))
    }
}
