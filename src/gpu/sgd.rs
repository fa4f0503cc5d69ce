//! Launches shaders/sgd.wgsl, and defines the per-step uniform it shares with dropout.wgsl.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    /// What changes every step: written with one small queue write before the step is submitted.
    #[derive(Debug, Default)]
    pub struct StepUniform {
        pub lr: f32,
        pub momentum: f32,
        pub weight_decay: f32,
        pub dropout_seed: u32,
        pub dropout_step: u32,
        /// 0: dropout layers are the identity in this step; 1: masks from (dropout_seed, dropout_step).
        pub dropout_on: u32,
        pub _p0: u32,
        pub _p1: u32,
    }
}

/// A tensor whose gradient arrives in `slices` partial sums: slice 0 at grads[start .. start + len],
/// slice t > 0 at grads[extra + (t - 1) * len ..]. The SGD kernel adds them in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlicedGrad {
    pub start: usize,
    pub len: usize,
    pub extra: usize,
    pub slices: usize,
}

uniform! {
    pub(super) struct Dims {
        len: u32,
        _p0: u32,
        _p1: u32,
        _p2: u32,
    }
}

/// The SGD kernel's bindings for `len` parameters: the uniform, the sliced tensors' table, and per
/// parameter its tensor's place in that table plus one (0: a whole gradient).
fn slice_buffers(ctx: &GpuContext, len: usize, sliced: &[SlicedGrad]) -> [wgpu::Buffer; 3] {
    // One unused row when there are none: a binding holds at least one element.
    let mut table: Vec<[u32; 4]> =
        sliced.iter().map(|t| [t.start as u32, t.len as u32, t.extra as u32, t.slices as u32]).collect();
    if table.is_empty() {
        table.push([0; 4]);
    }
    let mut of = vec![0u32; len];
    for (k, t) in sliced.iter().enumerate() {
        assert!(t.start + t.len <= len, "a sliced gradient past the {len} parameters");
        of[t.start..t.start + t.len].fill(k as u32 + 1);
    }
    [
        ctx.uniform("sgd dims", &Dims { len: len as u32, _p0: 0, _p1: 0, _p2: 0 }),
        ctx.upload("sgd sliced tensors", &table),
        ctx.upload("sgd sliced tensor of each parameter", &of),
    ]
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

/// Invocations per workgroup of both entry points (SGD_WG in shaders/sgd.wgsl).
const SGD_WORKGROUP: u32 = 64;

fn sgd_groups(len: usize) -> u32 {
    (len as u32).div_ceil(SGD_WORKGROUP)
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
        let [u, table, of] = slice_buffers(ctx, len, sliced);
        let buffers =
            [(0, &u), (1, b.step), (2, b.state), (3, b.grads), (4, b.momenta), (5, b.metrics), (6, &table), (7, &of)];
        let extra: usize = sliced.iter().map(|t| (t.slices - 1) * t.len).sum();
        // Reads parameter, gradient (and its slices) and momentum; writes parameter, gradient, momentum.
        self.update.launch(ctx, sgd_groups(len), &buffers).with_cost(Cost::new(5 * len + extra, 6 * len + extra))
    }

    /// The gradients finished from their slices, without an update (to read them back).
    pub fn sum_slices(&self, ctx: &GpuContext, len: usize, sliced: &[SlicedGrad], grads: &wgpu::Buffer) -> Dispatch {
        let [u, table, of] = slice_buffers(ctx, len, sliced);
        let extra: usize = sliced.iter().map(|t| (t.slices - 1) * t.len).sum();
        self.sum_slices
            .launch(ctx, sgd_groups(len), &[(0, &u), (3, grads), (6, &table), (7, &of)])
            .with_cost(Cost::new(extra, 2 * len + extra))
    }
}
