//! The Backend trait the training loop is generic over, and its two implementations: the CPU
//! reference executor and the GPU executor.

use std::collections::HashMap;

use anyhow::Result;

use crate::cpu::sgd::SgdStep;
use crate::cpu::{CpuNet, DropoutMode};
use crate::gpu::net::SharedBuffers;
use crate::gpu::{GpuContext, GpuNet, Kernels, StepUniform};
use crate::model::Model;

/// What one training step needs besides the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub dropout_seed: u32,
    /// The global step index: it draws the step's dropout masks.
    pub step: u32,
    /// Dropout layers drop (training); false makes them the identity (as in the PyTorch fixture).
    pub dropout: bool,
}

/// Loss and correct-count sums over the batches since the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    pub loss_sum: f64,
    pub correct: u64,
}

pub trait Backend {
    /// A one-line description: the backend and, for the GPU, the adapter.
    fn describe(&self) -> String;
    /// One training step; its loss and correct count are added into the running sums.
    fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()>;
    /// The running sums of the training steps since the last `reset_sums` (may wait for the device).
    fn train_sums(&mut self) -> Result<Sums>;
    /// Evaluation-mode pass of one batch, added into the running sums.
    fn eval_batch(&mut self, input: &[f32], labels: &[u8]) -> Result<()>;
    /// `eval_batch`, and the batch's logits read back (n x classes).
    fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>>;
    /// The running sums of the evaluation batches since the last `reset_sums`.
    fn eval_sums(&mut self) -> Result<Sums>;
    fn reset_sums(&mut self) -> Result<()>;
    /// Parameters and running statistics (the model's flat state buffer).
    fn state(&mut self) -> Result<Vec<f32>>;
    /// SGD momentum buffers of the trainable prefix.
    fn momenta(&mut self) -> Result<Vec<f32>>;
    fn load(&mut self, state: &[f32], momenta: &[f32]) -> Result<()>;
}

pub struct CpuBackend {
    net: CpuNet,
    state: Vec<f32>,
    momenta: Vec<f32>,
    sums: Sums,
}

impl CpuBackend {
    pub fn new(model: &Model, state: Vec<f32>) -> CpuBackend {
        assert_eq!(state.len(), model.num_state);
        CpuBackend { net: CpuNet::new(model), state, momenta: vec![0.0; model.num_trainable], sums: Sums::default() }
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()> {
        let sgd = SgdStep { lr: p.lr, momentum: p.momentum, weight_decay: p.weight_decay };
        let dropout =
            if p.dropout { DropoutMode::Hash { seed: p.dropout_seed, step: p.step } } else { DropoutMode::Off };
        let out = self.net.train_step(&mut self.state, &mut self.momenta, input, labels, sgd, dropout);
        self.sums.loss_sum += out.loss as f64 * labels.len() as f64;
        self.sums.correct += out.correct as u64;
        Ok(())
    }

    fn train_sums(&mut self) -> Result<Sums> {
        Ok(self.sums)
    }

    fn eval_batch(&mut self, input: &[f32], labels: &[u8]) -> Result<()> {
        let out = self.net.evaluate(&mut self.state, input, labels);
        self.sums.loss_sum += out.loss as f64 * labels.len() as f64;
        self.sums.correct += out.correct as u64;
        Ok(())
    }

    fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>> {
        self.eval_batch(input, labels)?;
        Ok(self.net.logits().to_vec())
    }

    fn eval_sums(&mut self) -> Result<Sums> {
        Ok(self.sums)
    }

    fn reset_sums(&mut self) -> Result<()> {
        self.sums = Sums::default();
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<f32>> {
        Ok(self.state.clone())
    }

    fn momenta(&mut self) -> Result<Vec<f32>> {
        Ok(self.momenta.clone())
    }

    fn load(&mut self, state: &[f32], momenta: &[f32]) -> Result<()> {
        self.state.copy_from_slice(state);
        self.momenta.copy_from_slice(momenta);
        Ok(())
    }
}

/// A step's parameters as the shaders' per-step uniform.
fn step_uniform(p: StepParams) -> StepUniform {
    StepUniform {
        lr: p.lr,
        momentum: p.momentum,
        weight_decay: p.weight_decay,
        dropout_seed: p.dropout_seed,
        dropout_step: p.step,
        dropout_on: p.dropout as u32,
        _pad: [0; 2],
    }
}

/// The GPU backend: one executor per batch size seen (the last batch of an epoch may be smaller), all
/// over the same parameter buffers.
pub struct GpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    model: Model,
    shared: SharedBuffers,
    nets: HashMap<usize, GpuNet>,
}

impl GpuBackend {
    pub fn new(ctx: GpuContext, model: &Model, state: &[f32]) -> Result<GpuBackend> {
        let kernels = Kernels::new(&ctx)?;
        let shared = SharedBuffers::new(&ctx, model, state);
        Ok(GpuBackend { ctx, kernels, model: model.clone(), shared, nets: HashMap::new() })
    }

