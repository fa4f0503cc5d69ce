//! Launches shaders/sgd.wgsl (after update_common.wgsl): the SGD update, and the gradients finished
//! from their slices without an update.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, take, Dispatch, Kernel};
use super::update::{slice_buffers, update_cost, update_groups, SlicedGrad, UpdateBuffers};

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
    pub fn update(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], b: &UpdateBuffers) -> Dispatch {
        let tables = slice_buffers(ctx, len, sliced);
        // Reads parameter, gradient (and its slices) and momentum; writes parameter, gradient, momentum.
        self.update.launch(ctx, update_groups(len), &b.bindings(&tables)).with_cost(update_cost(len, sliced, 5, 3, 3))
    }

    /// The gradients finished from their slices, without an update (to read them back).
    pub fn sum_slices(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], grads: &wgpu::Buffer) -> Dispatch {
        let [u, table, of] = slice_buffers(ctx, len, sliced);
        self.sum_slices
            .launch(ctx, update_groups(len), &[(0, &u), (3, grads), (6, &table), (7, &of)])
            .with_cost(update_cost(len, sliced, 0, 1, 1))
    }
}
