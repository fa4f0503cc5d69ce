//! One comparison of a backend's result with the CPU reference (`Check`), how it is measured
//! (`compare`, `compare_exact`), the tolerances (see the module `verify` for why each), and the
//! helpers every op's checks share: seeded random inputs, a buffer read back, the table's rows.

use anyhow::Result;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use crate::gpu::GpuContext;

pub const TOL_EXACT: f64 = 0.0;
pub const TOL_ELEMENTWISE: f64 = 1e-6;
pub const TOL_SUMS: f64 = 1e-5;
pub const TOL_GRADIENTS: f64 = 2e-5;

/// The smallest scale an error is taken relative to, so an all-zero tensor is compared absolutely.
const SCALE_FLOOR: f32 = 1e-6;

/// One comparison of a GPU (or other backend's) result with the CPU reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The kernel (`conv.forward`) or the step (`train step 1`) that produced the result.
    pub kernel: String,
    /// The layer or the tensor (`conv2`, `bn3.running_var`).
    pub layer: String,
    pub shape: String,
    /// Largest |got - want| relative to the largest |want|; for exact checks, the fraction that differs.
    /// Infinite when a value is not finite.
    pub error: f64,
    pub tolerance: f64,
    /// What went wrong beyond the number, or what else a reader should know.
    pub detail: Option<String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": self.kernel, "layer": self.layer, "shape": self.shape,
            // JSON has no infinity: a non-finite error is null, and `ok` says the rest.
            "error": if self.error.is_finite() { Some(self.error) } else { None },
            "tolerance": self.tolerance, "ok": self.ok(), "detail": self.detail,
        })
    }
}

/// max |got - want| / max(max |want|, floor): the error relative to the tensor's largest value.
/// Infinite when either side holds a non-finite value or the lengths differ.
pub fn rel_err(got: &[f32], want: &[f32], floor: f32) -> f64 {
    if got.len() != want.len() || got.iter().chain(want).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs())) as f64;
    got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).abs()).fold(0.0, f64::max) / scale
}

/// Compares `got` with the reference `want`, as one row.
pub fn compare(kernel: &str, layer: &str, shape: &str, got: &[f32], want: &[f32], tolerance: f64) -> Check {
    let error = rel_err(got, want, SCALE_FLOOR);
    let detail = if got.len() != want.len() {
        Some(format!("{} values, the reference has {}", got.len(), want.len()))
    } else if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        Some(format!("non-finite value {} at index {i}", got[i]))
    } else if let Some(i) = want.iter().position(|v| !v.is_finite()) {
        Some(format!("the reference is non-finite ({}) at index {i}", want[i]))
    } else if error > tolerance {
        let worst = (0..got.len()).max_by(|&a, &b| (got[a] - want[a]).abs().total_cmp(&(got[b] - want[b]).abs()));
        worst.map(|i| format!("worst at index {i}: {} against {}", got[i], want[i]))
    } else {
        None
    };
    Check { kernel: kernel.into(), layer: layer.into(), shape: shape.into(), error, tolerance, detail }
}

/// Compares values that must agree exactly (`what`: "winners", "mask"); the error is the fraction that differs.
pub fn compare_exact<T: PartialEq + std::fmt::Debug>(
    kernel: &str,
    layer: &str,
    shape: &str,
    what: &str,
    got: &[T],
    want: &[T],
) -> Check {
    let (error, detail) = if got.len() != want.len() {
        (f64::INFINITY, Some(format!("{} {what}, the reference has {}", got.len(), want.len())))
    } else {
        let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        match differ.first() {
            None => (0.0, None),
            Some(&i) => (
                differ.len() as f64 / got.len() as f64,
                Some(format!(
                    "{} of {} {what} differ; first at index {i}: {:?} against {:?}",
                    differ.len(),
                    got.len(),
                    got[i],
                    want[i]
                )),
            ),
        }
    };
    Check { kernel: kernel.into(), layer: layer.into(), shape: shape.into(), error, tolerance: TOL_EXACT, detail }
}

