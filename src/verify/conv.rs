//! Convolution checks: forward (whole, in parts, through an evaluation batchnorm), backward
//! (weights in slices, bias, dx), and the epilogues that write a training batchnorm's partials.

use super::batchnorm::{BnCase, BnPooling};
use crate::cpu::reference::batchnorm::*;
use crate::cpu::reference::conv::{bias_backward, bias_forward, conv_backward, conv_forward};
use crate::cpu::reference::pool::*;
use crate::cpu::reference::relu::relu_forward;
use crate::gpu::batchnorm::{BnBuffers, BnLayer, BnOffsets};
use crate::gpu::conv::{
    forward_splits, weight_grad_slices, BackwardEpilogue, BnStats, BnSums, Conv, ConvGrad, ConvLayer, EvalBn,
    ForwardEpilogue, GradBuffers,
};
use crate::gpu::dropout::FusedDropout;
use crate::gpu::kernel::run;
use crate::gpu::update::SlicedGrad;
use crate::gpu::{GpuContext, Kernels, StepUniform};
use crate::model::{ConvDims, BN_EPS};
use anyhow::Result;

use super::check::{compare, nchw, random, read, Check, TOL_SUMS};

/// A convolution's random input as given to the kernels, and as the layer sees it: with `pool`, the
/// 2x2 max pooling of an x twice as high and wide.
pub(super) fn conv_input(d: &ConvDims, pool: bool, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let x_given = random(seed, d.n * d.in_image() * if pool { 4 } else { 1 }, 1.0);
    if !pool {
        return (x_given.clone(), x_given);
    }
    let mut pooled = vec![0.0; d.n * d.in_image()];
    let mut argmax = vec![0; pooled.len()];
    maxpool2_forward(d.n * d.cin, 2 * d.h, 2 * d.w, &x_given, &mut pooled, &mut argmax);
    (x_given, pooled)
}

