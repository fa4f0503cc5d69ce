//! The GPU executor of the model description. For a batch size it allocates every buffer once
//! (parameters and running statistics, gradients and the optimizer's moments each in one buffer; one buffer per
//! activation) and records the forward, loss, backward and update launches once; a training step then
//! writes the batch and the step's uniform, and submits all of it in one compute pass of one encoder.
//! Nothing is read back unless asked.

use anyhow::{bail, Result};

use super::adam::Adam;
use super::batchnorm::{BatchNorm, BnBuffers};
use super::context::GpuContext;
use super::conv::{BackwardEpilogue, BnStats, BnSums, Conv, EvalBn, ForwardEpilogue, GradBuffers};
use super::dropout::{Dropout, FusedDropout};
use super::fusion::{sliced_grads, DxFusion, ForwardFusion, Fusion, Launch};
use super::kernel::{Cost, Dispatch};
use super::loss::{Loss, LossBuffers};
use super::pool::{Pool, PoolEpilogue};
use super::relu::Relu;
use super::sgd::Sgd;
use super::update::{StepUniform, UpdateBuffers};
use crate::model::{Layer, Model};
use crate::optim::{OptimizerKind, MOMENT_SLOTS};

/// Every shader's kernels, compiled once per device.
pub struct Kernels {
    pub conv: Conv,
    pub batchnorm: BatchNorm,
    pub pool: Pool,
    pub dropout: Dropout,
    pub relu: Relu,
    pub loss: Loss,
    pub sgd: Sgd,
    pub adam: Adam,
}

impl Kernels {
    pub fn new(ctx: &GpuContext) -> Result<Kernels> {
        Ok(Kernels {
            conv: Conv::new(ctx)?,
            batchnorm: BatchNorm::new(ctx)?,
            pool: Pool::new(ctx)?,
            dropout: Dropout::new(ctx)?,
            relu: Relu::new(ctx)?,
            loss: Loss::new(ctx)?,
            sgd: Sgd::new(ctx)?,
            adam: Adam::new(ctx)?,
        })
    }
}

/// The running metrics as the loss and SGD kernels leave them in the metrics buffer's words: loss sum
/// (f32), correct count (f32), and whether an update went non-finite (u32 flag); the fourth is unused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss_sum: f32,
    pub correct: u32,
    pub nonfinite: bool,
}

/// Words in the metrics buffer.
pub const METRICS_WORDS: usize = 4;

impl Metrics {
    pub fn from_words(w: &[u32]) -> Metrics {
        Metrics { loss_sum: f32::from_bits(w[0]), correct: f32::from_bits(w[1]) as u32, nonfinite: w[2] != 0 }
    }

    /// Reads a metrics buffer back (waits for the GPU).
    pub async fn read(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Result<Metrics> {
        Ok(Metrics::from_words(&ctx.read::<u32>(buffer, METRICS_WORDS).await?))
    }

    /// Zeroes a metrics buffer (in queue order).
    pub fn clear(ctx: &GpuContext, buffer: &wgpu::Buffer) {
        ctx.write(buffer, &[0u32; METRICS_WORDS]);
    }
}

/// The buffers every batch size's executor shares: parameters and running statistics, gradients and
/// the optimizer's moments (each one buffer), the metrics the loss kernel adds into, and the per-step
/// uniform.
#[derive(Clone)]
pub struct SharedBuffers {
    pub state: wgpu::Buffer,
    pub grads: wgpu::Buffer,
    /// The optimizer's moments (`optim::MOMENT_SLOTS` x the trainable parameters).
    pub moments: wgpu::Buffer,
    pub metrics: wgpu::Buffer,
    pub step: wgpu::Buffer,
}

impl SharedBuffers {
    pub fn new(ctx: &GpuContext, model: &Model, state: &[f32]) -> SharedBuffers {
        assert_eq!(state.len(), model.num_state, "state buffer length");
        SharedBuffers {
            state: ctx.upload("state", state),
            grads: ctx.zeros("grads", model.num_trainable + sliced_grads(model).1),
            moments: ctx.zeros("moments", MOMENT_SLOTS * model.num_trainable),
            metrics: ctx.zeros("metrics", METRICS_WORDS),
            step: ctx.uniform("step", &StepUniform::default()),
        }
    }
}

/// One launch of a profiled step: what it is, its size, what it must do, and when it ran (nanoseconds
/// from the step's first launch, each launch in its own pass).
#[derive(Debug, Clone)]
pub struct LaunchTime {
    pub label: String,
    pub workgroups: u32,
    pub cost: Cost,
    pub start_ns: f64,
    pub end_ns: f64,
}

impl LaunchTime {
    pub fn ns(&self) -> f64 {
        self.end_ns - self.start_ns
    }
}

/// A training step timed launch by launch, and as one pass.
#[derive(Debug, Clone)]
pub struct StepProfile {
    pub launches: Vec<LaunchTime>,
    pub one_pass_ns: f64,
}

/// Where the batches of a chunk lie in its upload buffer: every batch's images (f32), then every
/// batch's labels (u32), batch after batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkLayout {
    pub batches: usize,
    pub batch: usize,
    pub image_len: usize,
}

