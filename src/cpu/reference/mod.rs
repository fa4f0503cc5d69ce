//! The plain reference: every op forward and backward, written for clarity over the whole batch, and
//! `CpuNet`, which runs the plan op by op with them. `verify`, the gradient checks, the PyTorch golden
//! tests, the fused executor's tests and the GPU parity tests all read against it. One file per op
//! family, named as its shader in `shaders/` (`gemm.rs`, the matrix product, and `net.rs`, the
//! executor, have none).

pub mod adam;
pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod gemm;
pub mod loss;
pub mod net;
pub mod pool;
pub mod relu;
pub mod sgd;
