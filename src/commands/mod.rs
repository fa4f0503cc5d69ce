//! The command line's measuring and checking commands: `bench` and `profile` (bench.rs), `verify`.

pub mod bench;
pub mod verify;