impl ChunkLayout {
    pub fn input_bytes(&self) -> u64 {
        (self.batch * self.image_len * 4) as u64
    }

    pub fn labels_bytes(&self) -> u64 {
        (self.batch * 4) as u64
    }

    pub fn total_bytes(&self) -> u64 {
        self.batches as u64 * (self.input_bytes() + self.labels_bytes())
    }

    /// Byte offsets of batch `i`'s images and labels.
    pub fn offsets(&self, i: usize) -> (u64, u64) {
        let k = self.batches as u64;
        (i as u64 * self.input_bytes(), k * self.input_bytes() + i as u64 * self.labels_bytes())
    }
}

pub struct GpuNet {
    pub model: Model,
    pub batch: usize,
    pub shared: SharedBuffers,
    input: wgpu::Buffer,
    labels: wgpu::Buffer,
    activations: Vec<wgpu::Buffer>,
    forward_train: Vec<Dispatch>,
    forward_eval: Vec<Dispatch>,
    /// Where evaluation leaves the logits (None: the input buffer, for a network of dropout alone).
    eval_logits: Option<usize>,
    loss_train: Dispatch,
    loss_eval: Dispatch,
    backward: Vec<Dispatch>,
    /// The two updates a step may end with, and which one it does.
    sgd_update: Dispatch,
    adam_update: Dispatch,
    optimizer: OptimizerKind,
    /// The sliced weight gradients added up without an update (`gradients_only`).
    finish_grads: Dispatch,
}

/// Checks that batches of `n` fit the adapter's buffers (the largest activation decides); returns the
/// largest activation's length per image.
pub fn check_batch_fits(ctx: &GpuContext, model: &Model, n: usize) -> Result<usize> {
    let largest =
        (0..model.layers.len()).map(|i| model.input_of(i).len().max(model.shapes[i].len())).max().unwrap_or(0);
    let bytes = (n as u64).saturating_mul(largest as u64 * 4);
    let limits = ctx.device.limits();
    let allowed = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    if bytes > allowed {
        bail!(
            "batch size {n} needs GPU buffers of {} MiB, but {} allows {} MiB per buffer; use a smaller --batch-size",
            bytes >> 20,
            ctx.info.name,
            allowed >> 20
        );
    }
    Ok(largest)
}

/// Names launches after the layer they belong to, e.g. `conv.forward conv2`.
fn tag(launches: &mut [Dispatch], layer: &str) {
    for d in launches {
        d.label = format!("{} {layer}", d.label);
    }
}

/// The buffers of one batch size's executor: the batch, one per activation of the plan, the two
/// gradients that the backward pass alternates between, and per batchnorm its batch statistics and
/// partials.
struct Activations {
    input: wgpu::Buffer,
    labels: wgpu::Buffer,
    activations: Vec<wgpu::Buffer>,
    grad_a: wgpu::Buffer,
    grad_b: wgpu::Buffer,
    saved: Vec<Option<wgpu::Buffer>>,
}

