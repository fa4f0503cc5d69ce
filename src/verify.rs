//! The GPU checked against the CPU reference, the one implementation behind `mnist-wgpu verify`,
//! `tests/parity.rs` and `bench`'s pre-check:
//! - [`kernel_checks`]: every kernel at every layer shape of a model (forward and backward), on seeded
//!   random inputs, plus a few odd shapes that exercise partial blocks;
//! - [`step_checks`]: whole training steps of a backend against the CPU backend from the same state and
//!   batches: parameters after SGD, momenta, running statistics and the loss, per tensor.
//!
//! Each comparison is one [`Check`]: the largest |got - want| relative to the largest |want| of the
//! tensor, against a stated tolerance. A non-finite value on either side fails whatever the tolerance.
//!
//! Tolerances, relative to the tensor's largest value (f32 on both sides; the difference is summation
//! order, and on GPUs fused multiply-adds and faster exp/log):
//! - [`TOL_EXACT`]: results that select or copy (max-pool winners, dropout masks, the correct count);
//! - [`TOL_ELEMENTWISE`] 1e-6: element-wise arithmetic (pooling, dropout scaling, SGD), a few ulps;
//! - [`TOL_SUMS`] 1e-5: everything that sums (convolutions, batchnorm statistics and gradients, softmax
//!   and the loss) and the state after a step. Measured on lavapipe at batch 4: at most 6.6e-7
//!   (conv4 dx); at batch 100, see the README;
//! - [`TOL_GRADIENTS`] 2e-5: gradients of a whole step (momenta after the first step are gradients),
//!   sums of sums through the whole network.

use anyhow::Result;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::backend::{Backend, CpuBackend, StepParams};
use crate::cpu::batchnorm::*;
use crate::cpu::conv::{bias_backward, bias_forward, conv_backward, conv_forward};
use crate::cpu::dropout::{dropout_apply, dropout_mask};
use crate::cpu::loss::softmax_cross_entropy;
use crate::cpu::pool::*;
use crate::cpu::relu::{relu_backward, relu_forward};
use crate::cpu::sgd::{sgd_update, SgdStep};
use crate::data::loader::Batch;
use crate::gpu::batchnorm::{bn_slices, BnBuffers, BnLayer, BnOffsets, FusedDropout};
use crate::gpu::conv::{forward_splits, weight_grad_slices, BnStats, BnSums, Conv, EvalBn};
use crate::gpu::kernel::run;
use crate::gpu::loss::LossBuffers;
use crate::gpu::net::{conv_reading, METRICS_WORDS};
use crate::gpu::sgd::{SgdBuffers, SlicedGrad};
use crate::gpu::{GpuContext, Kernels, Metrics, StepUniform};
use crate::model::plan::Plan;
use crate::model::{ConvDims, Layer, Model, Shape, BN_EPS, BN_MOMENTUM};
use crate::train::schedule::OneCycle;

/// Whole training steps with dropout on that `verify` runs after the single step without.
pub const DROPOUT_STEPS: usize = 10;

pub const TOL_EXACT: f64 = 0.0;
pub const TOL_ELEMENTWISE: f64 = 1e-6;
pub const TOL_SUMS: f64 = 1e-5;
pub const TOL_GRADIENTS: f64 = 2e-5;

/// The smallest scale an error is taken relative to, so an all-zero tensor is compared absolutely.
const SCALE_FLOOR: f32 = 1e-6;

/// One comparison of a GPU (or other backend's) result with the CPU reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The kernel (`conv.forward`) or the step (`train step 1`) that produced the result.
    pub kernel: String,
    /// The layer or the tensor (`conv2`, `bn3.running_var`).
    pub layer: String,
    pub shape: String,
    /// Largest |got - want| relative to the largest |want|; for exact checks, the fraction that differs.
    /// Infinite when a value is not finite.
    pub error: f64,
    pub tolerance: f64,
    /// What went wrong beyond the number, or what else a reader should know.
    pub detail: Option<String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel, "layer": self.layer, "shape": self.shape,
            // JSON has no infinity: a non-finite error is null, and `ok` says the rest.
            "error": if self.error.is_finite() { Some(self.error) } else { None },
            "tolerance": self.tolerance, "ok": self.ok(), "detail": self.detail,
        })
    }
}

/// max |got - want| / max(max |want|, floor): the error relative to the tensor's largest value.
/// Infinite when either side holds a non-finite value or the lengths differ.
pub fn rel_err(got: &[f32], want: &[f32], floor: f32) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs())) as f64;
    got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).abs()).fold(0.0, f64::max) / scale
}

/// Compares `got` with the reference `want`, as one row.
pub fn compare(kernel: &str, layer: &str, shape: &str, got: &[f32], want: &[f32], tolerance: f64) -> Check {
    let error = rel_err(got, want, SCALE_FLOOR);
    let detail = if got.len() != want.len() {
        Some(format!("{} values, the reference has {}", got.len(), want.len()))
    } else if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        Some(format!("non-finite value {} at index {i}", got[i]))
    } else if let Some(i) = want.iter().position(|v| !v.is_finite()) {
        Some(format!("the reference is non-finite ({}) at index {i}", want[i]))
    } else if error > tolerance {
        let worst = (0..got.len()).max_by(|&a, &b| (got[a] - want[a]).abs().total_cmp(&(got[b] - want[b]).abs()));
        worst.map(|i| format!("worst at index {i}: {} against {}", got[i], want[i]))
    } else {
        None
    };
    Check { kernel: kernel.into(), layer: layer.into(), shape: shape.into(), error, tolerance, detail }
}

/// Compares values that must agree exactly (`what`: "winners", "mask"); the error is the fraction that differs.
pub fn compare_exact<T: PartialEq + std::fmt::Debug>(
    kernel: &str,
    layer: &str,
    shape: &str,
    what: &str,
    got: &[T],
    want: &[T],
) -> Check {
    let (error, detail) = if got.len() != want.len() {
        (f64::INFINITY, Some(format!("{} {what}, the reference has {}", got.len(), want.len())))
    } else {
        let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        match differ.first() {
            None => (0.0, None),
            Some(&i) => (
                differ.len() as f64 / got.len() as f64,
                Some(format!(
                    "{} of {} {what} differ; first at index {i}: {:?} against {:?}",
                    differ.len(),
                    got.len(),
                    got[i],
                    want[i]
                )),
            ),
        }
    };
    Check { kernel: kernel.into(), layer: layer.into(), shape: shape.into(), error, tolerance: TOL_EXACT, detail }
}

fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len).map(|_| g.random_range(-scale..scale)).collect()
}

fn nchw(n: usize, c: usize, h: usize, w: usize) -> String {
    format!("{n}x{c}x{h}x{w}")
}

/// Runs launches and reads one buffer back.
async fn read(ctx: &GpuContext, b: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
    ctx.read(b, len).await
}

