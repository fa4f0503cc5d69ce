//! The poolings, NCHW: 2x2 max and average pooling with stride 2, and global average pooling. `forward` and
//! `backward` run any pooling layer over a batch, in parallel; `forward_serial` and `backward_serial`
//! on one thread (the fused executor's per-image passes). The executors know no pooling by name.

use crate::cpu::isa::vectorized;
use rayon::prelude::*;

use crate::model::{Layer, Shape};

/// Planes per parallel task: enough work per task, and the same results however they are cut.
const PLANES_PER_TASK: usize = 16;

/// Pooling layer `layer` over `planes` planes of `s.h` x `s.w`: x into y. `winners` keeps what its
/// backward needs (the max pooling's winner per window; nothing for the average).
pub fn forward(layer: &Layer, planes: usize, s: Shape, x: &[f32], y: &mut [f32], winners: &mut Vec<u8>) {
    winners.resize(if matches!(layer, Layer::MaxPool2) { y.len() } else { 0 }, 0);
    let (pin, pout) = (s.h * s.w, y.len() / planes.max(1));
    let tasks = planes.div_ceil(PLANES_PER_TASK);
    let chunk = |len: usize| (PLANES_PER_TASK * len).max(1);
    let winners: Vec<&mut [u8]> = match winners.is_empty() {
        true => (0..tasks).map(|_| &mut [][..]).collect(),
        false => winners.chunks_mut(chunk(pout)).collect(),
    };
    y.par_chunks_mut(chunk(pout))
        .zip(x.par_chunks(chunk(pin)))
        .zip(winners)
        .for_each(|((y, x), winners)| forward_serial(layer, s, x, y, winners));
}

/// dx from dy for pooling layer `layer` (as `forward` ran it, leaving `winners`); dx is overwritten.
pub fn backward(layer: &Layer, planes: usize, s: Shape, winners: &[u8], dy: &[f32], dx: &mut [f32]) {
    let (pin, pout) = (s.h * s.w, dy.len() / planes.max(1));
    let tasks = planes.div_ceil(PLANES_PER_TASK);
    let chunk = |len: usize| (PLANES_PER_TASK * len).max(1);
    let winners: Vec<&[u8]> = match winners.is_empty() {
        true => (0..tasks).map(|_| &[][..]).collect(),
        false => winners.chunks(chunk(pout)).collect(),
    };
    dx.par_chunks_mut(chunk(pin))
        .zip(dy.par_chunks(chunk(pout)))
        .zip(winners)
        .for_each(|((dx, dy), winners)| backward_serial(layer, s, winners, dy, dx));
}

/// `forward` on this thread, over as many planes as x holds; `winners` is y's length for a max
/// pooling, else empty.
pub fn forward_serial(layer: &Layer, s: Shape, x: &[f32], y: &mut [f32], winners: &mut [u8]) {
    let planes = x.len() / (s.h * s.w);
    match layer {
        Layer::MaxPool2 => maxpool2_forward(planes, s.h, s.w, x, y, winners),
        Layer::AvgPool2 => avgpool2_forward(planes, s.h, s.w, x, y),
        Layer::GlobalAvgPool => global_avg_pool_forward(s.h * s.w, x, y),
        other => unreachable!("{other:?} is not a pooling"),
    }
}

/// `backward` on this thread, over as many planes as dx holds.
pub fn backward_serial(layer: &Layer, s: Shape, winners: &[u8], dy: &[f32], dx: &mut [f32]) {
    let planes = dx.len() / (s.h * s.w);
    match layer {
        Layer::MaxPool2 => maxpool2_backward(planes, s.h, s.w, winners, dy, dx),
        Layer::AvgPool2 => avgpool2_backward(planes, s.h, s.w, dy, dx),
        Layer::GlobalAvgPool => global_avg_pool_backward(s.h * s.w, dy, dx),
        other => unreachable!("{other:?} is not a pooling"),
    }
}

vectorized! {
    /// 2x2 max pooling of `planes` planes of h x w (h, w even). Writes, per output, the index within its
    /// window (0..4, row-major) of the maximum into `argmax`; on ties the first, as PyTorch does.
    pub fn maxpool2_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32], argmax: &mut [u8]) {
        let (ho, wo) = (h / 2, w / 2);
        assert_eq!(x.len(), planes * h * w);
        assert_eq!(y.len(), planes * ho * wo);
        assert_eq!(argmax.len(), y.len());
        for plane in 0..planes {
            let xp = &x[plane * h * w..][..h * w];
            for oy in 0..ho {
                let (top, bottom) = (&xp[2 * oy * w..][..w], &xp[(2 * oy + 1) * w..][..w]);
                let at = (plane * ho + oy) * wo;
                let (y_row, a_row) = (&mut y[at..at + wo], &mut argmax[at..at + wo]);
                for ox in 0..wo {
                    // The window in row-major order; a later value wins when greater or NaN (selects,
                    // not branches, so the row vectorizes).
                    let (mut best, mut at) = (top[2 * ox], 0u8);
                    for (i, v) in [(1, top[2 * ox + 1]), (2, bottom[2 * ox]), (3, bottom[2 * ox + 1])] {
                        let wins = v > best || v.is_nan();
                        best = if wins { v } else { best };
                        at = if wins { i } else { at };
                    }
                    y_row[ox] = best;
                    a_row[ox] = at;
                }
            }
        }
    }
}

