//! Launches shaders/conv1x1.wgsl.

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
    cout: u32,
    hw: u32,
    w_off: u32,
    _pad: [u32; 3],
}

fn dims(d: &ConvDims, w_off: usize) -> Dims {
    assert!(
        d.k == 1 && d.pad == 0,
        "conv1x1 launched with k = {}, pad = {}",
        d.k,
        d.pad
    );
    Dims {
        n: d.n as u32,
        cin: d.cin as u32,
        cout: d.cout as u32,
        hw: (d.h * d.w) as u32,
        w_off: w_off as u32,
        _pad: [0; 3],
    }
}

pub struct Conv1x1 {
    forward: Kernel,
    backward_data: Kernel,
    backward_weight: Kernel,
}

impl Conv1x1 {
    pub fn new(ctx: &GpuContext) -> Result<Conv1x1> {
        let mut k = compile(ctx, "conv1x1")?;
        Ok(Conv1x1 {
            forward: take(&mut k, "forward"),
            backward_data: take(&mut k, "backward_data"),
            backward_weight: take(&mut k, "backward_weight"),
        })
    }

    pub fn forward(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        x: &wgpu::Buffer,
        state: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Dispatch {
        let u = ctx.uniform("conv1x1 dims", &dims(d, w_off));
        self.forward.launch(
            ctx,
            groups_for(d.n * d.out_image()),
            &[(0, &u), (1, x), (2, state), (4, y)],
        )
    }

    pub fn backward_data(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        dy: &wgpu::Buffer,
        state: &wgpu::Buffer,
        dx: &wgpu::Buffer,
    ) -> Dispatch {
        let u = ctx.uniform("conv1x1 dims", &dims(d, w_off));
        self.backward_data.launch(
            ctx,
            groups_for(d.n * d.in_image()),
            &[(0, &u), (2, state), (3, dy), (4, dx)],
        )
    }

    pub fn backward_weight(
        &self,
        ctx: &GpuContext,
        d: &ConvDims,
        w_off: usize,
        x: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        grads: &wgpu::Buffer,
    ) -> Dispatch {
        let u = ctx.uniform("conv1x1 dims", &dims(d, w_off));
        self.backward_weight.launch(
            ctx,
            d.weight_len() as u32,
            &[(0, &u), (1, x), (3, dy), (5, grads)],
        )
    }
}
