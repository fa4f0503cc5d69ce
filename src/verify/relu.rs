//! The standalone ReLU kernels: forward from another buffer and in place, and backward; and the
//! backward of a ReLU with the dropout after it.

use crate::cpu::reference::dropout::dropout_mask;
use crate::cpu::reference::relu::{relu_backward, relu_forward};
use crate::gpu::dropout::FusedDropout;
use crate::gpu::kernel::run;
use crate::gpu::{GpuContext, Kernels};
use anyhow::Result;

use super::check::{compare, random, read, Check, TOL_EXACT};

/// A ReLU layer on its own over `len` values: a maximum and a select, so exactly the reference's.
pub(super) async fn relu_checks(
    ctx: &GpuContext,
    k: &Kernels,
    name: &str,
    len: usize,
    shape: &str,
    seed: u64,
) -> Result<Vec<Check>> {
    let (x, dy) = (random(seed, len, 1.0), random(seed + 1, len, 1.0));
    let (xb, in_place, dyb) = (ctx.upload("x", &x), ctx.upload("y (in place)", &x), ctx.upload("dy", &dy));
    let (yb, dxb) = (ctx.zeros("y", len), ctx.zeros("dx", len));
    let forward = k.relu.forward(ctx, len, Some(&xb), &yb);
    let forward_in_place = k.relu.forward(ctx, len, None, &in_place);
    run(ctx, &[&forward, &forward_in_place, &k.relu.backward(ctx, len, &yb, &dyb, &dxb)]);
    let mut y = x.clone();
    relu_forward(&mut y);
    let mut dx = dy.clone();
    relu_backward(&y, &mut dx);
    let (y_gpu, y_in_place) = (read(ctx, &yb, len).await?, read(ctx, &in_place, len).await?);
    let dx_gpu = read(ctx, &dxb, len).await?;
    Ok(vec![
        compare("relu.forward", name, shape, &y_gpu, &y, TOL_EXACT),
        compare("relu.forward_in_place", name, shape, &y_in_place, &y, TOL_EXACT),
        compare("relu.backward", name, shape, &dx_gpu, &dx, TOL_EXACT),
    ])
}

/// The backward of a ReLU and the dropout `f` after it over `len` values (`relu.backward_dropout`),
/// from the dropout's output as the forward epilogue leaves it, against the reference's two backwards
/// (the dropout's with its mask drawn again, then the ReLU's): a select and one product, exactly.
pub(super) async fn relu_dropout_checks(
    ctx: &GpuContext,
    k: &Kernels,
    name: &str,
    (len, shape): (usize, &str),
    f: FusedDropout,
    seed: u64,
) -> Result<Vec<Check>> {
    let (mut z, dy) = (random(seed, len, 1.0), random(seed + 1, len, 1.0));
    relu_forward(&mut z);
    let step = super::dropout::epilogue_step();
    let w = super::dropout::dropped(&z, f);
    let (wb, dyb, dxb, sb) =
        (ctx.upload("y", &w), ctx.upload("dy", &dy), ctx.zeros("dx", len), ctx.uniform("step", &step));
    run(ctx, &[&k.relu.backward_dropout(ctx, len, f.p, &sb, &wb, &dyb, &dxb)]);
    let mask = dropout_mask(step.dropout_seed, step.dropout_step, f.layer as u32, f.p, len);
    let mut dx: Vec<f32> = dy.iter().zip(&mask).map(|(g, m)| g * m).collect();
    relu_backward(&z, &mut dx);
    let got = read(ctx, &dxb, len).await?;
    Ok(vec![compare("relu.backward_dropout", name, shape, &got, &dx, TOL_EXACT)])
}
