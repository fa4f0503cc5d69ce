//! Launches shaders/loss.wgsl.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    pub(super) struct Dims {
        n: u32,
        classes: u32,
        accumulate: u32,
        pool_hw: u32,
    }
}

/// The loss kernel's buffers. With `pooled` = (x, hw), the global average pooling of x (hw values per
/// logit) is fused in and its result written to `logits`.
pub struct LossBuffers<'a> {
    pub logits: &'a wgpu::Buffer,
    pub labels: &'a wgpu::Buffer,
    pub dlogits: &'a wgpu::Buffer,
    pub metrics: &'a wgpu::Buffer,
    pub pooled: Option<(&'a wgpu::Buffer, usize)>,
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
    pub fn softmax_cross_entropy(
        &self,
        ctx: &GpuContext,
        n: usize,
        classes: usize,
        accumulate: bool,
        b: &LossBuffers,
    ) -> Dispatch {
        let hw = b.pooled.map_or(0, |(_, hw)| hw);
        let dims = Dims { n: n as u32, classes: classes as u32, accumulate: accumulate as u32, pool_hw: hw as u32 };
        let u = ctx.uniform("loss dims", &dims);
        // Unread without pooling; the labels are read-only too, so binding them there conflicts with nothing.
        let pooled = b.pooled.map_or(b.labels, |(x, _)| x);
        let buffers = [(0, &u), (1, b.logits), (2, b.labels), (3, b.dlogits), (4, b.metrics), (5, pooled)];
        // Per logit: the maximum, exp and sum, then exp and the gradient (and the pooling's sum).
        let (len, pool) = (n * classes, n * classes * hw);
        self.softmax_cross_entropy.launch(ctx, 1, &buffers).with_cost(Cost::new(8 * len + pool, 2 * len + n + pool))
    }
}
