//! The GPU checked against the CPU reference, the one implementation behind `mnist-wgpu verify`,
//! `tests/parity.rs` and `bench`'s pre-check:
//! - [`kernel_checks`]: every kernel at every layer shape of a model (forward and backward), on seeded
//!   random inputs, plus a few odd shapes that exercise partial blocks;
//! - [`step_checks`]: whole training steps of a backend against the CPU backend from the same state and
//!   batches: parameters after the update (SGD, then Adam), the optimizer's moments, running
//!   statistics and the loss, per tensor.
//!
//! Each comparison is one [`Check`]: the largest |got - want| relative to the largest |want| of the
//! tensor, against a stated tolerance. A non-finite value on either side fails whatever the tolerance.
//!
//! Tolerances, relative to the tensor's largest value (f32 on both sides; the difference is summation
//! order, and on GPUs fused multiply-adds and faster exp/log):
//! - [`TOL_EXACT`]: results that select or copy (max-pool winners, dropout masks, the correct count);
//! - [`TOL_ELEMENTWISE`] 1e-6: element-wise arithmetic (pooling, dropout scaling, SGD, Adam), a few
//!   ulps;
//! - [`TOL_SUMS`] 1e-5: everything that sums (convolutions, batchnorm statistics and gradients, softmax
//!   and the loss) and the state after a step. Measured on lavapipe at batch 4: at most 6.6e-7
//!   (conv4 dx); at batch 100, see the README's table of checks on software adapters;
//! - [`TOL_GRADIENTS`] 2e-5: gradients of a whole step (momenta after the first step are gradients),
//!   sums of sums through the whole network; and the parameters after Adam's whole steps, which are
//!   those gradients over their root mean square.

mod adam;
mod batchnorm;
mod check;
mod conv;
mod dropout;
mod loss;
mod pool;
mod relu;
mod sgd;
mod step;

use anyhow::Result;

use self::batchnorm::{BnCase, BnPooling};
use self::check::nchw;
pub use self::check::{
    compare, compare_exact, failures, format_row, header, rel_err, worst_ratio, Check, TOL_ELEMENTWISE, TOL_EXACT,
    TOL_GRADIENTS, TOL_SUMS,
};
pub use self::step::{random_batch, step_checks, StepChecks};
use crate::cpu::reference::batchnorm::BnDims;
use crate::gpu::dropout::FusedDropout;
use crate::gpu::fusion::{DxFusion, ForwardFusion, Fusion, Launch};
use crate::gpu::{GpuContext, Kernels};
use crate::model::{ConvDims, Layer, Model, Shape};

/// Whole training steps with dropout on that `verify` runs after the single step without.
pub const DROPOUT_STEPS: usize = 10;
/// Every kernel at every layer shape of `model` with a batch of `n`, forward and backward, in layer
/// order, as the fusion lowering launches them; then the loss and SGD kernels; then odd shapes
/// (channel counts off the kernels' channel blocks, more images than the loss kernel's invocations).
pub async fn kernel_checks(ctx: &GpuContext, k: &Kernels, model: &Model, n: usize) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let f = Fusion::new(model, n);
    for i in 0..model.layers.len() {
        checks.extend(layer_checks(ctx, k, model, &f, i).await?);
    }
    // A global average pooling that ends the network runs inside the loss kernel (as GpuNet does it).
    let last = model.layers.len() - 1;
    let pool_hw = match f.plan.pool_in_loss {
        Some(_) => model.input_of(last).h * model.input_of(last).w,
        None => 0,
    };
    checks.extend(loss::loss_checks(ctx, k, "loss", (n, model.output_classes(), pool_hw), 11).await?);
    checks.extend(sgd::sgd_checks(ctx, k, model.num_trainable).await?);
    checks.extend(adam::adam_checks(ctx, k, model.num_trainable).await?);
    checks.extend(odd_shape_checks(ctx, k).await?);
    Ok(checks)
}

