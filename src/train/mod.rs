//! The training loop, generic over the backend: the recipe's schedule, per-epoch evaluation, metrics,
//! checkpoints, stopping and divergence handling. [`run`] is the one loop; where its reports and
//! checkpoints go is a [`Sink`]'s business: files and progress bars for the command line
//! ([`files::train`], which also resumes), messages and memory for the web page.

#[cfg(feature = "app")]
pub mod files;
pub mod schedule;
#[cfg(feature = "app")]
pub mod seeds;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use web_time::Instant;

use self::schedule::OneCycle;
use crate::backend::{Backend, StepParams, Sums, MAX_CHUNK_BATCHES};
use crate::checkpoint::{OptimState, Position};
use crate::data::augment::{Augment, BatchAugment};
use crate::data::loader::{batches_per_epoch, eval_batches, spawn_epoch, Batch, LoaderConfig};
use crate::data::{Mnist, Split};
use crate::model::Model;
use crate::optim::{weight_decay_fault, Optimizer, OptimizerKind};

/// The recipe's hyper-parameters; the defaults are the spec's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    pub max_lr: f64,
    /// The one-cycle schedule's shape (PyTorch's `OneCycleLR` arguments of the same names).
    pub pct_start: f64,
    pub div_factor: f64,
    pub final_div_factor: f64,
    pub optimizer: Optimizer,
    pub weight_decay: f32,
    pub seed: u64,
    /// The per-image augmentation's strength.
    pub augment: Augment,
    pub batch_augment: BatchAugment,
}

impl Default for Recipe {
    fn default() -> Recipe {
        Recipe {
            epochs: 20,
            batch_size: 100,
            max_lr: 0.1,
            pct_start: 0.3,
            div_factor: 10.0,
            final_div_factor: 100.0,
            optimizer: Optimizer::default(),
            weight_decay: OptimizerKind::Sgd.default_weight_decay(),
            seed: 1,
            augment: Augment::default(),
            batch_augment: BatchAugment::default(),
        }
    }
}

impl Recipe {
    /// The recipe a network is meant for: the spec's, with its model file's `[train]` values where
    /// the table has them (the command line's flags and the page's fields override these in turn).
    pub fn for_model(model: &Model) -> Recipe {
        let (spec, file) = (Recipe::default(), model.train);
        let kind = file.optimizer.unwrap_or(spec.optimizer.kind);
        let optimizer = Optimizer {
            kind,
            betas: file.betas.map_or(spec.optimizer.betas, |[b1, b2]| (b1, b2)),
            eps: file.eps.unwrap_or(spec.optimizer.eps),
        };
        Recipe {
            epochs: file.epochs.unwrap_or(spec.epochs),
            batch_size: file.batch_size.unwrap_or(spec.batch_size),
            max_lr: file.max_lr.unwrap_or(spec.max_lr),
            pct_start: file.pct_start.unwrap_or(spec.pct_start),
            div_factor: file.div_factor.unwrap_or(spec.div_factor),
            final_div_factor: file.final_div_factor.unwrap_or(spec.final_div_factor),
            optimizer,
            weight_decay: file.weight_decay.unwrap_or(kind.default_weight_decay()),
            augment: Augment {
                translate: file.translate.unwrap_or(spec.augment.translate),
                jitter: file.jitter.unwrap_or(spec.augment.jitter),
                rotate: file.rotate.unwrap_or(spec.augment.rotate),
                cutout: file.cutout.unwrap_or(spec.augment.cutout),
            },
            batch_augment: BatchAugment { swell: file.swell, darken: file.darken, squeeze: file.squeeze },
            ..spec
        }
    }

    /// The one-cycle schedule over `total_steps` steps (momentum cycled; only SGD uses it).
    pub fn schedule(&self, total_steps: usize) -> OneCycle {
        OneCycle {
            pct_start: self.pct_start,
            div_factor: self.div_factor,
            final_div_factor: self.final_div_factor,
            ..OneCycle::recipe(total_steps, self.max_lr)
        }
    }

    /// The loader of the run's training batches.
    pub fn loader(&self) -> LoaderConfig {
        LoaderConfig {
            seed: self.seed,
            batch_size: self.batch_size,
            // Strength 0 on every count is the identity: the loader skips it (the same pixels, sooner).
            augment: (self.augment != Augment::NONE || self.batch_augment.any()).then_some(self.augment),
            batch_augment: self.batch_augment,
        }
    }

