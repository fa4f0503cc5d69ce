//! The GPU executor as a Backend: one executor per batch size over shared parameter buffers, chunks
//! of batches streamed to it.

use std::collections::HashMap;

use anyhow::{bail, Result};
use async_trait::async_trait;
use wgpu::util::DeviceExt;

use crate::backend::{chunk_batch_size, schedule_span, Backend, StepParams, Sums, MAX_CHUNK_BATCHES};
use crate::data::loader::Batch;
use crate::gpu::net::{ChunkLayout, SharedBuffers, StepProfile};
use crate::gpu::stream::{ChunkKind, Stream};
use crate::gpu::{GpuContext, GpuNet, Kernels, Metrics, StepUniform};
use crate::model::Model;
use crate::optim::{OptimizerKind, MOMENT_SLOTS};

/// A step's parameters as the shaders' per-step uniform (Adam's scalars for step count `step + 1`).
fn step_uniform(p: StepParams) -> StepUniform {
    let adam = p.optimizer.adam_scalars(p.lr as f64, p.weight_decay as f64, p.step as u64 + 1);
    StepUniform {
        lr: p.lr,
        momentum: p.momentum,
        weight_decay: p.weight_decay,
        dropout_seed: p.dropout_seed,
        dropout_step: p.step,
        dropout_on: p.dropout as u32,
        ..Default::default()
    }
    .with_adam(&adam)
}

/// About how long a chunk should run: long enough that submits are rare, short enough that the
/// progress bar moves and Ctrl-C answers promptly on a slow (software) adapter.
const CHUNK_SECONDS: f64 = 0.25;

/// The GPU backend: one executor per batch size seen (the last batch of an epoch may be smaller), all
/// over the same parameter buffers; chunks of batches are streamed to it (see `gpu::stream`).
pub struct GpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    model: Model,
    shared: SharedBuffers,
    nets: HashMap<usize, GpuNet>,
    /// The update every executor's training steps end with.
    optimizer: OptimizerKind,
    /// Every step's uniform for the run (`set_schedule`), copied into the step uniform step by step.
    schedule: Option<(wgpu::Buffer, usize)>,
    stream: Stream,
    /// Launches of zero workgroups: measures the host's side alone (`bench --host-only`).
    host_only: bool,
}

impl GpuBackend {
    pub fn new(ctx: GpuContext, model: &Model, state: &[f32]) -> Result<GpuBackend> {
        let kernels = Kernels::new(&ctx)?;
        let shared = SharedBuffers::new(&ctx, model, state);
        // A pipeline or buffer the device refused (out of memory, say) is reported here, by name.
        ctx.check()?;
        Ok(GpuBackend {
            ctx,
            kernels,
            model: model.clone(),
            shared,
            nets: HashMap::new(),
            optimizer: OptimizerKind::Sgd,
            schedule: None,
            stream: Stream::default(),
            host_only: false,
        })
    }

    /// With `on`, chunks do everything but the GPU's arithmetic: uploads, copies, recording, submits
    /// and metric read-backs, with every launch of zero workgroups. The results are then meaningless.
    pub fn set_host_only(&mut self, on: bool) {
        self.host_only = on;
    }

    /// The executor for `batch` images (built on first use) and the context to run it with.
    fn net(&mut self, batch: usize) -> Result<(&GpuNet, &GpuContext)> {
        if !self.nets.contains_key(&batch) {
            let mut net = GpuNet::with_shared(&self.ctx, &self.kernels, &self.model, batch, self.shared.clone())?;
            net.set_optimizer(self.optimizer);
            self.nets.insert(batch, net);
        }
        Ok((&self.nets[&batch], &self.ctx))
    }

    /// The device and the compiled kernels (to run single kernels, as `verify` does).
    pub fn parts(&self) -> (&GpuContext, &Kernels) {
        (&self.ctx, &self.kernels)
    }

    /// Makes every executor's training steps end with `kind`'s update.
    fn set_optimizer(&mut self, kind: OptimizerKind) {
        self.optimizer = kind;
        for net in self.nets.values_mut() {
            net.set_optimizer(kind);
        }
    }

