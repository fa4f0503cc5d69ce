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
//!   (conv4 dx); at batch 100, see the README's table of checks on software adapters;
//! - [`TOL_GRADIENTS`] 2e-5: gradients of a whole step (momenta after the first step are gradients),
//!   sums of sums through the whole network.

mod batchnorm;
mod conv;
mod dropout;
mod loss;
mod pool;
mod sgd;
mod step;

use anyhow::Result;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use self::batchnorm::{BnCase, BnPooling};
use crate::cpu::reference::batchnorm::BnDims;
use crate::gpu::batchnorm::FusedDropout;
use crate::gpu::fusion::{DxFusion, Fusion, Launch};
use crate::gpu::{GpuContext, Kernels};
use crate::model::{ConvDims, Layer, Model, Shape};
pub use step::{random_batch, step_checks, StepChecks};

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

pub(super) fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len).map(|_| g.random_range(-scale..scale)).collect()
}

pub(super) fn nchw(n: usize, c: usize, h: usize, w: usize) -> String {
    format!("{n}x{c}x{h}x{w}")
}

/// Runs launches and reads one buffer back.
pub(super) async fn read(ctx: &GpuContext, b: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
    ctx.read(b, len).await
}

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
    checks.extend(odd_shape_checks(ctx, k).await?);
    Ok(checks)
}

/// Layer `i`'s kernels, with what the lowering fuses at that layer. A layer that runs inside another
/// layer's launches (a ReLU, a dropout after a batchnorm, a max pooling read through) has none.
async fn layer_checks(ctx: &GpuContext, k: &Kernels, model: &Model, f: &Fusion, i: usize) -> Result<Vec<Check>> {
    let (name, s, n) = (model.layer_name(i), model.input_of(i), f.n);
    let seed = 1000 * i as u64;
    let launched = |l: Launch| f.forward.iter().chain(&f.backward).any(|(_, x)| *x == l);
    if let Some(c) = f.conv_layer(model, i) {
        let with_dx = !launched(Launch::ConvBackward { layer: i, fusion: DxFusion::None });
        return conv::conv_checks(ctx, k, &name, &c.d, seed, with_dx, c.pool, c.bias.is_some()).await;
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
        // The global average pooling is checked at the layer's shape even where the loss and a
        // batchnorm absorb it: no odd shape covers its standalone kernels.
        ref layer
            if launched(Launch::Pool { layer: i })
                || launched(Launch::PoolBackward { layer: i })
                || *layer == Layer::GlobalAvgPool =>
        {
            pool::checks(ctx, k, layer, &name, n, s, seed).await
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
        // Odd seeds read through a max pooling; seeds 2 and 3 have a bias.
        let (pool, bias) = (seed % 2 == 1, seed == 2 || seed == 3);
        checks.extend(conv::conv_checks(ctx, k, "odd shape", &d, seed, true, pool, bias).await?);
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
    // The standalone kernels of layers that fuse in Net3, as a network that cannot fuse them runs
    // them, and of the average pooling, which Net3 has not.
    checks.extend(pool::maxpool_checks(ctx, k, "odd shape", 3, Shape { c: 5, h: 6, w: 10 }, 16, true).await?);
    checks.extend(pool::checks(ctx, k, &Layer::AvgPool2, "odd shape", 3, Shape { c: 5, h: 6, w: 10 }, 22).await?);
    let shape = nchw(3, 5, 6, 10);
    checks.extend(dropout::dropout_checks(ctx, k, "odd shape", 3 * 5 * 6 * 10, (0.3, 9), &shape, 17).await?);
    Ok(checks)
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
