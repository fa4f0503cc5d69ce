//! The CPU backend: the fused executor (`FusedNet`, checked against the plain reference `CpuNet` in the
//! tests) training and evaluating one batch at a time, never waiting.

use anyhow::Result;
use async_trait::async_trait;

use crate::backend::{chunk_batch_size, schedule_span, Backend, StepParams, Sums, GIB};
use crate::cpu::executor::Update;
use crate::cpu::{CpuNet, DropoutMode, Executor, FusedNet};
use crate::data::loader::Batch;
use crate::model::Model;
use crate::optim::MOMENT_SLOTS;

pub struct CpuBackend {
    net: FusedNet,
    state: Vec<f32>,
    moments: Vec<f32>,
    sums: Sums,
    schedule: Vec<StepParams>,
    /// Training batches since the last reset.
    trained: usize,
}

impl CpuBackend {
    pub fn new(model: &Model, state: Vec<f32>) -> CpuBackend {
        assert_eq!(state.len(), model.num_state);
        CpuBackend {
            net: FusedNet::new(model),
            state,
            moments: vec![0.0; MOMENT_SLOTS * model.num_trainable],
            sums: Sums::default(),
            schedule: Vec::new(),
            trained: 0,
        }
    }
}

impl CpuBackend {
    /// An evaluation-mode pass of one batch, added into the running sums.
    fn evaluate(&mut self, input: &[f32], labels: &[u8]) {
        let out = self.net.evaluate(&mut self.state, input, labels);
        self.sums.loss_sum += out.loss as f64 * labels.len() as f64;
        self.sums.correct += out.correct as u64;
    }
}

#[async_trait(?Send)]
impl Backend for CpuBackend {
    async fn check_batch(&mut self, batch: usize) -> Result<()> {
        // Half as much again for what the estimate leaves out (a buffer growing while the old one is
        // held, the allocator's per-thread arenas), and 512 MiB for the data set, the loader's batches
        // and the threads' stacks: measured under `ulimit -v`, a run that passes this check fits.
        // The reference's footprint bounds the fused executor's: the same buffers, winners and two
        // gradient buffers, and no dropout masks (it draws them again).
        let need = CpuNet::bytes_for_batch(&self.net.model, batch) * 3 / 2 + (512 << 20);
        if let Some((free, what)) = crate::memory::memory_limit() {
            if need > free {
                anyhow::bail!(
                    "batch size {batch} needs about {:.1} GiB on the CPU backend (activations, gradients and what \
                     the backward pass keeps), but {what} leaves {:.1} GiB; use a smaller --batch-size",
                    need as f64 / GIB,
                    free as f64 / GIB
                );
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads, {})", rayon::current_num_threads(), crate::cpu::isa::isa().name())
    }

    async fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()> {
        let dropout =
            if p.dropout { DropoutMode::Hash { seed: p.dropout_seed, step: p.step } } else { DropoutMode::Off };
        let out = self.net.train_step(&mut self.state, &mut self.moments, input, labels, Update::for_step(&p), dropout);
        self.sums.loss_sum += out.loss as f64 * labels.len() as f64;
        self.sums.correct += out.correct as u64;
        self.sums.nonfinite |= out.nonfinite;
        Ok(())
    }

    fn set_schedule(&mut self, schedule: &[StepParams]) -> Result<()> {
        self.schedule = schedule.to_vec();
        Ok(())
    }

    async fn train_chunk(&mut self, batches: &[Batch], first_step: usize) -> Result<()> {
        chunk_batch_size(batches)?;
        let span = schedule_span(self.schedule.len(), first_step, batches.len())?;
        for (b, step) in batches.iter().zip(span) {
            self.train_step(&b.input, &b.labels, self.schedule[step]).await?;
            self.trained += 1;
        }
        Ok(())
    }

    fn poll_train_sums(&mut self) -> Result<Option<(usize, Sums)>> {
        Ok(Some((self.trained, self.sums)))
    }

    async fn train_sums(&mut self) -> Result<Sums> {
        Ok(self.sums)
    }

    async fn eval_chunk(&mut self, batches: &[Batch]) -> Result<()> {
        for b in batches {
            self.evaluate(&b.input, &b.labels);
        }
        Ok(())
    }

    async fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>> {
        self.evaluate(input, labels);
        Ok(self.net.logits().to_vec())
    }

    async fn eval_sums(&mut self) -> Result<Sums> {
        Ok(self.sums)
    }

    /// The CPU runs each batch as it is handed over: one at a time keeps progress and Ctrl-C prompt.
    fn chunk_batches(&self, _batch: usize, _train: bool) -> usize {
        1
    }

    async fn reset_sums(&mut self) -> Result<()> {
        self.sums = Sums::default();
        self.trained = 0;
        Ok(())
    }

    async fn state(&mut self) -> Result<Vec<f32>> {
        Ok(self.state.clone())
    }

    async fn moments(&mut self) -> Result<Vec<f32>> {
        Ok(self.moments.clone())
    }

    async fn load(&mut self, state: &[f32], moments: &[f32]) -> Result<()> {
        self.state.copy_from_slice(state);
        self.moments.copy_from_slice(moments);
        Ok(())
    }
}
