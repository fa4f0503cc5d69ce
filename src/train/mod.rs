//! Training: the one-cycle schedule.

pub mod schedule;
