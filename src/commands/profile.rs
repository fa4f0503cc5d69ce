//! `mnist-wgpu profile`: every launch of a GPU training step timed with GPU timestamps, as a roofline;
//! with `--backend cpu` every pass of the CPU backend's fused executor (`cpu-reference`: every op of
//! the reference), in wall time beside the machine's peak. The step is first checked against the CPU
//! reference (as `bench` does), so a wrong kernel is never timed.

use anyhow::{bail, Context, Result};
use clap::Args;
use pollster::block_on;

use mnist_wgpu::backend::Backend;
use mnist_wgpu::cpu::executor::Update;
use mnist_wgpu::cpu::profile::OpTime;
use mnist_wgpu::cpu::{CpuNet, DropoutMode, Executor, FusedNet};
use mnist_wgpu::data::loader::{epoch_order, Batch};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::net::StepProfile;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::Model;
use mnist_wgpu::optim::{OptimizerKind, MOMENT_SLOTS};

use super::bench::{median, step_params, timed_batch, timed_inputs, timed_loader, validate};

#[derive(Args)]
pub struct ProfileArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k, net3-avgpool2, mlp3, fast-recipe).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// The update that ends each training step: sgd, adam or adamw.
    #[arg(long, value_name = "NAME", value_parser = OptimizerKind::parse, default_value = "sgd")]
    optimizer: OptimizerKind,
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

/// Workgroups below which a training launch leaves most of a big GPU idle: an H100's 132 SMs take two
/// workgroups each at the least.
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
/// (FLOPs and minimum bytes per launch, their rates), beside the step timed as one pass; or with
/// `--backend cpu` / `cpu-reference`, every pass or op of a CPU executor's step.
pub fn run(args: ProfileArgs) -> Result<()> {
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
        let batches: Vec<Batch> = (0..=args.steps).map(|i| timed_batch(&set.train, &order, &cfg, i)).collect();
        return profile_cpu(&args, &model, &batches);
    }
    let mut backend = GpuBackend::new(GpuContext::new(args.adapter.as_deref())?, &model, &model.init_state(1))?;
    let p = |i| step_params(i, args.optimizer);
    let first = timed_batch(&set.train, &order, &cfg, 0);
    validate(&mut backend, &model, args.batch_size)?;
    // Warm-up (pipeline compilation, first-use costs), then the timed steps.
    block_on(backend.profile_step(&first.input, &first.labels, p(0)))?;
    let mut runs: Vec<StepProfile> = Vec::new();
    for i in 0..args.steps {
        let b = timed_batch(&set.train, &order, &cfg, i + 1);
        runs.push(block_on(backend.profile_step(&b.input, &b.labels, p(i + 1)))?);
    }
    if let Some(path) = &args.trace {
        std::fs::write(path, serde_json::to_string(&chrome_trace(&runs))?)
            .with_context(|| format!("writing the trace to {}", path.display()))?;
    }
    let profile = GpuProfile {
        device: backend.describe(),
        rows: launch_rows(&runs),
        one_pass: median(runs.iter().map(|r| r.one_pass_ns).collect()).0,
        eval_launches: backend.eval_launches(args.batch_size)?,
    };
    match args.json {
        true => println!("{}", serde_json::to_string_pretty(&profile.json(&args))?),
        false => profile.print(&args),
    }
    Ok(())
}

/// Each launch of the timed steps, its time the median over them.
fn launch_rows(runs: &[StepProfile]) -> Vec<LaunchRow> {
    (0..runs[0].launches.len())
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
        .collect()
}

/// A GPU training step's profile: its launches, the step as one pass, the evaluation's launch count.
struct GpuProfile {
    device: String,
    rows: Vec<LaunchRow>,
    one_pass: f64,
    eval_launches: usize,
}

impl GpuProfile {
    fn total(&self) -> f64 {
        self.rows.iter().map(|r| r.ns).sum()
    }

    /// The launches that leave most of a big GPU idle.
    fn few(&self) -> usize {
        self.rows.iter().filter(|r| r.workgroups < FEW_WORKGROUPS).count()
    }

    /// Per kernel (shader entry point), summed over the layers it runs for, longest first.
    fn per_kernel(&self) -> Vec<(String, f64)> {
        let mut per_kernel: Vec<(String, f64)> = Vec::new();
        for r in &self.rows {
            let kernel = r.label.split(' ').next().unwrap_or(&r.label).to_string();
            match per_kernel.iter_mut().find(|(k, _)| *k == kernel) {
                Some(entry) => entry.1 += r.ns,
                None => per_kernel.push((kernel, r.ns)),
            }
        }
        per_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
        per_kernel
    }

