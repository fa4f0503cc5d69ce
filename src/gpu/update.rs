//! What the two parameter updates (`sgd.rs`, `adam.rs`) share, as shaders/update_common.wgsl holds
//! their shaders' shared part: the per-step uniform (also read by dropout.wgsl), the table of
//! gradients summed in slices, the bindings and the grid.

use super::context::GpuContext;
use super::kernel::Cost;
use super::uniform::uniform;
use crate::optim::AdamScalars;

uniform! {
    /// What changes every step: written with one small queue write before the step is submitted (or
    /// copied from the run's schedule). The `adam_` members are `optim::AdamScalars`.
    #[derive(Debug, Default)]
    pub struct StepUniform {
        pub lr: f32,
        pub momentum: f32,
        pub weight_decay: f32,
        pub dropout_seed: u32,
        pub dropout_step: u32,
        /// 0: dropout layers are the identity in this step; 1: masks from (dropout_seed, dropout_step).
        pub dropout_on: u32,
        pub adam_one_minus_beta1: f32,
        pub adam_beta2: f32,
        pub adam_one_minus_beta2: f32,
        pub adam_eps: f32,
        pub adam_step_size: f32,
        pub adam_bc2_sqrt: f32,
        pub adam_l2: f32,
        pub adam_decay: f32,
        pub _p0: u32,
        pub _p1: u32,
    }
}

impl StepUniform {
    /// This uniform with an Adam step's scalars.
    pub fn with_adam(self, a: &AdamScalars) -> StepUniform {
        StepUniform {
            adam_one_minus_beta1: a.one_minus_beta1,
            adam_beta2: a.beta2,
            adam_one_minus_beta2: a.one_minus_beta2,
            adam_eps: a.eps,
            adam_step_size: a.step_size,
            adam_bc2_sqrt: a.bc2_sqrt,
            adam_l2: a.l2,
            adam_decay: a.decay,
            ..self
        }
    }
}

/// A tensor whose gradient arrives in `slices` partial sums: slice 0 at grads[start .. start + len],
/// slice t > 0 at grads[extra + (t - 1) * len ..]. The updates add them in order.
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

/// The bindings for `len` parameters: the uniform, the sliced tensors' table, and per parameter its
/// tensor's place in that table plus one (0: a whole gradient).
pub(super) fn slice_buffers(ctx: &GpuContext, len: usize, sliced: &[SlicedGrad]) -> [wgpu::Buffer; 3] {
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
        ctx.uniform("update dims", &Dims { len: len as u32, _p0: 0, _p1: 0, _p2: 0 }),
        ctx.upload("update sliced tensors", &table),
        ctx.upload("update sliced tensor of each parameter", &of),
    ]
}

/// Values read beyond the gradients themselves: the extra slices.
pub(super) fn extra_slices(sliced: &[SlicedGrad]) -> usize {
    sliced.iter().map(|t| (t.slices - 1) * t.len).sum()
}

/// The buffers an update reads and writes.
pub struct UpdateBuffers<'a> {
    pub step: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    /// The gradients (with the extra slices of `sliced` tensors after the trainable prefix).
    pub grads: &'a wgpu::Buffer,
    /// SGD's momenta, or Adam's first then second moments (`optim::MOMENT_SLOTS` x the parameters).
    pub moments: &'a wgpu::Buffer,
    pub metrics: &'a wgpu::Buffer,
}

impl UpdateBuffers<'_> {
    /// The launch's bindings, with the slice tables of `slice_buffers`.
    pub(super) fn bindings<'a>(&'a self, tables: &'a [wgpu::Buffer; 3]) -> [(u32, &'a wgpu::Buffer); 8] {
        let [u, table, of] = tables;
        [
            (0, u),
            (1, self.step),
            (2, self.state),
            (3, self.grads),
            (4, self.moments),
            (5, self.metrics),
            (6, table),
            (7, of),
        ]
    }
}

/// Invocations per workgroup of every update entry point (UPDATE_WG in shaders/update_common.wgsl).
const UPDATE_WORKGROUP: u32 = 64;

/// Workgroups for `len` parameters.
pub(super) fn update_groups(len: usize) -> u32 {
    (len as u32).div_ceil(UPDATE_WORKGROUP)
}

/// The cost of an update reading `reads` and writing `writes` values per parameter, and the slices.
pub(super) fn update_cost(len: usize, sliced: &[SlicedGrad], flops: usize, reads: usize, writes: usize) -> Cost {
    let extra = extra_slices(sliced);
    Cost::new(flops * len + extra, (reads + writes) * len + extra)
}