/// A convolution's random input as given to the kernels, and as the layer sees it: with `pool`, the
/// 2x2 max pooling of an x twice as high and wide.
fn conv_input(d: &ConvDims, pool: bool, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let x_given = random(seed, d.n * d.in_image() * if pool { 4 } else { 1 }, 1.0);
    if !pool {
        return (x_given.clone(), x_given);
    }
    let mut pooled = vec![0.0; d.n * d.in_image()];
    let mut argmax = vec![0; pooled.len()];
    maxpool2_forward(d.n * d.cin, 2 * d.h, 2 * d.w, &x_given, &mut pooled, &mut argmax);
    (x_given, pooled)
}

/// A convolution's launches against the reference: forward, forward with an evaluation-mode batchnorm
/// and ReLU, and backward (the weight gradient, and dx when `with_dx`). With `pool` the input is the
/// 2x2 max pooling of an x twice as high and wide, read through by the kernels.
#[allow(clippy::too_many_arguments)]
async fn conv_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    d: &ConvDims,
    seed: u64,
    with_dx: bool,
    pool: bool,
    with_bias: bool,
) -> Result<Vec<Check>> {
    let n = d.n;
    // The weights sit at a non-zero offset of a larger buffer, as in the model's state.
    let w_off = 7;
    let (x_given, x) = conv_input(d, pool, seed);
    let w = random(seed + 100, d.weight_len(), 0.3);
    let dy = random(seed + 200, n * d.out_image(), 1.0);
    let mut state = vec![0.0; w_off];
    state.extend_from_slice(&w);
    let c = d.cout;
    // The bias, if any, after the weights.
    let bias = if with_bias { random(seed + 150, c, 0.5) } else { Vec::new() };
    let b_off = state.len();
    state.extend_from_slice(&bias);
    // An evaluation-mode batchnorm's parameters after those, for the fused forward.
    let gamma: Vec<f32> = random(seed + 300, c, 0.5).iter().map(|v| v + 1.0).collect();
    let (beta, rm) = (random(seed + 310, c, 0.5), random(seed + 320, c, 0.5));
    let rv: Vec<f32> = random(seed + 330, c, 0.5).iter().map(|v| v + 1.0).collect();
    let bn_at = state.len();
    for t in [&gamma, &beta, &rm, &rv] {
        state.extend_from_slice(t);
    }
    let offsets = BnOffsets { gamma: bn_at, beta: bn_at + c, running_mean: bn_at + 2 * c, running_var: bn_at + 3 * c };
    let bn = EvalBn { offsets, eps: BN_EPS, relu: true };
    let (xb, sb, dyb) = (ctx.upload("x", &x_given), ctx.upload("state", &state), ctx.upload("dy", &dy));
    // The weight gradient in as many slices as training uses, added up as the SGD kernel does.
    let slices = weight_grad_slices(d, with_bias);
    let sliced = SlicedGrad { start: w_off, len: d.weight_len(), extra: state.len(), slices };
    let bias_extra = state.len() + (slices - 1) * d.weight_len();
    let bias_sliced = with_bias.then_some(SlicedGrad { start: b_off, len: c, extra: bias_extra, slices });
    let bias_at = with_bias.then_some(b_off);
    // The forward as training runs it when the layer's tiles are few: its sum split into parts
    // (at least 2 here, so that the split path is always checked), added in order as the batchnorm
    // statistics add them.
    let splits = forward_splits(d).max(2).min(d.col_rows()).max(1);
    let (yb, ysb, ybn, dxb, gb) = (
        ctx.zeros("y", n * d.out_image()),
        ctx.zeros("y (parts)", splits * n * d.out_image()),
        ctx.zeros("y (batchnorm)", n * d.out_image()),
        ctx.zeros("dx", n * d.in_image()),
        ctx.zeros("grads", bias_extra + (slices - 1) * bias.len()),
    );
    let conv = &k.conv;
    let mut launches = vec![
        conv.forward(ctx, d, w_off, bias_at, pool, 1, None, None, &xb, &sb, &yb)?,
        conv.forward(ctx, d, w_off, bias_at, pool, splits, None, None, &xb, &sb, &ysb)?,
        conv.forward(ctx, d, w_off, bias_at, pool, 1, Some(bn), None, &xb, &sb, &ybn)?,
    ];
    let dx_out = with_dx.then_some(&dxb);
    launches.push(conv.backward(ctx, d, &sliced, bias_sliced.as_ref(), pool, &xb, &dyb, &sb, &gb, dx_out, None)?);
    let all_sliced: Vec<SlicedGrad> = [Some(sliced), bias_sliced].into_iter().flatten().collect();
    launches.push(k.sgd.sum_slices(ctx, state.len(), &all_sliced, &gb));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    let mut y = vec![0.0; n * d.out_image()];
    conv_forward(d, &x, &w, &mut y);
    let (mut dx, mut dw) = (vec![0.0; n * d.in_image()], vec![0.0; d.weight_len()]);
    conv_backward(d, &x, &w, &dy, Some(&mut dx), &mut dw);
    let mut dbias = vec![0.0; bias.len()];
    if with_bias {
        bias_forward(d, &bias, &mut y);
        bias_backward(d, &dy, &mut dbias);
    }
    let mut y_bn = vec![0.0; y.len()];
    let bn_dims = BnDims { n, c, hw: d.ho() * d.wo() };
    batchnorm_forward_eval(&bn_dims, &y, &gamma, &beta, &rm, &rv, BN_EPS, &mut y_bn);
    relu_forward(&mut y_bn);
    let name = if with_bias { "conv (bias)" } else { "conv" };
    let pooled = if pool { format!(" (max pool of {})", nchw(n, d.cin, 2 * d.h, 2 * d.w)) } else { String::new() };
    let (input, output) = (format!("{}{pooled}", nchw(n, d.cin, d.h, d.w)), nchw(n, d.cout, d.ho(), d.wo()));
    let parts = read(ctx, &ysb, splits * y.len()).await?;
    let mut summed = parts[..y.len()].to_vec();
    for part in parts.chunks(y.len()).skip(1) {
        summed.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    let mut checks = vec![
        compare(
            &format!("{name}.forward"),
            layer,
            &format!("{input} -> {output}"),
            &read(ctx, &yb, y.len()).await?,
            &y,
            TOL_SUMS,
        ),
        compare(
            &format!("{name}.forward (sum in {splits} part{})", if splits > 1 { "s" } else { "" }),
            layer,
            &format!("{input} -> {output}"),
            &summed,
            &y,
            TOL_SUMS,
        ),
        compare(
            &format!("{name}.forward + batchnorm eval + relu"),
            layer,
            &format!("{input} -> {output}"),
            &read(ctx, &ybn, y.len()).await?,
            &y_bn,
            TOL_SUMS,
        ),
    ];
    if with_dx {
        let got = read(ctx, &dxb, dx.len()).await?;
        checks.push(compare(
            &format!("{name}.backward (dx)"),
            layer,
            &format!("{output} -> {input}"),
            &got,
            &dx,
            TOL_SUMS,
        ));
    }
    let g = read(ctx, &gb, state.len()).await?;
    let mut weight_check = compare(
        &format!("{name}.backward (weights)"),
        layer,
        &format!("{}x{}x{}x{} in {slices} slice{}", d.cout, d.cin, d.k, d.k, if slices > 1 { "s" } else { "" }),
        &g[w_off..b_off],
        &dw,
        TOL_SUMS,
    );
    if g[..w_off].iter().chain(&g[bn_at..]).any(|&v| v != 0.0) {
        weight_check.error = f64::INFINITY;
        weight_check.detail = Some("wrote outside its weights and bias".into());
    }
    checks.push(weight_check);
    if with_bias {
        let shape = format!("{c} in {slices} slice{}", if slices > 1 { "s" } else { "" });
        checks.push(compare(&format!("{name}.backward (bias)"), layer, &shape, &g[b_off..bn_at], &dbias, TOL_SUMS));
    }
    Ok(checks)
}

/// What a batchnorm launch fuses, as GpuNet fuses it: the ReLU after it, a dropout of this probability
/// after the ReLU, and in the backward pass the pooling that follows (its dy is then per pooled value).
#[derive(Debug, Clone, Copy, Default)]
struct BnCase {
    relu: bool,
    dropout: Option<FusedDropout>,
    pooling: BnPooling,
    /// The input arrives in this many parts (a split convolution's), 0 or 1: whole.
    parts: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum BnPooling {
    #[default]
    None,
    /// A global average pooling (one gradient per plane).
    Global,
    /// A 2x2 max pooling of planes this wide.
    Max { width: usize },
}

/// A batchnorm layer with what `case` fuses: training forward with running statistics, backward, and
/// evaluation forward.
async fn batchnorm_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    d: BnDims,
    case: BnCase,
    seed: u64,
) -> Result<Vec<Check>> {
    let (n, c) = (d.n, d.c);
    let len = n * c * d.hw;
    let parts = case.parts.max(1);
    // The input's parts, and x as their sum in order (what the kernel must use).
    let x_parts: Vec<f32> = random(seed, parts * len, 2.0).iter().map(|v| v + 0.3 / parts as f32).collect();
    let mut x = x_parts[..len].to_vec();
    for part in x_parts.chunks(len).skip(1) {
        x.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    let gamma: Vec<f32> = random(seed + 10, c, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = random(seed + 20, c, 0.5);
    let rm = random(seed + 30, c, 0.5);
    let rv: Vec<f32> = random(seed + 40, c, 0.5).iter().map(|v| v + 1.0).collect();
    let width = match case.pooling {
        BnPooling::Max { width } => width,
        _ => d.hw,
    };
    let pooled_len = match case.pooling {
        BnPooling::None => len,
        BnPooling::Global => n * c,
        BnPooling::Max { width } => n * c * (d.hw / width / 2) * (width / 2),
    };
    let dy = random(seed + 50, pooled_len, 1.0);
    let step = StepUniform { dropout_seed: 4321, dropout_step: 9, dropout_on: 1, ..Default::default() };
    // State layout: gamma, beta, running mean, running var.
    let state: Vec<f32> = [&gamma[..], &beta, &rm, &rv].concat();
    let offsets = BnOffsets { gamma: 0, beta: c, running_mean: 2 * c, running_var: 3 * c };
    // The sums in as many slices as training uses, by the batchnorm's own kernels (the partials
    // written by a convolution's epilogues are checked in conv_stats_checks and conv_sums_checks).
    let slices = bn_slices(c);
    let l = BnLayer {
        n,
        c,
        hw: d.hw,
        relu: case.relu,
        offsets,
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        slices,
        forward_parts: None,
        backward_parts: None,
        dy_pooled: case.pooling == BnPooling::Global,
        dropout: case.dropout,
        maxpool: matches!(case.pooling, BnPooling::Max { .. }),
        width,
        parts,
    };
    let (xb, sb, dyb) = (ctx.upload("x", &x_parts), ctx.upload("state", &state), ctx.upload("dy", &dy));
    let (yb, savedb, dxb, gb) =
        (ctx.zeros("y", len), ctx.zeros("saved", l.saved_len()), ctx.zeros("dx", len), ctx.zeros("grads", 2 * c));
    let stepb = ctx.uniform("step", &step);
    let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb, step: &stepb };
    let fwd = k.batchnorm.forward_train(ctx, &l, &b);
    let bwd = k.batchnorm.backward(ctx, &l, &b, &dyb, &dxb, &gb);
    run(ctx, &fwd.iter().chain(&bwd).collect::<Vec<_>>());

    // CPU: batchnorm, ReLU, dropout; backward through the pooling, dropout, ReLU, then batchnorm. The
    // pooling's and the ReLU's backward take the GPU's output: an output within rounding of zero, or
    // of its window's maximum, may decide differently on each side, and the backward is checked for
    // the forward's decisions (the forward is checked on its own).
    let y_gpu = read(ctx, &yb, len).await?;
    let mut y = vec![0.0; len];
    let saved = batchnorm_forward_train(&d, &x, &gamma, &beta, BN_EPS, &mut y);
    let mut g = vec![0.0; len];
    match case.pooling {
        BnPooling::None => g.copy_from_slice(&dy),
        BnPooling::Global => global_avg_pool_backward(d.hw, &dy, &mut g),
        BnPooling::Max { width } => {
            let (planes, h) = (n * c, d.hw / width);
            let (mut pooled, mut argmax) = (vec![0.0; pooled_len], vec![0u8; pooled_len]);
            maxpool2_forward(planes, h, width, &y_gpu, &mut pooled, &mut argmax);
            maxpool2_backward(planes, h, width, &argmax, &dy, &mut g);
        }
    }
    if case.relu {
        relu_forward(&mut y);
    }
    if let Some(FusedDropout { p, layer }) = case.dropout {
        let mask = dropout_mask(step.dropout_seed, step.dropout_step, layer as u32, p, len);
        dropout_apply(&mask, &mut y);
        dropout_apply(&mask, &mut g);
    }
    if case.relu {
        relu_backward(&y_gpu, &mut g);
    }
    let (mut rm2, mut rv2) = (rm.clone(), rv.clone());
    batchnorm_update_running(&d, &saved, BN_MOMENTUM, &mut rm2, &mut rv2);
    let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
    batchnorm_backward(&d, &x, &g, &gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);

    let relu_tag = match (case.relu, case.dropout) {
        (false, _) => "",
        (true, None) => "+relu",
        (true, Some(_)) => "+relu+dropout",
    };
    let parts_tag = if parts > 1 { format!(" (x in {parts} parts)") } else { String::new() };
    let dy_tag = match case.pooling {
        BnPooling::None => "",
        BnPooling::Global => " (dy of avg pool)",
        BnPooling::Max { .. } => " (dy of max pool)",
    };
    let act = format!("{n}x{c}x{}", d.hw);
    let in_slices = format!("{act} in {slices} slice{}", if slices > 1 { "s" } else { "" });
    let sv = read(ctx, &savedb, 2 * c).await?;
    let st = read(ctx, &sb, 4 * c).await?;
    let gr = read(ctx, &gb, 2 * c).await?;
    let dx_gpu = read(ctx, &dxb, len).await?;
    let per_channel = format!("{c}");
    let mut checks = vec![
        compare(&format!("batchnorm.stats (mean){parts_tag}"), layer, &in_slices, &sv[..c], &saved.mean, TOL_SUMS),
        compare("batchnorm.stats (1/std)", layer, &in_slices, &sv[c..], &saved.invstd, TOL_SUMS),
        compare("batchnorm.stats (running mean)", layer, &per_channel, &st[2 * c..3 * c], &rm2, TOL_SUMS),
        compare("batchnorm.stats (running var)", layer, &per_channel, &st[3 * c..], &rv2, TOL_SUMS),
        compare(&format!("batchnorm.apply_train{relu_tag}"), layer, &act, &y_gpu, &y, TOL_SUMS),
        compare(&format!("batchnorm.backward_reduce (dgamma){dy_tag}"), layer, &in_slices, &gr[..c], &dgamma, TOL_SUMS),
        compare(&format!("batchnorm.backward_reduce (dbeta){dy_tag}"), layer, &in_slices, &gr[c..], &dbeta, TOL_SUMS),
        compare(&format!("batchnorm.backward_data{relu_tag}{dy_tag}"), layer, &act, &dx_gpu, &dx, TOL_SUMS),
    ];

    // Evaluation mode, on the original running statistics.
    let sb = ctx.upload("state", &state);
    let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb, step: &stepb };
    run(ctx, &[&k.batchnorm.forward_eval(ctx, &l, &b)]);
    let mut ye = vec![0.0; len];
    batchnorm_forward_eval(&d, &x, &gamma, &beta, &rm, &rv, BN_EPS, &mut ye);
    if case.relu {
        relu_forward(&mut ye);
    }
    let eval_tag = if case.relu { "+relu" } else { "" };
    checks.push(compare(
        &format!("batchnorm.apply_eval{eval_tag}"),
        layer,
        &act,
        &read(ctx, &yb, len).await?,
        &ye,
        TOL_SUMS,
    ));
    Ok(checks)
}

/// The standalone max-pooling kernels; with `ties`, on values from a few levels, so that most windows
/// hold equal maxima and the first-on-ties rule decides where the gradient goes.
async fn maxpool_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    n: usize,
    s: Shape,
    seed: u64,
    ties: bool,
) -> Result<Vec<Check>> {
    let Shape { c, h, w } = s;
    let planes = n * c;
    let (len, out) = (planes * h * w, planes * (h / 2) * (w / 2));
    let mut x = random(seed, len, 1.0);
    if ties {
        x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
    }
    let dy = random(seed + 1, out, 1.0);
    let (xb, dyb) = (ctx.upload("x", &x), ctx.upload("dy", &dy));
    let (yb, dxb) = (ctx.zeros("y", out), ctx.zeros("dx", len));
    let f = k.pool.maxpool_forward(ctx, (planes, h, w), &xb, &yb);
    let b = k.pool.maxpool_backward(ctx, (planes, h, w), &xb, &dyb, &dxb);
    run(ctx, &[&f, &b]);
    let mut y = vec![0.0; out];
    let mut argmax = vec![0u8; out];
    maxpool2_forward(planes, h, w, &x, &mut y, &mut argmax);
    let mut dx = vec![0.0; len];
    maxpool2_backward(planes, h, w, &argmax, &dy, &mut dx);
    let (input, output) = (nchw(n, c, h, w), nchw(n, c, h / 2, w / 2));
    let tag = if ties { " (ties)" } else { "" };
    Ok(vec![
        compare(
            &format!("pool.maxpool_forward{tag}"),
            layer,
            &format!("{input} -> {output}"),
            &read(ctx, &yb, out).await?,
            &y,
            TOL_EXACT,
        ),
        compare(
            &format!("pool.maxpool_backward{tag}"),
            layer,
            &format!("{output} -> {input}"),
            &read(ctx, &dxb, len).await?,
            &dx,
            TOL_EXACT,
        ),
    ])
}