vectorized! {
    /// Routes each output gradient to the input that won its window; dx is overwritten.
    pub fn maxpool2_backward(planes: usize, h: usize, w: usize, argmax: &[u8], dy: &[f32], dx: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        assert_eq!(dx.len(), planes * h * w);
        for plane in 0..planes {
            let dxp = &mut dx[plane * h * w..][..h * w];
            for oy in 0..ho {
                let at = (plane * ho + oy) * wo;
                let (g_row, a_row) = (&dy[at..at + wo], &argmax[at..at + wo]);
                let (top, bottom) = dxp[2 * oy * w..][..2 * w].split_at_mut(w);
                // Every input of the window written: the gradient where it won, 0 elsewhere (selects).
                for ox in 0..wo {
                    let (g, a) = (g_row[ox], a_row[ox]);
                    top[2 * ox] = if a == 0 { g } else { 0.0 };
                    top[2 * ox + 1] = if a == 1 { g } else { 0.0 };
                    bottom[2 * ox] = if a == 2 { g } else { 0.0 };
                    bottom[2 * ox + 1] = if a == 3 { g } else { 0.0 };
                }
            }
        }
    }
}

vectorized! {
    /// 2x2 average pooling of `planes` planes of h x w (h, w even): each window's four values added in
    /// row-major order, then divided by 4, as PyTorch's AvgPool2d does.
    pub fn avgpool2_forward(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        assert_eq!(x.len(), planes * h * w);
        assert_eq!(y.len(), planes * ho * wo);
        for plane in 0..planes {
            let (xp, yp) = (&x[plane * h * w..][..h * w], &mut y[plane * ho * wo..][..ho * wo]);
            for oy in 0..ho {
                for ox in 0..wo {
                    let at = 2 * oy * w + 2 * ox;
                    yp[oy * wo + ox] = (((xp[at] + xp[at + 1]) + xp[at + w]) + xp[at + w + 1]) / 4.0;
                }
            }
        }
    }
}

vectorized! {
    /// Each output gradient divided by 4 into the four inputs of its window; dx is overwritten.
    pub fn avgpool2_backward(planes: usize, h: usize, w: usize, dy: &[f32], dx: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        assert_eq!(dx.len(), planes * h * w);
        assert_eq!(dy.len(), planes * ho * wo);
        for plane in 0..planes {
            let (dxp, dyp) = (&mut dx[plane * h * w..][..h * w], &dy[plane * ho * wo..][..ho * wo]);
            for oy in 0..ho {
                for ox in 0..wo {
                    let (at, g) = (2 * oy * w + 2 * ox, dyp[oy * wo + ox] / 4.0);
                    for i in [at, at + 1, at + w, at + w + 1] {
                        dxp[i] = g;
                    }
                }
            }
        }
    }
}

/// Mean of each plane of `hw` values.
pub fn global_avg_pool_forward(hw: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len() * hw);
    for (o, plane) in y.iter_mut().zip(x.chunks_exact(hw)) {
        *o = plane.iter().sum::<f32>() / hw as f32;
    }
}

/// Spreads each plane's gradient evenly over its `hw` inputs.
pub fn global_avg_pool_backward(hw: usize, dy: &[f32], dx: &mut [f32]) {
    assert_eq!(dx.len(), dy.len() * hw);
    for (&g, plane) in dy.iter().zip(dx.chunks_exact_mut(hw)) {
        plane.fill(g / hw as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pooling_keeps_the_first_maximum_and_lets_a_nan_win_as_pytorch_does() {
        // One plane of 2 x 6, three windows (top row / bottom row): (1, 3 / 2, 3) a tie, the first
        // wins; (3, NaN / 3, 1) a NaN after a larger value; (NaN, 0 / 5, 9) a NaN first.
        let nan = f32::NAN;
        let x = [1.0, 3.0, 3.0, nan, nan, 0.0, 2.0, 3.0, 3.0, 1.0, 5.0, 9.0];
        let (mut y, mut winners) = ([0.0f32; 3], [0u8; 3]);
        maxpool2_forward(1, 2, 6, &x, &mut y, &mut winners);
        assert_eq!((y[0], winners[0]), (3.0, 1), "the first of two equal maxima wins");
        assert!(y[1].is_nan() && winners[1] == 1, "a NaN wins over a larger value before it");
        assert!(y[2].is_nan() && winners[2] == 0, "a NaN first stays the winner");
    }
}
