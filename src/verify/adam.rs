//! The Adam kernel (Adam and AdamW), on whole gradients and on gradients in slices, and its flag of a
//! non-finite result, against the reference's `adam_update`.

use anyhow::Result;

use super::check::{compare, compare_exact, random, read, Check, TOL_ELEMENTWISE};
use crate::cpu::reference::adam::adam_update;
use crate::gpu::kernel::run;
use crate::gpu::net::METRICS_WORDS;
use crate::gpu::update::{SlicedGrad, UpdateBuffers};
use crate::gpu::{GpuContext, Kernels, Metrics, StepUniform};
use crate::optim::{Optimizer, OptimizerKind};

/// One case: the optimizer, whether the gradient comes in 3 slices, whether one gradient is infinite.
struct AdamCase {
    kind: OptimizerKind,
    sliced: bool,
    planted: bool,
}

pub(super) async fn adam_checks(ctx: &GpuContext, k: &Kernels, len: usize) -> Result<Vec<Check>> {
    let cases = [
        AdamCase { kind: OptimizerKind::Adam, sliced: false, planted: false },
        AdamCase { kind: OptimizerKind::AdamW, sliced: true, planted: false },
        AdamCase { kind: OptimizerKind::Adam, sliced: true, planted: true },
    ];
    let mut checks = Vec::new();
    for case in cases {
        checks.extend(adam_case(ctx, k, len, case).await?);
    }
    Ok(checks)
}

async fn adam_case(ctx: &GpuContext, k: &Kernels, len: usize, case: AdamCase) -> Result<Vec<Check>> {
    // Moments as a few steps leave them (the second non-negative), at step 3 of the fast recipe's
    // betas, with weight decay so that both of its forms count.
    let (p, m) = (random(1, len, 0.5), random(3, len, 0.1));
    let v: Vec<f32> = random(5, len, 0.1).iter().map(|x| x * x).collect();
    let slices = if case.sliced { 3 } else { 1 };
    let mut parts = random(4, slices * len, 0.1);
    if case.planted {
        parts[len / 2] = f32::INFINITY;
    }
    let whole: Vec<f32> = (0..len).map(|i| (0..slices).map(|s| parts[s * len + i]).sum()).collect();
    let sliced = [SlicedGrad { start: 0, len, extra: len, slices }];
    let sliced = if case.sliced { &sliced[..] } else { &[] };
    let optimizer = Optimizer { kind: case.kind, betas: (0.7, 0.9), eps: 1e-8 };
    let scalars = optimizer.adam_scalars(0.01, 0.01, 3);
    let step = StepUniform::default().with_adam(&scalars);
    let moments: Vec<f32> = m.iter().chain(&v).copied().collect();
    let (pb, gb, mb, sb) =
        (ctx.upload("p", &p), ctx.upload("g", &parts), ctx.upload("m", &moments), ctx.uniform("step", &step));
    let metrics = ctx.zeros("metrics", METRICS_WORDS);
    let buffers = UpdateBuffers { step: &sb, state: &pb, grads: &gb, moments: &mb, metrics: &metrics };
    run(ctx, &[&k.adam.update(ctx, len, sliced, &buffers)]);
    let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
    let want = adam_update(&scalars, &mut p2, &whole, &mut m2, &mut v2);
    let name = format!("adam.update ({})", case.kind.name());
    let (shape, what) = (len.to_string(), if case.sliced { "3 slices" } else { "whole gradients" });
    let got = Metrics::read(ctx, &metrics).await?.nonfinite;
    if case.planted {
        return Ok(vec![compare_exact(&name, "flag, one inf", &shape, "one infinite gradient", &[got], &[want])]);
    }
    let gm = read(ctx, &mb, 2 * len).await?;
    Ok(vec![
        compare_exact(&name, "flag, finite", &shape, what, &[got], &[want]),
        compare(&name, "parameters", &shape, &read(ctx, &pb, len).await?, &p2, TOL_ELEMENTWISE),
        compare(&name, "exp_avg", &shape, &gm[..len], &m2, TOL_ELEMENTWISE),
        compare(&name, "exp_avg_sq", &shape, &gm[len..], &v2, TOL_ELEMENTWISE),
    ])
}
