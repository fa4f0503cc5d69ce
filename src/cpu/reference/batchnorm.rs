//! Batch normalization over (N, H, W) per channel, PyTorch semantics; NCHW.
//!
//! Channel sums are accumulated in f64 in a fixed order (image by image, in 8 interleaved lanes), so
//! the statistics are as exact as f32 storage allows and identical on every run.

use crate::cpu::isa::vectorized;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnDims {
    pub n: usize,
    pub c: usize,
    /// Pixels per channel per image (H * W).
    pub hw: usize,
}

impl BnDims {
    pub fn count(&self) -> usize {
        self.n * self.hw
    }
}

/// What the backward pass needs from a training-mode forward pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BnSaved {
    pub mean: Vec<f32>,
    /// 1 / sqrt(biased variance + eps).
    pub invstd: Vec<f32>,
    /// Biased batch variance, for the running-statistics update.
    pub var: Vec<f32>,
}

/// Independent f64 accumulators per sum, so the summing loops vectorize; added in order at the end.
const LANES: usize = 8;

/// Adds f(a[i], b[i]) into lane i % LANES of `acc`. Inlined, so that it runs in the vector
/// instructions of its caller's form (`vectorized!`).
#[inline(always)]
fn add_lanes(acc: &mut [f64; LANES], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) {
    let (a_main, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_rest) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for k in 0..LANES {
            acc[k] += f(ca[k], cb[k]);
        }
    }
    for (k, (&va, &vb)) in a_rest.iter().zip(b_rest).enumerate() {
        acc[k] += f(va, vb);
    }
}

vectorized! {
    /// The f64 sums of f(a[i], b[i]) and of g(a[i], b[i]) over one plane, in one pass, each in the fixed
    /// order of `add_lanes`.
    pub fn plane_sums(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64, g: impl Fn(f32, f32) -> f64) -> (f64, f64) {
        let (mut acc_f, mut acc_g) = ([0.0f64; LANES], [0.0f64; LANES]);
        let (a_main, a_rest) = a.split_at(a.len() / LANES * LANES);
        let (b_main, b_rest) = b.split_at(a_main.len());
        for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
            for k in 0..LANES {
                acc_f[k] += f(ca[k], cb[k]);
                acc_g[k] += g(ca[k], cb[k]);
            }
        }
        for (k, (&va, &vb)) in a_rest.iter().zip(b_rest).enumerate() {
            acc_f[k] += f(va, vb);
            acc_g[k] += g(va, vb);
        }
        (acc_f.iter().sum(), acc_g.iter().sum())
    }
}

/// Per channel, the f64 sums of f(channel, x, other) over (N, H, W) of `x` and `other` (tensors of
/// the same shape), channels in parallel, each summed in a fixed order.
fn channel_sums(d: &BnDims, x: &[f32], other: &[f32], f: impl Fn(usize, f32, f32) -> f64 + Sync) -> Vec<f64> {
    (0..d.c)
        .into_par_iter()
        .map(|c| {
            let mut acc = [0.0f64; LANES];
            for img in 0..d.n {
                let plane = (img * d.c + c) * d.hw..(img * d.c + c + 1) * d.hw;
                add_lanes(&mut acc, &x[plane.clone()], &other[plane], |v, o| f(c, v, o));
            }
            acc.iter().sum()
        })
        .collect()
}

vectorized! {
    /// One image (channels of `hw` pixels): y = x * scale[c] + shift[c].
    pub fn affine_image(hw: usize, x_img: &[f32], scale: &[f32], shift: &[f32], y_img: &mut [f32]) {
        for (c, (yp, xp)) in y_img.chunks_exact_mut(hw).zip(x_img.chunks_exact(hw)).enumerate() {
            let (s, t) = (scale[c], shift[c]);
            for (o, &v) in yp.iter_mut().zip(xp) {
                *o = v * s + t;
            }
        }
    }
}

/// Applies y = x * scale[c] + shift[c], images in parallel.
fn affine(d: &BnDims, x: &[f32], scale: &[f32], shift: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(d.c * d.hw)
        .zip(x.par_chunks(d.c * d.hw))
        .for_each(|(yi, xi)| affine_image(d.hw, xi, scale, shift, yi));
}

