//! The CPU side: two executors of the same plan behind one trait (`executor.rs`), and the backend.
//!
//! - `reference/`: the plain reference of every op and `CpuNet`, which runs them op by op: what
//!   `verify`, the gradient checks and the GPU parity tests read against;
//! - `fused/`: `FusedNet`, the fast executor the CPU backend trains with (per-image passes between the
//!   batch's sync points, register-block products with FMA), held to the reference by the tests;
//! - shared by both: `executor.rs` (the trait: a training step, an evaluation, a profiled step),
//!   `isa.rs` (the instruction set the element-wise kernels run with), `scratch.rs` (per-thread
//!   scratch buffers), `profile.rs` (each op's FLOPs and bytes, the machine's peak);
//! - `backend.rs`: the CPU `Backend` over `FusedNet`.
//!
//! Dependencies point one way: `fused` reads `reference`, never the reverse.

pub mod backend;
pub mod executor;
pub mod fused;
pub mod isa;
pub mod profile;
pub mod reference;
pub mod scratch;

pub use executor::{DropoutMode, Executor, Mode, StepOut, Update};
pub use fused::FusedNet;
pub use reference::net::CpuNet;