    /// What is wrong with this recipe's optimizer settings, if anything (the rest of a model file's
    /// `[train]` table is checked where the file is read).
    pub fn fault(&self) -> Option<String> {
        weight_decay_fault(self.weight_decay).or_else(|| self.optimizer.fault())
    }
    pub fn to_json(&self) -> String {
        let mut json = serde_json::json!({
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_lr": self.max_lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "swell": self.batch_augment.swell,
            "darken": self.batch_augment.darken,
            "squeeze": self.batch_augment.squeeze,
        });
        // Only when not the recipe's, so that checkpoints of recipe-strength runs keep their recipe.
        let spec = Recipe::default();
        if (self.pct_start, self.div_factor, self.final_div_factor)
            != (spec.pct_start, spec.div_factor, spec.final_div_factor)
        {
            json["schedule"] = serde_json::json!({
                "pct_start": self.pct_start, "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
            });
        }
        let o = self.optimizer;
        if o.kind != OptimizerKind::Sgd {
            json["optimizer"] =
                serde_json::json!({ "name": o.kind.name(), "betas": [o.betas.0, o.betas.1], "eps": o.eps });
        }
        let a = self.augment;
        if a != Augment::default() {
            json["augment"] = serde_json::json!({
                "translate": a.translate, "jitter": a.jitter, "rotate": a.rotate, "cutout": a.cutout,
            });
        }
        json.to_string()
    }
}

/// Metrics of one epoch, as written to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_correct: u64,
    pub test_total: usize,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub train_images_per_sec: f64,
    pub lr: f64,
}

impl EpochRecord {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "test_loss": self.test_loss,
            "test_correct": self.test_correct,
            "test_total": self.test_total,
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
            "train_images_per_sec": self.train_images_per_sec,
            "lr": self.lr,
        })
        .to_string()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub epochs: Vec<EpochRecord>,
    /// Stopped by the stop flag before the last epoch's end.
    pub interrupted: bool,
    pub best_accuracy: Option<f64>,
}

/// Takes the next chunk: up to `k` batches from `batches`, all the size of the first (an epoch's
/// smaller last batch goes into a chunk of its own).
fn take_chunk<I: Iterator<Item = Batch>>(batches: &mut std::iter::Peekable<I>, k: usize) -> Vec<Batch> {
    let mut chunk: Vec<Batch> = Vec::with_capacity(k);
    while chunk.len() < k.max(1) {
        match batches.next_if(|b| chunk.first().is_none_or(|first| first.len() == b.len())) {
            Some(b) => chunk.push(b),
            None => break,
        }
    }
    chunk
}

/// Loss and accuracy of `backend` over a whole split in evaluation mode.
pub async fn evaluate(backend: &mut dyn Backend, split: &Split, batch_size: usize) -> Result<(f64, u64)> {
    backend.reset_sums().await?;
    let mut batches = eval_batches(split, batch_size).peekable();
    loop {
        let chunk = take_chunk(&mut batches, backend.chunk_batches(batch_size, false));
        if chunk.is_empty() {
            break;
        }
        backend.eval_chunk(&chunk).await?;
    }
    let s = backend.eval_sums().await?;
    Ok((s.loss_sum / split.len() as f64, s.correct))
}

/// Batches the loader builds ahead: two full chunks when they fit in 128 MiB, and a few per thread.
pub fn loader_ahead(batch_size: usize, threads: usize) -> usize {
    let batch_bytes = batch_size * crate::data::IMAGE_PIXELS * 4;
    (2 * MAX_CHUNK_BATCHES).min((128 << 20) / batch_bytes.max(1)).max(4 * threads.max(1))
}

/// What [`run_chunks`] handed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunksRun {
    /// Batches handed over (all of them run by the time the backend's sums are read).
    pub batches: usize,
    pub images: usize,
    /// Stopped early by the stop flag, with batches left.
    pub stopped: bool,
}

/// Hands `batches` (consecutive training batches, the first of them global step `first_step`) to
/// `backend` in chunks of `fixed_chunk` batches, or as many as the backend asks for, one chunk after
/// another without waiting. `on_sums(batches, sums)` sees the running sums whenever a chunk's come back
/// (the batches they cover since the last reset). Stops after the chunk during which `stop` got set.
pub async fn run_chunks(
    backend: &mut dyn Backend,
    batches: impl Iterator<Item = Batch>,
    first_step: usize,
    fixed_chunk: Option<usize>,
    stop: &AtomicBool,
    mut on_sums: impl FnMut(usize, Sums) -> Result<()>,
) -> Result<ChunksRun> {
    let mut batches = batches.peekable();
    let mut run = ChunksRun { batches: 0, images: 0, stopped: false };
    while let Some(next) = batches.peek() {
        let k = fixed_chunk.unwrap_or_else(|| backend.chunk_batches(next.len(), true));
        let chunk = take_chunk(&mut batches, k);
        backend.train_chunk(&chunk, first_step + run.batches).await?;
        run.batches += chunk.len();
        run.images += chunk.iter().map(|b| b.len()).sum::<usize>();
        if let Some((done, sums)) = backend.poll_train_sums()? {
            on_sums(done, sums)?;
        }
        if stop.load(Ordering::SeqCst) && batches.peek().is_some() {
            run.stopped = true;
            break;
        }
    }
    Ok(run)
}