    /// The executor for `batch` images (built on first use) and the context to run it with.
    fn net(&mut self, batch: usize) -> Result<(&GpuNet, &GpuContext)> {
        if !self.nets.contains_key(&batch) {
            let net = GpuNet::with_shared(&self.ctx, &self.kernels, &self.model, batch, self.shared.clone())?;
            self.nets.insert(batch, net);
        }
        Ok((&self.nets[&batch], &self.ctx))
    }

    /// The device and the compiled kernels (to run single kernels, as `verify` does).
    pub fn parts(&self) -> (&GpuContext, &Kernels) {
        (&self.ctx, &self.kernels)
    }

    /// One training step with every kernel timed: (launch, nanoseconds) in order.
    pub fn profile_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<Vec<(String, f64)>> {
        let (net, ctx) = self.net(labels.len())?;
        net.profile_step(ctx, input, labels, step_uniform(p))
    }

    fn sums(&mut self) -> Result<Sums> {
        let m: Vec<f32> = self.ctx.read(&self.shared.metrics, 2)?;
        Ok(Sums { loss_sum: m[0] as f64, correct: m[1] as u64 })
    }
}

impl Backend for GpuBackend {
    fn describe(&self) -> String {
        format!("gpu: {} ({:?}, {:?})", self.ctx.info.name, self.ctx.info.backend, self.ctx.info.device_type)
    }

    fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()> {
        let (net, ctx) = self.net(labels.len())?;
        net.train_step(ctx, input, labels, step_uniform(p), false)?;
        Ok(())
    }

    fn train_sums(&mut self) -> Result<Sums> {
        self.sums()
    }

    fn eval_batch(&mut self, input: &[f32], labels: &[u8]) -> Result<()> {
        let (net, ctx) = self.net(labels.len())?;
        net.evaluate_batch(ctx, input, labels);
        Ok(())
    }

    fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>> {
        let (net, ctx) = self.net(labels.len())?;
        net.evaluate_batch(ctx, input, labels);
        net.read_logits(ctx)
    }

    fn eval_sums(&mut self) -> Result<Sums> {
        self.sums()
    }

    fn reset_sums(&mut self) -> Result<()> {
        self.ctx.write(&self.shared.metrics, &[0.0f32, 0.0]);
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<f32>> {
        self.ctx.read(&self.shared.state, self.model.num_state)
    }

    fn momenta(&mut self) -> Result<Vec<f32>> {
        self.ctx.read(&self.shared.momenta, self.model.num_trainable)
    }

    fn load(&mut self, state: &[f32], momenta: &[f32]) -> Result<()> {
        assert_eq!(state.len(), self.model.num_state);
        assert_eq!(momenta.len(), self.model.num_trainable);
        self.ctx.write(&self.shared.state, state);
        self.ctx.write(&self.shared.momenta, momenta);
        Ok(())
    }
}