async fn gap_checks(
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

/// A dropout layer of probability p at index `index` of its model (which keys its mask).
async fn dropout_checks(
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

/// The loss kernel on `n` images of `classes` logits; with `pool_hw` > 0, from a global average
/// pooling of `pool_hw` values per logit fused in (its logits written out and checked too).
async fn loss_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    (n, classes, pool_hw): (usize, usize, usize),
    seed: u64,
) -> Result<Vec<Check>> {
    let pooled_input = random(seed + 1, n * classes * pool_hw.max(1), 4.0);
    let logits = if pool_hw > 0 {
        let mut l = vec![0.0; n * classes];
        global_avg_pool_forward(pool_hw, &pooled_input, &mut l);
        l
    } else {
        random(seed, n * classes, 4.0)
    };
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % classes) as u8).collect();
    let l32: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let (lb, lab, db, mb, pb) = (
        if pool_hw > 0 { ctx.zeros("logits", n * classes) } else { ctx.upload("logits", &logits) },
        ctx.upload("labels", &l32),
        ctx.zeros("dlogits", n * classes),
        ctx.zeros("metrics", 2),
        ctx.upload("pooled", &pooled_input),
    );
    let pooled = (pool_hw > 0).then_some((&pb, pool_hw));
    let buffers = LossBuffers { logits: &lb, labels: &lab, dlogits: &db, metrics: &mb, pooled };
    run(ctx, &[&k.loss.softmax_cross_entropy(ctx, n, classes, false, &buffers)]);
    let mut dlogits = vec![0.0; n * classes];
    let out = softmax_cross_entropy(&logits, &labels, classes, Some(&mut dlogits));
    let shape = if pool_hw > 0 { format!("{n}x{classes}x{pool_hw} pooled") } else { format!("{n}x{classes}") };
    let m = read(ctx, &mb, 2).await?;
    let got_logits = read(ctx, &lb, n * classes).await?;
    // Accumulating mode adds a second batch onto the first.
    run(ctx, &[&k.loss.softmax_cross_entropy(ctx, n, classes, true, &buffers)]);
    let m2 = read(ctx, &mb, 2).await?;
    let mut checks = vec![
        compare(
            "loss.softmax_cross_entropy (dlogits)",
            layer,
            &shape,
            &read(ctx, &db, n * classes).await?,
            &dlogits,
            TOL_SUMS,
        ),
        compare("loss.softmax_cross_entropy (loss)", layer, &shape, &[m[0] / n as f32], &[out.loss], TOL_SUMS),
        compare_exact("loss.softmax_cross_entropy (correct)", layer, &shape, "counts", &[m[1] as u32], &[out.correct]),
        compare_exact("loss.softmax_cross_entropy (accumulate)", layer, &shape, "sums", &m2, &[2.0 * m[0], 2.0 * m[1]]),
    ];
    if pool_hw > 0 {
        checks.push(compare(
            "loss.softmax_cross_entropy (pooled logits)",
            layer,
            &shape,
            &got_logits,
            &logits,
            TOL_SUMS,
        ));
    }
    Ok(checks)
}

