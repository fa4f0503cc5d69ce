//! `CpuNet`, the plain reference executor: the plan run op by op over the whole batch, each layer with
//! its reference function, in the plan's buffers. `verify`, the gradient checks, the fused executor's
//! tests and the GPU parity tests read against it. Buffers are kept between calls, so a training loop
//! allocates only on its first step.

use super::batchnorm::*;
use super::conv::*;
use super::dropout::{dropout_apply, dropout_mask_into};
use super::pool;
use super::relu::*;
use crate::cpu::executor::{DropoutMode, Executor, Mode};
use crate::cpu::profile::{self, record, OpTime};
use crate::model::plan::Plan;
use crate::model::{Layer, LayerParams, Model, BN_EPS, BN_MOMENTUM};

/// What a layer's backward pass needs from its forward pass, beyond its input and output.
#[derive(Debug, Clone)]
enum Saved {
    None,
    BatchNorm(BnSaved),
    /// A pooling's winners (empty for an average).
    Pool(Vec<u8>),
    /// Dropout scale per element; `None` when dropout was the identity.
    Dropout(Option<Vec<f32>>),
}

pub struct CpuNet {
    pub model: Model,
    /// What runs, in which ops and buffers: the same plan the GPU executor launches.
    pub plan: Plan,
    n: usize,
    input: Vec<f32>,
    /// The plan's buffers, as the last forward pass left them.
    buffers: Vec<Vec<f32>>,
    /// The buffer of the last forward pass's logits (None: the input, for a network of dropout alone).
    logits_at: Option<usize>,
    saved: Vec<Saved>,
    /// Gradients of the trainable prefix of the state buffer, from the last backward pass.
    pub grads: Vec<f32>,
    grad_out: Vec<f32>,
    grad_in: Vec<f32>,
    dlogits: Vec<f32>,
    /// When profiling (`profile_step`), each op's time as it runs.
    timing: Option<Vec<OpTime>>,
}

/// Split a state buffer into one parameter tensor, by table index.
pub(crate) fn tensor<'a>(model: &Model, state: &'a [f32], index: usize) -> &'a [f32] {
    let p = &model.params[index];
    &state[p.offset..p.offset + p.len]
}

impl CpuNet {
    pub fn new(model: &Model) -> CpuNet {
        let plan = Plan::new(model);
        CpuNet {
            model: model.clone(),
            n: 0,
            input: Vec::new(),
            buffers: vec![Vec::new(); plan.buffers],
            logits_at: None,
            plan,
            saved: vec![Saved::None; model.layers.len()],
            grads: vec![0.0; model.num_trainable],
            grad_out: Vec::new(),
            grad_in: Vec::new(),
            dlogits: Vec::new(),
            timing: None,
        }
    }

    /// Bytes a training step of `n` images holds, about: the plan's buffers, the dropout masks and
    /// max-pooling winners kept for the backward pass, the two gradient buffers and the input.
    pub fn bytes_for_batch(model: &Model, n: usize) -> u64 {
        let plan = Plan::new(model);
        let mut buffers = vec![0usize; plan.buffers];
        let (mut kept_f32, mut kept_u8, mut largest) = (0usize, 0usize, model.input.len());
        for (i, shape) in model.shapes.iter().enumerate() {
            buffers[plan.buffer[i]] = buffers[plan.buffer[i]].max(shape.len());
            largest = largest.max(shape.len());
            match model.layers[i] {
                Layer::Dropout { .. } => kept_f32 += shape.len(),
                Layer::MaxPool2 => kept_u8 += shape.len(),
                _ => {}
            }
        }
        let per_image_f32 = buffers.iter().sum::<usize>() + kept_f32 + 2 * largest + model.input.len();
        n as u64 * (4 * per_image_f32 as u64 + kept_u8 as u64)
    }
}

/// One layer's forward call: where it reads and writes, and what it saved last time (its buffers are
/// reused).
struct LayerCall<'a> {
    i: usize,
    n: usize,
    mode: Mode,
    /// The input (empty when the layer runs in place).
    x: &'a [f32],
    in_place: bool,
    previous: Saved,
}

