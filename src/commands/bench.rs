//! `mnist-wgpu bench`: images/s of the training step, the training loop and evaluation on each
//! backend, of augmentation and of the loader. Each figure is the median over repeats after warm-up;
//! a backend's step is first checked against the CPU reference on one batch, so a fast but wrong
//! kernel cannot post a number. `profile` shares its inputs and its check.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use pollster::block_on;

use anyhow::{bail, Result};
use clap::Args;

use mnist_wgpu::backend::{Backend, StepParams, MAX_CHUNK_BATCHES};
use mnist_wgpu::data::loader::{
    batches_per_epoch, default_threads, epoch_order, eval_batches, spawn_epoch, train_batch, Batch, LoaderConfig,
};
use mnist_wgpu::data::{
    self,
    augment::{Augment, BatchAugment},
};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::Model;
use mnist_wgpu::optim::{Optimizer, OptimizerKind};
use mnist_wgpu::train::{loader_ahead, run_chunks};
use mnist_wgpu::verify;

use super::{make_backend, BackendChoice, DeviceArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k, net3-avgpool2, mlp3, fast-recipe).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// The update that ends each training step: sgd, adam or adamw.
    #[arg(long, value_name = "NAME", value_parser = OptimizerKind::parse, default_value = "sgd")]
    optimizer: OptimizerKind,
    /// Training steps (or evaluation batches) per timed repeat.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Timed repeats; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Images per training step and per evaluation batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Backends to measure (default: the CPU, and the GPU when a hardware adapter is there).
    #[arg(long, value_enum, value_delimiter = ',')]
    backends: Vec<BackendChoice>,
    /// The GPU adapter: an index from `adapters`, or part of its name.
    #[arg(long)]
    adapter: Option<String>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also (with no --backends: only) the host's ceiling: the GPU backend's training steps, training
    /// loop and evaluation with every launch of zero workgroups (loader, uploads, recording, submits
    /// and read-backs only).
    #[arg(long)]
    host_only: bool,
}

struct Row {
    what: String,
    device: String,
    median: f64,
    min: f64,
    max: f64,
}

/// The median of `v`, its min and its max.
pub(super) fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    // An even count's median is the mean of the middle two.
    let median = if v.len().is_multiple_of(2) { (v[mid - 1] + v[mid]) / 2.0 } else { v[mid] };
    (median, v[0], v[v.len() - 1])
}

