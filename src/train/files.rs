//! The command line's side of a training run: resuming from a checkpoint file, the run's folder
//! (`last.safetensors`, `best.safetensors`, `metrics.jsonl`), progress bars and printed epochs, Ctrl-C,
//! and what a failed GPU leaves to go on from.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{EpochRecord, Kept, Outcome, Progress, Recipe, RunOptions, Sink};
use crate::backend::Backend;
use crate::checkpoint::{self, OptimState, Position};
use crate::data::Mnist;
use crate::model::Model;

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

/// Where checkpoint `path` lets a run of `recipe` resume: its state, its optimizer's moments (as
/// `Backend::moments` holds them) and its position.
/// Fails, saying why, for a checkpoint that cannot continue this run (no position, no optimizer file,
/// another recipe). `train` calls it, and the command line before it creates or opens anything.
pub fn resume_point(path: &Path, model: &Model, recipe: &Recipe) -> Result<(Vec<f32>, Vec<f32>, Position)> {
    let ck = checkpoint::load(path, model)?;
    let pos = ck
        .position
        .with_context(|| format!("{}: no training position in its metadata; cannot resume", path.display()))?;
    let optim = ck.optim.with_context(|| {
        format!(
            "{} is missing: the optimizer's state is needed to resume exactly",
            checkpoint::optim_path(path).display()
        )
    })?;
    if pos.recipe != recipe.to_json() {
        bail!(
            "{} was trained with recipe {}, not {}; resume with the same flags",
            path.display(),
            pos.recipe,
            recipe.to_json()
        );
    }
    if optim.kind != recipe.optimizer.kind {
        bail!(
            "{} holds the state of {}, but this run uses {}; resume with the same --optimizer",
            checkpoint::optim_path(path).display(),
            optim.kind.name(),
            recipe.optimizer.kind.name()
        );
    }
    Ok((ck.state, optim.moments, pos))
}

/// The run's folder, its progress bar and its printed lines.
struct FileSink {
    out_dir: PathBuf,
    last: PathBuf,
    best: PathBuf,
    metrics: std::fs::File,
    progress: bool,
    bar: ProgressBar,
    recipe: Recipe,
}

impl Sink for FileSink {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, first_batch: usize, batches: usize) {
        let style =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}").unwrap().progress_chars("=> ");
        self.bar = if self.progress { ProgressBar::new(batches as u64) } else { ProgressBar::hidden() };
        self.bar.set_style(style);
        self.bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
        self.bar.set_position(first_batch as u64);
    }

    fn progress(&mut self, p: &Progress) {
        self.bar.set_position(p.done as u64);
        self.bar.set_message(format!("loss {:.4} acc {:.2}% {:.0} img/s", p.loss, p.accuracy, p.images_per_sec));
    }

    fn keep(
        &mut self,
        which: Kept,
        model: &Model,
        state: &[f32],
        optim: &OptimState,
        position: &Position,
    ) -> Result<()> {
        let path = match which {
            Kept::Last => &self.last,
            Kept::Best => &self.best,
        };
        checkpoint::save(path, model, state, optim, position)
    }

    fn epoch_finished(&mut self, record: &EpochRecord) -> Result<()> {
        self.bar.finish_and_clear();
        println!(
            "Epoch {}/{}: train loss {:.4}, accuracy {:.2}%, {:.0} images/s",
            record.epoch, self.recipe.epochs, record.train_loss, record.train_accuracy, record.train_images_per_sec
        );
        println!(
            "Test set: Average loss: {:.4}, Accuracy: {}/{} ({:.2}%)  [epoch time {:.1} s]",
            record.test_loss, record.test_correct, record.test_total, record.test_accuracy, record.seconds
        );
        writeln!(self.metrics, "{}", record.to_json()).context("writing metrics.jsonl")
    }

    fn stopped(&mut self, position: &Position) {
        self.bar.abandon();
        let last = self.last.display();
        if position.batch_in_epoch > 0 {
            println!(
                "Interrupted: saved {last} at epoch {}, batch {}; continue with --resume {last}",
                position.epoch + 1,
                position.batch_in_epoch
            );
        } else {
            println!("Interrupted: saved {last}; continue with --resume {last}");
        }
    }

    fn last_kept(&self) -> String {
        if self.last.exists() {
            format!("the last good checkpoint, {}, is unchanged", self.last.display())
        } else {
            "no checkpoint had been written yet".to_string()
        }
    }
}

/// Trains `backend` (holding `model`'s state) on `data` as `opts.recipe` says, into `opts.out_dir`,
/// from `opts.resume` when given. A GPU that fails mid-run (a validation error, out of memory, a lost
/// device) ends it with what the GPU said, what became of the last checkpoint and how to go on from it.
pub fn train(backend: &mut dyn Backend, model: &Model, data: &Mnist, opts: &TrainOptions) -> Result<Outcome> {
    pollster::block_on(train_run(backend, model, data, opts)).map_err(|e| {
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

async fn train_run(backend: &mut dyn Backend, model: &Model, data: &Mnist, opts: &TrainOptions) -> Result<Outcome> {
    let r = opts.recipe;
    let last = opts.out_dir.join("last.safetensors");
    let best = opts.out_dir.join("best.safetensors");
    let mut run = RunOptions {
        recipe: r,
        start: (0, 0, 0),
        best_accuracy: None,
        chunk_batches: opts.chunk_batches,
        loader_threads: opts.loader_threads.max(1),
    };
    if let Some(path) = &opts.resume {
        let (state, moments, pos) = resume_point(path, model, &r)?;
        backend.load(&state, &moments).await?;
        run.start = (pos.epoch, pos.batch_in_epoch, pos.global_step);
        if best.exists() {
            run.best_accuracy = checkpoint::load(&best, model)?.position.and_then(|p| p.test_accuracy);
        }
        if pos.epoch >= r.epochs {
            println!("{} finished all {} epochs already; nothing to do", path.display(), r.epochs);
        } else {
            println!(
                "Resuming {} at epoch {}, batch {} (step {})",
                path.display(),
                pos.epoch + 1,
                pos.batch_in_epoch,
                pos.global_step
            );
        }
    }

    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.out_dir.join("metrics.jsonl"))
        .with_context(|| format!("opening {}", opts.out_dir.join("metrics.jsonl").display()))?;
    let mut sink = FileSink {
        out_dir: opts.out_dir.clone(),
        last,
        best,
        metrics,
        progress: opts.progress,
        bar: ProgressBar::hidden(),
        recipe: r,
    };
    let outcome = super::run(backend, model, data, &run, &opts.stop, &mut sink).await?;
    if let (Some(best), Some(last), false) = (outcome.best_accuracy, outcome.epochs.last(), outcome.interrupted) {
        println!("Best test accuracy {best:.2}%, final {:.2}% ({})", last.test_accuracy, sink.out_dir.display());
    }
    Ok(outcome)
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