async fn sgd_checks(ctx: &GpuContext, k: &Kernels, len: usize) -> Result<Vec<Check>> {
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
        let buffers = SgdBuffers { step: &sb, state: &pb, grads: &gb, momenta: &mb, metrics: &metrics };
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
    let buffers = SgdBuffers { step: &sb, state: &pb, grads: &gb, momenta: &mb, metrics: &metrics };
    run(ctx, &[&k.sgd.update(ctx, len, &sliced, &buffers)]);
    let (mut p2, mut m2) = (p.clone(), m.clone());
    sgd_update(sgd, &mut p2, &whole, &mut m2);
    let got = read(ctx, &pb, len).await?;
    checks.push(compare("sgd.update (3 slices)", "all trainable", &shape, &got, &p2, TOL_ELEMENTWISE));
    Ok(checks)
}

/// Every kernel at every layer shape of `model` with a batch of `n`, forward and backward, in layer
/// order; then the loss and SGD kernels; then odd shapes (channel counts off the kernels' channel
/// blocks, more images than the loss kernel's invocations).
pub async fn kernel_checks(ctx: &GpuContext, k: &Kernels, model: &Model, n: usize) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // Each kernel as GpuNet launches it, with what it fuses at that layer.
    let plan = Plan::new(model);
    let last = model.layers.len() - 1;
    for (i, layer) in model.layers.iter().enumerate() {
        let name = model.layer_name(i);
        let s = model.input_of(i);
        let seed = 1000 * i as u64;
        match *layer {
            Layer::Conv { .. } | Layer::Linear { .. } => {
                let (d, _) = model.conv(i, n).expect("a convolution layer");
                let pool = plan.pooled_input[i];
                let bias = model.conv_bias(i).is_some();
                // The first layer's input needs no gradient, so training never computes its dx.
                checks.extend(conv_checks(ctx, k, &name, &d, seed, i > 0, pool, bias).await?);
            }
            Layer::BatchNorm { c, .. } => {
                let fusion = plan.norm[i];
                // Before a global average pooling that ends the network, the pooling's backward runs
                // inside the batchnorm's.
                let pooling = if fusion.avgpool {
                    BnPooling::Global
                } else if fusion.maxpool {
                    BnPooling::Max { width: s.w }
                } else {
                    BnPooling::None
                };
                let parts = match (i.checked_sub(1).and_then(|j| model.conv(j, n)), i) {
                    (Some((d, _)), _) => forward_splits(&d),
                    _ => 1,
                };
                let dropout = fusion.dropout.map(|(layer, p)| FusedDropout { p, layer });
                let case = BnCase { relu: fusion.relu, dropout, pooling, parts };
                checks.extend(batchnorm_checks(ctx, k, &name, BnDims { n, c, hw: s.h * s.w }, case, seed).await?);
                // The partials the convolutions before and after write in training.
                if let Some((d, _)) = i.checked_sub(1).and_then(|j| model.conv(j, n)).filter(|_| parts == 1) {
                    checks.extend(conv_stats_checks(ctx, k, &name, &d, plan.pooled_input[i - 1], seed + 7).await?);
                }
                if let Some((d, _)) = conv_reading(model, &plan, i).and_then(|j| model.conv(j, n)) {
                    checks.extend(conv_sums_checks(ctx, k, &name, &d, case, seed + 8).await?);
                }
            }
            Layer::Relu => {} // fused into the batchnorm kernels before it
            // Inside the batchnorm before (and, for a max pooling, the convolution after): no launch of
            // their own.
            Layer::Dropout { .. } if plan.in_place(i) => {}
            Layer::MaxPool2 if plan.pooled_input.get(i + 1) == Some(&true) && !plan.backward.contains(&(i..i + 1)) => {}
            Layer::Dropout { p } => {
                checks.extend(dropout_checks(ctx, k, &name, n * s.len(), (p, i), &nchw(n, s.c, s.h, s.w), seed).await?)
            }
            Layer::MaxPool2 => checks.extend(maxpool_checks(ctx, k, &name, n, s, seed, false).await?),
            Layer::GlobalAvgPool => checks.extend(gap_checks(ctx, k, &name, n, s.c, s.h * s.w, seed).await?),
        }
    }
    // A global average pooling that ends the network runs inside the loss kernel (as GpuNet does it).
    let pool_hw = match model.layers[last] {
        Layer::GlobalAvgPool => model.input_of(last).h * model.input_of(last).w,
        _ => 0,
    };
    checks.extend(loss_checks(ctx, k, "loss", (n, model.output_classes(), pool_hw), 11).await?);
    checks.extend(sgd_checks(ctx, k, model.num_trainable).await?);
    // Off the model's shapes: partial tiles of every kind in the convolutions (channels not a multiple
    // of 16, sums not a multiple of the 16-deep slabs, positions not a multiple of 64, odd image sizes,
    // weight columns past one 64-wide tile), and more images than the loss kernel's invocations.
    for (seed, d) in [
        (1, ConvDims { n: 3, cin: 3, h: 9, w: 7, cout: 5, k: 3, pad: 1 }),
        (2, ConvDims { n: 3, cin: 3, h: 4, w: 5, cout: 7, k: 1, pad: 0 }),
        (3, ConvDims { n: 5, cin: 17, h: 11, w: 13, cout: 19, k: 3, pad: 1 }),
        (4, ConvDims { n: 7, cin: 9, h: 7, w: 9, cout: 33, k: 3, pad: 0 }),
        (5, ConvDims { n: 13, cin: 33, h: 5, w: 3, cout: 17, k: 1, pad: 0 }),
    ] {
        // Odd seeds read through a max pooling; seeds 2 and 3 have a bias.
        checks.extend(conv_checks(ctx, k, "odd shape", &d, seed, true, seed % 2 == 1, seed == 2 || seed == 3).await?);
    }
    checks.extend(loss_checks(ctx, k, "odd shape", (300, 10, 0), 12).await?);
    checks.extend(loss_checks(ctx, k, "odd shape", (300, 10, 7), 15).await?);
    // A batchnorm whose 39 elements per channel leave its last slices short and empty, and whose
    // workgroups straddle many planes; with and without the ReLU.
    let odd = BnDims { n: 3, c: 5, hw: 13 };
    let relu = BnCase { relu: true, ..Default::default() };
    checks.extend(batchnorm_checks(ctx, k, "odd shape", odd, relu, 13).await?);
    let avg = BnCase { pooling: BnPooling::Global, ..Default::default() };
    checks.extend(batchnorm_checks(ctx, k, "odd shape", odd, avg, 14).await?);
    // Dropout and a max pooling fused in, on planes of odd height and width (the last row and column
    // belong to no window), and on a few levels of input, so that windows hold equal maxima.
    let dropout = Some(FusedDropout { p: 0.3, layer: 5 });
    let fused = BnCase { relu: true, dropout, pooling: BnPooling::Max { width: 5 }, parts: 3 };
    checks.extend(batchnorm_checks(ctx, k, "odd shape", BnDims { n: 3, c: 5, hw: 35 }, fused, 15).await?);
    // The epilogues' partials on partial tiles: channels not a multiple of 16, positions not a
    // multiple of 64, odd planes; through a max pooling and a dropout, and through a ReLU alone.
    let odd_stats = ConvDims { n: 3, cin: 3, h: 9, w: 7, cout: 5, k: 3, pad: 1 };
    checks.extend(conv_stats_checks(ctx, k, "odd shape", &odd_stats, true, 18).await?);
    // 70 positions: a last tile of 6, whose quarters past the first are empty.
    let few = ConvDims { n: 2, cin: 4, h: 5, cout: 3, ..odd_stats };
    checks.extend(conv_stats_checks(ctx, k, "odd shape", &few, false, 21).await?);
    let odd_conv = ConvDims { n: 3, cin: 5, h: 5, w: 7, cout: 6, k: 3, pad: 1 };
    checks.extend(conv_sums_checks(ctx, k, "odd shape", &odd_conv, fused, 19).await?);
    checks.extend(conv_sums_checks(ctx, k, "odd shape", &ConvDims { h: 9, ..odd_conv }, relu, 20).await?);
    // The standalone kernels of layers that fuse in Net3, as a network that cannot fuse them runs them.
    checks.extend(maxpool_checks(ctx, k, "odd shape", 3, Shape { c: 5, h: 6, w: 10 }, 16, true).await?);
    checks.extend(dropout_checks(ctx, k, "odd shape", 3 * 5 * 6 * 10, (0.3, 9), &nchw(3, 5, 6, 10), 17).await?);
    Ok(checks)
}