/// The parts of a split forward (whole copies of `len` values), added in order.
fn sum_parts(parts: &[f32], len: usize) -> Vec<f32> {
    let mut summed = parts[..len].to_vec();
    for part in parts.chunks(len).skip(1) {
        summed.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    summed
}

/// A convolution's seeded inputs, laid out in one state buffer as the model's are: the weights at a
/// non-zero offset, the bias (if any) after them, then an evaluation-mode batchnorm's parameters for
/// the fused forward.
struct ConvInputs {
    /// The input as the kernels get it (with a max pooling read through: before it), and as the
    /// convolution sees it.
    x_given: Vec<f32>,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    dy: Vec<f32>,
    /// gamma, beta, running mean, running var.
    bn: [Vec<f32>; 4],
    state: Vec<f32>,
    w_off: usize,
    b_off: usize,
    bn_at: usize,
}

impl ConvInputs {
    fn new(d: &ConvDims, seed: u64, pool: bool, with_bias: bool) -> ConvInputs {
        let c = d.cout;
        let w_off = 7;
        let (x_given, x) = conv_input(d, pool, seed);
        let w = random(seed + 100, d.weight_len(), 0.3);
        let dy = random(seed + 200, d.n * d.out_image(), 1.0);
        let bias = if with_bias { random(seed + 150, c, 0.5) } else { Vec::new() };
        let gamma: Vec<f32> = random(seed + 300, c, 0.5).iter().map(|v| v + 1.0).collect();
        let (beta, rm) = (random(seed + 310, c, 0.5), random(seed + 320, c, 0.5));
        let rv: Vec<f32> = random(seed + 330, c, 0.5).iter().map(|v| v + 1.0).collect();
        let mut state = vec![0.0; w_off];
        state.extend_from_slice(&w);
        let b_off = state.len();
        state.extend_from_slice(&bias);
        let bn_at = state.len();
        for t in [&gamma, &beta, &rm, &rv] {
            state.extend_from_slice(t);
        }
        ConvInputs { x_given, x, w, bias, dy, bn: [gamma, beta, rm, rv], state, w_off, b_off, bn_at }
    }

    fn bn_offsets(&self, c: usize) -> BnOffsets {
        let at = self.bn_at;
        BnOffsets { gamma: at, beta: at + c, running_mean: at + 2 * c, running_var: at + 3 * c }
    }
}

/// The reference's results for `conv_checks`: y, y through the evaluation batchnorm and ReLU, dx,
/// and the weight and bias gradients.
fn conv_reference(d: &ConvDims, t: &ConvInputs) -> [Vec<f32>; 5] {
    let mut y = vec![0.0; d.n * d.out_image()];
    conv_forward(d, &t.x, &t.w, &mut y);
    let (mut dx, mut dw) = (vec![0.0; d.n * d.in_image()], vec![0.0; d.weight_len()]);
    conv_backward(d, &t.x, &t.w, &t.dy, Some(&mut dx), &mut dw);
    let mut dbias = vec![0.0; t.bias.len()];
    if !t.bias.is_empty() {
        bias_forward(d, &t.bias, &mut y);
        bias_backward(d, &t.dy, &mut dbias);
    }
    let mut y_bn = vec![0.0; y.len()];
    let [gamma, beta, rm, rv] = &t.bn;
    let bn_dims = BnDims { n: d.n, c: d.cout, hw: d.ho() * d.wo() };
    batchnorm_forward_eval(&bn_dims, &y, gamma, beta, rm, rv, BN_EPS, &mut y_bn);
    relu_forward(&mut y_bn);
    [y, y_bn, dx, dw, dbias]
}

/// What a convolution's checks cover besides its plain forward and weight gradient: dx (all layers
/// but the first), reading through a 2x2 max pooling of an x twice as high and wide, a bias, the
/// ReLU after it in the forward's epilogue, and the dropout after that ReLU.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ConvCase {
    pub with_dx: bool,
    pub pool: bool,
    pub with_bias: bool,
    pub relu: bool,
    pub dropout: Option<FusedDropout>,
}