/// Which checkpoint a run keeps: the latest (each epoch's end, or where it stopped) or the best so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Last,
    Best,
}

/// The running figures of the epoch under way, whenever a chunk's sums come back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Epochs from 0.
    pub epoch: usize,
    /// Batches of the epoch done (those before a resumed run's first included), of `batches`.
    pub done: usize,
    pub batches: usize,
    /// Over the images this run has trained on in this epoch.
    pub loss: f64,
    pub accuracy: f64,
    pub images_per_sec: f64,
}

/// Where a run's reports and checkpoints go.
pub trait Sink {
    /// Epoch `epoch` (from 0) of `epochs` starts, at batch `first_batch` of `batches`.
    fn epoch_started(&mut self, epoch: usize, epochs: usize, first_batch: usize, batches: usize);
    fn progress(&mut self, p: &Progress);
    /// Keeps a checkpoint of `state` (finite) and the optimizer's state at `position`.
    fn keep(
        &mut self,
        which: Kept,
        model: &Model,
        state: &[f32],
        optim: &OptimState,
        position: &Position,
    ) -> Result<()>;
    /// An epoch's record, once its checkpoints are kept.
    fn epoch_finished(&mut self, record: &EpochRecord) -> Result<()>;
    /// The run stopped (the stop flag) at `position`, its last checkpoint kept there.
    fn stopped(&mut self, position: &Position);
    /// What became of the last good checkpoint, for a run that fails (a sentence's end).
    fn last_kept(&self) -> String;
}

/// Where a run starts, and how it hands work over.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    pub recipe: Recipe,
    /// Epoch, batch in epoch and global step to start at (a resumed run's checkpoint position).
    pub start: (usize, usize, usize),
    /// The best test accuracy of the run so far (a resumed run's best checkpoint).
    pub best_accuracy: Option<f64>,
    /// Training steps per chunk handed to the backend (one submission on the GPU); None lets the
    /// backend choose from its limits and its measured pace. Results do not depend on it.
    pub chunk_batches: Option<usize>,
    /// Threads that augment training batches (the batches are the same for any count); 0 builds them
    /// on the training thread.
    pub loader_threads: usize,
}

/// The error of a run that diverged, saying what happened to the last checkpoint.
fn diverged(what: String, global_step: usize, sink: &dyn Sink) -> anyhow::Error {
    anyhow::anyhow!("training diverged: {what} by step {global_step}; {}", sink.last_kept())
}

fn check_finite(sums: Sums, global_step: usize, sink: &dyn Sink) -> Result<()> {
    if sums.nonfinite {
        return Err(diverged("an update left parameters non-finite".into(), global_step, sink));
    }
    if !sums.loss_sum.is_finite() {
        return Err(diverged(format!("the loss is {}", sums.loss_sum), global_step, sink));
    }
    Ok(())
}

/// Keeps a checkpoint, unless the parameters have gone non-finite (then the run has diverged).
async fn keep(
    backend: &mut dyn Backend,
    (model, optimizer): (&Model, OptimizerKind),
    which: Kept,
    position: &Position,
    sink: &mut dyn Sink,
) -> Result<()> {
    let state = backend.state().await?;
    if let Some(p) = model.params.iter().find(|p| state[p.offset..p.offset + p.len].iter().any(|v| !v.is_finite())) {
        return Err(diverged(format!("{} has non-finite values", p.name), position.global_step, sink));
    }
    let optim = OptimState { kind: optimizer, moments: backend.moments().await? };
    sink.keep(which, model, &state, &optim, position)
}

/// Every step's parameters, computed once for the whole run (the GPU keeps them in one buffer).
fn step_params(r: &Recipe, schedule: &OneCycle, total_steps: usize) -> Vec<StepParams> {
    (0..total_steps)
        .map(|global| {
            let (lr, momentum) = schedule.at(global);
            StepParams {
                lr: lr as f32,
                momentum: momentum as f32,
                weight_decay: r.weight_decay,
                dropout_seed: r.seed as u32,
                step: global as u32,
                dropout: true,
                optimizer: r.optimizer,
            }
        })
        .collect()
}

