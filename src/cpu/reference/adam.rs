//! Adam and AdamW over the flat parameter buffer, PyTorch's single-tensor semantics
//! (`torch.optim.Adam` / `AdamW`, `foreach=False`), with the step's scalars from `optim::AdamScalars`:
//! g += l2 * p (Adam); p *= decay (AdamW); m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g * g;
//! p += (-step_size * m) / (sqrt(v) / bc2_sqrt + eps).

use crate::cpu::isa::vectorized;
use crate::optim::AdamScalars;

/// PyTorch's `lerp`: the form it takes depends on whether the weight is below one half.
pub fn lerp(from: f32, to: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        from + weight * (to - from)
    } else {
        to - (to - from) * (1.0 - weight)
    }
}

vectorized! {
    /// Updates `params` and the moments `m` and `v`; returns whether any updated value is non-finite.
    pub fn adam_update(s: &AdamScalars, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32]) -> bool {
        assert!(params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len());
        let mut nonfinite = false;
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g + s.l2 * *p;
            *p *= s.decay;
            *m = lerp(*m, g, s.one_minus_beta1);
            *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
            let denom = v.sqrt() / s.bc2_sqrt + s.eps;
            *p += -s.step_size * *m / denom;
            nonfinite |= !p.is_finite() || !m.is_finite() || !v.is_finite();
        }
        nonfinite
    }
}