impl Activations {
    fn new(ctx: &GpuContext, model: &Model, f: &Fusion, largest: usize) -> Activations {
        let n = f.n;
        // The plan's buffers, each as large as the largest output it holds (a split forward's parts).
        let mut sizes = vec![0; f.plan.buffers];
        for (i, shape) in model.shapes.iter().enumerate() {
            sizes[f.plan.buffer[i]] = sizes[f.plan.buffer[i]].max(f.splits[i] * n * shape.len());
        }
        let saved = (0..model.layers.len())
            .map(|i| f.bn_layer(model, i).map(|l| ctx.zeros(&format!("layer {i} batch statistics"), l.saved_len())))
            .collect();
        Activations {
            input: ctx.zeros("input", n * model.input.len()),
            labels: ctx.zeros("labels", n),
            activations: sizes.iter().enumerate().map(|(b, &len)| ctx.zeros(&format!("activation {b}"), len)).collect(),
            grad_a: ctx.zeros("gradient A", n * largest),
            grad_b: ctx.zeros("gradient B", n * largest),
            saved,
        }
    }
}

/// Records the launches the fusion lowering lists, over one executor's buffers.
struct Recorder<'a> {
    ctx: &'a GpuContext,
    k: &'a Kernels,
    model: &'a Model,
    f: &'a Fusion,
    b: &'a Activations,
    shared: &'a SharedBuffers,
}

