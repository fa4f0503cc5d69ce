//! `mnist-wgpu verify`: every GPU kernel at every layer shape, then whole training steps, against the
//! CPU reference on one adapter (the checks are the library's `verify`).

use anyhow::{bail, Result};
use clap::Args;
use pollster::block_on;

use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::verify;

#[derive(Args)]
pub struct VerifyArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k, net3-avgpool2, mlp3, fast-recipe).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// The GPU adapter: an index from `adapters`, part of its name, or NAME:BACKEND (llvmpipe:gl);
    /// software adapters allowed.
    #[arg(long)]
    adapter: Option<String>,
    /// Images per batch in every check (the training batch by default).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Print the checks as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `mnist-wgpu verify`: every kernel at every layer shape, then whole training steps, against the CPU
/// reference on one adapter; fails (non-zero exit) on any check out of tolerance or non-finite.
pub fn run(args: VerifyArgs) -> Result<()> {
    let n = args.batch_size;
    if n == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = mnist_wgpu::model::file::for_mnist(args.model.as_deref())?;
    let ctx = GpuContext::new(args.adapter.as_deref())?;
    // Before any check allocates a buffer of that batch.
    mnist_wgpu::gpu::net::check_batch_fits(&ctx, &model, n)?;
    let info = ctx.info.clone();
    let adapter = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
    let driver = format!("{} {}", info.driver, info.driver_info).trim().to_string();
    let mut backend = GpuBackend::new(ctx, &model, &model.init_state(1))?;
    if !args.json {
        let net = args.model.as_deref().unwrap_or("net3");
        println!(
            "verify: every kernel of {net} at batch {n}, then whole training steps, on {adapter}, driver {driver}"
        );
        println!("{}", verify::header());
    }
    let (ctx, kernels) = backend.parts();
    let mut checks = block_on(verify::kernel_checks(ctx, kernels, &model, n))?;
    if !args.json {
        checks.iter().for_each(|c| println!("{}", verify::format_row(c)));
    }
    let steps = block_on(verify::step_checks(&model, &mut backend, n, verify::DROPOUT_STEPS))?;
    if !args.json {
        steps.checks.iter().for_each(|c| println!("{}", verify::format_row(c)));
        println!("{}", steps.set_aside_line());
    }
    let verify::StepChecks { checks: step_rows, set_aside, .. } = steps;
    checks.extend(step_rows);
    let passed = checks.iter().filter(|c| c.ok()).count();
    let total = checks.len();
    if args.json {
        let out = serde_json::json!({
            "adapter": adapter, "driver": driver, "batch_size": n, "passed": passed, "total": total,
            "checks": checks.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
            "batches_set_aside": set_aside,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    let worst = verify::worst_ratio(&checks);
    let line = format!("{passed}/{total} checks passed on {adapter}, driver {driver}, batch {n}");
    if passed < total {
        bail!("verify: {line}; {} FAILED (rows marked FAIL)", total - passed);
    }
    if !args.json {
        println!("verify: {line} (largest error {:.0}% of its tolerance)", 100.0 * worst);
    }
    Ok(())
}
