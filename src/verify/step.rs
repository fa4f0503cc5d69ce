//! Whole training steps of a backend against the CPU backend, from the same state and batches.

use super::check::TOL_GRADIENTS;
use crate::backend::{Backend, StepParams};
use crate::cpu::backend::CpuBackend;
use crate::data::loader::Batch;
use crate::model::Model;
use crate::optim::{Optimizer, OptimizerKind};
use crate::train::schedule::OneCycle;
use anyhow::Result;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::check::{compare, Check, TOL_SUMS};

/// Per tensor of the model, the state and the optimizer's moments of `backend` against `reference`
/// (SGD's momenta, or Adam's two moments).
pub(super) async fn compare_tensors(
    what: &str,
    (model, optimizer): (&Model, OptimizerKind),
    backend: &mut dyn Backend,
    reference: &mut CpuBackend,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let (state, want_state) = (backend.state().await?, reference.state().await?);
    let (moments, want_moments) = (backend.moments().await?, reference.moments().await?);
    let slots: &[&str] = match optimizer {
        OptimizerKind::Sgd => &["momenta"],
        OptimizerKind::Adam | OptimizerKind::AdamW => &["exp_avg", "exp_avg_sq"],
    };
    for p in &model.params {
        let range = p.offset..p.offset + p.len;
        let shape = p.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let kind = if p.trainable { "parameters" } else { "running statistics" };
        // Adam's step is the gradient over its root mean square: the parameters it moves inherit the
        // gradients' relative error (Net3's batchnorm biases, which start at 0: up to 7.4e-6 on
        // lavapipe at batch 16), so they are held to the gradients' tolerance.
        let tolerance = if p.trainable && optimizer != OptimizerKind::Sgd { TOL_GRADIENTS } else { TOL_SUMS };
        checks.push(compare(
            &format!("{what} ({kind})"),
            &p.name,
            &shape,
            &state[range.clone()],
            &want_state[range.clone()],
            tolerance,
        ));
        for (slot, name) in slots.iter().enumerate().filter(|_| p.trainable) {
            let range = slot * model.num_trainable + p.offset..slot * model.num_trainable + p.offset + p.len;
            let (got, want) = (&moments[range.clone()], &want_moments[range]);
            checks.push(compare(&format!("{what} ({name})"), &p.name, &shape, got, want, TOL_GRADIENTS));
        }
    }
    Ok(checks)
}

/// A batch of `n` random images and labels. Dense random pixels rather than digits: a digit's constant
/// background makes equal values in a max-pool window, and which of them counts as the maximum then
/// depends on the last bit of each backend's arithmetic. Both choices are right, but they send a
/// gradient to different pixels (up to 1e-3 of conv4's largest weight gradient on real batch-100
/// data, measured on lavapipe), which would hide the kernels' own errors.
pub fn random_batch(model: &Model, n: usize, seed: u64) -> Batch {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    // About the range of normalized MNIST pixels, (0 - 0.1307) / 0.3081 to (1 - 0.1307) / 0.3081.
    let input = (0..n * model.input.len()).map(|_| g.random_range(-0.5f32..2.8)).collect();
    let classes = model.output_classes() as u8;
    let labels = (0..n).map(|_| g.random_range(0..classes)).collect();
    Batch { epoch: 0, index: seed as usize, input, labels }
}

impl StepChecks {
    fn add(&mut self, more: StepChecks) {
        self.checks.extend(more.checks);
        self.set_aside.extend(more.set_aside);
        self.batches += more.batches;
    }
}

/// Batches a whole-step comparison may set aside, one after another, for a decision at a near-tie.
const NEAR_TIE_RETRIES: usize = 5;

/// The comparisons of whole training steps, and the batches set aside on the way.
#[derive(Debug, Clone, Default)]
pub struct StepChecks {
    pub checks: Vec<Check>,
    /// One line per batch set aside: the step, the batch and the comparison that failed on it.
    pub set_aside: Vec<String>,
    /// Batches run in all.
    pub batches: usize,
}

impl StepChecks {
    /// A line on the batches set aside, for a reader of the checks.
    pub fn set_aside_line(&self) -> String {
        let mut line = format!("batches set aside for near-ties: {} of {}", self.set_aside.len(), self.batches);
        if !self.set_aside.is_empty() {
            line += &format!(" ({})", self.set_aside.join("; "));
        }
        line
    }
}