/// A convolution's launches against the reference: forward (whole, and with its sum in parts),
/// forward with an evaluation-mode batchnorm and ReLU, forward with its own ReLU when `case.relu`,
/// and backward (the weight gradient in slices, added as the SGD kernel adds them; the bias's; dx
/// when `case.with_dx`).
pub(super) async fn conv_checks(
    ctx: &GpuContext,
    k: &Kernels,
    layer: &str,
    d: &ConvDims,
    seed: u64,
    case: ConvCase,
) -> Result<Vec<Check>> {
    let ConvCase { with_dx, pool, with_bias, relu, dropout } = case;
    let (n, c) = (d.n, d.cout);
    let t = ConvInputs::new(d, seed, pool, with_bias);
    let bn = EvalBn { offsets: t.bn_offsets(c), eps: BN_EPS, relu: true };
    let (xb, sb, dyb) = (ctx.upload("x", &t.x_given), ctx.upload("state", &t.state), ctx.upload("dy", &t.dy));
    let slices = weight_grad_slices(d, with_bias);
    let sliced = SlicedGrad { start: t.w_off, len: d.weight_len(), extra: t.state.len(), slices };
    let bias_extra = t.state.len() + (slices - 1) * d.weight_len();
    let bias_sliced = with_bias.then_some(SlicedGrad { start: t.b_off, len: c, extra: bias_extra, slices });
    // The forward as training runs it when the layer's tiles are few: its sum split into parts
    // (at least 2 here, so that the split path is always checked), added in order as the batchnorm
    // statistics add them.
    let splits = forward_splits(d).max(2).min(d.col_rows()).max(1);
    let (yb, ysb, ybn, dxb, gb) = (
        ctx.zeros("y", n * d.out_image()),
        ctx.zeros("y (parts)", splits * n * d.out_image()),
        ctx.zeros("y (batchnorm)", n * d.out_image()),
        ctx.zeros("dx", n * d.in_image()),
        ctx.zeros("grads", bias_extra + (slices - 1) * t.bias.len()),
    );
    let (conv, l) = (&k.conv, ConvLayer { d: *d, w_off: t.w_off, bias: with_bias.then_some(t.b_off), pool });
    let mut launches = vec![
        conv.forward(ctx, &l, ForwardEpilogue::Plain { splits: 1 }, &xb, &sb, &yb)?,
        conv.forward(ctx, &l, ForwardEpilogue::Plain { splits }, &xb, &sb, &ysb)?,
        conv.forward(ctx, &l, ForwardEpilogue::BnEval(bn), &xb, &sb, &ybn)?,
    ];
    let g = ConvGrad { d: *d, weights: sliced, bias: bias_sliced, pool };
    let dx_out = if with_dx { BackwardEpilogue::Dx(&dxb) } else { BackwardEpilogue::WeightsOnly };
    launches.push(conv.backward(ctx, &g, dx_out, &GradBuffers { x: &xb, dy: &dyb, state: &sb, grads: &gb })?);
    let all_sliced: Vec<SlicedGrad> = [Some(sliced), bias_sliced].into_iter().flatten().collect();
    launches.push(k.sgd.sum_slices(ctx, t.state.len(), &all_sliced, &gb));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    let [y, y_bn, dx, dw, dbias] = conv_reference(d, &t);
    let name = if with_bias { "conv (bias)" } else { "conv" };
    let pooled = if pool { format!(" (max pool of {})", nchw(n, d.cin, 2 * d.h, 2 * d.w)) } else { String::new() };
    let (input, output) = (format!("{}{pooled}", nchw(n, d.cin, d.h, d.w)), nchw(n, d.cout, d.ho(), d.wo()));
    let summed = sum_parts(&read(ctx, &ysb, splits * y.len()).await?, y.len());
    let plural = |count: usize| if count > 1 { "s" } else { "" };
    let forward = format!("{input} -> {output}");
    let (y_gpu, ybn_gpu) = (read(ctx, &yb, y.len()).await?, read(ctx, &ybn, y.len()).await?);
    let rows: Vec<(String, String, Vec<f32>, &[f32])> = vec![
        (format!("{name}.forward"), forward.clone(), y_gpu, &y),
        (format!("{name}.forward (sum in {splits} part{})", plural(splits)), forward.clone(), summed, &y),
        (format!("{name}.forward_bn_eval (+relu)"), forward.clone(), ybn_gpu, &y_bn),
    ];
    let mut checks: Vec<Check> =
        rows.iter().map(|(k, shape, got, want)| compare(k, layer, shape, got, want, TOL_SUMS)).collect();
    let epilogues = ReluEpilogues { relu, dropout, what: (name, layer, &forward) };
    checks.extend(relu_epilogue_checks(ctx, k, (&l, &xb, &sb), &y, epilogues).await?);
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
    let g = read(ctx, &gb, t.state.len()).await?;
    checks.extend(gradient_checks(layer, name, (d, slices, with_dx), &t, &g, (&dw, &dbias)));
    Ok(checks)
}

/// Which ReLU epilogues of a convolution's forward to check, and the rows' names: the convolution's,
/// the layer's, and the shapes.
struct ReluEpilogues<'a> {
    relu: bool,
    dropout: Option<FusedDropout>,
    what: (&'a str, &'a str, &'a str),
}

