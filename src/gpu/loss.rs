//! Launches shaders/loss.wgsl.

use anyhow::Result;
use bytemuck::{Pod, Zeroable};

use super::context::GpuContext;
use super::kernel::{compile, take, Cost, Dispatch, Kernel};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Dims {
    n: u32,
    classes: u32,
    accumulate: u32,
    _pad: u32,
}

pub struct Loss {
    softmax_cross_entropy: Kernel,
}

impl Loss {
    pub fn new(ctx: &GpuContext) -> Result<Loss> {
        Ok(Loss { softmax_cross_entropy: take(&mut compile(ctx, "loss")?, "softmax_cross_entropy") })
    }

    /// dlogits of the mean loss; metrics[0], metrics[1] = the loss sum and correct count of the batch
    /// (added to what they hold when `accumulate`).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_cross_entropy(
        &self,
        ctx: &GpuContext,
        n: usize,
        classes: usize,
        accumulate: bool,
        logits: &wgpu::Buffer,
        labels: &wgpu::Buffer,
        dlogits: &wgpu::Buffer,
        metrics: &wgpu::Buffer,
    ) -> Dispatch {
        let dims = Dims { n: n as u32, classes: classes as u32, accumulate: accumulate as u32, _pad: 0 };
        let u = ctx.uniform("loss dims", &dims);
        // Per logit: the maximum, exp and sum, then exp and the gradient.
        let buffers = [(0, &u), (1, logits), (2, labels), (3, dlogits), (4, metrics)];
        self.softmax_cross_entropy.launch(ctx, 1, &buffers).with_cost(Cost::new(8 * n * classes, 2 * n * classes + n))
    }
}