/// A convolution's forward writing the statistics partials of the training batchnorm (with ReLU) after
/// it, as GpuNet runs a convolution of one part: the batchnorm's statistics and output from them.
async fn conv_stats_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    d: &ConvDims,
    pool: bool,
    seed: u64,
) -> Result<Vec<Check>> {
    let (n, c) = (d.n, d.cout);
    let (x_given, x) = conv_input(d, pool, seed);
    let w = random(seed + 1, d.weight_len(), 0.3);
    let gamma: Vec<f32> = random(seed + 2, c, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = random(seed + 3, c, 0.5);
    let (rm, rv) = (vec![0.0; c], vec![1.0; c]);
    // Weights, then gamma, beta, running mean and variance.
    let state: Vec<f32> = [&w[..], &gamma, &beta, &rm, &rv].concat();
    let at = d.weight_len();
    let offsets = BnOffsets { gamma: at, beta: at + c, running_mean: at + 2 * c, running_var: at + 3 * c };
    let hw = d.ho() * d.wo();
    let positions = n * hw;
    let l = BnLayer {
        n,
        c,
        hw,
        relu: true,
        offsets,
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        slices: bn_slices(c),
        forward_parts: Some(Conv::position_tiles(positions)),
        backward_parts: None,
        dy_pooled: false,
        dropout: None,
        maxpool: false,
        width: d.wo(),
        parts: 1,
    };
    let (xb, sb) = (ctx.upload("x", &x_given), ctx.upload("state", &state));
    let (yb, zb, savedb) =
        (ctx.zeros("y", n * d.out_image()), ctx.zeros("z", n * d.out_image()), ctx.zeros("saved", l.saved_len()));
    let stepb = ctx.uniform("step", &StepUniform::default());
    let stats = BnStats { saved: &savedb, part_off: l.forward_partials_at() };
    let mut launches = vec![k.conv.forward(ctx, d, 0, None, pool, 1, None, Some(stats), &xb, &sb, &yb)?];
    let b = BnBuffers { x: &yb, y: &zb, state: &sb, saved: &savedb, step: &stepb };
    launches.extend(k.batchnorm.forward_train(ctx, &l, &b));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    let mut y = vec![0.0; n * d.out_image()];
    conv_forward(d, &x, &w, &mut y);
    let bn = BnDims { n, c, hw };
    let mut z = vec![0.0; y.len()];
    let saved = batchnorm_forward_train(&bn, &y, &gamma, &beta, BN_EPS, &mut z);
    relu_forward(&mut z);
    let sv = read(ctx, &savedb, 2 * c).await?;
    let shape = format!("{} in {} tiles", nchw(n, c, d.ho(), d.wo()), l.forward_partials());
    Ok(vec![
        compare("conv.forward -> batchnorm.stats (mean)", layer, &shape, &sv[..c], &saved.mean, TOL_SUMS),
        compare("conv.forward -> batchnorm.stats (1/std)", layer, &shape, &sv[c..], &saved.invstd, TOL_SUMS),
        compare(
            "conv.forward -> batchnorm.apply_train+relu",
            layer,
            &shape,
            &read(ctx, &zb, z.len()).await?,
            &z,
            TOL_SUMS,
        ),
    ])
}

/// A convolution's backward writing, from its dx, the backward sums of the training batchnorm whose
/// output it reads (`case`: with its ReLU, dropout and max pooling), as GpuNet runs it: the
/// batchnorm's dgamma, dbeta and dx from them. `d` is the convolution (its input: the batchnorm's
/// output, or with a max pooling that output's pooling).
async fn conv_sums_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    d: &ConvDims,
    case: BnCase,
    seed: u64,
) -> Result<Vec<Check>> {
    let pool = matches!(case.pooling, BnPooling::Max { .. });
    let (n, c) = (d.n, d.cin);
    let (h, w) = if pool { (2 * d.h, 2 * d.w) } else { (d.h, d.w) };
    let bn = BnDims { n, c, hw: h * w };
    let len = n * c * h * w;
    let x = random(seed, len, 2.0);
    let gamma: Vec<f32> = random(seed + 1, c, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = random(seed + 2, c, 0.5);
    let state: Vec<f32> = [&gamma[..], &beta, &vec![0.0; c], &vec![1.0; c]].concat();
    let offsets = BnOffsets { gamma: 0, beta: c, running_mean: 2 * c, running_var: 3 * c };
    let weights = random(seed + 3, d.weight_len(), 0.3);
    let dy = random(seed + 4, n * d.out_image(), 1.0);
    let step = StepUniform { dropout_seed: 99, dropout_step: 3, dropout_on: 1, ..Default::default() };
    let l = BnLayer {
        n,
        c,
        hw: h * w,
        relu: case.relu,
        offsets,
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        slices: bn_slices(c),
        forward_parts: None,
        backward_parts: Some(Conv::position_tiles(n * d.h * d.w)),
        dy_pooled: false,
        dropout: case.dropout,
        maxpool: pool,
        width: w,
        parts: 1,
    };
    let (xb, sb, wb, dyb) =
        (ctx.upload("x", &x), ctx.upload("state", &state), ctx.upload("weights", &weights), ctx.upload("dy", &dy));
    let (yb, savedb, dyc, dxb, gb) = (
        ctx.zeros("y", len),
        ctx.zeros("saved", l.saved_len()),
        ctx.zeros("conv dx", n * d.in_image()),
        ctx.zeros("dx", len),
        ctx.zeros("grads", 2 * c),
    );
    let slices = weight_grad_slices(d, false);
    let sliced = SlicedGrad { start: 0, len: d.weight_len(), extra: d.weight_len(), slices };
    let wgrads = ctx.zeros("weight grads", slices * d.weight_len());
    let stepb = ctx.uniform("step", &step);
    let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb, step: &stepb };
    let sums = BnSums {
        saved: &savedb,
        part_off: l.backward_partials_at(),
        bn_x: &xb,
        step: &stepb,
        relu: case.relu,
        dropout: case.dropout.map(|f| f.p),
    };
    let mut launches = k.batchnorm.forward_train(ctx, &l, &b);
    launches.push(k.conv.backward(ctx, d, &sliced, None, pool, &yb, &dyb, &wb, &wgrads, Some(&dyc), Some(sums))?);
    launches.extend(k.batchnorm.backward(ctx, &l, &b, &dyc, &dxb, &gb));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    // CPU, for the forward's decisions (the GPU's output y: its ReLU mask and pooling winners).
    let y_gpu = read(ctx, &yb, len).await?;
    let mut y = vec![0.0; len];
    let saved = batchnorm_forward_train(&bn, &x, &gamma, &beta, BN_EPS, &mut y);
    let mut conv_in = y_gpu.clone();
    let mut argmax = vec![0u8; n * d.in_image()];
    if pool {
        conv_in = vec![0.0; n * d.in_image()];
        maxpool2_forward(n * c, h, w, &y_gpu, &mut conv_in, &mut argmax);
    }
    let (mut dx_conv, mut dw) = (vec![0.0; n * d.in_image()], vec![0.0; d.weight_len()]);
    conv_backward(d, &conv_in, &weights, &dy, Some(&mut dx_conv), &mut dw);
    let mut g = dx_conv.clone();
    if pool {
        g = vec![0.0; len];
        maxpool2_backward(n * c, h, w, &argmax, &dx_conv, &mut g);
    }
    if let Some(FusedDropout { p, layer }) = case.dropout {
        dropout_apply(&dropout_mask(step.dropout_seed, step.dropout_step, layer as u32, p, len), &mut g);
    }
    if case.relu {
        relu_backward(&y_gpu, &mut g);
    }
    let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
    batchnorm_backward(&bn, &x, &g, &gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);
    let gr = read(ctx, &gb, 2 * c).await?;
    let tiles = format!("{} in {} tiles", nchw(n, c, h, w), l.backward_partials());
    let act = nchw(n, c, h, w);
    Ok(vec![
        compare("conv.backward -> batchnorm.backward (dgamma)", layer, &tiles, &gr[..c], &dgamma, TOL_SUMS),
        compare("conv.backward -> batchnorm.backward (dbeta)", layer, &tiles, &gr[c..], &dbeta, TOL_SUMS),
        compare("conv.backward -> batchnorm.backward_data", layer, &act, &read(ctx, &dxb, len).await?, &dx, TOL_SUMS),
    ])
}