impl CpuNet {
    /// Layer `c.i`'s forward pass over the batch, x into y (or y in place); returns what its backward
    /// pass needs.
    fn forward_layer(model: &Model, state: &mut [f32], c: LayerCall, y: &mut [f32]) -> Saved {
        let LayerCall { i, n, mode, x, in_place, previous } = c;
        let sin = model.input_of(i);
        match (&model.layers[i], model.layer_params[i]) {
            (Layer::Conv { .. } | Layer::Linear { .. }, _) => {
                // A linear layer is the 1x1 convolution of its flattened input (model.conv).
                let (d, w_off) = model.conv(i, n).expect("a convolution layer");
                conv_forward(&d, x, &state[w_off..w_off + d.weight_len()], y);
                if let Some(b) = model.conv_bias(i) {
                    bias_forward(&d, &state[b..b + d.cout], y);
                }
                Saved::None
            }
            (&Layer::BatchNorm { c, .. }, LayerParams::BatchNorm { weight, bias, running_mean, running_var }) => {
                let d = BnDims { n, c, hw: sin.h * sin.w };
                let (gamma, beta) = (tensor(model, state, weight), tensor(model, state, bias));
                if mode == Mode::Eval {
                    let (rm, rv) = (tensor(model, state, running_mean), tensor(model, state, running_var));
                    batchnorm_forward_eval(&d, x, gamma, beta, rm, rv, BN_EPS, y);
                    return Saved::None;
                }
                let saved = batchnorm_forward_train(&d, x, gamma, beta, BN_EPS, y);
                let (rm, rv) = (&model.params[running_mean], &model.params[running_var]);
                // The running mean and variance are adjacent in the table.
                debug_assert_eq!(rm.offset + rm.len, rv.offset);
                let (mean, var) = state[rm.offset..rv.offset + rv.len].split_at_mut(rm.len);
                batchnorm_update_running(&d, &saved, BN_MOMENTUM, mean, var);
                Saved::BatchNorm(saved)
            }
            (Layer::Relu, _) => {
                if !in_place {
                    y.copy_from_slice(x);
                }
                relu_forward(y);
                Saved::None
            }
            (&Layer::Dropout { p }, _) => {
                if !in_place {
                    y.copy_from_slice(x);
                }
                match mode {
                    Mode::Train(DropoutMode::Hash { seed, step }) if p > 0.0 => {
                        let mut mask = match previous {
                            Saved::Dropout(Some(mask)) => mask,
                            _ => Vec::new(),
                        };
                        mask.resize(y.len(), 0.0);
                        dropout_mask_into(seed, step, i as u32, p, &mut mask);
                        dropout_apply(&mask, y);
                        Saved::Dropout(Some(mask))
                    }
                    _ => Saved::Dropout(None),
                }
            }
            (layer, _) if layer.is_pooling() => {
                let mut winners = match previous {
                    Saved::Pool(winners) => winners,
                    _ => Vec::new(),
                };
                pool::forward(layer, n * sin.c, sin, x, y, &mut winners);
                Saved::Pool(winners)
            }
            (layer, params) => unreachable!("layer {layer:?} with parameters {params:?}"),
        }
    }
}

impl Executor for CpuNet {
    fn model(&self) -> &Model {
        &self.model
    }

    /// Runs the network op by op as the plan groups the layers, each layer with its reference function.
    fn forward(&mut self, state: &mut [f32], input: &[f32], n: usize, mode: Mode) -> &[f32] {
        let model = &self.model;
        let plan = &self.plan;
        assert_eq!(state.len(), model.num_state, "state buffer length");
        assert_eq!(input.len(), n * model.input.len(), "input length");
        self.n = n;
        self.input.clear();
        self.input.extend_from_slice(input);
        let training = matches!(mode, Mode::Train(_));
        let ops = if training { &plan.forward } else { &plan.eval };
        let at = |i: usize| plan.output_buffer(i, training);
        // The global average pooling that the GPU runs inside the loss kernel runs last.
        let in_loss = plan.pool_in_loss.map(|i| i..i + 1);
        for i in ops.iter().chain(&in_loss).flat_map(|op| op.clone()) {
            if mode == Mode::Eval && matches!(model.layers[i], Layer::Dropout { .. }) {
                continue; // the identity
            }
            let started = self.timing.is_some().then(web_time::Instant::now);
            let from = if i == 0 { None } else { at(i - 1) };
            let to = at(i).expect("a layer that runs has a buffer");
            let in_place = from == Some(to);
            // Take the output buffer out while the input is read (reused between calls).
            let mut y = std::mem::take(&mut self.buffers[to]);
            y.resize(n * model.shapes[i].len(), 0.0);
            let x: &[f32] = if in_place { &[] } else { from.map_or(&self.input, |b| &self.buffers[b]) };
            let previous = std::mem::replace(&mut self.saved[i], Saved::None);
            let call = LayerCall { i, n, mode, x, in_place, previous };
            self.saved[i] = CpuNet::forward_layer(model, state, call, &mut y);
            self.buffers[to] = y;
            record(&mut self.timing, &profile::label(model, i, false), profile::cost(model, i, n, false), started);
        }
        self.logits_at = at(model.layers.len() - 1);
        self.logits()
    }

