//! The standalone pooling kernels: 2x2 max and average pooling, and global average pooling.

use crate::cpu::reference::pool::*;
use crate::cpu::reference::relu::relu_forward;
use crate::gpu::dropout::FusedDropout;
use crate::gpu::kernel::run;
use crate::gpu::pool::PoolEpilogue;
use crate::gpu::{GpuContext, Kernels};
use crate::model::{Layer, Shape};
use anyhow::Result;

use super::check::{compare, nchw, random, read, Check, TOL_ELEMENTWISE, TOL_EXACT};

/// The standalone kernels of pooling layer `layer` at its input shape `s`, batch `n`; with `relu`, also
/// its forward with the ReLU after it, and with `dropout` with the dropout after that.
#[allow(clippy::too_many_arguments)]
pub(super) async fn checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &Layer,
    name: &str,
    n: usize,
    s: Shape,
    seed: u64,
    (relu, dropout): (bool, Option<FusedDropout>),
) -> Result<Vec<Check>> {
    match layer {
        Layer::MaxPool2 | Layer::AvgPool2 => {
            window_checks(ctx, k, layer, name, (n, s), seed, WindowCase { ties: false, relu, dropout }).await
        }
        Layer::GlobalAvgPool => gap_checks(ctx, k, name, n, s.c, s.h * s.w, seed).await,
        other => unreachable!("{other:?} is not a pooling"),
    }
}

/// A 2x2 pooling's seeded input x (with `ties`, rounded to a few levels) and output gradient dy over a
/// batch of `n` of shape `s`, uploaded, and the buffers for y and dx.
struct Windows {
    planes: usize,
    len: usize,
    out: usize,
    x: Vec<f32>,
    dy: Vec<f32>,
    xb: wgpu::Buffer,
    dyb: wgpu::Buffer,
    yb: wgpu::Buffer,
    dxb: wgpu::Buffer,
}

fn windows(ctx: &GpuContext, n: usize, s: Shape, seed: u64, ties: bool) -> Windows {
    let planes = n * s.c;
    let (len, out) = (planes * s.h * s.w, planes * (s.h / 2) * (s.w / 2));
    let mut x = random(seed, len, 1.0);
    if ties {
        x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
    }
    let dy = random(seed + 1, out, 1.0);
    let (xb, dyb) = (ctx.upload("x", &x), ctx.upload("dy", &dy));
    let (yb, dxb) = (ctx.zeros("y", out), ctx.zeros("dx", len));
    Windows { planes, len, out, x, dy, xb, dyb, yb, dxb }
}

/// How a 2x2 pooling is checked: on values from a few levels (`ties`), so that most windows of a max
/// pooling hold equal maxima and the first-on-ties rule decides where the gradient goes; and also its
/// forward with the ReLU after it (`relu`), and with the dropout after that ReLU (`dropout`).
#[derive(Debug, Clone, Copy)]
pub(super) struct WindowCase {
    pub ties: bool,
    pub relu: bool,
    pub dropout: Option<FusedDropout>,
}

/// The standalone kernels of a 2x2 pooling, forward and backward, at batch n of shape s, as `case`
/// says. A max pooling selects, so it must agree exactly; an average's division may round differently.
pub(super) async fn window_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &Layer,
    name: &str,
    (n, s): (usize, Shape),
    seed: u64,
    case: WindowCase,
) -> Result<Vec<Check>> {
    let (Shape { c, h, w }, WindowCase { ties, relu, dropout }) = (s, case);
    let Windows { planes, len, out, x, dy, xb, dyb, yb, dxb } = windows(ctx, n, s, seed, ties);
    let y_relu_b = ctx.zeros("y (relu)", if relu { out } else { 1 });
    let y_drop_b = ctx.zeros("y (relu, dropout)", if dropout.is_some() { out } else { 1 });
    let stepb = ctx.uniform("step", &super::dropout::epilogue_step());
    let mut launches = vec![
        k.pool.forward(ctx, layer, planes, s, &xb, &yb, PoolEpilogue::None),
        k.pool.backward(ctx, layer, planes, s, &xb, &dyb, &dxb),
    ];
    if relu {
        launches.push(k.pool.forward(ctx, layer, planes, s, &xb, &y_relu_b, PoolEpilogue::Relu));
    }
    if let Some(f) = dropout {
        launches.push(k.pool.forward(ctx, layer, planes, s, &xb, &y_drop_b, PoolEpilogue::ReluDropout(f, &stepb)));
    }
    run(ctx, &launches.iter().collect::<Vec<_>>());
    let (mut y, mut dx) = (vec![0.0; out], vec![0.0; len]);
    let mut winners = vec![0u8; if *layer == Layer::MaxPool2 { out } else { 0 }];
    forward_serial(layer, s, &x, &mut y, &mut winners);
    backward_serial(layer, s, &winners, &dy, &mut dx);
    let (kernel, tolerance) = match layer {
        Layer::MaxPool2 => ("maxpool", TOL_EXACT),
        _ => ("avgpool2", TOL_ELEMENTWISE),
    };
    let (input, output) = (nchw(n, c, h, w), nchw(n, c, h / 2, w / 2));
    let tag = if ties { " (ties)" } else { "" };
    let (y_gpu, dx_gpu) = (read(ctx, &yb, out).await?, read(ctx, &dxb, len).await?);
    let mut checks = vec![
        compare(&format!("pool.{kernel}_forward{tag}"), name, &format!("{input} -> {output}"), &y_gpu, &y, tolerance),
        compare(
            &format!("pool.{kernel}_backward{tag}"),
            name,
            &format!("{output} -> {input}"),
            &dx_gpu,
            &dx,
            tolerance,
        ),
    ];
    let mut y_relu = y.clone();
    relu_forward(&mut y_relu);
    let shape = format!("{input} -> {output}");
    if relu {
        let got = read(ctx, &y_relu_b, out).await?;
        checks.push(compare(&format!("pool.{kernel}_forward_relu{tag}"), name, &shape, &got, &y_relu, tolerance));
    }
    if let Some(f) = dropout {
        let (got, want) = (read(ctx, &y_drop_b, out).await?, super::dropout::dropped(&y_relu, f));
        checks.push(compare(&format!("pool.{kernel}_forward_relu_dropout{tag}"), name, &shape, &got, &want, tolerance));
    }
    Ok(checks)
}

pub(super) async fn gap_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    n: usize,
    c: usize,
    hw: usize,
    seed: u64,
) -> Result<Vec<Check>> {
    let planes = n * c;
    let x = random(seed, planes * hw, 1.0);
    let dy = random(seed + 1, planes, 1.0);
    let (xb, dyb, yb, dxb) =
        (ctx.upload("x", &x), ctx.upload("dy", &dy), ctx.zeros("y", planes), ctx.zeros("dx", planes * hw));
    run(ctx, &[&k.pool.gap_forward(ctx, planes, hw, &xb, &yb), &k.pool.gap_backward(ctx, planes, hw, &dyb, &dxb)]);
    let (mut y, mut dx) = (vec![0.0; planes], vec![0.0; planes * hw]);
    global_avg_pool_forward(hw, &x, &mut y);
    global_avg_pool_backward(hw, &dy, &mut dx);
    let shape = format!("{n}x{c}x{hw} -> {n}x{c}");
    Ok(vec![
        compare("pool.gap_forward", layer, &shape, &read(ctx, &yb, planes).await?, &y, TOL_ELEMENTWISE),
        compare("pool.gap_backward", layer, &shape, &read(ctx, &dxb, planes * hw).await?, &dx, TOL_ELEMENTWISE),
    ])
}