/// The run's position at `global_step`, for a checkpoint.
fn position(
    r: &Recipe,
    epoch: usize,
    batch_in_epoch: usize,
    global_step: usize,
    test_accuracy: Option<f64>,
) -> Position {
    Position { epoch, batch_in_epoch, global_step, test_accuracy, seed: r.seed, recipe: r.to_json() }
}

/// An epoch whose steps all ran: its index, the global step after it, the images it trained on, when
/// it started and its last step's learning rate.
struct Trained {
    epoch: usize,
    global: usize,
    images: usize,
    started: Instant,
    lr: f64,
}

/// The end of a trained epoch: the test set evaluated, its record, the last checkpoint kept (and the
/// best, when it is), then the record reported: an epoch reported always has its checkpoint.
async fn end_epoch(
    backend: &mut dyn Backend,
    model: &Model,
    data: &Mnist,
    r: &Recipe,
    t: Trained,
    best_accuracy: &mut Option<f64>,
    sink: &mut dyn Sink,
) -> Result<(EpochRecord, Position)> {
    let train_sums = backend.train_sums().await?;
    check_finite(train_sums, t.global, sink)?;
    let train_seconds = t.started.elapsed().as_secs_f64();
    let (test_loss, correct) = evaluate(backend, &data.test, r.batch_size).await?;
    let seen = t.images.max(1) as f64;
    let accuracy = 100.0 * correct as f64 / data.test.len() as f64;
    let record = EpochRecord {
        epoch: t.epoch + 1,
        train_loss: train_sums.loss_sum / seen,
        train_accuracy: 100.0 * train_sums.correct as f64 / seen,
        test_loss,
        test_correct: correct,
        test_total: data.test.len(),
        test_accuracy: accuracy,
        seconds: t.started.elapsed().as_secs_f64(),
        train_images_per_sec: t.images as f64 / train_seconds,
        lr: t.lr,
    };
    let at = position(r, t.epoch + 1, 0, t.global, Some(accuracy));
    keep(backend, (model, r.optimizer.kind), Kept::Last, &at, sink).await?;
    if best_accuracy.is_none_or(|b| accuracy > b) {
        *best_accuracy = Some(accuracy);
        keep(backend, (model, r.optimizer.kind), Kept::Best, &at, sink).await?;
    }
    sink.epoch_finished(&record)?;
    Ok((record, at))
}

/// Trains `backend` (holding `model`'s state) on `data` as `opts.recipe` says, from `opts.start`,
/// evaluating on the test set after every epoch; `sink` gets the progress, the records and the
/// checkpoints. Setting `stop` ends the run after the chunk of steps being handed over, with its
/// last checkpoint kept there.
pub async fn run(
    backend: &mut dyn Backend,
    model: &Model,
    data: &Mnist,
    opts: &RunOptions,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
) -> Result<Outcome> {
    let r = opts.recipe;
    let train_split = Arc::new(data.train.clone());
    let steps_per_epoch = batches_per_epoch(train_split.len(), r.batch_size);
    let schedule = r.schedule(r.epochs * steps_per_epoch);
    let loader = r.loader();
    let (mut epoch, mut first_batch, mut global) = opts.start;
    let mut best_accuracy = opts.best_accuracy;
    let mut records: Vec<EpochRecord> = Vec::new();
    backend.set_schedule(&step_params(&r, &schedule, r.epochs * steps_per_epoch))?;
    let ahead = loader_ahead(r.batch_size, opts.loader_threads);

    while epoch < r.epochs {
        let started = Instant::now();
        sink.epoch_started(epoch, r.epochs, first_batch, steps_per_epoch);
        backend.reset_sums().await?;
        let batches = spawn_epoch(train_split.clone(), loader, epoch, first_batch, ahead, opts.loader_threads);
        let loader_failure = batches.failure();
        let epoch_start_step = global;
        let resumed_images = first_batch * r.batch_size;
        let run = run_chunks(backend, batches, global, opts.chunk_batches, stop, |done, sums| {
            check_finite(sums, epoch_start_step + done, sink)?;
            let images = (done * r.batch_size).min(train_split.len() - resumed_images).max(1) as f64;
            sink.progress(&Progress {
                epoch,
                done: first_batch + done,
                batches: steps_per_epoch,
                loss: sums.loss_sum / images,
                accuracy: 100.0 * sums.correct as f64 / images,
                images_per_sec: images / started.elapsed().as_secs_f64(),
            });
            Ok(())
        })
        .await?;
        global += run.batches;
        let done = first_batch + run.batches;
        if run.stopped {
            check_finite(backend.train_sums().await?, global, sink)?;
            let at = position(&r, epoch, done, global, records.last().map(|e| e.test_accuracy));
            keep(backend, (model, r.optimizer.kind), Kept::Last, &at, sink).await?;
            sink.stopped(&at);
            return Ok(Outcome { epochs: records, interrupted: true, best_accuracy });
        }
        if done < steps_per_epoch {
            let why = loader_failure.get().unwrap_or_else(|| "a loader thread died".into());
            bail!(
                "{why}: the loader stopped after batch {done} of {steps_per_epoch} in epoch {}; {}",
                epoch + 1,
                sink.last_kept()
            );
        }
        let lr = schedule.at(global.saturating_sub(1)).0;
        let trained = Trained { epoch, global, images: run.images, started, lr };
        let (record, at) = end_epoch(backend, model, data, &r, trained, &mut best_accuracy, sink).await?;
        records.push(record);
        epoch += 1;
        first_batch = 0;
        if stop.load(Ordering::SeqCst) && epoch < r.epochs {
            sink.stopped(&at);
            return Ok(Outcome { epochs: records, interrupted: true, best_accuracy });
        }
    }
    Ok(Outcome { epochs: records, interrupted: false, best_accuracy })
}

