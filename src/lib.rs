//! mnist-wgpu: the recipe's small CNN trained on MNIST, in WGSL compute shaders through raw wgpu,
//! checked against a plain-Rust CPU reference.
//!
//! Dependencies point one way, down this list:
//! - `train`: the epoch loop over a `Backend`, the one-cycle schedule, metrics, checkpoints; beside it
//!   `verify`: the GPU kernels and whole steps of a `Backend` against the CPU reference;
//! - `gpu` (wgpu, the shaders of `shaders/`, the fusion lowering, the GPU backend) and `cpu` (the
//!   plain reference and its executor `CpuNet`, the fast executor `FusedNet`, the CPU backend), side by
//!   side: neither imports the other (the GPU tests use the CPU reference as their oracle);
//! - `backend`: the Backend trait both implement;
//! - `checkpoint`: safetensors with PyTorch's state_dict names;
//! - `onnx`: a network and its weights as an ONNX model; `report`: a run's pictures and page;
//! - `model`: the network described once (each layer type in `model/layer.rs`), no wgpu; `data`: IDX
//!   files, augmentation, the loader threads; `bundle_summary`: the table that ends a GPU bundle's run
//!   (`dist/run.sh`), from the files it wrote; `memory`: what the process may still allocate.
//!
//! `docs/architecture.md` is the map: a training step's flow, where each op lives, how to add a layer.
//!
//! `model`, `data` and `checkpoint` build without features (the fuzz targets of `fuzz/` use them so);
//! the `engine` feature adds the executors, training and verify, which also build for a web page
//! (wasm32, see `web/`); the default `app` feature adds files, reports and the command line.

#[cfg(feature = "engine")]
pub mod backend;
#[cfg(feature = "app")]
pub mod bundle_summary;
pub mod checkpoint;
#[cfg(feature = "engine")]
pub mod cpu;
pub mod data;
#[cfg(feature = "engine")]
pub mod gpu;
#[cfg(feature = "engine")]
pub mod memory;
pub mod model;
#[cfg(feature = "app")]
pub mod onnx;
pub mod optim;
#[cfg(feature = "app")]
pub mod report;
#[cfg(feature = "engine")]
pub mod train;
#[cfg(feature = "engine")]
pub mod verify;