pub(crate) fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len).map(|_| g.random_range(-scale..scale)).collect()
}

pub(crate) fn nchw(n: usize, c: usize, h: usize, w: usize) -> String {
    format!("{n}x{c}x{h}x{w}")
}

/// Runs launches and reads one buffer back.
pub(crate) async fn read(ctx: &GpuContext, b: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
    ctx.read(b, len).await
}

/// The largest error among `checks` as a share of its tolerance (exact checks, of tolerance 0, left out).
pub fn worst_ratio(checks: &[Check]) -> f64 {
    checks.iter().filter(|c| c.tolerance > 0.0).map(|c| c.error / c.tolerance).fold(0.0, f64::max)
}

/// The failed checks as lines, for an error message.
pub fn failures(checks: &[Check]) -> Vec<String> {
    checks.iter().filter(|c| !c.ok()).map(format_row).collect()
}

/// One row of the table `verify` prints.
pub fn format_row(c: &Check) -> String {
    let err = if c.error.is_finite() { format!("{:.2e}", c.error) } else { "non-finite".into() };
    let mut row = format!(
        "{:<56} {:<16} {:<46} {:>10} {:>8} {}",
        c.kernel,
        c.layer,
        c.shape,
        err,
        format!("{:.0e}", c.tolerance),
        if c.ok() { "ok" } else { "FAIL" }
    );
    if let Some(d) = &c.detail {
        row += &format!("  ({d})");
    }
    row
}

pub fn header() -> String {
    format!("{:<56} {:<16} {:<46} {:>10} {:>8} {}", "kernel", "layer", "shape", "max error", "tol", "result")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_passes_within_tolerance_and_fails_beyond_it() {
        let want = [1.0f32, -2.0, 4.0];
        assert!(compare("k", "l", "3", &[1.0, -2.0, 4.0], &want, 0.0).ok());
        // About 2e-5 off a largest value of 4: 5e-6 relative, within 1e-5 and beyond 4e-6.
        let c = compare("k", "l", "3", &[1.0, -2.0, 4.00002], &want, 1e-5);
        assert!((c.error - 5e-6).abs() < 1e-6 && c.ok(), "{c:?}");
        assert!(!compare("k", "l", "3", &[1.0, -2.0, 4.00002], &want, 4e-6).ok());
        let c = compare("k", "l", "3", &[1.0, -2.1, 4.0], &want, 1e-5);
        assert!(!c.ok());
        assert!(c.detail.as_deref().unwrap().contains("index 1"), "{c:?}");
        assert!(format_row(&c).contains("FAIL"));
    }

    #[test]
    fn non_finite_values_and_wrong_lengths_fail_whatever_the_tolerance() {
        for got in [[f32::NAN, 0.0], [0.0, f32::INFINITY]] {
            let c = compare("k", "l", "2", &got, &[0.0, 0.0], f64::MAX);
            assert!(!c.ok() && c.detail.as_deref().unwrap().contains("non-finite"), "{c:?}");
            assert!(format_row(&c).contains("non-finite"));
        }
        assert!(!compare("k", "l", "2", &[0.0, 0.0], &[f32::NAN, 0.0], f64::MAX).ok());
        assert!(!compare("k", "l", "2", &[0.0], &[0.0, 0.0], f64::MAX).ok());
        assert_eq!(compare("k", "l", "2", &[f32::NAN], &[0.0], 1.0).to_json()["error"], serde_json::Value::Null);
    }

    #[test]
    fn exact_checks_count_what_differs() {
        assert!(compare_exact("k", "l", "4", "winners", &[1u32, 2, 3, 0], &[1, 2, 3, 0]).ok());
        let c = compare_exact("k", "l", "4", "winners", &[1u32, 2, 3, 0], &[1, 2, 0, 0]);
        assert!(!c.ok() && c.error == 0.25, "{c:?}");
        assert!(c.detail.unwrap().starts_with("1 of 4 winners differ; first at index 2"));
    }
}
