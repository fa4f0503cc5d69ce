//! Launches shaders/batchnorm.wgsl: a training batchnorm's statistics and normalization, its
//! backward, and evaluation's normalization, with the ReLU, dropout and pooling backward it absorbs
//! (flags in its uniform: they combine freely, and a uniform branch costs the GPU nothing measurable).

use anyhow::Result;

use super::context::GpuContext;
use super::dropout::FusedDropout;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;
use crate::model::dropout_threshold;

/// Where one batchnorm layer's tensors live in the state (and gradient) buffer.
#[derive(Debug, Clone, Copy)]
pub struct BnOffsets {
    pub gamma: usize,
    pub beta: usize,
    pub running_mean: usize,
    pub running_var: usize,
}

/// One batchnorm layer over a batch.
#[derive(Debug, Clone, Copy)]
pub struct BnLayer {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    /// The ReLU that follows is fused in.
    pub relu: bool,
    pub offsets: BnOffsets,
    pub momentum: f32,
    pub eps: f32,
    /// Spans of each channel's elements, one workgroup each (`bn_spans`).
    pub spans: usize,
    /// Partials per channel of the forward sums when the convolution before writes them (its tiles
    /// of positions), else None: the statistics kernel runs and writes one per span.
    pub conv_forward_partials: Option<usize>,
    /// The same for the backward sums, when the convolution after writes them from its dx.
    pub conv_backward_partials: Option<usize>,
    /// In the backward pass, dy is the gradient of a global average pooling of this layer's output
    /// (one value per plane): the pooling's backward is fused in.
    pub dy_pooled: bool,
    /// The training-mode dropout after the fused ReLU runs inside (forward and backward).
    pub dropout: Option<FusedDropout>,
    /// In the backward pass, dy is the gradient of a 2x2 max pooling of this layer's output (after
    /// the fused ReLU and dropout): the pooling's backward is fused in.
    pub maxpool: bool,
    /// Pixels per row (the max pooling's windows).
    pub width: usize,
    /// The input arrives in this many parts (a convolution's split sums), added by the statistics.
    pub parts: usize,
}

/// Workgroups a batchnorm's kernels are spread over, at least, where there are few channels.
const BN_GROUPS: usize = 512;
/// Spans of a channel's elements, at most.
const MAX_BN_SPANS: usize = 64;

/// How many spans a channel's elements are cut into, one workgroup each: enough for BN_GROUPS
/// workgroups.
pub fn bn_spans(c: usize) -> usize {
    BN_GROUPS.div_ceil(c).clamp(1, MAX_BN_SPANS)
}

impl BnLayer {
    /// Forward partials per channel: the convolution's tiles, or the statistics kernel's spans.
    pub fn forward_partials(&self) -> usize {
        self.conv_forward_partials.unwrap_or(self.spans)
    }

    pub fn backward_partials(&self) -> usize {
        self.conv_backward_partials.unwrap_or(self.spans)
    }

    /// Where the forward partials start in `saved` (after the mean and 1/std).
    pub fn forward_partials_at(&self) -> usize {
        2 * self.c
    }

    /// Where the backward partials start in `saved`.
    pub fn backward_partials_at(&self) -> usize {
        self.forward_partials_at() + 3 * self.c * self.forward_partials()
    }

    /// Length of the layer's `saved` buffer: mean and 1/std, then the forward partials (count, mean,
    /// M2), then the backward partials (two sums).
    pub fn saved_len(&self) -> usize {
        self.backward_partials_at() + 2 * self.c * self.backward_partials()
    }
}

uniform! {
    pub(super) struct Dims {
        n: u32,
        c: u32,
        hw: u32,
        relu: u32,
        gamma_off: u32,
        beta_off: u32,
        mean_off: u32,
        var_off: u32,
        momentum: f32,
        eps: f32,
        spans: u32,
        fpartials: u32,
        bpartials: u32,
        dy_pooled: u32,
        dropout: u32,
        dropout_threshold: u32,
        dropout_scale: f32,
        maxpool: u32,
        width: u32,
        parts: u32,
        dropout_layer: u32,
        _p0: u32,
        _p1: u32,
        _p2: u32,
    }
}

fn dims(l: &BnLayer) -> Dims {
    Dims {
        n: l.n as u32,
        c: l.c as u32,
        hw: l.hw as u32,
        relu: l.relu as u32,
        gamma_off: l.offsets.gamma as u32,
        beta_off: l.offsets.beta as u32,
        mean_off: l.offsets.running_mean as u32,
        var_off: l.offsets.running_var as u32,
        momentum: l.momentum,
        eps: l.eps,
        spans: l.spans as u32,
        fpartials: l.forward_partials() as u32,
        bpartials: l.backward_partials() as u32,
        dy_pooled: l.dy_pooled as u32,
        dropout: l.dropout.is_some() as u32,
        dropout_threshold: l.dropout.map_or(0, |d| dropout_threshold(d.p)),
        dropout_scale: l.dropout.map_or(1.0, |d| 1.0 / (1.0 - d.p)),
        dropout_layer: l.dropout.map_or(0, |d| d.layer as u32),
        maxpool: l.maxpool as u32,
        width: l.width as u32,
        parts: l.parts as u32,
        _p0: 0,
        _p1: 0,
        _p2: 0,
    }
}

