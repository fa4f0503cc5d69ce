//! Launches shaders/conv3x3.wgsl and shaders/conv1x1.wgsl: both take the same uniform and have the
//! same three entry points (forward, backward_data, backward_weight), so one launcher serves both.

use anyhow::{bail, Result};
use bytemuck::{Pod, Zeroable};

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::sgd::SlicedGrad;
use crate::model::ConvDims;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Dims {
    n: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    ho: u32,
    wo: u32,
    pad: u32,
    w_off: u32,
    slices: u32,
    extra_off: u32,
    _pad: u32,
}

/// Workgroups a weight gradient's batch sum is spread over, at least, where there are few (co, ci)
/// pairs: a big GPU has over a hundred multiprocessors.
const WEIGHT_GRAD_GROUPS: usize = 512;
/// Slices of the positions per (co, ci) pair, at most.
const MAX_WEIGHT_GRAD_SLICES: usize = 64;

/// How many slices of the (image, position) sum a convolution's weight gradient is computed in (each
/// slice's partial sums written apart, then added in order by the SGD kernel): enough for
/// WEIGHT_GRAD_GROUPS workgroups. It depends on the channels only, so every batch size of one model
/// shares the gradient buffer's layout.
pub fn weight_grad_slices(d: &ConvDims) -> usize {
    WEIGHT_GRAD_GROUPS.div_ceil(d.cout * d.cin).clamp(1, MAX_WEIGHT_GRAD_SLICES)
}

/// The kernels of one convolution shader.
pub struct Conv {
    /// The kernel size the shader is written for.
    k: usize,
    /// Channels one invocation of forward (output channels) and backward_data (input channels)
    /// computes: CB in the shader.
    channel_block: usize,
    forward: Kernel,
    backward_data: Kernel,
    backward_weight: Kernel,
}

impl Conv {
    /// shaders/conv3x3.wgsl (padding 0 or 1).
    pub fn conv3x3(ctx: &GpuContext) -> Result<Conv> {
        Conv::new(ctx, "conv3x3", 3, 4)
    }

    /// shaders/conv1x1.wgsl (no padding).
    pub fn conv1x1(ctx: &GpuContext) -> Result<Conv> {
        Conv::new(ctx, "conv1x1", 1, 1)
    }

    fn new(ctx: &GpuContext, shader: &str, k: usize, channel_block: usize) -> Result<Conv> {
        let mut kernels = compile(ctx, shader)?;
        Ok(Conv {
            k,
            channel_block,
            forward: take(&mut kernels, "forward"),
            backward_data: take(&mut kernels, "backward_data"),
            backward_weight: take(&mut kernels, "backward_weight"),
        })
    }

    /// Every pass of a convolution does the same multiply-adds and touches input, weights and output.
    fn cost(d: &ConvDims) -> Cost {
        let taps = d.cout * d.cin * d.k * d.k;
        Cost::new(2 * d.n * d.ho() * d.wo() * taps, d.n * d.cin * d.h * d.w + taps + d.n * d.cout * d.ho() * d.wo())
    }

    fn dims(&self, ctx: &GpuContext, d: &ConvDims, w_off: usize) -> Result<wgpu::Buffer> {
        self.dims_sliced(ctx, d, w_off, 1, 0)
    }

    fn dims_sliced(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        slices: usize,
        extra_off: usize,
    ) -> Result<wgpu::Buffer> {
        if d.k != self.k || (self.k == 1 && d.pad != 0) {
            bail!("a {0}x{0} convolution with padding {1} given to the {2}x{2} kernels", d.k, d.pad, self.k);
        }
        let dims = Dims {
            n: d.n as u32,
            cin: d.cin as u32,
            h: d.h as u32,
            w: d.w as u32,
            cout: d.cout as u32,
            ho: d.ho() as u32,
            wo: d.wo() as u32,
            pad: d.pad as u32,
            w_off: w_off as u32,
            slices: slices as u32,
            extra_off: extra_off as u32,
            _pad: 0,
        };
        Ok(ctx.uniform("conv dims", &dims))
    }

    /// y = conv(x, weights at state[w_off..]).
    pub fn forward(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        x: &wgpu::Buffer,
        state: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let u = self.dims(ctx, d, w_off)?;
        Ok(self
            .forward
            .launch(
                ctx,
                groups_for(d.n * d.cout.div_ceil(self.channel_block) * d.ho() * d.wo()),
                &[(0, &u), (1, x), (2, state), (4, y)],
            )
            .with_cost(Conv::cost(d)))
    }

    /// dx from dy.
    pub fn backward_data(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        dy: &wgpu::Buffer,
        state: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let u = self.dims(ctx, d, w_off)?;
        Ok(self
            .backward_data
            .launch(
                ctx,
                groups_for(d.n * d.cin.div_ceil(self.channel_block) * d.h * d.w),
                &[(0, &u), (2, state), (3, dy), (4, dx)],
            )
            .with_cost(Conv::cost(d)))
    }

    /// grads[w_off..] = dL/dweights from x and dy: one workgroup per (output, input) channel pair,
    /// which computes all k x k taps.
    /// The weight gradient in `sliced.slices` partial sums (see `weight_grad_slices`), placed as
    /// `sliced` says in `grads`; the SGD kernel (or `Sgd::sum_slices`) adds them.
    pub fn backward_weight(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        sliced: &SlicedGrad,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        grads: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let u = self.dims_sliced(ctx, d, sliced.start, sliced.slices, sliced.extra)?;
        let buffers = [(0, &u), (1, x), (3, dy), (5, grads)];
        let groups = (d.cout * d.cin * sliced.slices) as u32;
        let mut cost = Conv::cost(d);
        cost.bytes += 4.0 * ((sliced.slices - 1) * sliced.len) as f64;
        Ok(self.backward_weight.launch(ctx, groups, &buffers).with_cost(cost))
    }
}
