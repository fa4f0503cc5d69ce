//! Batchnorm checks, with what a batchnorm's launches absorb (ReLU, dropout, pooling backward).

use crate::cpu::reference::batchnorm::*;
use crate::cpu::reference::dropout::{dropout_apply, dropout_mask};
use crate::cpu::reference::pool::*;
use crate::cpu::reference::relu::{relu_backward, relu_forward};
use crate::gpu::batchnorm::{bn_spans, BnBuffers, BnLayer, BnOffsets};
use crate::gpu::dropout::FusedDropout;
use crate::gpu::kernel::run;
use crate::gpu::{GpuContext, Kernels, StepUniform};
use crate::model::{BN_EPS, BN_MOMENTUM};
use anyhow::Result;

use super::check::{compare, random, read, Check, TOL_SUMS};

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

impl BnCase {
    /// The batchnorm layer of `d` that runs what this case fuses, its sums from its own kernels;
    /// callers change what their launches add (a convolution's partials, the pooling's planes).
    pub(super) fn layer(&self, d: BnDims, offsets: BnOffsets) -> BnLayer {
        BnLayer {
            n: d.n,
            c: d.c,
            hw: d.hw,
            relu: self.relu,
            offsets,
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
            spans: bn_spans(d.c),
            conv_forward_partials: None,
            conv_backward_partials: None,
            dy_pooled: self.pooling == BnPooling::Global,
            dropout: self.dropout,
            maxpool: matches!(self.pooling, BnPooling::Max { .. }),
            width: match self.pooling {
                BnPooling::Max { width } => width,
                _ => d.hw,
            },
            parts: self.parts.max(1),
        }
    }

    /// The gradient at the batchnorm's output (`len` values) from `dy` at the end of what it fuses:
    /// back through the pooling, the dropout and the ReLU, each deciding as the GPU's forward output
    /// `y_gpu` did (an output within rounding of zero, or of its window's maximum, may decide
    /// differently on each side; the backward is checked for the forward's decisions, the forward on
    /// its own).
    pub(super) fn reference_gradient(&self, l: &BnLayer, step: &StepUniform, y_gpu: &[f32], dy: &[f32]) -> Vec<f32> {
        let len = l.n * l.c * l.hw;
        let mut g = vec![0.0; len];
        match self.pooling {
            BnPooling::None => g.copy_from_slice(dy),
            BnPooling::Global => global_avg_pool_backward(l.hw, dy, &mut g),
            BnPooling::Max { .. } => {
                let (planes, h, width) = (l.n * l.c, l.hw / l.width, l.width);
                let (mut pooled, mut argmax) = (vec![0.0; dy.len()], vec![0u8; dy.len()]);
                maxpool2_forward(planes, h, width, y_gpu, &mut pooled, &mut argmax);
                maxpool2_backward(planes, h, width, &argmax, dy, &mut g);
            }
        }
        if let Some(FusedDropout { p, layer }) = self.dropout {
            dropout_apply(&dropout_mask(step.dropout_seed, step.dropout_step, layer as u32, p, len), &mut g);
        }
        if self.relu {
            relu_backward(y_gpu, &mut g);
        }
        g
    }

    /// The values dy holds per batchnorm output: all of them, one per plane, or one per window.
    fn dy_len(&self, d: BnDims) -> usize {
        match self.pooling {
            BnPooling::None => d.n * d.c * d.hw,
            BnPooling::Global => d.n * d.c,
            BnPooling::Max { width } => d.n * d.c * (d.hw / width / 2) * (width / 2),
        }
    }

    /// The kernels' names say what they fused: `+relu`, `+relu+dropout`; and the gradient's origin.
    fn tags(&self) -> (&'static str, &'static str) {
        let relu = match (self.relu, self.dropout) {
            (false, _) => "",
            (true, None) => "+relu",
            (true, Some(_)) => "+relu+dropout",
        };
        let dy = match self.pooling {
            BnPooling::None => "",
            BnPooling::Global => " (dy of avg pool)",
            BnPooling::Max { .. } => " (dy of max pool)",
        };
        (relu, dy)
    }
}

/// A batchnorm's seeded inputs: x in its parts (a split convolution's), gamma, beta, the running
/// statistics and the output gradient; the state buffer holds gamma, beta, running mean and var.
struct BnInputs {
    x_parts: Vec<f32>,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
    dy: Vec<f32>,
}

