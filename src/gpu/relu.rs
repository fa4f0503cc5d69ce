//! Launches shaders/relu.wgsl: a ReLU that no neighbour's kernel absorbs, and the backward of a ReLU
//! and dropout that a neighbour's forward epilogue ran.

use anyhow::Result;

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Cost, Dispatch, Kernel};
use super::uniform::uniform;

uniform! {
    pub(super) struct Dims {
        len: u32,
        drop_scale: f32,
        _p0: u32,
        _p1: u32,
    }
}

pub struct Relu {
    forward_in_place: Kernel,
    forward: Kernel,
    backward: Kernel,
    backward_dropout: Kernel,
}

impl Relu {
    pub fn new(ctx: &GpuContext) -> Result<Relu> {
        let mut k = compile(ctx, "relu")?;
        Ok(Relu {
            forward_in_place: take(&mut k, "forward_in_place"),
            forward: take(&mut k, "forward"),
            backward: take(&mut k, "backward"),
            backward_dropout: take(&mut k, "backward_dropout"),
        })
    }

    fn dims(ctx: &GpuContext, len: usize) -> wgpu::Buffer {
        ctx.uniform("relu dims", &Dims { len: len as u32, drop_scale: 1.0, _p0: 0, _p1: 0 })
    }

    /// y = relu(x) over `len` values; in place (`forward_in_place`) when x is None.
    pub fn forward(&self, ctx: &GpuContext, len: usize, x: Option<&wgpu::Buffer>, y: &wgpu::Buffer) -> Dispatch {
        let u = Self::dims(ctx, len);
        let d = match x {
            None => self.forward_in_place.launch(ctx, groups_for(len), &[(0, &u), (1, y)]),
            Some(x) => self.forward.launch(ctx, groups_for(len), &[(0, &u), (1, y), (2, x)]),
        };
        d.with_cost(Cost::new(len, 2 * len))
    }

    /// dx = dy where the forward's output y is positive, else 0.
    pub fn backward(
        &self,
        ctx: &GpuContext,
        len: usize,
        y: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let u = Self::dims(ctx, len);
        self.backward
            .launch(ctx, groups_for(len), &[(0, &u), (2, y), (3, dy), (4, dx)])
            .with_cost(Cost::new(len, 3 * len))
    }
    /// The backward of a ReLU and of the dropout of probability `p` after it, whose forwards ran in
    /// the epilogue before them: dx = dy * scale where the dropout's output y is positive, else 0.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_dropout(
        &self,
        ctx: &GpuContext,
        len: usize,
        p: f32,
        step: &wgpu::Buffer,
        y: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let drop_scale = super::dropout::mask_params(p).1;
        let u = ctx.uniform("relu dims", &Dims { len: len as u32, drop_scale, _p0: 0, _p1: 0 });
        self.backward_dropout
            .launch(ctx, groups_for(len), &[(0, &u), (2, y), (3, dy), (4, dx), (5, step)])
            .with_cost(Cost::new(2 * len, 3 * len))
    }
}
