//! Batchnorm checks, with what a batchnorm's launches absorb (ReLU, dropout, pooling backward).

use crate::cpu::reference::batchnorm::*;
use crate::cpu::reference::dropout::{dropout_apply, dropout_mask};
use crate::cpu::reference::pool::*;
use crate::cpu::reference::relu::{relu_backward, relu_forward};
use crate::gpu::batchnorm::{bn_spans, BnBuffers, BnLayer, BnOffsets, FusedDropout};
use crate::gpu::kernel::run;
use crate::gpu::{GpuContext, Kernels, StepUniform};
use crate::model::{BN_EPS, BN_MOMENTUM};
use anyhow::Result;

use super::{compare, random, read, Check, TOL_SUMS};

/// What a batchnorm launch fuses, as GpuNet fuses it: the ReLU after it, a dropout of this probability
/// after the ReLU, and in the backward pass the pooling that follows (its dy is then per pooled value).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BnCase {
    pub(super) relu: bool,
    pub(super) dropout: Option<FusedDropout>,
    pub(super) pooling: BnPooling,
    /// The input arrives in this many parts (a split convolution's), 0 or 1: whole.
    pub(super) parts: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) enum BnPooling {
    #[default]
    None,
    /// A global average pooling (one gradient per plane).
    Global,
    /// A 2x2 max pooling of planes this wide.
    Max { width: usize },
}

/// A batchnorm layer with what `case` fuses: training forward with running statistics, backward, and
/// evaluation forward.
pub(super) async fn batchnorm_checks(
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
    // The sums in as many spans as training uses, by the batchnorm's own kernels (the partials
    // written by a convolution's epilogues are checked in conv_stats_checks and conv_sums_checks).
    let spans = bn_spans(c);
    let l = BnLayer {
        n,
        c,
        hw: d.hw,
        relu: case.relu,
        offsets,
        momentum: BN_MOMENTUM,
        eps: BN_EPS,
        spans,
        conv_forward_partials: None,
        conv_backward_partials: None,
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
    let in_spans = format!("{act} in {spans} span{}", if spans > 1 { "s" } else { "" });
    let sv = read(ctx, &savedb, 2 * c).await?;
    let st = read(ctx, &sb, 4 * c).await?;
    let gr = read(ctx, &gb, 2 * c).await?;
    let dx_gpu = read(ctx, &dxb, len).await?;
    let per_channel = format!("{c}");
    let mut checks = vec![
        compare(&format!("batchnorm.stats (mean){parts_tag}"), layer, &in_spans, &sv[..c], &saved.mean, TOL_SUMS),
        compare("batchnorm.stats (1/std)", layer, &in_spans, &sv[c..], &saved.invstd, TOL_SUMS),
        compare("batchnorm.stats (running mean)", layer, &per_channel, &st[2 * c..3 * c], &rm2, TOL_SUMS),
        compare("batchnorm.stats (running var)", layer, &per_channel, &st[3 * c..], &rv2, TOL_SUMS),
        compare(&format!("batchnorm.apply_train{relu_tag}"), layer, &act, &y_gpu, &y, TOL_SUMS),
        compare(&format!("batchnorm.backward_reduce (dgamma){dy_tag}"), layer, &in_spans, &gr[..c], &dgamma, TOL_SUMS),
        compare(&format!("batchnorm.backward_reduce (dbeta){dy_tag}"), layer, &in_spans, &gr[c..], &dbeta, TOL_SUMS),
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
