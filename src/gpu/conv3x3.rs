//! Launches shaders/conv3x3.wgsl.

use anyhow::Result;
use bytemuck::{Pod, Zeroable};

use super::context::GpuContext;
use super::kernel::{compile, groups_for, take, Dispatch, Kernel};
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
    _pad: [u32; 3],
}

fn dims(d: &ConvDims, w_off: usize) -> Dims {
    assert_eq!(d.k, 3, "conv3x3 launched with k = {}", d.k);
    Dims {
        n: d.n as u32,
        cin: d.cin as u32,
        h: d.h as u32,
        w: d.w as u32,
        cout: d.cout as u32,
        ho: d.ho() as u32,
        wo: d.wo() as u32,
        pad: d.pad as u32,
        w_off: w_off as u32,
        _pad: [0; 3],
    }
}

pub struct Conv3x3 {
    forward: Kernel,
    backward_data: Kernel,
    backward_weight: Kernel,
}

impl Conv3x3 {
    pub fn new(ctx: &GpuContext) -> Result<Conv3x3> {
        let mut k = compile(ctx, "conv3x3")?;
        Ok(Conv3x3 {
            forward: take(&mut k, "forward"),
            backward_data: take(&mut k, "backward_data"),
            backward_weight: take(&mut k, "backward_weight"),
        })
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
    ) -> Dispatch {
        let u = ctx.uniform("conv3x3 dims", &dims(d, w_off));
        self.forward.launch(
            ctx,
            groups_for(d.n * d.out_image()),
            &[(0, &u), (1, x), (2, state), (4, y)],
        )
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
    ) -> Dispatch {
        let u = ctx.uniform("conv3x3 dims", &dims(d, w_off));
        self.backward_data.launch(
            ctx,
            groups_for(d.n * d.in_image()),
            &[(0, &u), (2, state), (3, dy), (4, dx)],
        )
    }

    /// grads[w_off..] = dL/dweights from x and dy.
    pub fn backward_weight(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        grads: &wgpu::Buffer,
    ) -> Dispatch {
        let u = ctx.uniform("conv3x3 dims", &dims(d, w_off));
        self.backward_weight.launch(
            ctx,
            d.weight_len() as u32,
            &[(0, &u), (1, x), (3, dy), (5, grads)],
        )
    }
}
