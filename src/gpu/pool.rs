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
    maxpool_backward: Kernel,
    avgpool2_forward: Kernel,
    avgpool2_backward: Kernel,
    gap_forward: Kernel,
    gap_backward: Kernel,
}

impl Pool {
    pub fn new(ctx: &GpuContext) -> Result<Pool> {
        let mut k = compile(ctx, "pool")?;
        Ok(Pool {
            maxpool_forward: take(&mut k, "maxpool_forward"),
            maxpool_backward: take(&mut k, "maxpool_backward"),
            avgpool2_forward: take(&mut k, "avgpool2_forward"),
            avgpool2_backward: take(&mut k, "avgpool2_backward"),
            gap_forward: take(&mut k, "gap_forward"),
            gap_backward: take(&mut k, "gap_backward"),
        })
    }

    /// Pooling layer `layer` over `planes` planes of `s.h` x `s.w`: x into y.
    pub fn forward(
        &self,
        ctx: &GpuContext,
        layer: &Layer,
        planes: usize,
        s: Shape,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        match layer {
            Layer::MaxPool2 => self.maxpool_forward(ctx, (planes, s.h, s.w), x, y),
            Layer::AvgPool2 => self.avgpool2_forward(ctx, (planes, s.h, s.w), x, y),
            Layer::GlobalAvgPool => self.gap_forward(ctx, planes, s.h * s.w, x, y),
            other => unreachable!("{other:?} is not a pooling"),
        }
    }

    /// dx from dy for pooling layer `layer`, whose forward input was x.
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
        match layer {
            Layer::MaxPool2 => self.maxpool_backward(ctx, (planes, s.h, s.w), x, dy, dx),
            Layer::AvgPool2 => self.avgpool2_backward(ctx, (planes, s.h, s.w), dy, dx),
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

    /// `planes` planes of h x w (given as (planes, h, w)) into h/2 x w/2: three comparisons per window.
    pub fn maxpool_forward(
        &self,
        ctx: &GpuContext,
        dims: (usize, usize, usize),
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        self.windows(ctx, &self.maxpool_forward, dims, &[(1, x), (2, y)], (3, 1))
    }

    /// dx from dy, each window's gradient routed to its maximum in the forward input x.
    pub fn maxpool_backward(
        &self,
        ctx: &GpuContext,
        dims: (usize, usize, usize),
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        self.windows(ctx, &self.maxpool_backward, dims, &[(1, x), (2, dx), (3, dy)], (3, 2))
    }

    /// `planes` planes of h x w (given as (planes, h, w)) into h/2 x w/2, each the mean of its window:
    /// three additions and a division.
    pub fn avgpool2_forward(
        &self,
        ctx: &GpuContext,
        dims: (usize, usize, usize),
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        self.windows(ctx, &self.avgpool2_forward, dims, &[(1, x), (2, y)], (4, 1))
    }

    /// dx from dy: a quarter of each window's gradient to each of its places.
    pub fn avgpool2_backward(
        &self,
        ctx: &GpuContext,
        dims: (usize, usize, usize),
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        self.windows(ctx, &self.avgpool2_backward, dims, &[(2, dx), (3, dy)], (1, 1))
    }

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