/// Runs `steps` consecutive training steps on random batches of `n` on the CPU reference, from the
/// model's seed-1 initialization and zero moments, and each of them on `backend` too, from the state and
/// moments the reference had before it. Per step, the loss; per tensor, the worst error over the steps.
///
/// Each step starts from the reference's state rather than the backend's own: a rounding difference
/// grows with every update of an independent run, which would measure the network's sensitivity, not
/// the kernels. And a step whose comparison fails is tried again on another batch (up to
/// NEAR_TIE_RETRIES times) before it counts as failed: about one activation in ten million sits within
/// rounding of a ReLU's zero or of its max-pool neighbour, and when the two backends decide such a tie
/// differently, a gradient goes to a different pixel (measured on lavapipe at batch 100: 3 of 21
/// steps, up to 1e-2 of a tensor's largest gradient). A wrong kernel or wiring fails on every batch; the
/// batches set aside are reported beside the checks.
pub(super) async fn run_steps(
    what: &str,
    model: &Model,
    backend: &mut dyn Backend,
    n: usize,
    steps: usize,
    params: impl Fn(usize) -> StepParams,
) -> Result<StepChecks> {
    let mut reference = CpuBackend::new(model, model.init_state(1));
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut worst: Vec<Check> = Vec::new();
    let mut set_aside = Vec::new();
    let mut batches = 0;
    for i in 0..steps {
        let (state, moments) = (reference.state().await?, reference.moments().await?);
        for attempt in 0..=NEAR_TIE_RETRIES {
            let batch = random_batch(model, n, 1000 * i as u64 + attempt as u64);
            batches += 1;
            let mut losses = [0.0f32; 2];
            for (b, loss) in [&mut *backend, &mut reference as &mut dyn Backend].into_iter().zip(&mut losses) {
                b.load(&state, &moments).await?;
                b.reset_sums().await?;
                b.train_step(&batch.input, &batch.labels, params(i)).await?;
                *loss = (b.train_sums().await?.loss_sum / n as f64) as f32;
            }
            let mut step = vec![compare(what, "loss", "", &[losses[0]], &[losses[1]], TOL_SUMS)];
            step.extend(compare_tensors(what, (model, params(i).optimizer.kind), backend, &mut reference).await?);
            let failed = step
                .iter()
                .filter(|c| !c.ok())
                .max_by(|a, b| (a.error / a.tolerance).total_cmp(&(b.error / b.tolerance)));
            if let (Some(f), true) = (failed, attempt < NEAR_TIE_RETRIES) {
                set_aside.push(format!("step {} batch {attempt}: {} {} {:.1e}", i + 1, f.kernel, f.layer, f.error));
                continue;
            }
            got.push(losses[0]);
            want.push(losses[1]);
            // The loss is compared over all steps below; the tensors keep their worst step.
            let tensors = step.split_off(1);
            if worst.is_empty() {
                worst = tensors;
            } else {
                for (w, c) in worst.iter_mut().zip(tensors) {
                    // A non-finite value's error is infinite, never NaN.
                    if c.error > w.error {
                        *w = c;
                    }
                }
            }
            break;
        }
    }
    let loss_what = if steps == 1 { "loss".to_string() } else { format!("losses of the {steps} steps") };
    let mut checks = vec![compare(what, "loss", &loss_what, &got, &want, TOL_SUMS)];
    checks.extend(worst);
    Ok(StepChecks { checks, set_aside, batches })
}

/// Whole training steps of `backend` against the CPU reference, on random batches of `n`: one step
/// without dropout (every parameter after SGD, the momenta, the running statistics, the loss), then,
/// when `dropout_steps` > 0, that many consecutive steps with dropout on (both draw the same masks;
/// momenta carry over, as in training), and as many again with AdamW (its two moments compared too),
/// each tensor's worst step reported. The backend is left holding the state of the last step.
pub async fn step_checks(
    model: &Model,
    backend: &mut dyn Backend,
    n: usize,
    dropout_steps: usize,
) -> Result<StepChecks> {
    let sgd = Optimizer::default();
    let one = |_| StepParams {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-5,
        dropout_seed: 7,
        step: 0,
        dropout: false,
        optimizer: sgd,
    };
    let mut all = run_steps("train step", model, backend, n, 1, one).await?;
    if dropout_steps > 0 {
        // The recipe's schedule, as training runs it.
        let schedule = OneCycle::recipe(12_000, 0.1);
        let recipe = |i: usize| {
            let (lr, momentum) = schedule.at(i);
            let (lr, momentum) = (lr as f32, momentum as f32);
            StepParams {
                lr,
                momentum,
                weight_decay: 1e-5,
                dropout_seed: 7,
                step: i as u32,
                dropout: true,
                optimizer: sgd,
            }
        };
        let what = format!("{dropout_steps} steps, dropout");
        all.add(run_steps(&what, model, backend, n, dropout_steps, recipe).await?);
        // The same steps with AdamW at the fast recipe's betas: the update's kernel in a whole step, its
        // moments carried over from step to step. Adam divides by sqrt(v) + eps, so a gradient near 0
        // moves its parameter by up to lr times its rounding over eps: at eps 1e-8 the last bit of a
        // gradient that cancels to about 1e-9 (fc1 of the fast recipe's network, measured on lavapipe)
        // moves the parameter by up to 5e-3 of lr either way. eps 1e-3 bounds that amplification, so
        // these rows still see a wrong moment or scalar; the kernel's rows check eps 1e-8 itself.
        let adamw = Optimizer { kind: OptimizerKind::AdamW, betas: (0.7, 0.9), eps: 1e-3 };
        let adam = |i: usize| StepParams { lr: 0.01, weight_decay: 0.01, optimizer: adamw, ..recipe(i) };
        let what = format!("{dropout_steps} steps, dropout, adamw");
        all.add(run_steps(&what, model, backend, n, dropout_steps, adam).await?);
    }
    Ok(all)
}
