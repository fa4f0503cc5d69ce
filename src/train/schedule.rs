//! PyTorch's OneCycleLR as the recipe configures it: two cosine phases, lr from max_lr / div_factor up
//! to max_lr and down to (max_lr / div_factor) / final_div_factor, momentum mirrored between max and base.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneCycle {
    pub total_steps: usize,
    pub max_lr: f64,
    pub pct_start: f64,
    pub div_factor: f64,
    pub final_div_factor: f64,
    pub base_momentum: f64,
    pub max_momentum: f64,
}

impl OneCycle {
    /// The recipe's schedule over `total_steps` steps (12,000 for 20 epochs of 600 steps).
    pub fn recipe(total_steps: usize, max_lr: f64) -> OneCycle {
        OneCycle {
            total_steps,
            max_lr,
            pct_start: 0.3,
            div_factor: 10.0,
            final_div_factor: 100.0,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }

    /// The (lr, momentum) that step `k` (0-based) uses.
    pub fn at(&self, k: usize) -> (f64, f64) {
        let initial_lr = self.max_lr / self.div_factor;
        let min_lr = initial_lr / self.final_div_factor;
        // PyTorch: the first phase ends at float(pct_start * total_steps) - 1.
        let phase1_end = self.pct_start * self.total_steps as f64 - 1.0;
        let last = self.total_steps as f64 - 1.0;
        let k = k as f64;
        let cos = |a: f64, b: f64, t: f64| b + (a - b) / 2.0 * (1.0 + (std::f64::consts::PI * t).cos());
        if k <= phase1_end {
            let t = k / phase1_end;
            (cos(initial_lr, self.max_lr, t), cos(self.max_momentum, self.base_momentum, t))
        } else {
            let t = (k - phase1_end) / (last - phase1_end);
            (cos(self.max_lr, min_lr, t), cos(self.base_momentum, self.max_momentum, t))
        }
    }
}
