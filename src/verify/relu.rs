//! The standalone ReLU kernels: forward from another buffer and in place, and backward.

use crate::cpu::reference::relu::{relu_backward, relu_forward};
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
