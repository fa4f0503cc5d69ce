//! The SGD kernel, on whole gradients and on gradients in slices.

use crate::cpu::reference::sgd::{sgd_update, SgdStep};
use crate::gpu::kernel::run;
use crate::gpu::net::METRICS_WORDS;
use crate::gpu::update::{SlicedGrad, UpdateBuffers};
use crate::gpu::{GpuContext, Kernels, Metrics, StepUniform};
use anyhow::Result;

use super::check::{compare, compare_exact, random, read, Check, TOL_ELEMENTWISE};

pub(super) async fn sgd_checks(ctx: &GpuContext, k: &Kernels, len: usize) -> Result<Vec<Check>> {
    let (p, mut g, m) = (random(1, len, 0.5), random(2, len, 0.1), random(3, len, 0.1));
    let step = StepUniform { lr: 0.05, momentum: 0.9, weight_decay: 1e-5, ..Default::default() };
    let sgd = SgdStep { lr: 0.05, momentum: 0.9, weight_decay: 1e-5 };
    let shape = format!("{len}");
    let mut checks = Vec::new();
    // Finite gradients, then one infinite one: the diverged flag must stay clear, then be set.
    for planted in [false, true] {
        if planted {
            g[len / 2] = f32::INFINITY;
        }
        let (pb, gb, mb, sb) =
            (ctx.upload("p", &p), ctx.upload("g", &g), ctx.upload("m", &m), ctx.uniform("step", &step));
        let metrics = ctx.zeros("metrics", METRICS_WORDS);
        let buffers = UpdateBuffers { step: &sb, state: &pb, grads: &gb, moments: &mb, metrics: &metrics };
        run(ctx, &[&k.sgd.update(ctx, len, &[], &buffers)]);
        let (mut p2, mut m2) = (p.clone(), m.clone());
        let want = sgd_update(sgd, &mut p2, &g, &mut m2);
        let got = Metrics::read(ctx, &metrics).await?.nonfinite;
        let what = if planted { "one infinite gradient" } else { "finite gradients" };
        checks.push(compare_exact("sgd.update (non-finite flag)", "all trainable", &shape, what, &[got], &[want]));
        if !planted {
            let (gp, gm) = (read(ctx, &pb, len).await?, read(ctx, &mb, len).await?);
            checks.push(compare("sgd.update (parameters)", "all trainable", &shape, &gp, &p2, TOL_ELEMENTWISE));
            checks.push(compare("sgd.update (momenta)", "all trainable", &shape, &gm, &m2, TOL_ELEMENTWISE));
        }
    }
    // A gradient in 3 slices (slice 0 in place, slices 1 and 2 after it), added in slice order: the
    // same additions as here, so the same bits; and the update steps with the whole gradient.
    let parts = random(4, 3 * len, 0.1);
    let sliced = [SlicedGrad { start: 0, len, extra: len, slices: 3 }];
    let whole: Vec<f32> = (0..len).map(|i| parts[i] + parts[len + i] + parts[2 * len + i]).collect();
    let gb = ctx.upload("sliced g", &parts);
    run(ctx, &[&k.sgd.sum_slices(ctx, len, &sliced, &gb)]);
    let sums = read(ctx, &gb, len).await?;
    checks.push(compare_exact("sgd.sum_slices", "all trainable", &shape, "3 slices", &sums, &whole));
    let (pb, gb, mb, sb) =
        (ctx.upload("p", &p), ctx.upload("g", &parts), ctx.upload("m", &m), ctx.uniform("step", &step));
    let metrics = ctx.zeros("metrics", METRICS_WORDS);
    let buffers = UpdateBuffers { step: &sb, state: &pb, grads: &gb, moments: &mb, metrics: &metrics };
    run(ctx, &[&k.sgd.update(ctx, len, &sliced, &buffers)]);
    let (mut p2, mut m2) = (p.clone(), m.clone());
    sgd_update(sgd, &mut p2, &whole, &mut m2);
    let got = read(ctx, &pb, len).await?;
    checks.push(compare("sgd.update (3 slices)", "all trainable", &shape, &got, &p2, TOL_ELEMENTWISE));
    Ok(checks)
}