/// Per tensor of the model, the state and momenta of `backend` against `reference`.
async fn compare_tensors(
    what: &str,
    model: &Model,
    backend: &mut dyn Backend,
    reference: &mut CpuBackend,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let (state, want_state) = (backend.state().await?, reference.state().await?);
    let (momenta, want_momenta) = (backend.momenta().await?, reference.momenta().await?);
    for p in &model.params {
        let range = p.offset..p.offset + p.len;
        let shape = p.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let kind = if p.trainable { "parameters" } else { "running statistics" };
        checks.push(compare(
            &format!("{what} ({kind})"),
            &p.name,
            &shape,
            &state[range.clone()],
            &want_state[range.clone()],
            TOL_SUMS,
        ));
        if p.trainable {
            let m = &momenta[range.clone()];
            checks.push(compare(&format!("{what} (momenta)"), &p.name, &shape, m, &want_momenta[range], TOL_GRADIENTS));
        }
    }
    Ok(checks)
}

/// A batch of `n` random images and labels. Dense random pixels rather than digits: a digit's constant
/// background makes equal values in a max-pool window, and which of them counts as the maximum then
/// depends on the last bit of each backend's arithmetic. Both choices are right, but they send a
/// gradient to different pixels (up to 1e-3 of conv4's largest weight gradient on real batch-100
/// data, measured on lavapipe), which would hide the kernels' own errors.
pub fn random_batch(model: &Model, n: usize, seed: u64) -> Batch {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    // About the range of normalized MNIST pixels, (0 - 0.1307) / 0.3081 to (1 - 0.1307) / 0.3081.
    let input = (0..n * model.input.len()).map(|_| g.random_range(-0.5f32..2.8)).collect();
    let classes = model.output_classes() as u8;
    let labels = (0..n).map(|_| g.random_range(0..classes)).collect();
    Batch { epoch: 0, index: seed as usize, input, labels }
}