    /// Backpropagates `dlogits` through the last training-mode forward pass, op by op as the plan
    /// groups the layers; returns the gradients of the trainable prefix of the state buffer.
    fn backward(&mut self, state: &[f32], dlogits: &[f32]) -> &[f32] {
        let model = &self.model;
        let plan = &self.plan;
        let n = self.n;
        assert_eq!(dlogits.len(), self.logits().len(), "dlogits length");
        self.grad_out.clear();
        self.grad_out.extend_from_slice(dlogits);
        for i in plan.backward.iter().flat_map(|op| op.clone().rev()) {
            let x: &[f32] = if i == 0 { &self.input } else { &self.buffers[plan.buffer[i - 1]] };
            let sin = model.input_of(i);
            let started = self.timing.is_some().then(web_time::Instant::now);
            self.grad_in.resize(n * sin.len(), 0.0);
            let (dy, dx) = (&mut self.grad_out, &mut self.grad_in);
            // Layers that transform the gradient in place leave it in `dy`; the others write `dx`.
            let mut in_place = false;
            match (&model.layers[i], model.layer_params[i], &self.saved[i]) {
                (Layer::Conv { .. } | Layer::Linear { .. }, _, _) => {
                    let (d, w_off) = model.conv(i, n).expect("a convolution layer");
                    let weights = w_off..w_off + d.weight_len();
                    // The input image needs no gradient.
                    let dx = if i == 0 { None } else { Some(&mut dx[..]) };
                    conv_backward(&d, x, &state[weights.clone()], dy, dx, &mut self.grads[weights]);
                    if let Some(b) = model.conv_bias(i) {
                        bias_backward(&d, dy, &mut self.grads[b..b + d.cout]);
                    }
                }
                (&Layer::BatchNorm { c, .. }, LayerParams::BatchNorm { weight, bias, .. }, Saved::BatchNorm(saved)) => {
                    let d = BnDims { n, c, hw: sin.h * sin.w };
                    let (pw, pb) = (&model.params[weight], &model.params[bias]);
                    // bias follows weight in the table.
                    let (dgamma, dbeta) = self.grads[pw.offset..pb.offset + pb.len].split_at_mut(pw.len);
                    batchnorm_backward(&d, x, dy, tensor(model, state, weight), saved, dx, dgamma, dbeta);
                }
                (Layer::Relu, _, _) => {
                    // Its output, or what a dropout in place made of it: zero exactly where either cut.
                    relu_backward(&self.buffers[plan.buffer[i]], dy);
                    in_place = true;
                }
                (Layer::Dropout { .. }, _, Saved::Dropout(mask)) => {
                    if let Some(mask) = mask {
                        dropout_apply(mask, dy);
                    }
                    in_place = true;
                }
                (layer, _, Saved::Pool(winners)) if layer.is_pooling() => {
                    pool::backward(layer, n * sin.c, sin, winners, dy, dx)
                }
                (layer, _, _) => {
                    panic!("backward of {layer:?} needs a training-mode forward pass first")
                }
            }
            if !in_place {
                std::mem::swap(&mut self.grad_out, &mut self.grad_in);
            }
            record(&mut self.timing, &profile::label(model, i, true), profile::cost(model, i, n, true), started);
        }
        &self.grads
    }

    /// The logits (n x classes) of the last forward pass.
    fn logits(&self) -> &[f32] {
        self.logits_at.map_or(&self.input, |b| &self.buffers[b])
    }

    fn grads(&self) -> &[f32] {
        &self.grads
    }

    fn scratch(&mut self) -> (&mut Vec<f32>, &mut Option<Vec<OpTime>>) {
        (&mut self.dlogits, &mut self.timing)
    }
}