impl Recorder<'_> {
    /// Layer `i`'s training-mode input.
    fn input_of(&self, i: usize) -> &wgpu::Buffer {
        if i == 0 {
            &self.b.input
        } else {
            &self.b.activations[self.f.plan.buffer[i - 1]]
        }
    }

    /// An evaluation buffer (None: the input batch).
    fn eval_buffer(&self, at: Option<usize>) -> &wgpu::Buffer {
        at.map_or(&self.b.input, |a| &self.b.activations[a])
    }

    fn eval_input_of(&self, i: usize) -> &wgpu::Buffer {
        if i == 0 {
            &self.b.input
        } else {
            self.eval_buffer(self.f.plan.eval_buffer[i - 1])
        }
    }

    fn saved(&self, i: usize) -> &wgpu::Buffer {
        self.b.saved[i].as_ref().expect("a batchnorm's buffer")
    }

    fn bn_buffers<'b>(&'b self, i: usize, x: &'b wgpu::Buffer, y: &'b wgpu::Buffer) -> BnBuffers<'b> {
        BnBuffers { x, y, state: &self.shared.state, saved: self.saved(i), step: &self.shared.step }
    }

    /// Dropout layer `i` as an epilogue runs it.
    fn dropout(&self, i: usize) -> FusedDropout {
        let Layer::Dropout { p } = self.model.layers[i] else { unreachable!("a dropout layer") };
        FusedDropout { p, layer: i }
    }

    /// What runs after a 2x2 pooling in its forward launch.
    fn pool_epilogue(&self, launch: &Launch) -> PoolEpilogue<'_> {
        match *launch {
            Launch::PoolRelu { .. } => PoolEpilogue::Relu,
            Launch::PoolReluDropout { layer } => PoolEpilogue::ReluDropout(self.dropout(layer + 2), &self.shared.step),
            _ => PoolEpilogue::None,
        }
    }

    fn conv_forward(
        &self,
        layer: usize,
        fusion: ForwardFusion,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        let (m, f) = (self.model, self.f);
        let l = f.conv_layer(m, layer).expect("a convolution layer");
        let bn = |i: usize| f.bn_layer(m, i).expect("a batchnorm layer");
        let epilogue = match fusion {
            ForwardFusion::Plain { splits } => ForwardEpilogue::Plain { splits },
            ForwardFusion::BnStats { bn: i } => {
                ForwardEpilogue::BnStats(BnStats { saved: self.saved(i), part_off: bn(i).forward_partials_at() })
            }
            ForwardFusion::BnEval { bn: i } => {
                let l = bn(i);
                ForwardEpilogue::BnEval(EvalBn { offsets: l.offsets, eps: l.eps, relu: l.relu })
            }
            ForwardFusion::Relu => ForwardEpilogue::Relu,
            ForwardFusion::ReluDropout { dropout } => {
                ForwardEpilogue::ReluDropout(self.dropout(dropout), &self.shared.step)
            }
        };
        self.k.conv.forward(self.ctx, &l, epilogue, x, &self.shared.state, y)
    }

    /// The training forward pass, one entry per op.
    fn record_forward(&self) -> Result<Vec<Dispatch>> {
        let (k, ctx, n) = (self.k, self.ctx, self.f.n);
        let mut launches = Vec::new();
        for (op, launch) in &self.f.forward {
            let mark = launches.len();
            let (x, y) = (self.input_of(op.start), &self.b.activations[self.f.plan.buffer[op.end - 1]]);
            let s = self.model.input_of(op.start);
            match *launch {
                Launch::ConvForward { layer, fusion } => launches.push(self.conv_forward(layer, fusion, x, y)?),
                Launch::BatchNormTrain { layer } => {
                    let l = self.f.bn_layer(self.model, layer).expect("a batchnorm layer");
                    launches.extend(k.batchnorm.forward_train(ctx, &l, &self.bn_buffers(layer, x, y)));
                }
                Launch::Dropout { layer } => {
                    let Layer::Dropout { p } = self.model.layers[layer] else { unreachable!("a dropout layer") };
                    launches.push(k.dropout.apply(ctx, n * s.len(), p, layer, &self.shared.step, x, y))
                }
                Launch::Pool { layer } | Launch::PoolRelu { layer } | Launch::PoolReluDropout { layer } => {
                    let epilogue = self.pool_epilogue(launch);
                    launches.push(k.pool.forward(ctx, &self.model.layers[layer], n * s.c, s, x, y, epilogue))
                }
                Launch::Relu { layer } => {
                    let x = (!self.f.plan.in_place(layer)).then_some(x);
                    launches.push(k.relu.forward(ctx, n * s.len(), x, y))
                }
                other => unreachable!("{other:?} in the forward pass"),
            }
            tag(&mut launches[mark..], &self.f.op_name(self.model, op));
        }
        Ok(launches)
    }

    /// The evaluation forward pass, one launch per op.
    fn record_eval(&self) -> Result<Vec<Dispatch>> {
        let (k, ctx, n) = (self.k, self.ctx, self.f.n);
        let mut launches = Vec::new();
        for (op, launch) in &self.f.eval {
            let (x, y) = (self.eval_input_of(op.start), self.eval_buffer(self.f.plan.eval_buffer[op.end - 1]));
            let s = self.model.input_of(op.start);
            let mut d = match *launch {
                Launch::ConvForward { layer, fusion } => self.conv_forward(layer, fusion, x, y)?,
                Launch::BatchNormEval { layer } => {
                    let l = self.f.bn_layer(self.model, layer).expect("a batchnorm layer");
                    k.batchnorm.forward_eval(ctx, &l, &self.bn_buffers(layer, x, y))
                }
                Launch::Pool { layer } | Launch::PoolRelu { layer } => {
                    let epilogue = self.pool_epilogue(launch);
                    k.pool.forward(ctx, &self.model.layers[layer], n * s.c, s, x, y, epilogue)
                }
                Launch::Relu { layer } => {
                    let eval = &self.f.plan.eval_buffer;
                    let in_place = layer > 0 && eval[layer - 1] == eval[layer];
                    k.relu.forward(ctx, n * s.len(), (!in_place).then_some(x), y)
                }
                other => unreachable!("{other:?} in the evaluation pass"),
            };
            tag(std::slice::from_mut(&mut d), &self.f.op_name(self.model, op));
            launches.push(d);
        }
        Ok(launches)
    }

    /// The loss kernel of training and of evaluation, with the global average pooling that ends the
    /// network inside. Both add batch after batch into the metrics (cleared by reset_metrics), so a
    /// training loop reads running sums only when it shows them. Evaluation's dlogits go unused.
    fn record_loss(&self) -> (Dispatch, Dispatch) {
        let (m, plan) = (self.model, &self.f.plan);
        let last = m.layers.len() - 1;
        let pool_hw = m.input_of(last).h * m.input_of(last).w;
        let buffers = |logits, pooled_input| LossBuffers {
            logits,
            labels: &self.b.labels,
            dlogits: &self.b.grad_a,
            metrics: &self.shared.metrics,
            pooled: plan.pool_in_loss.is_some().then_some((pooled_input, pool_hw)),
        };
        let (n, classes) = (self.f.n, m.output_classes());
        let train = buffers(&self.b.activations[plan.buffer[last]], self.input_of(last));
        let eval = buffers(self.eval_buffer(plan.eval_buffer[last]), self.eval_input_of(last));
        (
            self.k.loss.softmax_cross_entropy(self.ctx, n, classes, true, &train),
            self.k.loss.softmax_cross_entropy(self.ctx, n, classes, true, &eval),
        )
    }

    /// A convolution's backward: its gradients from `dy`, and dx into `dx` as the lowering says.
    fn conv_backward(&self, layer: usize, fusion: DxFusion, dy: &wgpu::Buffer, dx: &wgpu::Buffer) -> Result<Dispatch> {
        let (m, f) = (self.model, self.f);
        let g = f.conv_grad(m, layer).expect("a convolution layer");
        // With a max pooling read through, x is the pooling's input.
        let x = if g.pool { self.input_of(layer - 1) } else { self.input_of(layer) };
        let epilogue = match fusion {
            DxFusion::None => BackwardEpilogue::WeightsOnly,
            DxFusion::Dx => BackwardEpilogue::Dx(dx),
            DxFusion::BnSums { bn } => {
                let l = f.bn_layer(m, bn).expect("a batchnorm layer");
                let sums = BnSums {
                    saved: self.saved(bn),
                    part_off: l.backward_partials_at(),
                    bn_x: self.input_of(bn),
                    step: &self.shared.step,
                    relu: l.relu,
                    dropout: l.dropout.map(|f| f.p),
                };
                BackwardEpilogue::DxBnSums(dx, sums)
            }
        };
        let b = GradBuffers { x, dy, state: &self.shared.state, grads: &self.shared.grads };
        self.k.conv.backward(self.ctx, &g, epilogue, &b)
    }

    /// The backward pass, one entry per op: the gradient of the op's output is in `cur`; each writes
    /// the gradient of its input into `other`.
    fn record_backward(&self) -> Result<Vec<Dispatch>> {
        let (k, ctx, n) = (self.k, self.ctx, self.f.n);
        let mut launches = Vec::new();
        let (mut cur, mut other) = (&self.b.grad_a, &self.b.grad_b);
        for (op, launch) in &self.f.backward {
            let mark = launches.len();
            let i = op.start;
            let (x, y) = (self.input_of(i), &self.b.activations[self.f.plan.buffer[i]]);
            let s = self.model.input_of(i);
            match *launch {
                Launch::ConvBackward { layer, fusion } => launches.push(self.conv_backward(layer, fusion, cur, other)?),
                Launch::BatchNormBackward { layer } => {
                    let l = self.f.bn_layer(self.model, layer).expect("a batchnorm layer");
                    let b = self.bn_buffers(layer, x, y);
                    launches.extend(k.batchnorm.backward(ctx, &l, &b, cur, other, &self.shared.grads));
                }
                Launch::Dropout { layer } => {
                    let Layer::Dropout { p } = self.model.layers[layer] else { unreachable!("a dropout layer") };
                    launches.push(k.dropout.apply(ctx, n * s.len(), p, layer, &self.shared.step, cur, other))
                }
                Launch::PoolBackward { layer } => {
                    let layer = &self.model.layers[layer];
                    launches.push(k.pool.backward(ctx, layer, n * s.c, s, x, cur, other))
                }
                Launch::ReluBackward { .. } => launches.push(k.relu.backward(ctx, n * s.len(), y, cur, other)),
                Launch::ReluDropoutBackward { layer } => {
                    // The dropout's output: 0 wherever the ReLU or its mask cut.
                    let y = &self.b.activations[self.f.plan.buffer[layer + 1]];
                    let p = self.dropout(layer + 1).p;
                    launches.push(k.relu.backward_dropout(ctx, n * s.len(), p, &self.shared.step, y, cur, other))
                }
                other => unreachable!("{other:?} in the backward pass"),
            }
            tag(&mut launches[mark..], &self.model.layer_name(i));
            std::mem::swap(&mut cur, &mut other);
        }
        Ok(launches)
    }
}