/// A run timed for time to accuracy: the seconds from its first step to the end of its last (the
/// loader's work included; the data were already in memory), the evaluation's seconds, and what it
/// gave on the evaluation split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimedRun {
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub loss: f64,
    pub correct: u64,
    pub total: usize,
}

impl TimedRun {
    pub fn accuracy(&self) -> f64 {
        100.0 * self.correct as f64 / self.total.max(1) as f64
    }
}

/// Trains `backend` (holding `model`'s initial state) on `train` as `r` says, every epoch straight
/// after the one before (no evaluation and no checkpoint between them), then evaluates on `eval`
/// once: what `speedrun` times. Fails, saying when, if the run diverges.
pub async fn timed_run(
    backend: &mut dyn Backend,
    (train, eval): (&Split, &Split),
    r: &Recipe,
    loader_threads: usize,
) -> Result<TimedRun> {
    let split = Arc::new(train.clone());
    let steps_per_epoch = batches_per_epoch(split.len(), r.batch_size);
    let total = r.epochs * steps_per_epoch;
    backend.set_schedule(&step_params(r, &r.schedule(total), total))?;
    let ahead = loader_ahead(r.batch_size, loader_threads);
    let never = AtomicBool::new(false);
    backend.reset_sums().await?;
    let started = Instant::now();
    let mut global = 0;
    for epoch in 0..r.epochs {
        let batches = spawn_epoch(split.clone(), r.loader(), epoch, 0, ahead, loader_threads);
        let failure = batches.failure();
        let run = run_chunks(backend, batches, global, None, &never, |done, sums| match sums.nonfinite {
            true => bail!("training diverged: an update left parameters non-finite by step {}", global + done),
            false => Ok(()),
        })
        .await?;
        global += run.batches;
        if run.batches < steps_per_epoch {
            let why = failure.get().unwrap_or_else(|| "a loader thread died".into());
            bail!("{why}: the loader stopped after batch {} of {steps_per_epoch} in epoch {}", run.batches, epoch + 1);
        }
    }
    // Waits for the device: the last step has ended when its sums are back.
    let sums = backend.train_sums().await?;
    let train_seconds = started.elapsed().as_secs_f64();
    if sums.nonfinite || !sums.loss_sum.is_finite() {
        bail!("training diverged by step {global}: the loss is {}", sums.loss_sum);
    }
    let eval_started = Instant::now();
    let (loss, correct) = evaluate(backend, eval, r.batch_size).await?;
    Ok(TimedRun { train_seconds, eval_seconds: eval_started.elapsed().as_secs_f64(), loss, correct, total: eval.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_json_names_the_augmentation_only_when_it_is_not_the_recipes() {
        // Checkpoints compare this text on resume: a recipe-strength run keeps the text it always had.
        let spec = Recipe::default().to_json();
        assert!(!spec.contains("augment\""), "{spec}");
        let mild = Recipe { augment: Augment { rotate: 7.0, ..Augment::default() }, ..Recipe::default() };
        let json: serde_json::Value = serde_json::from_str(&mild.to_json()).unwrap();
        assert_eq!(json["augment"]["rotate"], 7.0);
        assert_eq!(json["augment"]["translate"], 4);
    }
}