/// Runs `work` (which handles `images` images) `repeats` times after one warm-up; images/s per run.
fn time(repeats: usize, images: usize, mut work: impl FnMut() -> Result<()>) -> Result<(f64, f64, f64)> {
    work()?;
    let mut rates = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        work()?;
        rates.push(images as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}

/// One whole training step from the same state and a random batch on `backend` and on the CPU reference: every
/// parameter, momentum and running statistic and the loss must agree (`verify`'s step check).
pub(super) fn validate(backend: &mut dyn Backend, model: &Model, batch_size: usize) -> Result<()> {
    let checks = block_on(verify::step_checks(model, backend, batch_size, 0))?.checks;
    let failed = verify::failures(&checks);
    if !failed.is_empty() {
        bail!(
            "{}: a training step differs from the CPU reference; not timing it:\n{}\n{}",
            backend.describe(),
            verify::header(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// Batches the loader rows time per repeat (at least): long enough for the threads to start and settle.
const LOADER_BATCHES: usize = 200;

/// The network a bench or profile times, and the bundled MNIST, which must hold a batch.
pub(super) fn timed_inputs(model: Option<&str>, batch_size: usize) -> Result<(Model, data::Mnist)> {
    let model = mnist_wgpu::model::file::for_mnist(model)?;
    let set = data::load_dir(&data::default_dir())?;
    if batch_size > set.train.len() {
        bail!("--batch-size {batch_size} is larger than the training set ({} images)", set.train.len());
    }
    Ok((model, set))
}

/// The loader of the timed batches: seed 1, the recipe's augmentation.
pub(super) fn timed_loader(batch_size: usize) -> LoaderConfig {
    LoaderConfig { seed: 1, batch_size, augment: Some(Augment::default()), batch_augment: BatchAugment::default() }
}

/// Timed batch `i`: epoch 0's full batches in order, from the first again after the last, so that any
/// number of steps has a batch of `cfg.batch_size` images (`timed_inputs` checked it fits).
pub(super) fn timed_batch(split: &data::Split, order: &[u32], cfg: &LoaderConfig, i: usize) -> Batch {
    train_batch(split, order, cfg, 0, i % (split.len() / cfg.batch_size))
}

/// The parameters of timed step `step` with `optimizer`'s update (dropout on, as in training).
pub(super) fn step_params(step: usize, optimizer: OptimizerKind) -> StepParams {
    StepParams {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-5,
        dropout_seed: 1,
        step: step as u32,
        dropout: true,
        optimizer: Optimizer { kind: optimizer, ..Optimizer::default() },
    }
}

/// Chunks the training loop row runs per repeat, at least: the loader's start and the last chunk's
/// wait, which no chunk overlaps, are then a small part of the figure, as in an epoch of training.
const LOOP_CHUNKS: usize = 10;
/// Longest loop repeat (and the length of the benchmark's schedule).
const MAX_LOOP_STEPS: usize = LOOP_CHUNKS * MAX_CHUNK_BATCHES;

/// Training steps the loop row runs per repeat: the asked-for steps, and at least LOOP_CHUNKS chunks
/// of the size the backend picks (once warm); at most an epoch's full batches, which is all the loop
/// is given (`training_loop` runs within epoch 0).
fn loop_steps(backend: &dyn Backend, args: &BenchArgs, train_len: usize) -> usize {
    let steps = args.steps.max(LOOP_CHUNKS * backend.chunk_batches(args.batch_size, true)).min(MAX_LOOP_STEPS);
    steps.min(train_len / args.batch_size)
}

/// The training loop as `train` runs it, over `steps` batches: loader threads, chunks handed over
/// without waiting, running sums picked up as chunks finish; then a wait for the last.
fn training_loop(
    backend: &mut dyn Backend,
    split: &Arc<data::Split>,
    cfg: LoaderConfig,
    steps: usize,
    threads: usize,
) -> Result<()> {
    block_on(backend.reset_sums())?;
    let ahead = loader_ahead(cfg.batch_size, threads);
    let batches = spawn_epoch(split.clone(), cfg, 0, 0, ahead, threads).take(steps);
    let never = AtomicBool::new(false);
    block_on(run_chunks(backend, batches, 0, None, &never, |_, sums| {
        std::hint::black_box(sums);
        Ok(())
    }))?;
    block_on(backend.train_sums())?;
    Ok(())
}

/// Evaluation in chunks, as `train` evaluates after an epoch.
fn evaluation(backend: &mut dyn Backend, eval: &[Batch]) -> Result<()> {
    block_on(backend.reset_sums())?;
    for chunk in eval.chunks(backend.chunk_batches(eval[0].len(), false)) {
        block_on(backend.eval_chunk(chunk))?;
    }
    block_on(backend.eval_sums())?;
    Ok(())
}

/// `mnist-wgpu bench`: the host's rows (augmentation, the loader), then each backend's.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.steps == 0 || args.repeats == 0 || args.batch_size == 0 {
        bail!("--steps, --repeats and --batch-size must be at least 1");
    }
    let (model, set) = timed_inputs(args.model.as_deref(), args.batch_size)?;
    let cfg = timed_loader(args.batch_size);
    let split = Arc::new(set.train.clone());
    let mut rows = host_rows(&args, &split, cfg)?;
    let order = epoch_order(1, 0, set.train.len());
    let timed = Timed {
        batches: (0..args.steps).map(|i| timed_batch(&set.train, &order, &cfg, i)).collect(),
        eval: eval_batches(&set.test, args.batch_size).take(args.steps).collect(),
        split,
        cfg,
        threads: default_threads(),
    };
    let schedule: Vec<StepParams> =
        (0..MAX_LOOP_STEPS.max(args.steps)).map(|i| step_params(i, args.optimizer)).collect();
    // The asked-for backends, then the host-only GPU backend when asked.
    let runs =
        backends(&args).into_iter().map(|b| (b, false)).chain(args.host_only.then_some((BackendChoice::Gpu, true)));
    for (choice, host_only) in runs {
        let mut backend: Box<dyn Backend> = if host_only {
            let mut gpu = GpuBackend::new(GpuContext::new(args.adapter.as_deref())?, &model, &model.init_state(1))?;
            validate(&mut gpu, &model, args.batch_size)?;
            gpu.set_host_only(true);
            Box::new(gpu)
        } else {
            let device = DeviceArgs { backend: choice, adapter: args.adapter.clone() };
            let mut backend = make_backend(&device, &model, model.init_state(1))?;
            validate(backend.as_mut(), &model, args.batch_size)?;
            backend
        };
        backend.set_schedule(&schedule)?;
        rows.extend(backend_rows(&args, backend.as_mut(), host_only, &timed)?);
    }
    print_rows(&args, &rows, timed.threads)
}

/// Augmentation on one thread, and the loader as training runs it (worker threads, in-order
/// hand-over) with one thread and with one per core, over enough batches to be timed.
fn host_rows(args: &BenchArgs, split: &Arc<data::Split>, cfg: LoaderConfig) -> Result<Vec<Row>> {
    let order = epoch_order(1, 0, split.len());
    let mut rows = Vec::new();
    let (m, lo, hi) = time(args.repeats, args.steps * args.batch_size, || {
        for i in 0..args.steps {
            std::hint::black_box(timed_batch(split, &order, &cfg, i));
        }
        Ok(())
    })?;
    rows.push(Row { what: "augmentation (1 thread)".into(), device: "cpu".into(), median: m, min: lo, max: hi });
    let loader_batches = args.steps.max(LOADER_BATCHES).min(batches_per_epoch(split.len(), args.batch_size));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in if cores > 1 { vec![1, cores] } else { vec![1] } {
        let (m, lo, hi) = time(args.repeats, loader_batches * args.batch_size, || {
            for b in spawn_epoch(split.clone(), cfg, 0, 0, 4 * threads, threads).take(loader_batches) {
                std::hint::black_box(b);
            }
            Ok(())
        })?;
        let what = format!("loader ({threads} thread{})", if threads > 1 { "s" } else { "" });
        rows.push(Row { what, device: "cpu".into(), median: m, min: lo, max: hi });
    }
    Ok(rows)
}

/// The backends `--backends` names; by default the CPU, and the GPU on a hardware adapter.
fn backends(args: &BenchArgs) -> Vec<BackendChoice> {
    let mut backends = args.backends.clone();
    if backends.is_empty() && !args.host_only {
        backends.push(BackendChoice::Cpu);
        match GpuContext::new(args.adapter.as_deref()) {
            Ok(ctx) if !ctx.is_software() => backends.push(BackendChoice::Gpu),
            Ok(ctx) => eprintln!(
                "note: not timing the GPU backend on {}, a software adapter; ask with --backends gpu",
                ctx.info.name
            ),
            Err(_) => eprintln!("note: no GPU adapter; timing the CPU backend only"),
        }
    }
    backends
}

/// What every backend is timed on: prepared training batches, evaluation batches, and the loader.
struct Timed {
    batches: Vec<Batch>,
    eval: Vec<Batch>,
    split: Arc<data::Split>,
    cfg: LoaderConfig,
    threads: usize,
}

/// A backend's rows: training steps on prepared batches (with the host-only GPU backend, what its
/// host side costs), chunked as training hands them over; the training loop; evaluation.
fn backend_rows(args: &BenchArgs, backend: &mut dyn Backend, host_only: bool, t: &Timed) -> Result<Vec<Row>> {
    let name = if host_only { format!("{} (host only)", backend.describe()) } else { backend.describe() };
    let row = |what: &str, (median, min, max): (f64, f64, f64)| Row {
        what: format!("{what}, batch {}", args.batch_size),
        device: name.clone(),
        median,
        min,
        max,
    };
    // Warm up so that the backend's chunk size has settled.
    training_loop(backend, &t.split, t.cfg, args.steps, t.threads)?;
    let steps = loop_steps(backend, args, t.split.len());
    let prepared: Vec<&Batch> = t.batches.iter().cycle().take(if host_only { steps } else { args.steps }).collect();
    let stepped = time(args.repeats, prepared.len() * args.batch_size, || {
        block_on(backend.reset_sums())?;
        let never = AtomicBool::new(false);
        let batches = prepared.iter().map(|&b| b.clone());
        block_on(run_chunks(backend, batches, 0, None, &never, |_, _| Ok(())))?;
        // Waits for the device: the time covers the work, not just its submission.
        block_on(backend.train_sums())?;
        Ok(())
    })?;
    let looped =
        time(args.repeats, steps * args.batch_size, || training_loop(backend, &t.split, t.cfg, steps, t.threads))?;
    let eval_images: usize = t.eval.iter().map(|b| b.len()).sum();
    let evaluated = time(args.repeats, eval_images, || evaluation(backend, &t.eval))?;
    Ok(vec![row("training steps", stepped), row("training loop", looped), row("evaluation", evaluated)])
}

/// The rows as a table, or as JSON.
fn print_rows(args: &BenchArgs, rows: &[Row], threads: usize) -> Result<()> {
    if args.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"what": r.what, "device": r.device, "images_per_sec_median": r.median, "min": r.min, "max": r.max}))
            .collect();
        let out = serde_json::json!({"repeats": args.repeats, "steps": args.steps, "results": list});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<28}{:<60}{:>14}{:>22}", "what", "device", "images/s", "(min .. max)");
    for r in rows {
        let range = format!("({:.0} .. {:.0})", r.min, r.max);
        println!("{:<28}{:<60}{:>14.0}{range:>22}", r.what, r.device, r.median);
    }
    println!(
        "medians of {} repeats after one warm-up repeat; {} batches per repeat, the training loop at least {} \
         chunks (at most an epoch) with {} loader threads",
        args.repeats, args.steps, LOOP_CHUNKS, threads
    );
    Ok(())
}
