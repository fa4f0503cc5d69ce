//! Launches shaders/pool.wgsl: max and average pooling 2x2, and global average pooling. `forward` and `backward`
//! launch any pooling layer, so the executor knows none by name.

use anyhow::Result;

use crate::model::{Layer, Shape};

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    pub(super) struct Dims {
        planes: u32,
        h: u32,
        w: u32,
        _p0: u32,
    }
}

pub struct Pool {
    maxpool_forward: Kernel,
    maxpool_forward_relu: Kernel,
    maxpool_backward: Kernel,
    avgpool2_forward: Kernel,
    avgpool2_forward_relu: Kernel,
    avgpool2_backward: Kernel,
    gap_forward: Kernel,
    gap_backward: Kernel,
}

impl Pool {
    pub fn new(ctx: &GpuContext) -> Result<Pool> {
        let mut k = compile(ctx, "pool")?;
        Ok(Pool {
            maxpool_forward: take(&mut k, "maxpool_forward"),
            maxpool_forward_relu: take(&mut k, "maxpool_forward_relu"),
            maxpool_backward: take(&mut k, "maxpool_backward"),
            avgpool2_forward: take(&mut k, "avgpool2_forward"),
            avgpool2_forward_relu: take(&mut k, "avgpool2_forward_relu"),
            avgpool2_backward: take(&mut k, "avgpool2_backward"),
            gap_forward: take(&mut k, "gap_forward"),
            gap_backward: take(&mut k, "gap_backward"),
        })
    }

    /// Pooling layer `layer` over `planes` planes of `s.h` x `s.w`: x into y; with `relu`, the ReLU
    /// after a 2x2 pooling in the same launch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ctx: &GpuContext,
        layer: &Layer,
        planes: usize,
        s: Shape,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        relu: bool,
    ) -> Dispatch {
        // Per window: three comparisons for the maximum; three additions and a division for the mean;
        // one more for the ReLU.
        let (kernel, flops) = match (layer, relu) {
            (Layer::MaxPool2, false) => (&self.maxpool_forward, 3),
            (Layer::MaxPool2, true) => (&self.maxpool_forward_relu, 4),
            (Layer::AvgPool2, false) => (&self.avgpool2_forward, 4),
            (Layer::AvgPool2, true) => (&self.avgpool2_forward_relu, 5),
            (Layer::GlobalAvgPool, false) => return self.gap_forward(ctx, planes, s.h * s.w, x, y),
            (other, _) => unreachable!("{other:?} with relu {relu}: no such pooling kernel"),
        };
        self.windows(ctx, kernel, (planes, s.h, s.w), &[(1, x), (2, y)], (flops, 1))
    }

    /// dx from dy for pooling layer `layer`, whose forward input was x: a max pooling routes each
    /// window's gradient to its maximum in x, an average gives each place a quarter of it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &GpuContext,
        layer: &Layer,
        planes: usize,
        s: Shape,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let dims = (planes, s.h, s.w);
        match layer {
            Layer::MaxPool2 => self.windows(ctx, &self.maxpool_backward, dims, &[(1, x), (2, dx), (3, dy)], (3, 2)),
            Layer::AvgPool2 => self.windows(ctx, &self.avgpool2_backward, dims, &[(2, dx), (3, dy)], (1, 1)),
            Layer::GlobalAvgPool => self.gap_backward(ctx, planes, s.h * s.w, dy, dx),
            other => unreachable!("{other:?} is not a pooling"),
        }
    }

    fn dims(ctx: &GpuContext, planes: usize, h: usize, w: usize) -> wgpu::Buffer {
        ctx.uniform("pool dims", &Dims { planes: planes as u32, h: h as u32, w: w as u32, _p0: 0 })
    }

    /// One invocation per 2x2 window of `planes` planes of h x w, binding `buffers` besides the uniform;
    /// its cost: `flops` per window, the input read (or dx written) `passes` times, one value per window.
    fn windows(
        &self,
        ctx: &GpuContext,
        kernel: &Kernel,
        (planes, h, w): (usize, usize, usize),
        buffers: &[(u32, &wgpu::Buffer)],
        (flops, passes): (usize, usize),
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, h, w);
        let (len, out) = (planes * h * w, planes * h * w / 4);
        let all: Vec<(u32, &wgpu::Buffer)> = [(0, &u)].into_iter().chain(buffers.iter().copied()).collect();
        kernel.launch(ctx, groups_for(out), &all).with_cost(Cost::new(flops * out, passes * len + out))
    }

    /// `planes` planes of hw values into one mean each.
    pub fn gap_forward(
        &self,
        ctx: &GpuContext,
        planes: usize,
        hw: usize,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, hw, 1);
        self.gap_forward
            .launch(ctx, groups_for(planes), &[(0, &u), (1, x), (2, y)])
            .with_cost(Cost::new(planes * hw, planes * hw + planes))
    }

    /// dx from dy: each plane's gradient over its hw places, divided by hw.
    pub fn gap_backward(
        &self,
        ctx: &GpuContext,
        planes: usize,
        hw: usize,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, hw, 1);
        self.gap_backward
            .launch(ctx, groups_for(planes * hw), &[(0, &u), (1, dy), (2, dx)])
            .with_cost(Cost::new(planes * hw, planes * hw + planes))
    }
}
