//! The plain-Rust reference of every op, forward and backward, and the CPU executor built from them.
//! One file per op family, named as its shader in `shaders/`.

pub mod batchnorm;
pub mod conv;
pub mod dropout;
pub mod gemm;
pub mod loss;
pub mod net;
pub mod pool;
pub mod relu;
pub mod sgd;

pub use net::{CpuNet, DropoutMode, Mode};