/// Layer `i`'s kernels, with what the lowering fuses at that layer. A layer that runs inside another
/// layer's launches (a ReLU, a dropout after a batchnorm, a max pooling read through) has none.
async fn layer_checks(ctx: &GpuContext, k: &Kernels, model: &Model, f: &Fusion, i: usize) -> Result<Vec<Check>> {
    let (name, s, n) = (model.layer_name(i), model.input_of(i), f.n);
    let seed = 1000 * i as u64;
    let launched = |l: Launch| f.forward.iter().chain(&f.eval).chain(&f.backward).any(|(_, x)| *x == l);
    // A dropout that runs in the epilogue of layer `at`'s forward, `after` layers on.
    let epilogue_dropout = |at: usize, after: usize| match model.layers.get(at + after) {
        Some(&Layer::Dropout { p }) => Some(FusedDropout { p, layer: at + after }),
        _ => None,
    };
    if let Some(c) = f.conv_layer(model, i) {
        let dropout = f.forward.iter().find_map(|(_, l)| match *l {
            Launch::ConvForward { layer, fusion: ForwardFusion::ReluDropout { dropout } } if layer == i => {
                epilogue_dropout(dropout, 0)
            }
            _ => None,
        });
        let case = conv::ConvCase {
            with_dx: !launched(Launch::ConvBackward { layer: i, fusion: DxFusion::None }),
            pool: c.pool,
            with_bias: c.bias.is_some(),
            relu: launched(Launch::ConvForward { layer: i, fusion: ForwardFusion::Relu }),
            dropout,
        };
        return conv::conv_checks(ctx, k, &name, &c.d, seed, case).await;
    }
    if let Some(l) = f.bn_layer(model, i) {
        let pooling = match (l.dy_pooled, l.maxpool) {
            (true, _) => BnPooling::Global,
            (_, true) => BnPooling::Max { width: s.w },
            _ => BnPooling::None,
        };
        let case = BnCase { relu: l.relu, dropout: l.dropout, pooling, parts: l.parts };
        let mut checks = batchnorm::batchnorm_checks(ctx, k, &name, BnDims { n, c: l.c, hw: l.hw }, case, seed).await?;
        // The partials the convolutions before and after write in training.
        if let Some(c) = f.stats_from[i].and_then(|c| f.conv_layer(model, c)) {
            checks.extend(conv::conv_stats_checks(ctx, k, &name, &c.d, c.pool, seed + 7).await?);
        }
        if let Some(c) = f.sums_from[i].and_then(|c| f.conv_layer(model, c)) {
            checks.extend(conv::conv_sums_checks(ctx, k, &name, &c.d, case, seed + 8).await?);
        }
        return Ok(checks);
    }
    match model.layers[i] {
        Layer::Dropout { p } if launched(Launch::Dropout { layer: i }) => {
            dropout::dropout_checks(ctx, k, &name, n * s.len(), (p, i), &nchw(n, s.c, s.h, s.w), seed).await
        }
        Layer::Relu if launched(Launch::ReluDropoutBackward { layer: i }) => {
            let shape = nchw(n, s.c, s.h, s.w);
            let f = epilogue_dropout(i, 1).expect("a dropout after the ReLU");
            let mut checks = relu::relu_dropout_checks(ctx, k, &name, (n * s.len(), &shape), f, seed).await?;
            if launched(Launch::Relu { layer: i }) {
                checks.extend(relu::relu_checks(ctx, k, &name, n * s.len(), &shape, seed).await?);
            }
            Ok(checks)
        }
        Layer::Relu if launched(Launch::Relu { layer: i }) || launched(Launch::ReluBackward { layer: i }) => {
            relu::relu_checks(ctx, k, &name, n * s.len(), &nchw(n, s.c, s.h, s.w), seed).await
        }
        // The global average pooling is checked at the layer's shape even where the loss and a
        // batchnorm absorb it: no odd shape covers its standalone kernels.
        ref layer
            if launched(Launch::Pool { layer: i })
                || launched(Launch::PoolRelu { layer: i })
                || launched(Launch::PoolReluDropout { layer: i })
                || launched(Launch::PoolBackward { layer: i })
                || *layer == Layer::GlobalAvgPool =>
        {
            let relu = launched(Launch::PoolRelu { layer: i });
            let dropout = launched(Launch::PoolReluDropout { layer: i }).then(|| epilogue_dropout(i, 2)).flatten();
            pool::checks(ctx, k, layer, &name, n, s, seed, (relu, dropout)).await
        }
        _ => Ok(Vec::new()),
    }
}

