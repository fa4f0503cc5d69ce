//! Launches shaders/dropout.wgsl.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    pub(super) struct Dims {
        len: u32,
        threshold: u32,
        scale: f32,
        layer: u32,
    }
}

/// A dropout layer run inside another layer's kernels (a batchnorm's, or a convolution's or pooling's
/// ReLU epilogue): its probability, and its index in the model (which keys its mask).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedDropout {
    pub p: f32,
    pub layer: usize,
}

/// A dropout of probability p as its kernels take it: the hash's keep threshold and the scale of a
/// kept value (shared by dropout.wgsl and the epilogues that run a dropout).
pub fn mask_params(p: f32) -> (u32, f32) {
    (crate::model::dropout_threshold(p), 1.0 / (1.0 - p))
}

pub struct Dropout {
    apply: Kernel,
}

impl Dropout {
    pub fn new(ctx: &GpuContext) -> Result<Dropout> {
        Ok(Dropout { apply: take(&mut compile(ctx, "dropout")?, "apply") })
    }

    /// out = x * mask, the mask drawn from the seed and step in the `step` uniform (see update::StepUniform).
    /// Dropout layer `layer` (its index in the model, which keys its mask) of probability p.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        ctx: &GpuContext,
        len: usize,
        p: f32,
        layer: usize,
        step: &wgpu::Buffer,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) -> Dispatch {
        let (threshold, scale) = mask_params(p);
        let dims = Dims { len: len as u32, threshold, scale, layer: layer as u32 };
        let u = ctx.uniform("dropout dims", &dims);
        self.apply
            .launch(ctx, groups_for(len), &[(0, &u), (1, step), (2, x), (3, out)])
            .with_cost(Cost::new(len, 2 * len))
    }
}