    /// A training step with every kernel timed, and timed as one pass (see `GpuNet::profile_step`).
    pub async fn profile_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<StepProfile> {
        self.set_optimizer(p.optimizer.kind);
        let (net, ctx) = self.net(labels.len())?;
        net.profile_step(ctx, input, labels, step_uniform(p)).await
    }

    /// Launches per evaluation batch of `batch` images.
    pub fn eval_launches(&mut self, batch: usize) -> Result<usize> {
        Ok(self.net(batch)?.0.eval_launches())
    }

    async fn sums(&mut self) -> Result<Sums> {
        self.stream.drain(&self.ctx).await?;
        Ok(sums_of(Metrics::read(&self.ctx, &self.shared.metrics).await?))
    }

    /// The most batches of `batch` images one upload buffer may hold.
    fn chunk_limit(&self, batch: usize) -> usize {
        let layout = ChunkLayout { batches: 1, batch, image_len: self.model.input.len() };
        let per_batch = layout.total_bytes().max(1);
        ((self.ctx.device.limits().max_buffer_size / per_batch) as usize).clamp(1, MAX_CHUNK_BATCHES)
    }

    /// Uploads `batches` as one chunk and records each as a training step (from `first_step` on) or an
    /// evaluation pass, all in one submission.
    async fn submit_chunk(&mut self, batches: &[Batch], first_step: Option<usize>) -> Result<()> {
        let n = chunk_batch_size(batches)?;
        if batches.len() > self.chunk_limit(n) {
            bail!(
                "a chunk of {} batches of {n} is more than one upload buffer holds ({})",
                batches.len(),
                self.chunk_limit(n)
            );
        }
        self.net(n)?;
        let layout = ChunkLayout { batches: batches.len(), batch: n, image_len: self.model.input.len() };
        let (net, empty) = (&self.nets[&n], self.host_only);
        let (kind, schedule) = match first_step {
            Some(first) => {
                let Some((buffer, len)) = &self.schedule else {
                    bail!("train_chunk before set_schedule: the GPU backend needs the run's schedule first")
                };
                schedule_span(*len, first, batches.len())?;
                (ChunkKind::Train, Some((buffer, first)))
            }
            None => (ChunkKind::Eval, None),
        };
        self.stream
            .submit(
                &self.ctx,
                kind,
                batches.len(),
                layout.total_bytes(),
                &self.shared.metrics,
                |bytes| fill_chunk(batches, &layout, bytes),
                |encoder, upload| {
                    for i in 0..batches.len() {
                        let step = schedule.map(|(buffer, first)| (buffer, first + i));
                        net.record_batch(encoder, upload, &layout, i, step, empty);
                    }
                },
            )
            .await?;
        self.stream.poll(&self.ctx)
    }
}

fn sums_of(m: Metrics) -> Sums {
    Sums { loss_sum: m.loss_sum as f64, correct: m.correct as u64, nonfinite: m.nonfinite }
}

/// Writes a chunk's images, then its labels as u32, where `ChunkLayout` places them.
fn fill_chunk(batches: &[Batch], layout: &ChunkLayout, out: &mut wgpu::BufferViewMut) {
    for (i, b) in batches.iter().enumerate() {
        let start = layout.offsets(i).0 as usize;
        out.slice(start..start + layout.input_bytes() as usize).copy_from_slice(bytemuck::cast_slice(&b.input));
    }
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.iter().map(|&l| l as u32)).collect();
    let start = layout.offsets(0).1 as usize;
    out.slice(start..start + 4 * labels.len()).copy_from_slice(bytemuck::cast_slice(&labels));
}

#[async_trait(?Send)]
impl Backend for GpuBackend {
    async fn check_batch(&mut self, batch: usize) -> Result<()> {
        let largest = crate::gpu::net::check_batch_fits(&self.ctx, &self.model, batch)?;
        // wgpu cannot say how much memory a device has, so the batch's buffers are made now, where the
        // device can refuse them with a message, rather than at the first step.
        let scope = self.ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let built = self.net(batch).map(|_| ());
        if let Some(e) = scope.pop().await {
            self.nets.remove(&batch);
            anyhow::bail!(
                "batch size {batch} does not fit in the memory of {} (its largest buffer alone is {} MiB): {e}; \
                 use a smaller --batch-size",
                self.ctx.info.name,
                (batch * largest * 4) >> 20
            );
        }
        built
    }

