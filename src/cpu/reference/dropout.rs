//! Dropout with an explicit mask, and the counter-based hash that draws masks identically on every
//! backend: element i of dropout layer `layer` (its index in the model's layer list) at step `step`
//! under `seed` is kept when
//! lowbias32(i + lowbias32(step + lowbias32(seed + lowbias32(layer)))) >> 8 >= p * 2^24 (u32
//! arithmetic, wrapping), so that each dropout layer draws its own mask. The same function is written
//! in `shaders/common.wgsl` (`dropout_hash`).

use crate::cpu::isa::vectorized;
use rayon::prelude::*;

pub use crate::model::dropout_threshold;

/// A 32-bit integer mixer (Chris Wellons' "lowbias32"), good avalanche with only u32 ops.
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The part of the hash shared by every element of a layer's mask in a step.
fn dropout_key(seed: u32, step: u32, layer: u32) -> u32 {
    lowbias32(step.wrapping_add(lowbias32(seed.wrapping_add(lowbias32(layer)))))
}

/// A uniform 24-bit draw in 0..2^24 for element `index` of the step whose key is `key`.
fn dropout_draw(key: u32, index: u32) -> u32 {
    lowbias32(index.wrapping_add(key)) >> 8
}

/// The scale each element is multiplied by: 0 when dropped, 1 / (1 - p) when kept.
pub fn dropout_mask(seed: u32, step: u32, layer: u32, p: f32, len: usize) -> Vec<f32> {
    let mut mask = vec![0.0; len];
    dropout_mask_into(seed, step, layer, p, &mut mask);
    mask
}

/// `dropout_mask` into an existing buffer (its length is the element count).
pub fn dropout_mask_into(seed: u32, step: u32, layer: u32, p: f32, mask: &mut [f32]) {
    mask.par_chunks_mut(1 << 14).enumerate().for_each(|(chunk, m)| {
        m.fill(1.0);
        dropout_serial(seed, step, layer, p, chunk << 14, m);
    });
}

vectorized! {
    /// On this thread, in place: x *= the mask's elements `first`, `first + 1`, ... of layer `layer`'s
    /// mask at `step` (the product `dropout_apply` makes with `dropout_mask`'s, without the mask).
    pub fn dropout_serial(seed: u32, step: u32, layer: u32, p: f32, first: usize, x: &mut [f32]) {
        let (key, threshold, keep) = (dropout_key(seed, step, layer), dropout_threshold(p), 1.0 / (1.0 - p));
        for (i, v) in x.iter_mut().enumerate() {
            let scale = if dropout_draw(key, (first + i) as u32) >= threshold { keep } else { 0.0 };
            *v *= scale;
        }
    }
}

/// In place: x *= mask. The backward pass is the same product applied to the gradient.
pub fn dropout_apply(mask: &[f32], x: &mut [f32]) {
    assert_eq!(mask.len(), x.len());
    x.par_chunks_mut(1 << 14).zip(mask.par_chunks(1 << 14)).for_each(|(x, m)| {
        x.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
    });
}
