//! Launches shaders/pool.wgsl: max and average pooling 2x2, and global average pooling. `forward` and `backward`
//! launch any pooling layer, so the executor knows none by name.

use anyhow::Result;

use crate::model::{Layer, Shape};

use super::context::GpuContext;
use super::dropout::FusedDropout;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    pub(super) struct Dims {
        planes: u32,
        h: u32,
        w: u32,
        drop_layer: u32,
        drop_threshold: u32,
        drop_scale: f32,
        _p0: u32,
        _p1: u32,
    }
}

/// What a 2x2 pooling's forward applies after it, each an entry point of pool.wgsl.
#[derive(Clone, Copy)]
pub enum PoolEpilogue<'a> {
    None,
    /// `*_forward_relu`: the ReLU after it.
    Relu,
    /// `*_forward_relu_dropout`: the ReLU, then the dropout after it (masks from `step`).
    ReluDropout(FusedDropout, &'a wgpu::Buffer),
}

pub struct Pool {
    maxpool_forward: Kernel,
    maxpool_forward_relu: Kernel,
    maxpool_forward_relu_dropout: Kernel,
    maxpool_backward: Kernel,
    avgpool2_forward: Kernel,
    avgpool2_forward_relu: Kernel,
    avgpool2_forward_relu_dropout: Kernel,
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
            maxpool_forward_relu_dropout: take(&mut k, "maxpool_forward_relu_dropout"),
            maxpool_backward: take(&mut k, "maxpool_backward"),
            avgpool2_forward: take(&mut k, "avgpool2_forward"),
            avgpool2_forward_relu: take(&mut k, "avgpool2_forward_relu"),
            avgpool2_forward_relu_dropout: take(&mut k, "avgpool2_forward_relu_dropout"),
            avgpool2_backward: take(&mut k, "avgpool2_backward"),
            gap_forward: take(&mut k, "gap_forward"),
            gap_backward: take(&mut k, "gap_backward"),
        })
    }

    /// Pooling layer `layer` over `planes` planes of `s.h` x `s.w`: x into y, through what `epilogue`
    /// says after a 2x2 pooling in the same launch.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ctx: &GpuContext,
        layer: &Layer,
        planes: usize,
        s: Shape,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        epilogue: PoolEpilogue,
    ) -> Dispatch {
        use PoolEpilogue as E;
        // Per window: three comparisons for the maximum; three additions and a division for the mean;
        // one more for the ReLU, one for the dropout.
        let (kernel, flops) = match (layer, epilogue) {
            (Layer::MaxPool2, E::None) => (&self.maxpool_forward, 3),
            (Layer::MaxPool2, E::Relu) => (&self.maxpool_forward_relu, 4),
            (Layer::MaxPool2, E::ReluDropout(..)) => (&self.maxpool_forward_relu_dropout, 5),
            (Layer::AvgPool2, E::None) => (&self.avgpool2_forward, 4),
            (Layer::AvgPool2, E::Relu) => (&self.avgpool2_forward_relu, 5),
            (Layer::AvgPool2, E::ReluDropout(..)) => (&self.avgpool2_forward_relu_dropout, 6),
            (Layer::GlobalAvgPool, E::None) => return self.gap_forward(ctx, planes, s.h * s.w, x, y),
            (other, _) => unreachable!("{other:?} with an epilogue: no such pooling kernel"),
        };
        let mut dims = Self::plain_dims(planes, s.h, s.w);
        let mut buffers = vec![(1, x), (2, y)];
        if let E::ReluDropout(dropout, step) = epilogue {
            (dims.drop_threshold, dims.drop_scale) = super::dropout::mask_params(dropout.p);
            dims.drop_layer = dropout.layer as u32;
            buffers.push((4, step));
        }
        self.windows(ctx, kernel, dims, &buffers, (flops, 1))
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
        let dims = Self::plain_dims(planes, s.h, s.w);
        match layer {
            Layer::MaxPool2 => self.windows(ctx, &self.maxpool_backward, dims, &[(1, x), (2, dx), (3, dy)], (3, 2)),
            Layer::AvgPool2 => self.windows(ctx, &self.avgpool2_backward, dims, &[(2, dx), (3, dy)], (1, 1)),
            Layer::GlobalAvgPool => self.gap_backward(ctx, planes, s.h * s.w, dy, dx),
            other => unreachable!("{other:?} is not a pooling"),
        }
    }

    fn plain_dims(planes: usize, h: usize, w: usize) -> Dims {
        let (planes, h, w) = (planes as u32, h as u32, w as u32);
        Dims { planes, h, w, drop_layer: 0, drop_threshold: 0, drop_scale: 1.0, _p0: 0, _p1: 0 }
    }

    fn dims(ctx: &GpuContext, planes: usize, h: usize, w: usize) -> wgpu::Buffer {
        ctx.uniform("pool dims", &Self::plain_dims(planes, h, w))
    }

    /// One invocation per 2x2 window of `planes` planes of h x w, binding `buffers` besides the uniform;
    /// its cost: `flops` per window, the input read (or dx written) `passes` times, one value per window.
    fn windows(
        &self,
        ctx: &GpuContext,
        kernel: &Kernel,
        dims: Dims,
        buffers: &[(u32, &wgpu::Buffer)],
        (flops, passes): (usize, usize),
    ) -> Dispatch {
        let u = ctx.uniform("pool dims", &dims);
        let len = (dims.planes * dims.h * dims.w) as usize;
        let out = len / 4;
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