/// `forward_relu` and `forward_relu_dropout` of convolution `l` on the uploaded x and state, against
/// the reference's forward output `y` through the ReLU (and the dropout).
async fn relu_epilogue_checks(
    ctx: &GpuContext,
    k: &Kernels,
    (l, xb, sb): (&ConvLayer, &wgpu::Buffer, &wgpu::Buffer),
    y: &[f32],
    e: ReluEpilogues<'_>,
) -> Result<Vec<Check>> {
    let (name, layer, shape) = e.what;
    let yr = ctx.zeros("y (relu)", if e.relu { y.len() } else { 1 });
    let yrd = ctx.zeros("y (relu, dropout)", if e.dropout.is_some() { y.len() } else { 1 });
    let stepb = ctx.uniform("step", &super::dropout::epilogue_step());
    let mut launches = Vec::new();
    if e.relu {
        launches.push(k.conv.forward(ctx, l, ForwardEpilogue::Relu, xb, sb, &yr)?);
    }
    if let Some(f) = e.dropout {
        launches.push(k.conv.forward(ctx, l, ForwardEpilogue::ReluDropout(f, &stepb), xb, sb, &yrd)?);
    }
    run(ctx, &launches.iter().collect::<Vec<_>>());
    let mut y_relu = y.to_vec();
    relu_forward(&mut y_relu);
    let mut checks = Vec::new();
    if e.relu {
        let got = read(ctx, &yr, y.len()).await?;
        checks.push(compare(&format!("{name}.forward_relu"), layer, shape, &got, &y_relu, TOL_SUMS));
    }
    if let Some(f) = e.dropout {
        let (got, want) = (read(ctx, &yrd, y.len()).await?, super::dropout::dropped(&y_relu, f));
        checks.push(compare(&format!("{name}.forward_relu_dropout"), layer, shape, &got, &want, TOL_SUMS));
    }
    Ok(checks)
}

/// The weight gradient (summed from its slices; nothing written outside the weights and bias) and the
/// bias gradient, from the gradient buffer `g` the launches wrote.
fn gradient_checks(
    layer: &str,
    name: &str,
    (d, slices, with_dx): (&ConvDims, usize, bool),
    t: &ConvInputs,
    g: &[f32],
    (dw, dbias): (&[f32], &[f32]),
) -> Vec<Check> {
    let plural = if slices > 1 { "s" } else { "" };
    let mut weight_check = compare(
        &format!("{name}.{}", if with_dx { "backward (weights)" } else { "backward_weights" }),
        layer,
        &format!("{}x{}x{}x{} in {slices} slice{plural}", d.cout, d.cin, d.k, d.k),
        &g[t.w_off..t.b_off],
        dw,
        TOL_SUMS,
    );
    if g[..t.w_off].iter().chain(&g[t.bn_at..]).any(|&v| v != 0.0) {
        weight_check.error = f64::INFINITY;
        weight_check.detail = Some("wrote outside its weights and bias".into());
    }
    let mut checks = vec![weight_check];
    if !dbias.is_empty() {
        let shape = format!("{} in {slices} slice{plural}", d.cout);
        checks.push(compare(&format!("{name}.backward (bias)"), layer, &shape, &g[t.b_off..t.bn_at], dbias, TOL_SUMS));
    }
    checks
}