impl BnInputs {
    fn new(d: BnDims, case: BnCase, seed: u64) -> BnInputs {
        let (len, c, parts) = (d.n * d.c * d.hw, d.c, case.parts.max(1));
        // The input's parts, and x as their sum in order (what the kernel must use).
        let x_parts: Vec<f32> = random(seed, parts * len, 2.0).iter().map(|v| v + 0.3 / parts as f32).collect();
        let mut x = x_parts[..len].to_vec();
        for part in x_parts.chunks(len).skip(1) {
            x.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        BnInputs {
            x_parts,
            x,
            gamma: random(seed + 10, c, 0.5).iter().map(|v| v + 1.0).collect(),
            beta: random(seed + 20, c, 0.5),
            rm: random(seed + 30, c, 0.5),
            rv: random(seed + 40, c, 0.5).iter().map(|v| v + 1.0).collect(),
            dy: random(seed + 50, case.dy_len(d), 1.0),
        }
    }

    fn state(&self) -> Vec<f32> {
        [&self.gamma[..], &self.beta, &self.rm, &self.rv].concat()
    }
}

/// What the reference computes of a training step through the batchnorm: its output, statistics,
/// running statistics after the update, and dx, dgamma, dbeta.
struct BnWant {
    y: Vec<f32>,
    saved: BnSaved,
    running: (Vec<f32>, Vec<f32>),
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

impl BnWant {
    /// The reference's forward (batchnorm, ReLU, dropout) and backward (through what `case` fuses,
    /// for the GPU's forward decisions, then the batchnorm).
    fn new(l: &BnLayer, case: BnCase, step: &StepUniform, t: &BnInputs, y_gpu: &[f32]) -> BnWant {
        let d = BnDims { n: l.n, c: l.c, hw: l.hw };
        let len = d.n * d.c * d.hw;
        let mut y = vec![0.0; len];
        let saved = batchnorm_forward_train(&d, &t.x, &t.gamma, &t.beta, BN_EPS, &mut y);
        if case.relu {
            relu_forward(&mut y);
        }
        if let Some(FusedDropout { p, layer }) = case.dropout {
            dropout_apply(&dropout_mask(step.dropout_seed, step.dropout_step, layer as u32, p, len), &mut y);
        }
        let g = case.reference_gradient(l, step, y_gpu, &t.dy);
        let (mut rm, mut rv) = (t.rm.clone(), t.rv.clone());
        batchnorm_update_running(&d, &saved, BN_MOMENTUM, &mut rm, &mut rv);
        let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; d.c], vec![0.0; d.c]);
        batchnorm_backward(&d, &t.x, &g, &t.gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);
        BnWant { y, saved, running: (rm, rv), dx, dgamma, dbeta }
    }
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
    let (len, c) = (d.n * d.c * d.hw, d.c);
    let t = BnInputs::new(d, case, seed);
    let step = StepUniform { dropout_seed: 4321, dropout_step: 9, dropout_on: 1, ..Default::default() };
    let state = t.state();
    // The sums in as many spans as training uses, by the batchnorm's own kernels (the partials
    // written by a convolution's epilogues are checked in conv_stats_checks and conv_sums_checks).
    let l = case.layer(d, BnOffsets { gamma: 0, beta: c, running_mean: 2 * c, running_var: 3 * c });
    let (xb, sb, dyb) = (ctx.upload("x", &t.x_parts), ctx.upload("state", &state), ctx.upload("dy", &t.dy));
    let (yb, savedb, dxb, gb) =
        (ctx.zeros("y", len), ctx.zeros("saved", l.saved_len()), ctx.zeros("dx", len), ctx.zeros("grads", 2 * c));
    let stepb = ctx.uniform("step", &step);
    let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb, step: &stepb };
    let fwd = k.batchnorm.forward_train(ctx, &l, &b);
    let bwd = k.batchnorm.backward(ctx, &l, &b, &dyb, &dxb, &gb);
    run(ctx, &fwd.iter().chain(&bwd).collect::<Vec<_>>());

    let y_gpu = read(ctx, &yb, len).await?;
    let want = BnWant::new(&l, case, &step, &t, &y_gpu);
    let (relu_tag, dy_tag) = case.tags();
    let parts_tag = if l.parts > 1 { format!(" (x in {} parts)", l.parts) } else { String::new() };
    let act = format!("{}x{c}x{}", d.n, d.hw);
    let in_spans = format!("{act} in {} span{}", l.spans, if l.spans > 1 { "s" } else { "" });
    let (sv, st) = (read(ctx, &savedb, 2 * c).await?, read(ctx, &sb, 4 * c).await?);
    let (gr, dx_gpu) = (read(ctx, &gb, 2 * c).await?, read(ctx, &dxb, len).await?);
    let (rm, rv) = &want.running;
    let rows: [(String, &str, &[f32], &[f32]); 8] = [
        (format!("batchnorm.stats (mean){parts_tag}"), &in_spans, &sv[..c], &want.saved.mean),
        ("batchnorm.stats (1/std)".into(), &in_spans, &sv[c..], &want.saved.invstd),
        ("batchnorm.stats (running mean)".into(), &format!("{c}"), &st[2 * c..3 * c], rm),
        ("batchnorm.stats (running var)".into(), &format!("{c}"), &st[3 * c..], rv),
        (format!("batchnorm.apply_train{relu_tag}"), &act, &y_gpu, &want.y),
        (format!("batchnorm.backward_reduce (dgamma){dy_tag}"), &in_spans, &gr[..c], &want.dgamma),
        (format!("batchnorm.backward_reduce (dbeta){dy_tag}"), &in_spans, &gr[c..], &want.dbeta),
        (format!("batchnorm.backward_data{relu_tag}{dy_tag}"), &act, &dx_gpu, &want.dx),
    ];
    let mut checks: Vec<Check> =
        rows.iter().map(|(kernel, shape, got, want)| compare(kernel, layer, shape, got, want, TOL_SUMS)).collect();
    checks.push(eval_check(ctx, k, layer, (d, case), &t, (&l, &b), &act).await?);
    Ok(checks)
}

/// Evaluation mode, on the original running statistics (the state uploaded again).
async fn eval_check(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    (d, case): (BnDims, BnCase),
    t: &BnInputs,
    (l, b): (&BnLayer, &BnBuffers<'_>),
    act: &str,
) -> Result<Check> {
    let sb = ctx.upload("state", &t.state());
    let b = BnBuffers { state: &sb, ..*b };
    run(ctx, &[&k.batchnorm.forward_eval(ctx, l, &b)]);
    let mut ye = vec![0.0; t.x.len()];
    batchnorm_forward_eval(&d, &t.x, &t.gamma, &t.beta, &t.rm, &t.rv, BN_EPS, &mut ye);
    if case.relu {
        relu_forward(&mut ye);
    }
    let eval_tag = if case.relu { "+relu" } else { "" };
    let got = read(ctx, b.y, ye.len()).await?;
    Ok(compare(&format!("batchnorm.apply_eval{eval_tag}"), layer, act, &got, &ye, TOL_SUMS))
}
