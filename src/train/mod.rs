//! The training loop, generic over the backend: the recipe's schedule, per-epoch evaluation, metrics,
//! checkpoints, resuming, Ctrl-C and divergence handling.

pub mod schedule;
pub mod seeds;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend::{Backend, StepParams, Sums, MAX_CHUNK_BATCHES};
use crate::checkpoint::{self, Position};
use crate::data::augment::{Augment, BatchAugment};
use crate::data::loader::{batches_per_epoch, eval_batches, spawn_epoch, Batch, LoaderConfig};
use crate::data::{Mnist, Split};
use crate::model::Model;
use schedule::OneCycle;

/// The recipe's hyper-parameters; the defaults are the spec's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    pub max_lr: f64,
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
            weight_decay: 1e-5,
            seed: 1,
            augment: Augment::default(),
            batch_augment: BatchAugment::default(),
        }
    }
}

impl Recipe {
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
    fn to_json(&self) -> String {
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

#[derive(Clone)]
pub struct TrainOptions {
    pub recipe: Recipe,
    pub out_dir: PathBuf,
    pub resume: Option<PathBuf>,
    /// Show progress bars (they also hide themselves when stderr is not a terminal).
    pub progress: bool,
    /// Set (by Ctrl-C) to stop after the chunk of steps being handed over, save and return.
    pub stop: Arc<AtomicBool>,
    /// Training steps per chunk handed to the backend (one submission on the GPU); None lets the
    /// backend choose from its limits and its measured pace. Results do not depend on it.
    pub chunk_batches: Option<usize>,
    /// Threads that augment training batches (the batches are the same for any count).
    pub loader_threads: usize,
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
pub fn evaluate(backend: &mut dyn Backend, split: &Split, batch_size: usize) -> Result<(f64, u64)> {
    backend.reset_sums()?;
    let mut batches = eval_batches(split, batch_size).peekable();
    loop {
        let chunk = take_chunk(&mut batches, backend.chunk_batches(batch_size, false));
        if chunk.is_empty() {
            break;
        }
        backend.eval_chunk(&chunk)?;
    }
    let s = backend.eval_sums()?;
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
pub fn run_chunks(
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
        backend.train_chunk(&chunk, first_step + run.batches)?;
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

/// The error of a run that diverged, saying what happened to the last checkpoint.
fn diverged(what: String, global_step: usize, last: &Path) -> anyhow::Error {
    let kept = if last.exists() {
        format!("the last good checkpoint, {}, is unchanged", last.display())
    } else {
        "no checkpoint had been written yet".to_string()
    };
    anyhow::anyhow!("training diverged: {what} by step {global_step}; {kept}")
}

fn check_finite(sums: Sums, global_step: usize, last: &Path) -> Result<()> {
    if sums.nonfinite {
        return Err(diverged("an update left parameters non-finite".into(), global_step, last));
    }
    if !sums.loss_sum.is_finite() {
        return Err(diverged(format!("the loss is {}", sums.loss_sum), global_step, last));
    }
    Ok(())
}

/// Saves a checkpoint, unless the parameters have gone non-finite (then the run has diverged).
fn save(backend: &mut dyn Backend, model: &Model, path: &Path, position: &Position, last: &Path) -> Result<()> {
    let state = backend.state()?;
    if let Some(p) = model.params.iter().find(|p| state[p.offset..p.offset + p.len].iter().any(|v| !v.is_finite())) {
        return Err(diverged(format!("{} has non-finite values", p.name), position.global_step, last));
    }
    checkpoint::save(path, model, &state, &backend.momenta()?, position)
}

/// Where checkpoint `path` lets a run of `recipe` resume: its state, its momenta and its position.
/// Fails, saying why, for a checkpoint that cannot continue this run (no position, no optimizer file,
/// another recipe). `train` calls it, and the command line before it creates or opens anything.
pub fn resume_point(path: &Path, model: &Model, recipe: &Recipe) -> Result<(Vec<f32>, Vec<f32>, Position)> {
    let ck = checkpoint::load(path, model)?;
    let pos = ck
        .position
        .with_context(|| format!("{}: no training position in its metadata; cannot resume", path.display()))?;
    let momenta = ck.momenta.with_context(|| {
        format!("{} is missing: the momenta are needed to resume exactly", checkpoint::optim_path(path).display())
    })?;
    if pos.recipe != recipe.to_json() {
        bail!(
            "{} was trained with recipe {}, not {}; resume with the same flags",
            path.display(),
            pos.recipe,
            recipe.to_json()
        );
    }
    Ok((ck.state, momenta, pos))
}

/// Trains `backend` (holding `model`'s state) on `data` as `opts.recipe` says. A GPU that fails
/// mid-run (a validation error, out of memory, a lost device) ends it with what the GPU said, what
/// became of the last checkpoint and how to go on from it.
pub fn train(backend: &mut dyn Backend, model: &Model, data: &Mnist, opts: &TrainOptions) -> Result<Outcome> {
    train_run(backend, model, data, opts).map_err(|e| {
        if !e.is::<crate::gpu::context::GpuFailure>() {
            return e;
        }
        let last = opts.out_dir.join("last.safetensors");
        let next = if last.exists() {
            format!(
                "the last good checkpoint, {}, is unchanged; continue with --resume {} (and the same flags)",
                last.display(),
                last.display()
            )
        } else {
            "no checkpoint had been written yet".to_string()
        };
        anyhow::anyhow!("{e:#}. Training stopped: {next}")
    })
}

fn train_run(backend: &mut dyn Backend, model: &Model, data: &Mnist, opts: &TrainOptions) -> Result<Outcome> {
    let r = opts.recipe;
    let train_split = Arc::new(data.train.clone());
    let steps_per_epoch = batches_per_epoch(train_split.len(), r.batch_size);
    let schedule = OneCycle::recipe(r.epochs * steps_per_epoch, r.max_lr);
    let loader = LoaderConfig {
        seed: r.seed,
        batch_size: r.batch_size,
        augment: Some(r.augment),
        batch_augment: r.batch_augment,
    };
    let last = opts.out_dir.join("last.safetensors");
    let best = opts.out_dir.join("best.safetensors");

    let (mut epoch, mut first_batch, mut global) = (0, 0, 0);
    let mut best_accuracy: Option<f64> = None;
    if let Some(path) = &opts.resume {
        let (state, momenta, pos) = resume_point(path, model, &r)?;
        backend.load(&state, &momenta)?;
        (epoch, first_batch, global) = (pos.epoch, pos.batch_in_epoch, pos.global_step);
        if best.exists() {
            best_accuracy = checkpoint::load(&best, model)?.position.and_then(|p| p.test_accuracy);
        }
        if epoch >= r.epochs {
            println!("{} finished all {} epochs already; nothing to do", path.display(), r.epochs);
        } else {
            println!("Resuming {} at epoch {}, batch {first_batch} (step {global})", path.display(), epoch + 1);
        }
    }

    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out_dir.join("metrics.jsonl"))
        .with_context(|| format!("opening {}", opts.out_dir.join("metrics.jsonl").display()))?;
    let mut records = Vec::new();
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").unwrap().progress_chars("=> ");

    // Every step's parameters, computed once for the whole run (the GPU keeps them in one buffer).
    let total_steps = r.epochs * steps_per_epoch;
    let steps: Vec<StepParams> = (0..total_steps)
        .map(|global| {
            let (lr, momentum) = schedule.at(global);
            StepParams {
                lr: lr as f32,
                momentum: momentum as f32,
                weight_decay: r.weight_decay,
                dropout_seed: r.seed as u32,
                step: global as u32,
                dropout: true,
            }
        })
        .collect();
    backend.set_schedule(&steps)?;
    let ahead = loader_ahead(r.batch_size, opts.loader_threads);

    while epoch < r.epochs {
        let started = Instant::now();
        let bar = if opts.progress { ProgressBar::new(steps_per_epoch as u64) } else { ProgressBar::hidden() };
        bar.set_style(style.clone());
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, r.epochs));
        bar.set_position(first_batch as u64);
        backend.reset_sums()?;
        let batches = spawn_epoch(train_split.clone(), loader, epoch, first_batch, ahead, opts.loader_threads);
        let loader_failure = batches.failure();
        let epoch_start_step = global;
        let run = run_chunks(backend, batches, global, opts.chunk_batches, &opts.stop, |done, sums| {
            check_finite(sums, epoch_start_step + done, &last)?;
            let images = (done * r.batch_size).min(train_split.len() - first_batch * r.batch_size);
            bar.set_position((first_batch + done) as u64);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                sums.loss_sum / images.max(1) as f64,
                100.0 * sums.correct as f64 / images.max(1) as f64,
                images as f64 / started.elapsed().as_secs_f64()
            ));
            Ok(())
        })?;
        global += run.batches;
        let seen = run.images;
        let done = first_batch + run.batches;
        if run.stopped {
            bar.abandon();
            check_finite(backend.train_sums()?, global, &last)?;
            let position = Position {
                epoch,
                batch_in_epoch: done,
                global_step: global,
                test_accuracy: records.last().map(|e: &EpochRecord| e.test_accuracy),
                seed: r.seed,
                recipe: r.to_json(),
            };
            save(backend, model, &last, &position, &last)?;
            println!(
                "Interrupted: saved {} at epoch {}, batch {done}; continue with --resume {}",
                last.display(),
                epoch + 1,
                last.display()
            );
            return Ok(Outcome { epochs: records, interrupted: true, best_accuracy });
        }
        if done < steps_per_epoch {
            let why = loader_failure.get().unwrap_or_else(|| "a loader thread died".into());
            bail!(
                "{why}: the loader stopped after batch {done} of {steps_per_epoch} in epoch {}; the checkpoints \
                 already saved in {} are unchanged",
                epoch + 1,
                opts.out_dir.display()
            );
        }
        let train_sums = backend.train_sums()?;
        check_finite(train_sums, global, &last)?;
        let train_seconds = started.elapsed().as_secs_f64();
        bar.finish_and_clear();

        let (test_loss, correct) = evaluate(backend, &data.test, r.batch_size)?;
        let seconds = started.elapsed().as_secs_f64();
        let accuracy = 100.0 * correct as f64 / data.test.len() as f64;
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: train_sums.loss_sum / seen.max(1) as f64,
            train_accuracy: 100.0 * train_sums.correct as f64 / seen.max(1) as f64,
            test_loss,
            test_correct: correct,
            test_total: data.test.len(),
            test_accuracy: accuracy,
            seconds,
            train_images_per_sec: seen as f64 / train_seconds,
            lr: schedule.at(global.saturating_sub(1)).0,
        };
        println!(
            "Epoch {}/{}: train loss {:.4}, accuracy {:.2}%, {:.0} images/s",
            record.epoch, r.epochs, record.train_loss, record.train_accuracy, record.train_images_per_sec
        );
        println!(
            "Test set: Average loss: {:.4}, Accuracy: {}/{} ({:.2}%)  [epoch time {:.1} s]",
            test_loss,
            correct,
            data.test.len(),
            accuracy,
            seconds
        );
        let position = Position {
            epoch: epoch + 1,
            batch_in_epoch: 0,
            global_step: global,
            test_accuracy: Some(accuracy),
            seed: r.seed,
            recipe: r.to_json(),
        };
        save(backend, model, &last, &position, &last)?;
        if best_accuracy.is_none_or(|b| accuracy > b) {
            best_accuracy = Some(accuracy);
            save(backend, model, &best, &position, &last)?;
        }
        // Only now: an epoch in metrics.jsonl always has its checkpoint.
        writeln!(metrics_file, "{}", record.to_json()).context("writing metrics.jsonl")?;
        records.push(record);
        epoch += 1;
        first_batch = 0;
        if opts.stop.load(Ordering::SeqCst) && epoch < r.epochs {
            println!("Interrupted: saved {}; continue with --resume {}", last.display(), last.display());
            return Ok(Outcome { epochs: records, interrupted: true, best_accuracy });
        }
    }
    if let (Some(best), Some(last)) = (best_accuracy, records.last()) {
        println!("Best test accuracy {best:.2}%, final {:.2}% ({})", last.test_accuracy, opts.out_dir.display());
    }
    Ok(Outcome { epochs: records, interrupted: false, best_accuracy })
}

/// `runs/2026-11-26T01-23-45` for now (UTC), so runs sort by time.
pub fn timestamped_dir(root: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    root.join(format!("{year:04}-{month:02}-{day:02}T{:02}-{:02}-{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
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
