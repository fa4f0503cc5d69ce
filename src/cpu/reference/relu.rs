//! ReLU. The backward pass reads the forward output: y > 0 exactly where x > 0.

use crate::cpu::isa::vectorized;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// In place: x = max(x, 0), keeping a NaN as PyTorch does (so a diverging run shows in its loss).
pub fn relu_forward(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(relu_forward_serial);
}

vectorized! {
    /// `relu_forward` on this thread.
    pub fn relu_forward_serial(x: &mut [f32]) {
        x.iter_mut().for_each(|v| *v = if v.is_nan() { *v } else { v.max(0.0) });
    }
}

/// In place: dy = dy where y > 0, else 0.
pub fn relu_backward(y: &[f32], dy: &mut [f32]) {
    dy.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(g, y)| relu_backward_serial(y, g));
}

vectorized! {
    /// `relu_backward` on this thread.
    pub fn relu_backward_serial(y: &[f32], dy: &mut [f32]) {
        for (g, &y) in dy.iter_mut().zip(y) {
            // A select, not a branch, so the loop vectorizes.
            *g = if y > 0.0 { *g } else { 0.0 };
        }
    }
}
