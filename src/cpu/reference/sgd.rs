//! The recipe's SGD update over the flat parameter buffer, PyTorch semantics:
//! g += weight_decay * p; buf = momentum * buf + g; p -= lr * buf.
//! With buf starting at zero, the first step gives buf = g exactly, as PyTorch's first step does.

use crate::cpu::isa::vectorized;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

vectorized! {
    /// Updates `params` and `momenta`; returns whether any updated value is non-finite (the run diverged).
    pub fn sgd_update(step: SgdStep, params: &mut [f32], grads: &[f32], momenta: &mut [f32]) -> bool {
        assert!(params.len() == grads.len() && grads.len() == momenta.len());
        let mut nonfinite = false;
        for ((p, &g), buf) in params.iter_mut().zip(grads).zip(momenta.iter_mut()) {
            let g = g + step.weight_decay * *p;
            *buf = step.momentum * *buf + g;
            *p -= step.lr * *buf;
            nonfinite |= !p.is_finite() || !buf.is_finite();
        }
        nonfinite
    }
}