impl GpuNet {
    /// Buffers and launches for batches of `batch` images, parameters from `state`.
    pub fn new(ctx: &GpuContext, k: &Kernels, model: &Model, batch: usize, state: &[f32]) -> Result<GpuNet> {
        GpuNet::with_shared(ctx, k, model, batch, SharedBuffers::new(ctx, model, state))
    }

    /// Buffers and launches for batches of `batch` images over existing parameter buffers (so that
    /// executors of several batch sizes train and evaluate one model): every launch as the fusion
    /// lowering lists it.
    pub fn with_shared(
        ctx: &GpuContext,
        k: &Kernels,
        model: &Model,
        batch: usize,
        shared: SharedBuffers,
    ) -> Result<GpuNet> {
        let largest = check_batch_fits(ctx, model, batch)?;
        let f = Fusion::new(model, batch);
        let b = Activations::new(ctx, model, &f, largest);
        let r = Recorder { ctx, k, model, f: &f, b: &b, shared: &shared };
        let (loss_train, loss_eval) = r.record_loss();
        let (forward_train, forward_eval, backward) = (r.record_forward()?, r.record_eval()?, r.record_backward()?);
        let update_buffers = UpdateBuffers {
            step: &shared.step,
            state: &shared.state,
            grads: &shared.grads,
            moments: &shared.moments,
            metrics: &shared.metrics,
        };
        let sgd_update = k.sgd.update(ctx, model.num_trainable, &f.sliced, &update_buffers);
        let adam_update = k.adam.update(ctx, model.num_trainable, &f.sliced, &update_buffers);
        let finish_grads = k.sgd.sum_slices(ctx, model.num_trainable, &f.sliced, &shared.grads);
        let eval_logits = f.plan.eval_buffer[model.layers.len() - 1];
        let Activations { input, labels, activations, .. } = b;
        Ok(GpuNet {
            model: model.clone(),
            batch,
            shared: shared.clone(),
            input,
            labels,
            activations,
            forward_train,
            forward_eval,
            eval_logits,
            loss_train,
            loss_eval,
            backward,
            sgd_update,
            adam_update,
            optimizer: OptimizerKind::Sgd,
            finish_grads,
        })
    }

