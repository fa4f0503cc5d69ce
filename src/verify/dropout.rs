//! The standalone dropout kernel, and what the checks of the epilogues that run a dropout share.

use crate::cpu::reference::dropout::dropout_mask;
use crate::gpu::dropout::FusedDropout;
use crate::gpu::kernel::run;
use crate::gpu::{GpuContext, Kernels, StepUniform};
use anyhow::Result;

use super::check::{compare, compare_exact, random, read, Check, TOL_ELEMENTWISE};

/// A dropout layer of probability p at index `index` of its model (which keys its mask).
pub(super) async fn dropout_checks(
    ctx: &GpuContext,
    k: &Kernels,
    name: &str,
    len: usize,
    (p, index): (f32, usize),
    shape: &str,
    seed: u64,
) -> Result<Vec<Check>> {
    let x = random(seed, len, 1.0);
    let step = StepUniform { dropout_seed: 1234, dropout_step: 77, dropout_on: 1, ..Default::default() };
    let (xb, yb, sb) = (ctx.upload("x", &x), ctx.zeros("y", len), ctx.uniform("step", &step));
    run(ctx, &[&k.dropout.apply(ctx, len, p, index, &sb, &xb, &yb)]);
    let mask = dropout_mask(1234, 77, index as u32, p, len);
    let want: Vec<f32> = x.iter().zip(&mask).map(|(a, m)| a * m).collect();
    let got = read(ctx, &yb, len).await?;
    let kept = |v: &[f32]| v.iter().map(|a| *a != 0.0).collect::<Vec<bool>>();
    Ok(vec![
        compare_exact("dropout.apply (mask)", name, shape, "mask elements", &kept(&got), &kept(&want)),
        compare("dropout.apply", name, shape, &got, &want, TOL_ELEMENTWISE),
    ])
}

/// The step whose masks the epilogue checks draw (dropout on).
pub(super) fn epilogue_step() -> StepUniform {
    StepUniform { dropout_seed: 4242, dropout_step: 5, dropout_on: 1, ..Default::default() }
}

/// `y` through the dropout `d` with `epilogue_step`'s masks, as the reference applies it.
pub(super) fn dropped(y: &[f32], d: FusedDropout) -> Vec<f32> {
    let step = epilogue_step();
    let mask = dropout_mask(step.dropout_seed, step.dropout_step, d.layer as u32, d.p, y.len());
    y.iter().zip(&mask).map(|(a, m)| a * m).collect()
}
