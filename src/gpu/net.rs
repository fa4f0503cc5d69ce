//! The GPU executor of the model description. For a batch size it allocates every buffer once
//! (parameters and running statistics, gradients and momenta each in one buffer; one buffer per
//! activation) and records the forward, loss, backward and SGD launches once; a training step then
//! writes the batch and the step's uniform, and submits all of it in one compute pass of one encoder.
//! Nothing is read back unless asked.

use anyhow::{bail, Result};

use super::batchnorm::{bn_slices, BatchNorm, BnBuffers, BnLayer, BnOffsets, FusedDropout};
use super::context::GpuContext;
use super::conv::weight_grad_slices;
use super::conv::{forward_splits, BnStats, BnSums, Conv, EvalBn};
use super::dropout::Dropout;
use super::kernel::{Cost, Dispatch};
use super::loss::{Loss, LossBuffers};
use super::pool::Pool;
use super::sgd::{Sgd, SgdBuffers, SlicedGrad, StepUniform};
use crate::model::plan::{Op, Plan};
use crate::model::{Layer, LayerParams, Model, BN_EPS, BN_MOMENTUM};

/// Every shader's kernels, compiled once per device.
pub struct Kernels {
    pub conv: Conv,
    pub batchnorm: BatchNorm,
    pub pool: Pool,
    pub dropout: Dropout,
    pub loss: Loss,
    pub sgd: Sgd,
}

