//! Launches shaders/adam.wgsl (after update_common.wgsl): the Adam and AdamW update.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, take, Dispatch, Kernel};
use super::update::{slice_buffers, update_cost, update_groups, SlicedGrad, UpdateBuffers};

pub struct Adam {
    update: Kernel,
}

impl Adam {
    pub fn new(ctx: &GpuContext) -> Result<Adam> {
        Ok(Adam { update: take(&mut compile(ctx, "adam")?, "update") })
    }

    /// The update of the first `len` values of `state`, each gradient first finished from its slices,
    /// with the step uniform's Adam scalars; `b.moments` holds 2 x `len` values. A non-finite result
    /// sets the flag word of `metrics`.
    pub fn update(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], b: &UpdateBuffers) -> Dispatch {
        let tables = slice_buffers(ctx, len, sliced);
        // Reads parameter, gradient (and its slices) and both moments; writes them all.
        self.update.launch(ctx, update_groups(len), &b.bindings(&tables)).with_cost(update_cost(len, sliced, 13, 4, 4))
    }
}