/// Batches a whole-step comparison may set aside, one after another, for a decision at a near-tie.
const NEAR_TIE_RETRIES: usize = 5;

/// The comparisons of whole training steps, and the batches set aside on the way.
#[derive(Debug, Clone, Default)]
pub struct StepChecks {
    pub checks: Vec<Check>,
    /// One line per batch set aside: the step, the batch and the comparison that failed on it.
    pub set_aside: Vec<String>,
    /// Batches run in all.
    pub batches: usize,
}

impl StepChecks {
    /// A line on the batches set aside, for a reader of the checks.
    pub fn set_aside_line(&self) -> String {
        let mut line = format!("batches set aside for near-ties: {} of {}", self.set_aside.len(), self.batches);
        if !self.set_aside.is_empty() {
            line += &format!(" ({})", self.set_aside.join("; "));
        }
        line
    }
}

/// Runs `steps` consecutive training steps on random batches of `n` on the CPU reference, from the
/// model's seed-1 initialization and zero momenta, and each of them on `backend` too, from the state and
/// momenta the reference had before it. Per step, the loss; per tensor, the worst error over the steps.
///
/// Each step starts from the reference's state rather than the backend's own: a rounding difference
/// grows with every update of an independent run, which would measure the network's sensitivity, not
/// the kernels. And a step whose comparison fails is tried again on another batch (up to
/// NEAR_TIE_RETRIES times) before it counts as failed: about one activation in ten million sits within
/// rounding of a ReLU's zero or of its max-pool neighbour, and when the two backends decide such a tie
/// differently, a gradient goes to a different pixel (measured on lavapipe at batch 100: 3 of 21
/// steps, up to 1e-2 of a tensor's largest gradient). A wrong kernel or wiring fails on every batch; the
/// batches set aside are reported beside the checks.
async fn run_steps(
    what: &str,
    model: &Model,
    backend: &mut dyn Backend,
    n: usize,
    steps: usize,
    params: impl Fn(usize) -> StepParams,
) -> Result<StepChecks> {
    let mut reference = CpuBackend::new(model, model.init_state(1));
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut worst: Vec<Check> = Vec::new();
    let mut set_aside = Vec::new();
    let mut batches = 0;
    for i in 0..steps {
        let (state, momenta) = (reference.state().await?, reference.momenta().await?);
        for attempt in 0..=NEAR_TIE_RETRIES {
            let batch = random_batch(model, n, 1000 * i as u64 + attempt as u64);
            batches += 1;
            let mut losses = [0.0f32; 2];
            for (b, loss) in [&mut *backend, &mut reference as &mut dyn Backend].into_iter().zip(&mut losses) {
                b.load(&state, &momenta).await?;
                b.reset_sums().await?;
                b.train_step(&batch.input, &batch.labels, params(i)).await?;
                *loss = (b.train_sums().await?.loss_sum / n as f64) as f32;
            }
            let mut step = vec![compare(what, "loss", "", &[losses[0]], &[losses[1]], TOL_SUMS)];
            step.extend(compare_tensors(what, model, backend, &mut reference).await?);
            let failed = step
                .iter()
                .filter(|c| !c.ok())
                .max_by(|a, b| (a.error / a.tolerance).total_cmp(&(b.error / b.tolerance)));
            if let (Some(f), true) = (failed, attempt < NEAR_TIE_RETRIES) {
                set_aside.push(format!("step {} batch {attempt}: {} {} {:.1e}", i + 1, f.kernel, f.layer, f.error));
                continue;
            }
            got.push(losses[0]);
            want.push(losses[1]);
            // The loss is compared over all steps below; the tensors keep their worst step.
            let tensors = step.split_off(1);
            if worst.is_empty() {
                worst = tensors;
            } else {
                for (w, c) in worst.iter_mut().zip(tensors) {
                    // A non-finite value's error is infinite, never NaN.
                    if c.error > w.error {
                        *w = c;
                    }
                }
            }
            break;
        }
    }
    let loss_what = if steps == 1 { "loss".to_string() } else { format!("losses of the {steps} steps") };
    let mut checks = vec![compare(what, "loss", &loss_what, &got, &want, TOL_SUMS)];
    checks.extend(worst);
    Ok(StepChecks { checks, set_aside, batches })
}