    fn write_batch(&self, ctx: &GpuContext, input: &[f32], labels: &[u8]) {
        assert_eq!(labels.len(), self.batch, "this GpuNet runs batches of {}", self.batch);
        assert_eq!(input.len(), self.batch * self.model.input.len(), "input length");
        ctx.write(&self.input, input);
        let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        ctx.write(&self.labels, &labels);
    }

    /// Records and submits `groups` of launches in one compute pass of one encoder.
    fn submit<'a>(&self, ctx: &GpuContext, launches: impl IntoIterator<Item = &'a Dispatch>) {
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        super::kernel::record_pass(&mut encoder, launches, false);
        ctx.queue.submit([encoder.finish()]);
    }

    /// One training step: forward (training mode), loss, backward, SGD update, all on the GPU.
    /// The batch's loss and correct count are added into the metrics; they are read back (the sums
    /// since the last `reset_metrics`) only when `read_metrics`.
    pub async fn train_step(
        &self,
        ctx: &GpuContext,
        input: &[f32],
        labels: &[u8],
        step: StepUniform,
        read_metrics: bool,
    ) -> Result<Option<Metrics>> {
        self.write_batch(ctx, input, labels);
        ctx.write(&self.shared.step, &[step]);
        self.submit(ctx, self.train_dispatches());
        if read_metrics {
            Ok(Some(self.metrics(ctx).await?))
        } else {
            Ok(None)
        }
    }

    /// Forward, loss and backward (training mode), without the update.
    pub fn gradients_only(&self, ctx: &GpuContext, input: &[f32], labels: &[u8], step: StepUniform) {
        self.write_batch(ctx, input, labels);
        ctx.write(&self.shared.step, &[step]);
        self.submit(ctx, self.gradient_dispatches().chain([&self.finish_grads]));
    }

    /// Clears the metrics that `evaluate_batch` adds into.
    pub fn reset_metrics(&self, ctx: &GpuContext) {
        Metrics::clear(ctx, &self.shared.metrics);
    }

    /// Evaluation-mode forward pass and loss of a batch, added into the metrics (no readback).
    /// Batchnorm uses the running statistics and dropout is the identity.
    pub fn evaluate_batch(&self, ctx: &GpuContext, input: &[f32], labels: &[u8]) {
        self.write_batch(ctx, input, labels);
        self.submit(ctx, self.eval_dispatches());
    }

    pub async fn metrics(&self, ctx: &GpuContext) -> Result<Metrics> {
        Metrics::read(ctx, &self.shared.metrics).await
    }

    pub async fn read_state(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.read(&self.shared.state, self.model.num_state).await
    }

    pub fn write_state(&self, ctx: &GpuContext, state: &[f32]) {
        assert_eq!(state.len(), self.model.num_state);
        ctx.write(&self.shared.state, state);
    }

    pub async fn read_grads(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.read(&self.shared.grads, self.model.num_trainable).await
    }

    /// The optimizer's moments (`optim::MOMENT_SLOTS` x the trainable parameters).
    pub async fn read_moments(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.read(&self.shared.moments, MOMENT_SLOTS * self.model.num_trainable).await
    }

    /// Sets the moments: all of them, or SGD's momenta alone (the second moments are then left as
    /// they are).
    pub fn write_moments(&self, ctx: &GpuContext, moments: &[f32]) {
        let n = self.model.num_trainable;
        assert!(moments.len() == n || moments.len() == MOMENT_SLOTS * n, "moments length");
        ctx.write(&self.shared.moments, moments);
    }

    /// Which update the training steps end with from now on (SGD until set).
    pub fn set_optimizer(&mut self, kind: OptimizerKind) {
        self.optimizer = kind;
    }

    /// The logits of the last evaluation pass (and of the last training pass, unless the network ends
    /// in dropout).
    pub async fn read_logits(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        let len = self.batch * self.model.output_classes();
        ctx.read(self.eval_logits.map_or(&self.input, |a| &self.activations[a]), len).await
    }

    /// Records batch `index` of a chunk uploaded into `chunk` (see [`ChunkLayout`]): copies its images
    /// and labels into this executor's input, then, for training, the step's entry of the run's
    /// `schedule` into the step uniform, and one compute pass of the step's (or the evaluation's)
    /// launches. `empty` records launches of zero workgroups (the host-only benchmark).
    pub fn record_batch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        chunk: &wgpu::Buffer,
        layout: &ChunkLayout,
        index: usize,
        train_step: Option<(&wgpu::Buffer, usize)>,
        empty: bool,
    ) {
        let (input, labels) = layout.offsets(index);
        encoder.copy_buffer_to_buffer(chunk, input, &self.input, 0, layout.input_bytes());
        encoder.copy_buffer_to_buffer(chunk, labels, &self.labels, 0, layout.labels_bytes());
        match train_step {
            Some((schedule, step)) => {
                let size = std::mem::size_of::<StepUniform>() as u64;
                encoder.copy_buffer_to_buffer(schedule, step as u64 * size, &self.shared.step, 0, size);
                super::kernel::record_pass(encoder, self.train_dispatches(), empty);
            }
            None => super::kernel::record_pass(encoder, self.eval_dispatches(), empty),
        }
    }

    /// Two training steps on the same batch, timed with GPU timestamps: first with every launch in its
    /// own compute pass (its start and end), then all in one pass as training runs them (the whole).
    /// Each step updates the parameters.
    pub async fn profile_step(
        &self,
        ctx: &GpuContext,
        input: &[f32],
        labels: &[u8],
        step: StepUniform,
    ) -> Result<StepProfile> {
        self.write_batch(ctx, input, labels);
        ctx.write(&self.shared.step, &[step]);
        let launches: Vec<&Dispatch> = self.train_dispatches().collect();
        let times = super::kernel::run_timed(ctx, &launches, true).await?;
        let whole = super::kernel::run_timed(ctx, &launches, false).await?;
        Ok(StepProfile {
            launches: launches
                .iter()
                .zip(times)
                .map(|(d, (start_ns, end_ns))| LaunchTime {
                    label: d.label.clone(),
                    workgroups: d.workgroups(),
                    cost: d.cost,
                    start_ns,
                    end_ns,
                })
                .collect(),
            one_pass_ns: whole[0].1 - whole[0].0,
        })
    }

    /// Launches per evaluation batch.
    pub fn eval_launches(&self) -> usize {
        self.forward_eval.len() + 1
    }

    /// Launches per training step: forward, loss, backward, the update.
    pub fn train_launches(&self) -> usize {
        self.train_dispatches().count()
    }

    /// The launches of a training step up to its gradients: forward, loss, backward.
    fn gradient_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.forward_train.iter().chain([&self.loss_train]).chain(&self.backward)
    }

    /// Every launch of a training step, in order.
    fn train_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        let update = match self.optimizer {
            OptimizerKind::Sgd => &self.sgd_update,
            OptimizerKind::Adam | OptimizerKind::AdamW => &self.adam_update,
        };
        self.gradient_dispatches().chain([update])
    }

    /// Every launch of an evaluation batch, in order.
    fn eval_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.forward_eval.iter().chain([&self.loss_eval])
    }
}
