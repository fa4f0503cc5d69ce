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

    /// `planes` planes of h x w (given as (planes, h, w)) into h/2 x w/2.
    pub fn maxpool_forward(
        &self,
        ctx: &GpuContext,
        (planes, h, w): (usize, usize, usize),
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, h, w);
        let (len, out) = (planes * h * w, planes * h * w / 4);
        // Three comparisons per window; the window read, its maximum written.
        self.maxpool_forward
            .launch(ctx, groups_for(out), &[(0, &u), (1, x), (2, y)])
            .with_cost(Cost::new(3 * out, len + out))
    }

    /// dx from dy, each window's gradient routed to its maximum in the forward input x.
    pub fn maxpool_backward(
        &self,
        ctx: &GpuContext,
        (planes, h, w): (usize, usize, usize),
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, h, w);
        let (len, out) = (planes * h * w, planes * h * w / 4);
        self.maxpool_backward
            .launch(ctx, groups_for(out), &[(0, &u), (1, x), (2, dx), (3, dy)])
            .with_cost(Cost::new(3 * out, 2 * len + out))
    }

    /// `planes` planes of h x w (given as (planes, h, w)) into h/2 x w/2, each the mean of its window.
    pub fn avgpool2_forward(
        &self,
        ctx: &GpuContext,
        (planes, h, w): (usize, usize, usize),
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, h, w);
        let (len, out) = (planes * h * w, planes * h * w / 4);
        // Three additions and a division per window.
        self.avgpool2_forward
            .launch(ctx, groups_for(out), &[(0, &u), (1, x), (2, y)])
            .with_cost(Cost::new(4 * out, len + out))
    }

    /// dx from dy: a quarter of each window's gradient to each of its places.
    pub fn avgpool2_backward(
        &self,
        ctx: &GpuContext,
        (planes, h, w): (usize, usize, usize),
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, planes, h, w);
        let (len, out) = (planes * h * w, planes * h * w / 4);
        self.avgpool2_backward
            .launch(ctx, groups_for(out), &[(0, &u), (2, dx), (3, dy)])
            .with_cost(Cost::new(out, len + out))
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