/// Training mode: normalize with the batch mean and biased batch variance.
pub fn batchnorm_forward_train(d: &BnDims, x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> BnSaved {
    assert_eq!(x.len(), d.n * d.c * d.hw);
    let m = d.count() as f64;
    let mean: Vec<f64> = channel_sums(d, x, x, |_, v, _| v as f64).into_iter().map(|s| s / m).collect();
    let var: Vec<f64> =
        channel_sums(d, x, x, |c, v, _| (v as f64 - mean[c]).powi(2)).into_iter().map(|s| s / m).collect();
    let (saved, scale, shift) = normalization(&mean, &var, gamma, beta, eps);
    affine(d, x, &scale, &shift, y);
    saved
}

/// From the batch mean and biased variance per channel: what the backward pass keeps, and the
/// normalization as y = x * scale + shift.
pub fn normalization(
    mean: &[f64],
    var: &[f64],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (BnSaved, Vec<f32>, Vec<f32>) {
    let invstd: Vec<f32> = var.iter().map(|&v| (1.0 / (v + eps as f64).sqrt()) as f32).collect();
    let scale: Vec<f32> = invstd.iter().zip(gamma).map(|(s, g)| g * s).collect();
    let shift: Vec<f32> = (0..mean.len()).map(|c| beta[c] - mean[c] as f32 * scale[c]).collect();
    let saved = BnSaved {
        mean: mean.iter().map(|&v| v as f32).collect(),
        invstd,
        var: var.iter().map(|&v| v as f32).collect(),
    };
    (saved, scale, shift)
}

/// The evaluation-mode normalization as y = x * scale + shift, from the running statistics.
pub fn eval_normalization(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = (0..gamma.len()).map(|c| gamma[c] / (var[c] + eps).sqrt()).collect();
    let shift: Vec<f32> = (0..gamma.len()).map(|c| beta[c] - mean[c] * scale[c]).collect();
    (scale, shift)
}

/// running = (1 - momentum) * running + momentum * batch, with the unbiased variance, as PyTorch does.
pub fn batchnorm_update_running(
    d: &BnDims,
    saved: &BnSaved,
    momentum: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
) {
    let m = d.count() as f32;
    let unbias = m / (m - 1.0).max(1.0);
    for c in 0..d.c {
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * saved.mean[c];
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * saved.var[c] * unbias;
    }
}

/// Evaluation mode: normalize with the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_eval(
    d: &BnDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    let (scale, shift) = eval_normalization(gamma, beta, running_mean, running_var, eps);
    affine(d, x, &scale, &shift, y);
}

/// Training-mode gradients: dx (overwritten), dgamma and dbeta (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    d: &BnDims,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    saved: &BnSaved,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    // Sum over (N, H, W) of dy and of dy * xhat, channel by channel.
    let sum_dy = channel_sums(d, dy, dy, |_, g, _| g as f64);
    let sum_dy_xhat = channel_sums(d, dy, x, |c, g, v| dy_xhat(saved, c)(g, v));
    let sums: Vec<(f64, f64)> = sum_dy.into_iter().zip(sum_dy_xhat).collect();
    for c in 0..d.c {
        dbeta[c] = sums[c].0 as f32;
        dgamma[c] = sums[c].1 as f32;
    }
    dx.par_chunks_mut(d.c * d.hw)
        .zip(dy.par_chunks(d.c * d.hw).zip(x.par_chunks(d.c * d.hw)))
        .for_each(|(dxi, (dyi, xi))| backward_dx_image(d, xi, dyi, gamma, saved, &sums, dxi));
}

/// The term of the sum of dy * xhat for channel `c`, in f64.
pub fn dy_xhat(saved: &BnSaved, c: usize) -> impl Fn(f32, f32) -> f64 {
    let (mean, invstd) = (saved.mean[c], saved.invstd[c]);
    move |g, v| g as f64 * ((v - mean) * invstd) as f64
}

vectorized! {
    /// One image of `batchnorm_backward`'s dx, from the batch's per-channel (sum of dy, sum of dy * xhat):
    /// dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    pub fn backward_dx_image(
        d: &BnDims,
        x_img: &[f32],
        dy_img: &[f32],
        gamma: &[f32],
        saved: &BnSaved,
        sums: &[(f64, f64)],
        dx_img: &mut [f32],
    ) {
        let m = d.count() as f64;
        for c in 0..d.c {
            let (mean, invstd) = (saved.mean[c], saved.invstd[c]);
            let k = gamma[c] * invstd;
            let mean_dy = (sums[c].0 / m) as f32;
            let mean_dyx = (sums[c].1 / m) as f32;
            let range = c * d.hw..(c + 1) * d.hw;
            for ((o, &g), &v) in dx_img[range.clone()].iter_mut().zip(&dy_img[range.clone()]).zip(&x_img[range]) {
                *o = k * (g - mean_dy - (v - mean) * invstd * mean_dyx);
            }
        }
    }
}
