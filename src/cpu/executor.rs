//! What runs a network on the CPU: the `Executor` trait that both executors implement (`CpuNet`, the
//! plain reference of every op, and `FusedNet`, the fast executor checked against it), so that a
//! training step, an evaluation and a profiled step are written once.

use rayon::prelude::*;

use super::profile::{self, record, OpTime};
use super::reference::adam::adam_update;
use super::reference::loss::{softmax_cross_entropy, LossOut};
use super::reference::sgd::{sgd_update, SgdStep};
use crate::backend::StepParams;
use crate::model::Model;
use crate::optim::{AdamScalars, OptimizerKind};

/// How dropout layers behave in a training-mode pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutMode {
    /// Identity (as for the PyTorch golden fixture).
    Off,
    /// Masks from the counter-based hash of (seed, step, element index), as the GPU draws them.
    Hash { seed: u32, step: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics (running statistics updated), dropout as given.
    Train(DropoutMode),
    /// Running statistics, no dropout.
    Eval,
}

/// What a training step reports: the batch's mean loss and correct count, and whether the update
/// left any parameter or momentum non-finite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOut {
    pub loss: f32,
    pub correct: u32,
    pub nonfinite: bool,
}

/// The update that ends a training step, with its scalars for this step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Update {
    Sgd(SgdStep),
    /// Adam or AdamW (the scalars say which).
    Adam(AdamScalars),
}

impl Update {
    /// The update a step of the run's schedule asks for (Adam's step count: the global step plus one).
    pub fn for_step(p: &StepParams) -> Update {
        match p.optimizer.kind {
            OptimizerKind::Sgd => Update::Sgd(SgdStep { lr: p.lr, momentum: p.momentum, weight_decay: p.weight_decay }),
            OptimizerKind::Adam | OptimizerKind::AdamW => {
                Update::Adam(p.optimizer.adam_scalars(p.lr as f64, p.weight_decay as f64, p.step as u64 + 1))
            }
        }
    }

    /// SGD's momenta (and an empty buffer), or Adam's first and second moments, of a parameter buffer
    /// of `len` values from `moments`, which holds them one after the other.
    pub fn split_moments<'a>(&self, moments: &'a mut [f32], len: usize) -> (&'a mut [f32], &'a mut [f32]) {
        match self {
            Update::Sgd(_) => (&mut moments[..len], &mut []),
            Update::Adam(_) => moments[..2 * len].split_at_mut(len),
        }
    }

    /// Updates `params` from `grads`, with `m` and `v` as `split_moments` gives them (or the same
    /// values' part of each). Returns whether any updated value is non-finite (the run diverged).
    /// Each value's update is on its own, so the threads take a chunk each.
    pub fn apply(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) -> bool {
        const CHUNK: usize = 1 << 14;
        assert_eq!(m.len(), params.len(), "the update's first moments");
        assert_eq!(v.len(), if let Update::Adam(_) = self { params.len() } else { 0 }, "the update's second moments");
        let chunks = params.par_chunks_mut(CHUNK).zip(grads.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK));
        match self {
            Update::Sgd(_) => {
                chunks.map(|((p, g), m)| self.apply_serial(p, g, m, &mut [])).reduce(|| false, |a, b| a || b)
            }
            Update::Adam(_) => chunks
                .zip(v.par_chunks_mut(CHUNK))
                .map(|(((p, g), m), v)| self.apply_serial(p, g, m, v))
                .reduce(|| false, |a, b| a || b),
        }
    }

    /// `apply` on this thread.
    pub fn apply_serial(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) -> bool {
        match self {
            Update::Sgd(sgd) => sgd_update(*sgd, params, grads, m),
            Update::Adam(s) => adam_update(s, params, grads, m, v),
        }
    }

    /// FLOPs and bytes of the update of `params` values, as `profile` counts them.
    fn cost(&self, params: usize) -> (f64, f64) {
        match self {
            Update::Sgd(_) => profile::sgd_cost(params),
            // Reads parameter, gradient and two moments, writes parameter and moments.
            Update::Adam(_) => ((13 * params) as f64, 4.0 * (7 * params) as f64),
        }
    }

    /// The label of the update in CPU profiles, as the GPU's kernel is named.
    fn label(&self) -> &'static str {
        match self {
            Update::Sgd(_) => "sgd.update",
            Update::Adam(_) => "adam.update",
        }
    }
}

