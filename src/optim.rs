//! Which optimizer a run uses and its fixed settings, as PyTorch names them: SGD with momentum (the
//! recipe's), Adam, or AdamW. Per step the schedule adds the learning rate (and SGD's momentum); the
//! update itself lives beside each executor (`cpu/reference/{sgd,adam}.rs`, `shaders/{sgd,adam}.wgsl`).
//! Knows nothing of wgpu.

use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `torch.optim.SGD` with momentum: the recipe's.
    #[default]
    Sgd,
    /// `torch.optim.Adam`: weight decay added to the gradient (L2).
    Adam,
    /// `torch.optim.AdamW`: weight decay applied to the parameters (decoupled).
    AdamW,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        }
    }

    pub fn parse(s: &str) -> Result<OptimizerKind> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            _ => bail!("unknown optimizer {s:?}: expected sgd, adam or adamw"),
        }
    }

    /// PyTorch's default weight decay, except SGD's, which is the recipe's.
    pub fn default_weight_decay(self) -> f32 {
        match self {
            OptimizerKind::Sgd => 1e-5,
            OptimizerKind::Adam => 0.0,
            OptimizerKind::AdamW => 0.01,
        }
    }
}

/// The optimizer and the settings that stay fixed over a run (Adam's betas and eps; SGD has none: its
/// momentum follows the one-cycle schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub betas: (f64, f64),
    pub eps: f64,
}

/// PyTorch's defaults for Adam and AdamW.
pub const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
pub const ADAM_EPS: f64 = 1e-8;

impl Default for Optimizer {
    fn default() -> Optimizer {
        Optimizer { kind: OptimizerKind::Sgd, betas: ADAM_BETAS, eps: ADAM_EPS }
    }
}

impl Optimizer {
    /// What is wrong with these settings, if anything (PyTorch refuses the same values).
    pub fn fault(&self) -> Option<String> {
        let (b1, b2) = self.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            Some(format!("betas must each be at least 0 and below 1, not ({b1}, {b2})"))
        } else if !(self.eps.is_finite() && self.eps >= 0.0) {
            Some(format!("eps must be a number of at least 0, not {}", self.eps))
        } else {
            None
        }
    }
}

/// What is wrong with a weight decay, if anything.
pub fn weight_decay_fault(weight_decay: f32) -> Option<String> {
    match weight_decay.is_finite() && weight_decay >= 0.0 {
        true => None,
        false => Some(format!("weight decay must be a number of at least 0, not {weight_decay}")),
    }
}

/// One Adam or AdamW step's scalars. PyTorch computes them in Python (double precision) from the
/// step count and hands them to its float kernels; here too, so that every backend takes the same f32s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamScalars {
    /// 1 - beta1: the weight of `exp_avg.lerp_(grad, 1 - beta1)`.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// lr / (1 - beta1^t).
    pub step_size: f32,
    /// sqrt(1 - beta2^t).
    pub bc2_sqrt: f32,
    /// Added to the gradient times the parameter (Adam's L2); 0 for AdamW.
    pub l2: f32,
    /// The parameter's factor before the step: 1 - lr * weight_decay for AdamW, 1 for Adam.
    pub decay: f32,
}

impl Optimizer {
    /// The scalars of update number `t` (from 1) at learning rate `lr`.
    pub fn adam_scalars(&self, lr: f64, weight_decay: f64, t: u64) -> AdamScalars {
        let (b1, b2) = self.betas;
        let t = t.max(1) as i32;
        let decoupled = self.kind == OptimizerKind::AdamW;
        AdamScalars {
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: self.eps as f32,
            step_size: (lr / (1.0 - b1.powi(t))) as f32,
            bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
            l2: if decoupled { 0.0 } else { weight_decay as f32 },
            decay: if decoupled { (1.0 - lr * weight_decay) as f32 } else { 1.0 },
        }
    }
}

/// Moment buffers per trainable parameter that every backend keeps: SGD's momentum (or Adam's first
/// moment) in the first `num_trainable` values, Adam's second moment in the next (zero under SGD).
pub const MOMENT_SLOTS: usize = 2;

/// Parses `--betas B1,B2`.
pub fn parse_betas(s: &str) -> Result<(f64, f64)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [b1, b2] = parts[..] else { bail!("--betas {s:?}: expected two numbers, B1,B2 (e.g. 0.9,0.999)") };
    let num = |v: &str| v.parse::<f64>().map_err(|e| anyhow::anyhow!("--betas {s:?}: {v:?} is not a number ({e})"));
    Ok((num(b1)?, num(b2)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_bad_settings_are_named() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::AdamW] {
            assert_eq!(OptimizerKind::parse(kind.name()).unwrap(), kind);
        }
        assert!(OptimizerKind::parse("rmsprop").unwrap_err().to_string().contains("sgd, adam or adamw"));
        assert_eq!(parse_betas("0.7, 0.9").unwrap(), (0.7, 0.9));
        assert!(parse_betas("0.7").is_err() && parse_betas("a,b").is_err());
        let bad = Optimizer { betas: (1.0, 0.9), ..Optimizer::default() };
        assert!(bad.fault().unwrap().contains("betas"));
        assert!(Optimizer { eps: -1.0, ..Optimizer::default() }.fault().unwrap().contains("eps"));
        assert_eq!(Optimizer::default().fault(), None);
    }
}
