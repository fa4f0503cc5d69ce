//! mnist-wgpu: the recipe's small CNN trained on MNIST, in WGSL compute shaders through raw wgpu,
//! checked against a plain-Rust CPU reference.
//!
//! Layers, each depending only on those listed after it: `cpu` (reference ops and the CPU executor),
//! `train` (schedule), `model` (the network described once), `data` (IDX files).

pub mod backend;
pub mod checkpoint;
pub mod cpu;
pub mod data;
pub mod gpu;
pub mod model;
pub mod train;
