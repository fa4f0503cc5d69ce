//! The GPU backend: raw wgpu device setup (`context`, with the limits the kernels need, `limits`),
//! compute pipelines and launches (`kernel`), one launcher per shader of `shaders/` (named after it; `update` holds what the two
//! updates share),
//! the uniforms they share with WGSL (`uniform`), the fusion lowering that lists a step's launches
//! (`fusion`), the executor that records them (`net`), chunk streaming and the Backend over it.
//! Depends on `model`, `data` and the `backend` trait; nothing depends on it but the trainer, verify
//! and the CLI.

pub mod adam;
pub mod backend;
pub mod batchnorm;
pub mod context;
pub mod conv;
pub mod dropout;
pub mod fusion;
pub mod kernel;
pub mod limits;
pub mod loss;
pub mod net;
pub mod pool;
pub mod relu;
pub mod sgd;
pub mod stream;
pub mod uniform;
pub mod update;

#[cfg(not(target_arch = "wasm32"))]
pub use context::list_adapters;
pub use context::{GpuContext, INSTALL_HINT};
pub use net::{GpuNet, Kernels, Metrics};
pub use update::StepUniform;