/// A convolution's forward writing the statistics partials of the training batchnorm (with ReLU) after
/// it, as GpuNet runs a convolution of one part: the batchnorm's statistics and output from them.
pub(super) async fn conv_stats_checks(
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
    let bn = BnDims { n, c, hw };
    let relu = BnCase { relu: true, ..BnCase::default() };
    let l =
        BnLayer { conv_forward_partials: Some(Conv::position_tiles(n * hw)), width: d.wo(), ..relu.layer(bn, offsets) };
    let (xb, sb) = (ctx.upload("x", &x_given), ctx.upload("state", &state));
    let (yb, zb, savedb) =
        (ctx.zeros("y", n * d.out_image()), ctx.zeros("z", n * d.out_image()), ctx.zeros("saved", l.saved_len()));
    let stepb = ctx.uniform("step", &StepUniform::default());
    let stats = BnStats { saved: &savedb, part_off: l.forward_partials_at() };
    let conv = ConvLayer { d: *d, w_off: 0, bias: None, pool };
    let mut launches = vec![k.conv.forward(ctx, &conv, ForwardEpilogue::BnStats(stats), &xb, &sb, &yb)?];
    let b = BnBuffers { x: &yb, y: &zb, state: &sb, saved: &savedb, step: &stepb };
    launches.extend(k.batchnorm.forward_train(ctx, &l, &b));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    let mut y = vec![0.0; n * d.out_image()];
    conv_forward(d, &x, &w, &mut y);
    let mut z = vec![0.0; y.len()];
    let saved = batchnorm_forward_train(&bn, &y, &gamma, &beta, BN_EPS, &mut z);
    relu_forward(&mut z);
    let sv = read(ctx, &savedb, 2 * c).await?;
    let shape = format!("{} in {} tiles", nchw(n, c, d.ho(), d.wo()), l.forward_partials());
    Ok(vec![
        compare("conv.forward_bn_stats -> batchnorm (mean)", layer, &shape, &sv[..c], &saved.mean, TOL_SUMS),
        compare("conv.forward_bn_stats -> batchnorm (1/std)", layer, &shape, &sv[c..], &saved.invstd, TOL_SUMS),
        compare(
            "conv.forward_bn_stats -> batchnorm.apply_train+relu",
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
pub(super) async fn conv_sums_checks(
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
        conv_backward_partials: Some(Conv::position_tiles(n * d.h * d.w)),
        dy_pooled: false,
        width: w,
        parts: 1,
        ..case.layer(bn, offsets)
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
    let g = ConvGrad { d: *d, weights: sliced, bias: None, pool };
    let grad = GradBuffers { x: &yb, dy: &dyb, state: &wb, grads: &wgrads };
    launches.push(k.conv.backward(ctx, &g, BackwardEpilogue::DxBnSums(&dyc, sums), &grad)?);
    launches.extend(k.batchnorm.backward(ctx, &l, &b, &dyc, &dxb, &gb));
    run(ctx, &launches.iter().collect::<Vec<_>>());

    // CPU, for the forward's decisions (the GPU's output y: its ReLU mask and pooling winners).
    let y_gpu = read(ctx, &yb, len).await?;
    let mut y = vec![0.0; len];
    let saved = batchnorm_forward_train(&bn, &x, &gamma, &beta, BN_EPS, &mut y);
    let mut conv_in = y_gpu.clone();
    if pool {
        conv_in = vec![0.0; n * d.in_image()];
        let mut argmax = vec![0u8; n * d.in_image()];
        maxpool2_forward(n * c, h, w, &y_gpu, &mut conv_in, &mut argmax);
    }
    let (mut dx_conv, mut dw) = (vec![0.0; n * d.in_image()], vec![0.0; d.weight_len()]);
    conv_backward(d, &conv_in, &weights, &dy, Some(&mut dx_conv), &mut dw);
    let g = case.reference_gradient(&l, &step, &y_gpu, &dx_conv);
    let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
    batchnorm_backward(&bn, &x, &g, &gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);
    let (gr, dx_gpu) = (read(ctx, &gb, 2 * c).await?, read(ctx, &dxb, len).await?);
    let tiles = format!("{} in {} tiles", nchw(n, c, h, w), l.backward_partials());
    let act = nchw(n, c, h, w);
    let rows: [(&str, &str, &[f32], &[f32]); 3] = [
        ("conv.backward_bn_sums -> batchnorm (dgamma)", &tiles, &gr[..c], &dgamma),
        ("conv.backward_bn_sums -> batchnorm (dbeta)", &tiles, &gr[c..], &dbeta),
        ("conv.backward_bn_sums -> batchnorm.backward_data", &act, &dx_gpu, &dx),
    ];
    Ok(rows.iter().map(|(kernel, shape, got, want)| compare(kernel, layer, shape, got, want, TOL_SUMS)).collect())
}
