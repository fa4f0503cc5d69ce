//! Launches shaders/sgd.wgsl, and defines the per-step uniform it shares with dropout.wgsl.

use anyhow::Result;
use bytemuck::{Pod, Zeroable};

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};

/// What changes every step: written with one small queue write before the step is submitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct StepUniform {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub dropout_seed: u32,
    pub dropout_step: u32,
    /// 0: dropout layers are the identity in this step; 1: masks from (dropout_seed, dropout_step).
    pub dropout_on: u32,
    pub _pad: [u32; 2],
}

/// Tensors whose gradients arrive in slices, at most (MAX_SLICED in sgd.wgsl); others get one slice.
pub const MAX_SLICED: usize = 32;

/// A tensor whose gradient arrives in `slices` partial sums: slice 0 at grads[start .. start + len],
/// slice t > 0 at grads[extra + (t - 1) * len ..]. The SGD kernel adds them in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlicedGrad {
    pub start: usize,
    pub len: usize,
    pub extra: usize,
    pub slices: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Dims {
    len: u32,
    sliced_count: u32,
    _pad: [u32; 2],
    sliced: [[u32; 4]; MAX_SLICED],
}

fn dims(len: usize, sliced: &[SlicedGrad]) -> Dims {
    assert!(sliced.len() <= MAX_SLICED, "at most {MAX_SLICED} sliced gradients");
    let mut d = Dims { len: len as u32, sliced_count: sliced.len() as u32, _pad: [0; 2], sliced: [[0; 4]; MAX_SLICED] };
    for (slot, t) in d.sliced.iter_mut().zip(sliced) {
        *slot = [t.start as u32, t.len as u32, t.extra as u32, t.slices as u32];
    }
    d
}

/// The buffers the update reads and writes.
pub struct SgdBuffers<'a> {
    pub step: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    /// The gradients (with the extra slices of `sliced` tensors after the trainable prefix).
    pub grads: &'a wgpu::Buffer,
    pub momenta: &'a wgpu::Buffer,
    pub metrics: &'a wgpu::Buffer,
}

pub struct Sgd {
    update: Kernel,
    sum_slices: Kernel,
}

impl Sgd {
    pub fn new(ctx: &GpuContext) -> Result<Sgd> {
        let mut k = compile(ctx, "sgd")?;
        Ok(Sgd { update: take(&mut k, "update"), sum_slices: take(&mut k, "sum_slices") })
    }

    /// The update of the first `len` values of `state` (the trainable prefix), each gradient first
    /// finished from its slices; a non-finite result sets the flag word of `metrics`.
    pub fn update(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], b: &SgdBuffers) -> Dispatch {
        let u = ctx.uniform("sgd dims", &dims(len, sliced));
        let buffers = [(0, &u), (1, b.step), (2, b.state), (3, b.grads), (4, b.momenta), (5, b.metrics)];
        let extra: usize = sliced.iter().map(|t| (t.slices - 1) * t.len).sum();
        // Reads parameter, gradient (and its slices) and momentum; writes parameter, gradient, momentum.
        self.update.launch(ctx, groups_for(len), &buffers).with_cost(Cost::new(5 * len + extra, 6 * len + extra))
    }

    /// The gradients finished from their slices, without an update (to read them back).
    pub fn sum_slices(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], grads: &wgpu::Buffer) -> Dispatch {
        let u = ctx.uniform("sgd dims", &dims(len, sliced));
        let extra: usize = sliced.iter().map(|t| (t.slices - 1) * t.len).sum();
        self.sum_slices
            .launch(ctx, groups_for(len), &[(0, &u), (3, grads)])
            .with_cost(Cost::new(extra, 2 * len + extra))
    }
}
