//! The Backend trait the training loop is generic over. Its two implementations sit beside their
//! executors: `cpu::backend::CpuBackend` and `gpu::backend::GpuBackend`.
//!
//! The methods that may wait for the GPU are async, so that a web page awaits them while the
//! browser's event loop runs; natively they are driven by `pollster::block_on`, and the CPU backend's
//! never wait.

use anyhow::{bail, Result};
use async_trait::async_trait;

use crate::data::loader::Batch;
use crate::optim::Optimizer;

/// What one training step needs besides the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub dropout_seed: u32,
    /// The global step index: it draws the step's dropout masks.
    pub step: u32,
    /// Dropout layers drop (training); false makes them the identity (as in the PyTorch fixture).
    pub dropout: bool,
    /// The run's optimizer (Adam's step count is `step + 1`).
    pub optimizer: Optimizer,
}

/// Loss and correct-count sums over the batches since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    pub loss_sum: f64,
    pub correct: u64,
    /// A training step left a parameter or momentum non-finite (the run diverged).
    pub nonfinite: bool,
}

#[async_trait(?Send)]
pub trait Backend {
    /// A one-line description: the backend and, for the GPU, the adapter.
    fn describe(&self) -> String;
    /// One training step; its loss and correct count are added into the running sums.
    async fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()>;
    /// The parameters of every step of the run, indexed by the global step, for `train_chunk`.
    fn set_schedule(&mut self, schedule: &[StepParams]) -> Result<()>;
    /// Training steps `first_step`, `first_step + 1`, ... on `batches` (all of one size), with the
    /// schedule's parameters; their losses and correct counts go into the running sums. May return
    /// before the device has run them.
    async fn train_chunk(&mut self, batches: &[Batch], first_step: usize) -> Result<()>;
    /// The running sums as of the latest finished training chunk, without waiting: the training
    /// batches since the last `reset_sums` they cover, and the sums. None before any has finished.
    fn poll_train_sums(&mut self) -> Result<Option<(usize, Sums)>>;
    /// The running sums of every training step since the last `reset_sums` (waits for the device).
    async fn train_sums(&mut self) -> Result<Sums>;
    /// Evaluation-mode passes of `batches` (all of one size), added into the running sums.
    async fn eval_chunk(&mut self, batches: &[Batch]) -> Result<()>;
    /// `eval_chunk` of one batch, and its logits read back (n x classes).
    async fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>>;
    /// The running sums of the evaluation batches since the last `reset_sums` (waits for the device).
    async fn eval_sums(&mut self) -> Result<Sums>;
    /// How many batches of `batch` images to hand over per chunk now (train when `train`, else eval).
    fn chunk_batches(&self, batch: usize, train: bool) -> usize;
    /// Waits for all work handed over, then zeroes the running sums.
    async fn reset_sums(&mut self) -> Result<()>;
    /// Parameters and running statistics (the model's flat state buffer).
    async fn state(&mut self) -> Result<Vec<f32>>;
    /// The optimizer's moment buffers of the trainable prefix, `MOMENT_SLOTS` x `num_trainable` values
    /// (SGD's momenta or Adam's first moments, then Adam's second moments).
    async fn moments(&mut self) -> Result<Vec<f32>>;
    /// Sets the state buffer and the moments (as `moments` returns them).
    async fn load(&mut self, state: &[f32], moments: &[f32]) -> Result<()>;
    /// Refuses, with the figure and the limit, a batch size whose buffers would not fit, before a run
    /// depends on them (so that it cannot abort on an allocation). The GPU backend makes the batch's
    /// buffers here: only the device can say whether its memory holds them.
    async fn check_batch(&mut self, batch: usize) -> Result<()>;
}

/// The schedule's entries for `first_step..first_step + count`, or an error naming what is missing.
pub(crate) fn schedule_span(schedule_len: usize, first_step: usize, count: usize) -> Result<std::ops::Range<usize>> {
    let span = first_step..first_step + count;
    if span.end > schedule_len {
        bail!(
            "training steps {}..{} are past the schedule set for the run ({schedule_len} steps)",
            span.start,
            span.end
        );
    }
    Ok(span)
}

/// Checks that a chunk's batches are all of one size; returns it.
pub(crate) fn chunk_batch_size(batches: &[Batch]) -> Result<usize> {
    let n = batches.first().map_or(0, |b| b.len());
    if n == 0 || batches.iter().any(|b| b.len() != n) {
        bail!("a chunk needs one or more batches, all of the same (non-zero) size");
    }
    Ok(n)
}

/// Batches per chunk at most: a chunk's steps are recorded into one encoder and submitted at once.
pub const MAX_CHUNK_BATCHES: usize = 50;

/// Bytes in a GiB, for the messages about memory.
pub(crate) const GIB: f64 = (1u64 << 30) as f64;