impl Kernels {
    pub fn new(ctx: &GpuContext) -> Result<Kernels> {
        Ok(Kernels {
            conv: Conv::new(ctx)?,
            batchnorm: BatchNorm::new(ctx)?,
            pool: Pool::new(ctx)?,
            dropout: Dropout::new(ctx)?,
            loss: Loss::new(ctx)?,
            sgd: Sgd::new(ctx)?,
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
/// momenta (each one buffer), the metrics the loss kernel adds into, and the per-step uniform.
#[derive(Clone)]
pub struct SharedBuffers {
    pub state: wgpu::Buffer,
    pub grads: wgpu::Buffer,
    pub momenta: wgpu::Buffer,
    pub metrics: wgpu::Buffer,
    pub step: wgpu::Buffer,
}

/// Which weight gradients are summed in slices, and where their extra slices go (after the trainable
/// prefix of the gradient buffer), in layer order; and the extra room they take.
pub fn sliced_grads(model: &Model) -> (Vec<SlicedGrad>, usize) {
    let mut sliced = Vec::new();
    let mut extra = model.num_trainable;
    let mut add = |start: usize, len: usize, slices: usize| {
        if slices > 1 {
            sliced.push(SlicedGrad { start, len, extra, slices });
            extra += (slices - 1) * len;
        }
    };
    for i in 0..model.layers.len() {
        if let Some((d, w_off)) = model.conv(i, 1) {
            let bias = model.conv_bias(i);
            let slices = weight_grad_slices(&d, bias.is_some());
            add(w_off, d.weight_len(), slices);
            if let Some(b) = bias {
                add(b, d.cout, slices);
            }
        }
    }
    (sliced, extra - model.num_trainable)
}

/// The convolution that reads batchnorm `i`'s output in the backward pass (after the ReLU, dropout
/// and max pooling the batchnorm absorbs), whose dx epilogue then writes the batchnorm's backward sums.
pub fn conv_reading(model: &Model, plan: &Plan, i: usize) -> Option<usize> {
    let f = plan.norm[i];
    if f.avgpool {
        return None;
    }
    let next = i + 1 + f.relu as usize + f.dropout.is_some() as usize + f.maxpool as usize;
    let conv = matches!(model.layers.get(next), Some(Layer::Conv { .. }));
    (conv && plan.pooled_input[next] == f.maxpool).then_some(next)
}

/// The slices of the weight gradient at `w_off`: as `sliced_grads` planned, else one in place.
fn slices_of(sliced: &[SlicedGrad], w_off: usize, len: usize) -> SlicedGrad {
    sliced.iter().find(|t| t.start == w_off).copied().unwrap_or(SlicedGrad { start: w_off, len, extra: 0, slices: 1 })
}

impl SharedBuffers {
    pub fn new(ctx: &GpuContext, model: &Model, state: &[f32]) -> SharedBuffers {
        assert_eq!(state.len(), model.num_state, "state buffer length");
        SharedBuffers {
            state: ctx.upload("state", state),
            grads: ctx.zeros("grads", model.num_trainable + sliced_grads(model).1),
            momenta: ctx.zeros("momenta", model.num_trainable),
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
    update: Dispatch,
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

/// Refuses, naming the layer, a network the GPU kernels cannot run (before anything is allocated).
pub fn check_runs_on_gpu(model: &Model) -> Result<()> {
    Plan::new(model).check_gpu(model).map_err(anyhow::Error::msg)
}

/// Names launches after the layer they belong to, e.g. `conv.forward conv2`.
fn tag(launches: &mut [Dispatch], layer: &str) {
    for d in launches {
        d.label = format!("{} {layer}", d.label);
    }
}

/// The layer an op is named after: the convolution of a max pooling read through, else its first.
fn op_name(model: &Model, plan: &Plan, op: &Op) -> String {
    let main = if op.len() > 1 && plan.pooled_input[op.start + 1] { op.start + 1 } else { op.start };
    model.layer_name(main)
}

impl GpuNet {
    /// Buffers and launches for batches of `batch` images, parameters from `state`.
    pub fn new(ctx: &GpuContext, k: &Kernels, model: &Model, batch: usize, state: &[f32]) -> Result<GpuNet> {
        GpuNet::with_shared(ctx, k, model, batch, SharedBuffers::new(ctx, model, state))
    }

    /// Buffers and launches for batches of `batch` images over existing parameter buffers (so that
    /// executors of several batch sizes train and evaluate one model).
    pub fn with_shared(
        ctx: &GpuContext,
        k: &Kernels,
        model: &Model,
        batch: usize,
        shared: SharedBuffers,
    ) -> Result<GpuNet> {
        let n = batch;
        let classes = model.output_classes();
        let SharedBuffers { state: state_buf, grads, momenta, metrics, step } = &shared;
        check_runs_on_gpu(model)?;
        let largest = check_batch_fits(ctx, model, n)?;
        let input = ctx.zeros("input", n * model.input.len());
        let labels = ctx.zeros("labels", n);

        let plan = Plan::new(model);
        // A training convolution followed by a batchnorm splits its sum when its tiles are few; its
        // buffer holds the parts.
        let splits: Vec<usize> = (0..model.layers.len())
            .map(|i| match (model.conv(i, n), model.layers.get(i + 1)) {
                (Some((d, _)), Some(Layer::BatchNorm { .. })) => forward_splits(&d),
                _ => 1,
            })
            .collect();
        // The plan's buffers, each as large as the largest output it holds.
        let mut sizes = vec![0; plan.buffers];
        for (i, shape) in model.shapes.iter().enumerate() {
            sizes[plan.buffer[i]] = sizes[plan.buffer[i]].max(splits[i] * n * shape.len());
        }
        let activations: Vec<wgpu::Buffer> =
            sizes.iter().enumerate().map(|(b, &len)| ctx.zeros(&format!("activation {b}"), len)).collect();
        let grad_a = ctx.zeros("gradient A", n * largest);
        let grad_b = ctx.zeros("gradient B", n * largest);

        let input_of = |i: usize| if i == 0 { &input } else { &activations[plan.buffer[i - 1]] };
        let (sliced, _) = sliced_grads(model);
        // A training batchnorm right after a convolution of one part gets its statistics' partials
        // from the convolution's epilogue, and one whose output a convolution reads gets its backward
        // sums from that convolution's dx: one launch fewer each.
        let forward_parts = |i: usize| -> Option<usize> {
            let before =
                i.checked_sub(1).filter(|&p| matches!(model.layers[p], Layer::Conv { .. }) && splits[p] == 1)?;
            let (d, _) = model.conv(before, n)?;
            Some(Conv::position_tiles(d.n * d.ho() * d.wo()))
        };
        let backward_parts = |i: usize| -> Option<usize> {
            let (d, _) = model.conv(conv_reading(model, &plan, i)?, n)?;
            Some(Conv::position_tiles(d.n * d.h * d.w))
        };
        let bn_layer = |i: usize, c: usize, p: LayerParams| -> BnLayer {
            let LayerParams::BatchNorm { weight, bias, running_mean, running_var } = p else {
                unreachable!("batchnorm without its parameters")
            };
            let s = model.input_of(i);
            let fusion = plan.norm[i];
            BnLayer {
                n,
                c,
                hw: s.h * s.w,
                relu: fusion.relu,
                offsets: BnOffsets {
                    gamma: model.params[weight].offset,
                    beta: model.params[bias].offset,
                    running_mean: model.params[running_mean].offset,
                    running_var: model.params[running_var].offset,
                },
                momentum: BN_MOMENTUM,
                eps: BN_EPS,
                slices: bn_slices(c),
                forward_parts: forward_parts(i),
                backward_parts: backward_parts(i),
                dy_pooled: false,
                dropout: fusion.dropout.map(|(layer, p)| FusedDropout { p, layer }),
                maxpool: fusion.maxpool,
                width: s.w,
                parts: if i > 0 { splits[i - 1] } else { 1 },
            }
        };
        let bn_of = |i: usize| -> Option<BnLayer> {
            match (model.layers.get(i)?, model.layer_params[i]) {
                (&Layer::BatchNorm { c, .. }, p) => Some(bn_layer(i, c, p)),
                _ => None,
            }
        };

        // Per-layer extra buffers: batchnorm statistics and partial sums.
        let saved: Vec<Option<wgpu::Buffer>> = (0..model.layers.len())
            .map(|i| bn_of(i).map(|l| ctx.zeros(&format!("layer {i} batch statistics"), l.saved_len())))
            .collect();
        // Per convolution: the batchnorm whose backward sums its dx epilogue writes.
        let mut sums_for = vec![None; model.layers.len()];
        for i in 0..model.layers.len() {
            if let Some(conv) = bn_of(i).and(conv_reading(model, &plan, i)) {
                sums_for[conv] = Some(i);
            }
        }
        let eval_buffer = |at: Option<usize>| at.map_or(&input, |a| &activations[a]);
        let eval_input_of = |i: usize| if i == 0 { &input } else { eval_buffer(plan.eval_buffer[i - 1]) };

        // The convolution (or linear layer) an op runs, and whether it reads through a max pooling.
        let conv_of = |op: &Op| match model.layers[op.start] {
            Layer::Conv { .. } | Layer::Linear { .. } => Some((op.start, false)),
            Layer::MaxPool2 if op.len() > 1 => Some((op.start + 1, true)),
            _ => None,
        };
        // One launch per op of the plan.
        let mut forward_train = Vec::new();
        for op in &plan.forward {
            let mark = forward_train.len();
            let i = op.start;
            let (x, y) = (input_of(i), &activations[plan.buffer[op.end - 1]]);
            let sin = model.input_of(i);
            match (&model.layers[i], model.layer_params[i]) {
                _ if conv_of(op).is_some() => {
                    let (c, pool) = conv_of(op).expect("checked");
                    let (d, w_off) = model.conv(c, n).expect("a convolution layer");
                    let bias = model.conv_bias(c);
                    let stats = bn_of(c + 1).filter(|l| l.forward_parts.is_some()).map(|l| BnStats {
                        saved: saved[c + 1].as_ref().expect("a batchnorm's buffer"),
                        part_off: l.forward_partials_at(),
                    });
                    let conv = &k.conv;
                    forward_train
                        .push(conv.forward(ctx, &d, w_off, bias, pool, splits[c], None, stats, x, state_buf, y)?);
                }
                (&Layer::BatchNorm { c, .. }, p) => {
                    let l = bn_layer(i, c, p);
                    let saved = saved[i].as_ref().unwrap();
                    let b = BnBuffers { x, y, state: state_buf, saved, step };
                    forward_train.extend(k.batchnorm.forward_train(ctx, &l, &b));
                }
                (&Layer::Dropout { p }, _) => forward_train.push(k.dropout.apply(ctx, n * sin.len(), p, i, step, x, y)),
                (Layer::MaxPool2, _) => {
                    forward_train.push(k.pool.maxpool_forward(ctx, (n * sin.c, sin.h, sin.w), x, y))
                }
                (Layer::GlobalAvgPool, _) => {
                    forward_train.push(k.pool.gap_forward(ctx, n * sin.c, sin.h * sin.w, x, y))
                }
                (layer, _) => unreachable!("{layer:?} alone (check_runs_on_gpu refuses it)"),
            }
            tag(&mut forward_train[mark..], &op_name(model, &plan, op));
        }

        // Evaluation: a batchnorm after a convolution is an affine map per channel, run in the
        // convolution's epilogue (which writes the batchnorm's output).
        let mut forward_eval = Vec::new();
        for op in &plan.eval {
            let mark = forward_eval.len();
            let i = op.start;
            let (x, y) = (eval_input_of(i), eval_buffer(plan.eval_buffer[op.end - 1]));
            let sin = model.input_of(i);
            match (&model.layers[i], model.layer_params[i]) {
                _ if conv_of(op).is_some() => {
                    let (c, pool) = conv_of(op).expect("checked");
                    let (d, w_off) = model.conv(c, n).expect("a convolution layer");
                    let bias = model.conv_bias(c);
                    let bn = match (model.layers.get(c + 1), model.layer_params.get(c + 1)) {
                        (Some(&Layer::BatchNorm { c: channels, .. }), Some(&p)) if op.end > c + 1 => {
                            let l = bn_layer(c + 1, channels, p);
                            Some(EvalBn { offsets: l.offsets, eps: l.eps, relu: l.relu })
                        }
                        _ => None,
                    };
                    forward_eval.push(k.conv.forward(ctx, &d, w_off, bias, pool, 1, bn, None, x, state_buf, y)?);
                }
                (&Layer::BatchNorm { c, .. }, p) => {
                    let l = bn_layer(i, c, p);
                    let saved = saved[i].as_ref().unwrap();
                    forward_eval.push(k.batchnorm.forward_eval(
                        ctx,
                        &l,
                        &BnBuffers { x, y, state: state_buf, saved, step },
                    ));
                }
                (Layer::MaxPool2, _) => forward_eval.push(k.pool.maxpool_forward(ctx, (n * sin.c, sin.h, sin.w), x, y)),
                (Layer::GlobalAvgPool, _) => forward_eval.push(k.pool.gap_forward(ctx, n * sin.c, sin.h * sin.w, x, y)),
                (layer, _) => unreachable!("{layer:?} alone in evaluation"),
            }
            tag(&mut forward_eval[mark..], &op_name(model, &plan, op));
        }

        // The loss kernel, with the global average pooling that ends the network inside.
        let last = model.layers.len() - 1;
        let logits = &activations[plan.buffer[last]];
        let eval_logits = plan.eval_buffer[last];
        // Both add batch after batch into the metrics (cleared by reset_metrics), so a training loop
        // reads running sums only when it shows them. Evaluation's dlogits go unused.
        let pool_hw = model.input_of(last).h * model.input_of(last).w;
        let loss_buffers = |logits, pooled_input| LossBuffers {
            logits,
            labels: &labels,
            dlogits: &grad_a,
            metrics,
            pooled: plan.pool_in_loss.is_some().then_some((pooled_input, pool_hw)),
        };
        let loss_train = k.loss.softmax_cross_entropy(ctx, n, classes, true, &loss_buffers(logits, input_of(last)));
        let eval_buffers = loss_buffers(eval_buffer(eval_logits), eval_input_of(last));
        let loss_eval = k.loss.softmax_cross_entropy(ctx, n, classes, true, &eval_buffers);

        // Backward, one launch per op: the gradient of the op's output is in `cur`; each writes the
        // gradient of its input into `other`.
        let mut backward = Vec::new();
        let (mut cur, mut other) = (&grad_a, &grad_b);
        for op in &plan.backward {
            let mark = backward.len();
            let i = op.start;
            let (x, y) = (input_of(i), &activations[plan.buffer[i]]);
            let sin = model.input_of(i);
            match (&model.layers[i], model.layer_params[i]) {
                (Layer::Conv { .. } | Layer::Linear { .. }, _) => {
                    let (d, w_off) = model.conv(i, n).expect("a convolution layer");
                    let slices = slices_of(&sliced, w_off, d.weight_len());
                    let bias = model.conv_bias(i).map(|b| slices_of(&sliced, b, d.cout));
                    let pool = plan.pooled_input[i];
                    let x = if pool { input_of(i - 1) } else { x };
                    // The input image needs no gradient.
                    let dx = (i > 0).then_some(other);
                    let bias = bias.as_ref();
                    let sums = sums_for[i].and_then(|b| Some((b, bn_of(b)?))).map(|(b, l)| BnSums {
                        saved: saved[b].as_ref().expect("a batchnorm's buffer"),
                        part_off: l.backward_partials_at(),
                        bn_x: input_of(b),
                        step,
                        relu: l.relu,
                        dropout: l.dropout.map(|f| f.p),
                    });
                    let conv = &k.conv;
                    backward.push(conv.backward(ctx, &d, &slices, bias, pool, x, cur, state_buf, grads, dx, sums)?);
                }
                (&Layer::BatchNorm { c, .. }, p) => {
                    let l = BnLayer { dy_pooled: plan.norm[i].avgpool, ..bn_layer(i, c, p) };
                    let saved = saved[i].as_ref().unwrap();
                    let b = BnBuffers { x, y, state: state_buf, saved, step };
                    backward.extend(k.batchnorm.backward(ctx, &l, &b, cur, other, grads));
                }
                (&Layer::Dropout { p }, _) => {
                    backward.push(k.dropout.apply(ctx, n * sin.len(), p, i, step, cur, other))
                }
                (Layer::MaxPool2, _) => {
                    backward.push(k.pool.maxpool_backward(ctx, (n * sin.c, sin.h, sin.w), x, cur, other));
                }
                (Layer::GlobalAvgPool, _) => {
                    backward.push(k.pool.gap_backward(ctx, n * sin.c, sin.h * sin.w, cur, other))
                }
                (layer, _) => unreachable!("{layer:?} alone (check_runs_on_gpu refuses it)"),
            }
            tag(&mut backward[mark..], &model.layer_name(i));
            std::mem::swap(&mut cur, &mut other);
        }
        let sgd_buffers = SgdBuffers { step, state: state_buf, grads, momenta, metrics };
        let update = k.sgd.update(ctx, model.num_trainable, &sliced, &sgd_buffers);
        let finish_grads = k.sgd.sum_slices(ctx, model.num_trainable, &sliced, grads);

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
            update,
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

    pub async fn read_momenta(&self, ctx: &GpuContext) -> Result<Vec<f32>> {
        ctx.read(&self.shared.momenta, self.model.num_trainable).await
    }

    pub fn write_momenta(&self, ctx: &GpuContext, momenta: &[f32]) {
        assert_eq!(momenta.len(), self.model.num_trainable);
        ctx.write(&self.shared.momenta, momenta);
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

    /// The launches of a training step up to its gradients: forward, loss, backward.
    fn gradient_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.forward_train.iter().chain([&self.loss_train]).chain(&self.backward)
    }

    /// Every launch of a training step, in order.
    fn train_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.gradient_dispatches().chain([&self.update])
    }

    /// Every launch of an evaluation batch, in order.
    fn eval_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        self.forward_eval.iter().chain([&self.loss_eval])
    }
}