    fn describe(&self) -> String {
        format!("gpu: {} ({:?}, {:?})", self.ctx.info.name, self.ctx.info.backend, self.ctx.info.device_type)
    }

    async fn train_step(&mut self, input: &[f32], labels: &[u8], p: StepParams) -> Result<()> {
        self.set_optimizer(p.optimizer.kind);
        let (net, ctx) = self.net(labels.len())?;
        net.train_step(ctx, input, labels, step_uniform(p), false).await?;
        Ok(())
    }

    fn set_schedule(&mut self, schedule: &[StepParams]) -> Result<()> {
        if let Some(first) = schedule.first() {
            if schedule.iter().any(|p| p.optimizer != first.optimizer) {
                bail!("a schedule whose steps use different optimizers");
            }
            self.set_optimizer(first.optimizer.kind);
        }
        let uniforms: Vec<StepUniform> = schedule.iter().map(|&p| step_uniform(p)).collect();
        // A binding holds at least one element.
        let empty = [StepUniform::default()];
        let bytes = std::mem::size_of_val(uniforms.as_slice()) as u64;
        let limit = self.ctx.device.limits().max_buffer_size;
        if bytes > limit {
            bail!(
                "the run's schedule of {} steps needs {} MiB on the GPU, more than {} allows in one buffer ({} MiB); \
                 train fewer epochs or larger batches",
                schedule.len(),
                bytes >> 20,
                self.ctx.info.name,
                limit >> 20
            );
        }
        let buffer = self.ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("schedule"),
            contents: bytemuck::cast_slice(if uniforms.is_empty() { &empty } else { &uniforms }),
            usage: wgpu::BufferUsages::COPY_SRC,
        });
        self.schedule = Some((buffer, schedule.len()));
        Ok(())
    }

    async fn train_chunk(&mut self, batches: &[Batch], first_step: usize) -> Result<()> {
        self.submit_chunk(batches, Some(first_step)).await
    }

    fn poll_train_sums(&mut self) -> Result<Option<(usize, Sums)>> {
        self.stream.poll(&self.ctx)?;
        Ok(self.stream.latest.filter(|f| f.kind == ChunkKind::Train).map(|f| (f.batches, sums_of(f.metrics))))
    }

    async fn train_sums(&mut self) -> Result<Sums> {
        self.sums().await
    }

    async fn eval_chunk(&mut self, batches: &[Batch]) -> Result<()> {
        self.submit_chunk(batches, None).await
    }

    async fn eval_logits(&mut self, input: &[f32], labels: &[u8]) -> Result<Vec<f32>> {
        let (net, ctx) = self.net(labels.len())?;
        net.evaluate_batch(ctx, input, labels);
        net.read_logits(ctx).await
    }

    async fn eval_sums(&mut self) -> Result<Sums> {
        self.sums().await
    }

    fn chunk_batches(&self, batch: usize, train: bool) -> usize {
        let kind = if train { ChunkKind::Train } else { ChunkKind::Eval };
        self.stream.batches_per_chunk(kind, CHUNK_SECONDS, self.chunk_limit(batch))
    }

    async fn reset_sums(&mut self) -> Result<()> {
        self.stream.reset(&self.ctx).await?;
        Metrics::clear(&self.ctx, &self.shared.metrics);
        Ok(())
    }

    async fn state(&mut self) -> Result<Vec<f32>> {
        self.stream.drain(&self.ctx).await?;
        self.ctx.read(&self.shared.state, self.model.num_state).await
    }

    async fn moments(&mut self) -> Result<Vec<f32>> {
        self.stream.drain(&self.ctx).await?;
        self.ctx.read(&self.shared.moments, MOMENT_SLOTS * self.model.num_trainable).await
    }

    async fn load(&mut self, state: &[f32], moments: &[f32]) -> Result<()> {
        assert_eq!(state.len(), self.model.num_state);
        assert_eq!(moments.len(), MOMENT_SLOTS * self.model.num_trainable);
        self.stream.drain(&self.ctx).await?;
        self.ctx.write(&self.shared.state, state);
        self.ctx.write(&self.shared.moments, moments);
        Ok(())
    }
}