pub struct BatchNorm {
    stats: Kernel,
    apply_train: Kernel,
    apply_eval: Kernel,
    backward_reduce: Kernel,
    backward_data: Kernel,
}

/// The buffers one batchnorm layer works on.
pub struct BnBuffers<'a> {
    /// The layer's input.
    pub x: &'a wgpu::Buffer,
    /// The layer's output (after the fused ReLU).
    pub y: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    /// Batch mean then 1 / sqrt(var + eps), 2 * c values.
    pub saved: &'a wgpu::Buffer,
    /// The step uniform (the fused dropout's draw).
    pub step: &'a wgpu::Buffer,
}

impl BatchNorm {
    pub fn new(ctx: &GpuContext) -> Result<BatchNorm> {
        let mut k = compile(ctx, "batchnorm")?;
        Ok(BatchNorm {
            stats: take(&mut k, "stats"),
            apply_train: take(&mut k, "apply_train"),
            apply_eval: take(&mut k, "apply_eval"),
            backward_reduce: take(&mut k, "backward_reduce"),
            backward_data: take(&mut k, "backward_data"),
        })
    }

    /// Training mode: batch statistics (unless the convolution before wrote their partials), then the
    /// normalization (and the running statistics update).
    pub fn forward_train(&self, ctx: &GpuContext, l: &BnLayer, b: &BnBuffers) -> Vec<Dispatch> {
        let u = ctx.uniform("batchnorm dims", &dims(l));
        let all = [(0, &u), (1, b.x), (2, b.state), (3, b.saved), (4, b.y), (8, b.step)];
        let len = l.n * l.c * l.hw;
        let groups = (l.c * l.spans) as u32;
        let partials = 3 * l.c * l.forward_partials();
        let mut launches = Vec::new();
        if l.conv_forward_partials.is_none() {
            // Mean and M2 of x per span (adding the parts of a split convolution's output).
            let stats = self.stats.launch(ctx, groups, &all);
            launches.push(stats.with_cost(Cost::new((2 + l.parts) * len, l.parts * len + partials)));
        }
        // The partials combined in every workgroup, then (x - mean) * scale + shift, ReLU, dropout.
        let apply = self.apply_train.launch(ctx, groups, &all);
        launches.push(apply.with_cost(Cost::new(3 * len, 2 * len + partials + 4 * l.c)));
        launches
    }

    /// Evaluation mode: the running statistics.
    pub fn forward_eval(&self, ctx: &GpuContext, l: &BnLayer, b: &BnBuffers) -> Dispatch {
        let u = ctx.uniform("batchnorm dims", &dims(l));
        let len = l.n * l.c * l.hw;
        self.apply_eval
            .launch(ctx, groups_for(len), &[(0, &u), (1, b.x), (2, b.state), (4, b.y)])
            .with_cost(Cost::new(3 * len, 2 * len + 4 * l.c))
    }

    /// dgamma, dbeta into `grads` (from partials of the convolution after, or of the reduction here),
    /// and dx, from dy (through the fused ReLU, dropout and pooling).
    pub fn backward(
        &self,
        ctx: &GpuContext,
        l: &BnLayer,
        b: &BnBuffers,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        grads: &wgpu::Buffer,
    ) -> Vec<Dispatch> {
        let u = ctx.uniform("batchnorm dims", &dims(l));
        let all = [(0, &u), (1, b.x), (2, b.state), (3, b.saved), (4, dx), (5, dy), (6, grads), (7, b.y), (8, b.step)];
        let len = l.n * l.c * l.hw;
        let groups = (l.c * l.spans) as u32;
        let partials = 2 * l.c * l.backward_partials();
        let mut launches = Vec::new();
        if l.conv_backward_partials.is_none() {
            // The sums of dy and dy * x-hat per span (reading x, dy and, for the masks, y).
            let reduce = self.backward_reduce.launch(ctx, groups, &all);
            launches.push(reduce.with_cost(Cost::new(4 * len, 3 * len + partials)));
        }
        // The partials added in every workgroup, then dx from them.
        let data = self.backward_data.launch(ctx, groups, &all);
        launches.push(data.with_cost(Cost::new(6 * len, 4 * len + partials + 4 * l.c)));
        launches
    }
}