/// A network run on the CPU. The required methods are each executor's own; the provided ones (a
/// training step, a profiled step, an evaluation) are the same for both.
pub trait Executor: Send {
    fn model(&self) -> &Model;
    /// Runs the network on `n` images (NCHW, normalized); training mode updates the batchnorms'
    /// running statistics in `state`, as PyTorch's forward pass does. Returns the logits.
    fn forward(&mut self, state: &mut [f32], input: &[f32], n: usize, mode: Mode) -> &[f32];
    /// Backpropagates `dlogits` through the last training-mode forward pass; returns the gradients of
    /// the trainable prefix of the state buffer.
    fn backward(&mut self, state: &[f32], dlogits: &[f32]) -> &[f32];
    /// The logits (n x classes) of the last forward pass.
    fn logits(&self) -> &[f32];
    /// The gradients of the last backward pass.
    fn grads(&self) -> &[f32];
    /// The dlogits buffer kept between steps, and the profile being taken (None: not profiling).
    fn scratch(&mut self) -> (&mut Vec<f32>, &mut Option<Vec<OpTime>>);

    /// One training step on a batch: forward (training mode), loss, backward, update.
    /// `state` holds the parameters and running statistics; `moments` the optimizer's buffers of the
    /// trainable prefix (see `Update::split_moments`).
    fn train_step(
        &mut self,
        state: &mut [f32],
        moments: &mut [f32],
        input: &[f32],
        labels: &[u8],
        update: Update,
        dropout: DropoutMode,
    ) -> StepOut {
        in_pool(|| {
            let classes = self.model().output_classes();
            self.forward(state, input, labels.len(), Mode::Train(dropout));
            let mut dlogits = std::mem::take(self.scratch().0);
            dlogits.resize(labels.len() * classes, 0.0);
            let started = self.scratch().1.is_some().then(web_time::Instant::now);
            let out = softmax_cross_entropy(self.logits(), labels, classes, Some(&mut dlogits));
            record(self.scratch().1, "loss", profile::loss_cost(labels.len(), classes), started);
            self.backward(state, &dlogits);
            *self.scratch().0 = dlogits;
            let trainable = self.model().num_trainable;
            let started = self.scratch().1.is_some().then(web_time::Instant::now);
            let nonfinite = self.update(&update, &mut state[..trainable], moments);
            record(self.scratch().1, update.label(), update.cost(trainable), started);
            StepOut { loss: out.loss, correct: out.correct, nonfinite }
        })
    }

    /// The update that ends a training step, from the last backward pass's gradients: `params` (the
    /// trainable prefix of the state) and `moments` (see `Update::split_moments`). Returns whether any
    /// updated value is non-finite.
    fn update(&mut self, update: &Update, params: &mut [f32], moments: &mut [f32]) -> bool {
        let (m, v) = update.split_moments(moments, params.len());
        update.apply(params, self.grads(), m, v)
    }

    /// One training step as `train_step` runs it, with each op's time.
    fn profile_step(
        &mut self,
        state: &mut [f32],
        moments: &mut [f32],
        batch: (&[f32], &[u8]),
        update: Update,
        dropout: DropoutMode,
    ) -> (StepOut, Vec<OpTime>) {
        *self.scratch().1 = Some(Vec::new());
        let out = self.train_step(state, moments, batch.0, batch.1, update, dropout);
        (out, self.scratch().1.take().unwrap_or_default())
    }

    /// Evaluation-mode loss and correct count of a batch (running statistics, no dropout).
    fn evaluate(&mut self, state: &mut [f32], input: &[f32], labels: &[u8]) -> LossOut {
        in_pool(|| {
            let classes = self.model().output_classes();
            self.forward(state, input, labels.len(), Mode::Eval);
            softmax_cross_entropy(self.logits(), labels, classes, None)
        })
    }
}

/// Runs `f` on a thread of rayon's pool (on this one, if it is one). A step's many parallel ops are
/// then each split within the pool; called from outside it, each would be handed in as a job that
/// wakes a worker and puts the caller to sleep until it is done (mlp3's training steps at batch 100:
/// about 8% more images/s in the pool).
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
