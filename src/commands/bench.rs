//! `mnist-wgpu bench` (images/s of the training step on each backend, of augmentation and of
//! evaluation) and `profile` (every launch of a GPU training step timed). Each figure is the median
//! over repeats after warm-up; a backend's step is first checked against the CPU reference on one
//! batch, so a fast but wrong kernel cannot post a number.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use pollster::block_on;

use anyhow::{bail, Context, Result};
use clap::Args;

use mnist_wgpu::backend::{Backend, StepParams, MAX_CHUNK_BATCHES};
use mnist_wgpu::cpu::profile::OpTime;
use mnist_wgpu::cpu::sgd::SgdStep;
use mnist_wgpu::cpu::{CpuNet, DropoutMode, Executor, FusedNet};
use mnist_wgpu::data::loader::{
    batches_per_epoch, default_threads, epoch_order, eval_batches, spawn_epoch, train_batch, Batch, LoaderConfig,
};
use mnist_wgpu::data::{
    self,
    augment::{Augment, BatchAugment},
};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::net::StepProfile;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::Model;
use mnist_wgpu::train::{loader_ahead, run_chunks};
use mnist_wgpu::verify;

use crate::{make_backend, BackendChoice, DeviceArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
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

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
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
fn validate(backend: &mut dyn Backend, model: &Model, batch_size: usize) -> Result<()> {
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
fn timed_inputs(model: Option<&str>, batch_size: usize) -> Result<(Model, data::Mnist)> {
    let model = mnist_wgpu::model::file::for_mnist(model)?;
    let set = data::load_dir(&data::default_dir())?;
    if batch_size > set.train.len() {
        bail!("--batch-size {batch_size} is larger than the training set ({} images)", set.train.len());
    }
    Ok((model, set))
}

/// The loader of the timed batches: seed 1, the recipe's augmentation.
fn timed_loader(batch_size: usize) -> LoaderConfig {
    LoaderConfig { seed: 1, batch_size, augment: Some(Augment::default()), batch_augment: BatchAugment::default() }
}

/// The parameters of timed step `step` (dropout on, as in training).
fn step_params(step: usize) -> StepParams {
    StepParams { lr: 0.05, momentum: 0.9, weight_decay: 1e-5, dropout_seed: 1, step: step as u32, dropout: true }
}

/// Chunks the training loop row runs per repeat, at least: the loader's start and the last chunk's
/// wait, which no chunk overlaps, are then a small part of the figure, as in an epoch of training.
const LOOP_CHUNKS: usize = 10;
/// Longest loop repeat (and the length of the benchmark's schedule).
const MAX_LOOP_STEPS: usize = LOOP_CHUNKS * MAX_CHUNK_BATCHES;

/// Training steps the loop row runs per repeat: the asked-for steps, and at least LOOP_CHUNKS chunks
/// of the size the backend picks (once warm).
fn loop_steps(backend: &dyn Backend, args: &BenchArgs) -> usize {
    args.steps.max(LOOP_CHUNKS * backend.chunk_batches(args.batch_size, true)).min(MAX_LOOP_STEPS)
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

pub fn run(args: BenchArgs) -> Result<()> {
    if args.steps == 0 || args.repeats == 0 || args.batch_size == 0 {
        bail!("--steps, --repeats and --batch-size must be at least 1");
    }
    let (model, set) = timed_inputs(args.model.as_deref(), args.batch_size)?;
    let cfg = timed_loader(args.batch_size);
    let order = epoch_order(1, 0, set.train.len());
    let batches: Vec<Batch> = (0..args.steps).map(|i| train_batch(&set.train, &order, &cfg, 0, i)).collect();
    let mut rows = Vec::new();

    let (m, lo, hi) = time(args.repeats, args.steps * args.batch_size, || {
        for i in 0..args.steps {
            std::hint::black_box(train_batch(&set.train, &order, &cfg, 0, i));
        }
        Ok(())
    })?;
    rows.push(Row { what: "augmentation (1 thread)".into(), device: "cpu".into(), median: m, min: lo, max: hi });

    // The loader as training runs it (worker threads, in-order hand-over), with one thread and with one
    // per core, over enough batches to be timed.
    let split = Arc::new(set.train.clone());
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
    let eval: Vec<Batch> = eval_batches(&set.test, args.batch_size).take(args.steps).collect();
    let eval_images: usize = eval.iter().map(|b| b.len()).sum();
    let threads = default_threads();
    let schedule: Vec<StepParams> = (0..MAX_LOOP_STEPS.max(args.steps)).map(step_params).collect();
    // The asked-for backends, then the host-only GPU backend when asked.
    let runs = backends.into_iter().map(|b| (b, false)).chain(args.host_only.then_some((BackendChoice::Gpu, true)));
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
        let name = if host_only { format!("{} (host only)", backend.describe()) } else { backend.describe() };
        backend.set_schedule(&schedule)?;
        // Warm up so that the backend's chunk size has settled.
        training_loop(backend.as_mut(), &split, cfg, args.steps, threads)?;
        let steps = loop_steps(backend.as_ref(), &args);
        // Prepared batches: the backend's own rate (with the host-only GPU backend, what its host side
        // costs), chunked as training hands them over.
        let prepared: Vec<&Batch> = batches.iter().cycle().take(if host_only { steps } else { args.steps }).collect();
        let (m, lo, hi) = time(args.repeats, prepared.len() * args.batch_size, || {
            block_on(backend.reset_sums())?;
            let never = AtomicBool::new(false);
            let batches = prepared.iter().map(|&b| b.clone());
            block_on(run_chunks(backend.as_mut(), batches, 0, None, &never, |_, _| Ok(())))?;
            // Waits for the device: the time covers the work, not just its submission.
            block_on(backend.train_sums())?;
            Ok(())
        })?;
        let what = format!("training steps, batch {}", args.batch_size);
        rows.push(Row { what, device: name.clone(), median: m, min: lo, max: hi });
        let (m, lo, hi) = time(args.repeats, steps * args.batch_size, || {
            training_loop(backend.as_mut(), &split, cfg, steps, threads)
        })?;
        let what = format!("training loop, batch {}", args.batch_size);
        rows.push(Row { what, device: name.clone(), median: m, min: lo, max: hi });
        let (m, lo, hi) = time(args.repeats, eval_images, || evaluation(backend.as_mut(), &eval))?;
        let what = format!("evaluation, batch {}", args.batch_size);
        rows.push(Row { what, device: name, median: m, min: lo, max: hi });
    }

    if args.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"what": r.what, "device": r.device, "images_per_sec_median": r.median, "min": r.min, "max": r.max}))
            .collect();
        let out = serde_json::json!({"repeats": args.repeats, "steps": args.steps, "results": list});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<28}{:<60}{:>14}{:>22}", "what", "device", "images/s", "(min .. max)");
        for r in rows {
            println!(
                "{:<28}{:<60}{:>14.0}{:>22}",
                r.what,
                r.device,
                r.median,
                format!("({:.0} .. {:.0})", r.min, r.max)
            );
        }
        println!(
            "medians of {} repeats after one warm-up repeat; {} batches per repeat, the training loop at least {} \
             chunks with {} loader threads",
            args.repeats, args.steps, LOOP_CHUNKS, threads
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ProfileArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// Timed training steps; each kernel's median over them is reported.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Images per training step.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// The GPU adapter: an index from `adapters`, or part of its name (software adapters allowed).
    #[arg(long)]
    adapter: Option<String>,
    /// The executor to profile: the GPU's launches (GPU timestamps), the CPU backend's passes, or the
    /// CPU reference's ops (wall time, beside the machine's peak: a large matrix product on every core).
    #[arg(long, value_enum, default_value = "gpu")]
    backend: ProfiledBackend,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the timed steps as Chrome trace JSON (open it in Perfetto or chrome://tracing): one
    /// track per kernel.
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfiledBackend {
    Gpu,
    /// The CPU backend as it trains: the fused executor's passes.
    Cpu,
    /// The CPU reference executor, op by op.
    CpuReference,
}

/// The peak row's matrix product: large enough that packing and threads' start are a small part of it.
const PEAK_SIZE: usize = 1024;
const PEAK_REPEATS: usize = 5;

/// Workgroups below which a training launch leaves most of a big GPU idle (issue 9's floor).
const FEW_WORKGROUPS: u32 = 256;

/// One launch's row of the profile: medians over the timed steps.
struct LaunchRow {
    label: String,
    workgroups: u32,
    flops: f64,
    bytes: f64,
    ns: f64,
}

impl LaunchRow {
    fn gflops(&self) -> f64 {
        self.flops / self.ns.max(1e-9)
    }

    fn gbytes(&self) -> f64 {
        self.bytes / self.ns.max(1e-9)
    }
}

/// The timed steps as Chrome trace events, one after another, one track (thread) per kernel.
fn chrome_trace(runs: &[StepProfile]) -> serde_json::Value {
    let mut tracks: Vec<String> = Vec::new();
    let mut events = Vec::new();
    let mut offset_us = 0.0;
    for (step, run) in runs.iter().enumerate() {
        for l in &run.launches {
            let kernel = l.label.split(' ').next().unwrap_or(&l.label).to_string();
            let tid = tracks.iter().position(|t| *t == kernel).unwrap_or_else(|| {
                tracks.push(kernel);
                tracks.len() - 1
            });
            events.push(serde_json::json!({
                "name": l.label, "cat": "kernel", "ph": "X", "pid": 1, "tid": tid,
                "ts": offset_us + l.start_ns / 1e3, "dur": l.ns() / 1e3,
                "args": {"step": step, "workgroups": l.workgroups, "flops": l.cost.flops, "min_bytes": l.cost.bytes},
            }));
        }
        offset_us += run.launches.last().map_or(0.0, |l| l.end_ns / 1e3) + 10.0;
    }
    for (tid, name) in tracks.iter().enumerate() {
        events
            .push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
    }
    serde_json::json!({"traceEvents": events, "displayTimeUnit": "ns"})
}

/// `mnist-wgpu profile`: every kernel of a GPU training step timed with GPU timestamps, as a roofline
/// (FLOPs and minimum bytes per launch, their rates), beside the step timed as one pass.
pub fn profile(args: ProfileArgs) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    let (model, set) = timed_inputs(args.model.as_deref(), args.batch_size)?;
    let cfg = timed_loader(args.batch_size);
    let order = epoch_order(1, 0, set.train.len());
    if args.backend != ProfiledBackend::Gpu {
        if args.trace.is_some() || args.adapter.is_some() {
            bail!("--trace and --adapter are for --backend gpu");
        }
        let batches: Vec<Batch> = (0..=args.steps).map(|i| train_batch(&set.train, &order, &cfg, 0, i)).collect();
        return profile_cpu(&args, &model, &batches);
    }
    let mut backend = GpuBackend::new(GpuContext::new(args.adapter.as_deref())?, &model, &model.init_state(1))?;
    let p = step_params;
    let first = train_batch(&set.train, &order, &cfg, 0, 0);
    validate(&mut backend, &model, args.batch_size)?;
    // Warm-up (pipeline compilation, first-use costs), then the timed steps.
    block_on(backend.profile_step(&first.input, &first.labels, p(0)))?;
    let mut runs: Vec<StepProfile> = Vec::new();
    for i in 0..args.steps {
        let b = train_batch(&set.train, &order, &cfg, 0, i + 1);
        runs.push(block_on(backend.profile_step(&b.input, &b.labels, p(i + 1)))?);
    }
    let eval_launches = backend.eval_launches(args.batch_size)?;
    let rows: Vec<LaunchRow> = (0..runs[0].launches.len())
        .map(|k| {
            let l = &runs[0].launches[k];
            LaunchRow {
                label: l.label.clone(),
                workgroups: l.workgroups,
                flops: l.cost.flops,
                bytes: l.cost.bytes,
                ns: median(runs.iter().map(|r| r.launches[k].ns()).collect()).0,
            }
        })
        .collect();
    let total: f64 = rows.iter().map(|r| r.ns).sum();
    let one_pass = median(runs.iter().map(|r| r.one_pass_ns).collect()).0;
    let few: Vec<&LaunchRow> = rows.iter().filter(|r| r.workgroups < FEW_WORKGROUPS).collect();
    // Per kernel (shader entry point), summed over the layers it runs for.
    let mut per_kernel: Vec<(String, f64)> = Vec::new();
    for r in &rows {
        let kernel = r.label.split(' ').next().unwrap_or(&r.label).to_string();
        match per_kernel.iter_mut().find(|(k, _)| *k == kernel) {
            Some(entry) => entry.1 += r.ns,
            None => per_kernel.push((kernel, r.ns)),
        }
    }
    per_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(path) = &args.trace {
        std::fs::write(path, serde_json::to_string(&chrome_trace(&runs))?)
            .with_context(|| format!("writing the trace to {}", path.display()))?;
    }
    if args.json {
        let launches: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "launch": r.label, "workgroups": r.workgroups, "median_us": r.ns / 1e3,
                    "flops": r.flops, "min_bytes": r.bytes, "gflop_per_s": r.gflops(), "gb_per_s": r.gbytes(),
                })
            })
            .collect();
        let kernels: Vec<serde_json::Value> =
            per_kernel.iter().map(|(k, ns)| serde_json::json!({"kernel": k, "median_us": ns / 1e3})).collect();
        let out = serde_json::json!({
            "device": backend.describe(), "batch_size": args.batch_size, "steps": args.steps,
            "step_us": total / 1e3, "one_pass_us": one_pass / 1e3,
            "dispatches_per_step": rows.len(), "dispatches_per_eval_batch": eval_launches,
            "launches_under_256_workgroups": few.len(),
            "launches": launches, "kernels": kernels,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{} - training step at batch {}, medians of {} steps", backend.describe(), args.batch_size, args.steps);
    println!("{:<40}{:>9}{:>11}{:>7}{:>10}{:>9}", "launch", "groups", "us", "%", "GFLOP/s", "GB/s");
    for r in &rows {
        println!(
            "{:<40}{:>9}{:>11.1}{:>6.1}%{:>10.1}{:>9.1}",
            r.label,
            r.workgroups,
            r.ns / 1e3,
            100.0 * r.ns / total,
            r.gflops(),
            r.gbytes()
        );
    }
    let flops: f64 = rows.iter().map(|r| r.flops).sum();
    println!(
        "{:<40}{:>9}{:>11.1}  ({:.0} images/s; {:.1} GFLOP/s over the step)",
        "sum of the launches, each in its own pass",
        "",
        total / 1e3,
        args.batch_size as f64 / (total / 1e9),
        flops / total
    );
    println!(
        "{:<40}{:>9}{:>11.1}  ({:.0} images/s; one pass minus the sum: {:+.1} us, the launches' gaps and barriers)",
        "the whole step as one pass",
        "",
        one_pass / 1e3,
        args.batch_size as f64 / (one_pass / 1e9),
        (one_pass - total) / 1e3
    );
    println!(
        "{} launches per training step, {eval_launches} per evaluation batch; {} launches under {FEW_WORKGROUPS} workgroups",
        rows.len(),
        few.len()
    );
    println!("\nper kernel, all layers:");
    for (k, ns) in &per_kernel {
        println!("{k:<40}{:>20.1}{:>6.1}%", ns / 1e3, 100.0 * ns / total);
    }
    if let Some(path) = &args.trace {
        println!("\ntrace of the {} timed steps: {} (open in Perfetto)", args.steps, path.display());
    }
    Ok(())
}

/// `profile --backend cpu`: every op of a CPU training step timed (medians over the steps after one
/// warm-up step), with its FLOPs and minimum bytes, beside the machine's peak, so that each op's share
/// of it reads as the GPU profile's roofline does.
fn profile_cpu(args: &ProfileArgs, model: &Model, batches: &[Batch]) -> Result<()> {
    let mut net: Box<dyn Executor> = match args.backend {
        ProfiledBackend::CpuReference => Box::new(CpuNet::new(model)),
        _ => Box::new(FusedNet::new(model)),
    };
    let (mut state, mut momenta) = (model.init_state(1), vec![0.0; model.num_trainable]);
    let mut runs: Vec<Vec<OpTime>> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let p = step_params(i);
        let sgd = SgdStep { lr: p.lr, momentum: p.momentum, weight_decay: p.weight_decay };
        let dropout = DropoutMode::Hash { seed: p.dropout_seed, step: p.step };
        let (_, ops) = net.profile_step(&mut state, &mut momenta, (&b.input, &b.labels), sgd, dropout);
        if i > 0 {
            runs.push(ops);
        }
    }
    let rows: Vec<LaunchRow> = (0..runs[0].len())
        .map(|k| {
            let op = &runs[0][k];
            let ns = median(runs.iter().map(|r| r[k].ns).collect()).0;
            LaunchRow { label: op.label.clone(), workgroups: 0, flops: op.flops, bytes: op.bytes, ns }
        })
        .collect();
    let (peak, peak_what) = mnist_wgpu::cpu::profile::peak_gflops(PEAK_SIZE, PEAK_REPEATS);
    let total: f64 = rows.iter().map(|r| r.ns).sum();
    let flops: f64 = rows.iter().map(|r| r.flops).sum();
    let executor = if args.backend == ProfiledBackend::Cpu { "fused executor" } else { "reference executor" };
    let isa = mnist_wgpu::cpu::isa::isa().name();
    let device = format!("CPU backend ({executor}, {isa}), {} threads", rayon::current_num_threads());
    if args.json {
        let ops: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "op": r.label, "median_us": r.ns / 1e3, "flops": r.flops, "min_bytes": r.bytes,
                    "gflop_per_s": r.gflops(), "share_of_peak": r.gflops() / peak, "gb_per_s": r.gbytes(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "device": device, "batch_size": args.batch_size, "steps": args.steps, "step_us": total / 1e3,
            "images_per_s": args.batch_size as f64 / (total / 1e9), "gflop_per_s": flops / total,
            "peak_gflop_per_s": peak, "peak": peak_what, "ops": ops,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{device} - training step at batch {}, medians of {} steps", args.batch_size, args.steps);
    println!("{:<40}{:>11}{:>7}{:>10}{:>8}{:>9}", "op", "us", "%", "GFLOP/s", "peak", "GB/s");
    for r in &rows {
        let (us, share, gf) = (r.ns / 1e3, 100.0 * r.ns / total, r.gflops());
        println!("{:<40}{us:>11.1}{share:>6.1}%{gf:>10.1}{:>7.1}%{:>9.1}", r.label, 100.0 * gf / peak, r.gbytes());
    }
    let (images, rate) = (args.batch_size as f64 / (total / 1e9), flops / total);
    println!(
        "{:<40}{:>11.1}{:>7}{rate:>10.1}{:>7.1}%  ({images:.0} images/s)",
        "the whole step",
        total / 1e3,
        "",
        100.0 * rate / peak
    );
    println!("{:<40}{:>11}{:>7}{peak:>10.1}{:>8}  ({peak_what})", "the machine's peak", "", "", "100%");
    Ok(())
}
