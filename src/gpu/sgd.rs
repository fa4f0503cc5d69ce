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

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Dims {
    len: u32,
    _pad: [u32; 3],
}

pub struct Sgd {
    update: Kernel,
}

impl Sgd {
    pub fn new(ctx: &GpuContext) -> Result<Sgd> {
        Ok(Sgd { update: take(&mut compile(ctx, "sgd")?, "update") })
    }

    /// The update of the first `len` values of `state` (the trainable prefix); a non-finite result
    /// sets the flag word of `metrics`.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        ctx: &GpuContext,
        len: usize,
        step: &wgpu::Buffer,
        state: &wgpu::Buffer,
        grads: &wgpu::Buffer,
        momenta: &wgpu::Buffer,
        metrics: &wgpu::Buffer,
    ) -> Dispatch {
        let u = ctx.uniform("sgd dims", &Dims { len: len as u32, _pad: [0; 3] });
        let buffers = [(0, &u), (1, step), (2, state), (3, grads), (4, momenta), (5, metrics)];
        // Reads parameter, gradient and momentum; writes parameter and momentum.
        self.update.launch(ctx, groups_for(len), &buffers).with_cost(Cost::new(5 * len, 5 * len))
    }
}