/// Whole training steps of `backend` against the CPU reference, on random batches of `n`: one step
/// without dropout (every parameter after SGD, the momenta, the running statistics, the loss), then,
/// when `dropout_steps` > 0, that many consecutive steps with dropout on (both draw the same masks;
/// momenta carry over, as in training), each tensor's worst step reported. The backend is left holding
/// the state of the last step.
pub async fn step_checks(
    model: &Model,
    backend: &mut dyn Backend,
    n: usize,
    dropout_steps: usize,
) -> Result<StepChecks> {
    let one = |_| StepParams { lr: 0.05, momentum: 0.9, weight_decay: 1e-5, dropout_seed: 7, step: 0, dropout: false };
    let mut all = run_steps("train step", model, backend, n, 1, one).await?;
    if dropout_steps > 0 {
        // The recipe's schedule, as training runs it.
        let schedule = OneCycle::recipe(12_000, 0.1);
        let recipe = |i: usize| {
            let (lr, momentum) = schedule.at(i);
            let (lr, momentum) = (lr as f32, momentum as f32);
            StepParams { lr, momentum, weight_decay: 1e-5, dropout_seed: 7, step: i as u32, dropout: true }
        };
        let what = format!("{dropout_steps} steps, dropout");
        let more = run_steps(&what, model, backend, n, dropout_steps, recipe).await?;
        all.checks.extend(more.checks);
        all.set_aside.extend(more.set_aside);
        all.batches += more.batches;
    }
    Ok(all)
}

/// The largest error among `checks` as a share of its tolerance (exact checks, of tolerance 0, left out).
pub fn worst_ratio(checks: &[Check]) -> f64 {
    checks.iter().filter(|c| c.tolerance > 0.0).map(|c| c.error / c.tolerance).fold(0.0, f64::max)
}

/// The failed checks as lines, for an error message.
pub fn failures(checks: &[Check]) -> Vec<String> {
    checks.iter().filter(|c| !c.ok()).map(format_row).collect()
}

/// One row of the table `verify` prints.
pub fn format_row(c: &Check) -> String {
    let err = if c.error.is_finite() { format!("{:.2e}", c.error) } else { "non-finite".into() };
    let mut row = format!(
        "{:<56} {:<16} {:<46} {:>10} {:>8} {}",
        c.kernel,
        c.layer,
        c.shape,
        err,
        format!("{:.0e}", c.tolerance),
        if c.ok() { "ok" } else { "FAIL" }
    );
    if let Some(d) = &c.detail {
        row += &format!("  ({d})");
    }
    row
}

pub fn header() -> String {
    format!("{:<56} {:<16} {:<46} {:>10} {:>8} {}", "kernel", "layer", "shape", "max error", "tol", "result")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_passes_within_tolerance_and_fails_beyond_it() {
        let want = [1.0f32, -2.0, 4.0];
        assert!(compare("k", "l", "3", &[1.0, -2.0, 4.0], &want, 0.0).ok());
        // About 2e-5 off a largest value of 4: 5e-6 relative, within 1e-5 and beyond 4e-6.
        let c = compare("k", "l", "3", &[1.0, -2.0, 4.00002], &want, 1e-5);
        assert!((c.error - 5e-6).abs() < 1e-6 && c.ok(), "{c:?}");
        assert!(!compare("k", "l", "3", &[1.0, -2.0, 4.00002], &want, 4e-6).ok());
        let c = compare("k", "l", "3", &[1.0, -2.1, 4.0], &want, 1e-5);
        assert!(!c.ok());
        assert!(c.detail.as_deref().unwrap().contains("index 1"), "{c:?}");
        assert!(format_row(&c).contains("FAIL"));
    }

    #[test]
    fn non_finite_values_and_wrong_lengths_fail_whatever_the_tolerance() {
        for got in [[f32::NAN, 0.0], [0.0, f32::INFINITY]] {
            let c = compare("k", "l", "2", &got, &[0.0, 0.0], f64::MAX);
            assert!(!c.ok() && c.detail.as_deref().unwrap().contains("non-finite"), "{c:?}");
            assert!(format_row(&c).contains("non-finite"));
        }
        assert!(!compare("k", "l", "2", &[0.0, 0.0], &[f32::NAN, 0.0], f64::MAX).ok());
        assert!(!compare("k", "l", "2", &[0.0], &[0.0, 0.0], f64::MAX).ok());
        assert_eq!(compare("k", "l", "2", &[f32::NAN], &[0.0], 1.0).to_json()["error"], serde_json::Value::Null);
    }

    #[test]
    fn exact_checks_count_what_differs() {
        assert!(compare_exact("k", "l", "4", "winners", &[1u32, 2, 3, 0], &[1, 2, 3, 0]).ok());
        let c = compare_exact("k", "l", "4", "winners", &[1u32, 2, 3, 0], &[1, 2, 0, 0]);
        assert!(!c.ok() && c.error == 0.25, "{c:?}");
        assert!(c.detail.unwrap().starts_with("1 of 4 winners differ; first at index 2"));
    }
}