/// Off the model's shapes: partial tiles of every kind in the convolutions (channels not a multiple of
/// 16, sums not a multiple of the 16-deep slabs, positions not a multiple of 64, odd image sizes, weight
/// columns past one 64-wide tile), more images than the loss kernel's invocations, odd batchnorm
/// planes, and the standalone kernels of layers that fuse in Net3.
async fn odd_shape_checks(ctx: &GpuContext, k: &Kernels) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (seed, d) in [
        (1, ConvDims { n: 3, cin: 3, h: 9, w: 7, cout: 5, k: 3, pad: 1 }),
        (2, ConvDims { n: 3, cin: 3, h: 4, w: 5, cout: 7, k: 1, pad: 0 }),
        (3, ConvDims { n: 5, cin: 17, h: 11, w: 13, cout: 19, k: 3, pad: 1 }),
        (4, ConvDims { n: 7, cin: 9, h: 7, w: 9, cout: 33, k: 3, pad: 0 }),
        (5, ConvDims { n: 13, cin: 33, h: 5, w: 3, cout: 17, k: 1, pad: 0 }),
    ] {
        // Odd seeds read through a max pooling; seeds 2 and 3 have a bias; 3 and 4 a ReLU after them.
        // Seed 4 also has a dropout after its ReLU.
        let (pool, with_bias, relu) = (seed % 2 == 1, seed == 2 || seed == 3, seed == 3 || seed == 4);
        let dropout = (seed == 4).then_some(FusedDropout { p: 0.3, layer: 7 });
        let case = conv::ConvCase { with_dx: true, pool, with_bias, relu, dropout };
        checks.extend(conv::conv_checks(ctx, k, "odd shape", &d, seed, case).await?);
    }
    checks.extend(loss::loss_checks(ctx, k, "odd shape", (300, 10, 0), 12).await?);
    checks.extend(loss::loss_checks(ctx, k, "odd shape", (300, 10, 7), 15).await?);
    // A batchnorm whose 39 elements per channel leave its last spans short and empty, and whose
    // workgroups straddle many planes; with and without the ReLU.
    let odd = BnDims { n: 3, c: 5, hw: 13 };
    let relu = BnCase { relu: true, ..Default::default() };
    checks.extend(batchnorm::batchnorm_checks(ctx, k, "odd shape", odd, relu, 13).await?);
    let avg = BnCase { pooling: BnPooling::Global, ..Default::default() };
    checks.extend(batchnorm::batchnorm_checks(ctx, k, "odd shape", odd, avg, 14).await?);
    // Dropout and a max pooling fused in, on planes of odd height and width (the last row and column
    // belong to no window), and on a few levels of input, so that windows hold equal maxima.
    let dropout = Some(FusedDropout { p: 0.3, layer: 5 });
    let fused = BnCase { relu: true, dropout, pooling: BnPooling::Max { width: 5 }, parts: 3 };
    let planes = BnDims { n: 3, c: 5, hw: 35 };
    checks.extend(batchnorm::batchnorm_checks(ctx, k, "odd shape", planes, fused, 15).await?);
    // The epilogues' partials on partial tiles: channels not a multiple of 16, positions not a
    // multiple of 64, odd planes; through a max pooling and a dropout, and through a ReLU alone.
    let odd_stats = ConvDims { n: 3, cin: 3, h: 9, w: 7, cout: 5, k: 3, pad: 1 };
    checks.extend(conv::conv_stats_checks(ctx, k, "odd shape", &odd_stats, true, 18).await?);
    // 70 positions: a last tile of 6, whose quarters past the first are empty.
    let few = ConvDims { n: 2, cin: 4, h: 5, cout: 3, ..odd_stats };
    checks.extend(conv::conv_stats_checks(ctx, k, "odd shape", &few, false, 21).await?);
    let odd_conv = ConvDims { n: 3, cin: 5, h: 5, w: 7, cout: 6, k: 3, pad: 1 };
    checks.extend(conv::conv_sums_checks(ctx, k, "odd shape", &odd_conv, fused, 19).await?);
    checks.extend(conv::conv_sums_checks(ctx, k, "odd shape", &ConvDims { h: 9, ..odd_conv }, relu, 20).await?);
    // The standalone kernels of layers that fuse in Net3 (max pooling, dropout, ReLU), as a network
    // that cannot fuse them runs them, and of the average pooling, which Net3 has not.
    let odd_planes = Shape { c: 5, h: 6, w: 10 };
    // Each with the ReLU after it, and with a dropout after that.
    let dropout = Some(FusedDropout { p: 0.3, layer: 11 });
    let ties = pool::WindowCase { ties: true, relu: true, dropout };
    checks.extend(pool::window_checks(ctx, k, &Layer::MaxPool2, "odd shape", (3, odd_planes), 16, ties).await?);
    checks.extend(pool::checks(ctx, k, &Layer::AvgPool2, "odd shape", 3, odd_planes, 22, (true, dropout)).await?);
    let (len, shape) = (3 * 5 * 6 * 10, nchw(3, 5, 6, 10));
    checks.extend(dropout::dropout_checks(ctx, k, "odd shape", len, (0.3, 9), &shape, 17).await?);
    checks.extend(relu::relu_checks(ctx, k, "odd shape", len, &shape, 23).await?);
    let f = FusedDropout { p: 0.3, layer: 12 };
    checks.extend(relu::relu_dropout_checks(ctx, k, "odd shape", (len, &shape), f, 24).await?);
    Ok(checks)
}