    fn json(&self, args: &ProfileArgs) -> serde_json::Value {
        let launches: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "launch": r.label, "workgroups": r.workgroups, "median_us": r.ns / 1e3,
                    "flops": r.flops, "min_bytes": r.bytes, "gflop_per_s": r.gflops(), "gb_per_s": r.gbytes(),
                })
            })
            .collect();
        let kernels: Vec<serde_json::Value> =
            self.per_kernel().iter().map(|(k, ns)| serde_json::json!({"kernel": k, "median_us": ns / 1e3})).collect();
        serde_json::json!({
            "device": self.device, "batch_size": args.batch_size, "steps": args.steps,
            "step_us": self.total() / 1e3, "one_pass_us": self.one_pass / 1e3,
            "dispatches_per_step": self.rows.len(), "dispatches_per_eval_batch": self.eval_launches,
            "launches_under_256_workgroups": self.few(),
            "launches": launches, "kernels": kernels,
        })
    }

    fn print(&self, args: &ProfileArgs) {
        let (total, one_pass, n) = (self.total(), self.one_pass, args.batch_size as f64);
        println!("{} - training step at batch {}, medians of {} steps", self.device, args.batch_size, args.steps);
        println!("{:<40}{:>9}{:>11}{:>7}{:>10}{:>9}", "launch", "groups", "us", "%", "GFLOP/s", "GB/s");
        for r in &self.rows {
            let (us, share) = (r.ns / 1e3, 100.0 * r.ns / total);
            println!(
                "{:<40}{:>9}{us:>11.1}{share:>6.1}%{:>10.1}{:>9.1}",
                r.label,
                r.workgroups,
                r.gflops(),
                r.gbytes()
            );
        }
        let flops: f64 = self.rows.iter().map(|r| r.flops).sum();
        println!(
            "{:<40}{:>9}{:>11.1}  ({:.0} images/s; {:.1} GFLOP/s over the step)",
            "sum of the launches, each in its own pass",
            "",
            total / 1e3,
            n / (total / 1e9),
            flops / total
        );
        println!(
            "{:<40}{:>9}{:>11.1}  ({:.0} images/s; one pass minus the sum: {:+.1} us, the launches' gaps and barriers)",
            "the whole step as one pass",
            "",
            one_pass / 1e3,
            n / (one_pass / 1e9),
            (one_pass - total) / 1e3
        );
        println!(
            "{} launches per training step, {} per evaluation batch; {} launches under {FEW_WORKGROUPS} workgroups",
            self.rows.len(),
            self.eval_launches,
            self.few()
        );
        println!("\nper kernel, all layers:");
        for (k, ns) in &self.per_kernel() {
            println!("{k:<40}{:>20.1}{:>6.1}%", ns / 1e3, 100.0 * ns / total);
        }
        if let Some(path) = &args.trace {
            println!("\ntrace of the {} timed steps: {} (open in Perfetto)", args.steps, path.display());
        }
    }
}

/// `profile --backend cpu`: every op of a CPU training step timed (medians over the steps after one
/// warm-up step), with its FLOPs and minimum bytes, beside the machine's peak, so that each op's share
/// of it reads as the GPU profile's roofline does.
fn profile_cpu(args: &ProfileArgs, model: &Model, batches: &[Batch]) -> Result<()> {
    let mut net: Box<dyn Executor> = match args.backend {
        ProfiledBackend::CpuReference => Box::new(CpuNet::new(model)),
        _ => Box::new(FusedNet::new(model)),
    };
    let (mut state, mut moments) = (model.init_state(1), vec![0.0; MOMENT_SLOTS * model.num_trainable]);
    let mut runs: Vec<Vec<OpTime>> = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let p = step_params(i, args.optimizer);
        let dropout = DropoutMode::Hash { seed: p.dropout_seed, step: p.step };
        let (_, ops) = net.profile_step(&mut state, &mut moments, (&b.input, &b.labels), Update::for_step(&p), dropout);
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
    let ceiling = mnist_wgpu::cpu::profile::fma_ceiling_gflops();
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
            "peak_gflop_per_s": peak, "peak": peak_what,
            "fma_ceiling_gflop_per_s": ceiling.as_ref().map(|c| c.0), "fma_ceiling": ceiling.as_ref().map(|c| &c.1),
            "ops": ops,
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
    if let Some((gflops, what)) = ceiling {
        let share = format!("{:.0}%", 100.0 * gflops / peak);
        println!(
            "{:<40}{:>11}{:>7}{gflops:>10.1}{share:>8}  ({what}: no product goes faster)",
            "the FMA ceiling", "", ""
        );
    }
    Ok(())
}
