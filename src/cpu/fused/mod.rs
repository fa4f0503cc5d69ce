//! The fast CPU executor: the network of `CpuNet` (the plain reference, which the tests and `verify`
//! hold everything against) run in a few passes over the batch instead of one pass per layer.
//!
//! A pass takes each image through every layer between two points where the whole batch must meet,
//! while the image is in cache: a batchnorm's statistics in the forward pass, its gradient sums in
//! the backward pass. The plan decides the passes (`Plan::passes`); Net3's training step is 7 passes
//! forward and 7 backward (45 layer ops in `CpuNet`); evaluation, which needs no batch statistics, is
//! one pass. Each layer runs the reference's own per-image functions (`image.rs`), the convolutions
//! with the products of `fma.rs` over the padded image's taps (`shifted.rs`) where the CPU has FMA
//! (`products.rs` decides). What differs from `CpuNet` is the order of some sums: a batchnorm's mean
//! and variance come from one pass of sums and sums of squares (f64), and the weight gradients are dot
//! products summed in vector lanes, then in groups of images (`store.rs`). Every sum is kept per image
//! or per group and added in image order, so the results do not depend on the number of threads.

mod fma;
mod image;
mod products;
mod shifted;
mod store;

use std::ops::Range;

use rayon::prelude::*;

use self::image::{Ctx, Norm};
use self::products::Products;
use self::store::{group_size, image_order_sums, lens, views, Lens, Store};
use super::executor::{DropoutMode, Executor, Mode};
use super::profile::{self, record, OpTime};
use super::reference::batchnorm::{batchnorm_update_running, eval_normalization, normalization, BnDims};
use super::reference::conv::sum_rows;
use super::reference::net::tensor;
use crate::model::plan::Plan;
use crate::model::{Layer, LayerParams, Model, BN_EPS, BN_MOMENTUM};

pub struct FusedNet {
    pub model: Model,
    plan: Plan,
    lens: Lens,
    n: usize,
    dropout: DropoutMode,
    norms: Vec<Norm>,
    store: Store,
    /// The gradient at a batchnorm's output between two backward passes (one read, one written).
    grad: [Vec<f32>; 2],
    /// The logits of the last evaluation pass.
    eval_logits: Vec<f32>,
    dlogits: Vec<f32>,
    /// Gradients of the trainable prefix of the state buffer, from the last backward pass.
    pub grads: Vec<f32>,
    /// Whether the last forward pass trained (its logits are in the plan's last buffer).
    trained: bool,
    timing: Option<Vec<OpTime>>,
}

impl FusedNet {
    pub fn new(model: &Model) -> FusedNet {
        let plan = Plan::new(model);
        FusedNet {
            lens: lens(model, &plan),
            model: model.clone(),
            plan,
            n: 0,
            dropout: DropoutMode::Off,
            norms: vec![Norm::default(); model.layers.len()],
            store: Store::default(),
            grad: [Vec::new(), Vec::new()],
            eval_logits: Vec::new(),
            dlogits: Vec::new(),
            grads: vec![0.0; model.num_trainable],
            trained: false,
            timing: None,
        }
    }

    /// What every image of a pass reads, and the store its views cut.
    fn pass<'a>(&'a mut self, state: &'a [f32], dropout: DropoutMode) -> (Ctx<'a>, &'a mut Store) {
        let ctx = Ctx {
            model: &self.model,
            plan: &self.plan,
            state,
            norms: &self.norms,
            dropout,
            n: self.n,
            lens: &self.lens,
            products: Products::fastest(),
        };
        (ctx, &mut self.store)
    }

    fn forward_train(&mut self, state: &mut [f32], input: &[f32], n: usize, dropout: DropoutMode) {
        self.n = n;
        self.dropout = dropout;
        self.trained = true;
        self.size_store(n);
        self.store.input.copy_from_slice(input);
        for k in 0..self.plan.passes.forward.len() {
            let layers = self.plan.passes.forward[k].clone();
            let started = self.timing.is_some().then(web_time::Instant::now);
            if !layers.is_empty() && matches!(self.model.layers[layers.start], Layer::BatchNorm { .. }) {
                self.batch_statistics(state, layers.start);
            }
            let stats_for = (layers.end < self.model.layers.len()).then_some(layers.end);
            let (ctx, store) = self.pass(state, dropout);
            let views = views(store, ctx.lens, n, (&[], &mut []));
            views.into_par_iter().for_each(|mut v| {
                for j in 0..v.images {
                    for i in layers.clone() {
                        ctx.train_layer(&mut v, j, i);
                    }
                    if let Some(b) = stats_for {
                        ctx.image_moments(&mut v, j, b);
                    }
                }
            });
            self.time_pass(layers, false, started);
        }
    }

    /// A batchnorm's statistics from its images' sums (added in image order): its normalization,
    /// what its backward pass keeps, its running statistics updated.
    fn batch_statistics(&mut self, state: &mut [f32], b: usize) {
        let model = &self.model;
        let (c, s) = (model.shapes[b].c, model.shapes[b]);
        let m = (self.n * s.h * s.w) as f64;
        let totals = image_order_sums(&self.store.image_sums[b][..self.n * 2 * c], 2 * c);
        let mean: Vec<f64> = (0..c).map(|ch| totals[2 * ch] / m).collect();
        let var: Vec<f64> = (0..c).map(|ch| (totals[2 * ch + 1] / m - mean[ch] * mean[ch]).max(0.0)).collect();
        let LayerParams::BatchNorm { weight, bias, running_mean, running_var } = model.layer_params[b] else {
            unreachable!("layer {b} is a batchnorm")
        };
        let (saved, scale, shift) =
            normalization(&mean, &var, tensor(model, state, weight), tensor(model, state, bias), BN_EPS);
        let (rm, rv) = (&model.params[running_mean], &model.params[running_var]);
        let (mean, var) = state[rm.offset..rv.offset + rv.len].split_at_mut(rm.len);
        batchnorm_update_running(&BnDims { n: self.n, c, hw: s.h * s.w }, &saved, BN_MOMENTUM, mean, var);
        self.norms[b] = Norm { scale, shift, saved, sums: Vec::new() };
    }

    fn forward_eval(&mut self, state: &[f32], input: &[f32], n: usize) {
        let model = &self.model;
        self.n = n;
        self.trained = false;
        let started = self.timing.is_some().then(web_time::Instant::now);
        for b in (0..model.layers.len()).filter(|&i| matches!(model.layers[i], Layer::BatchNorm { .. })) {
            let LayerParams::BatchNorm { weight, bias, running_mean, running_var } = model.layer_params[b] else {
                unreachable!("layer {b} is a batchnorm")
            };
            let t = |i| tensor(model, state, i);
            let (scale, shift) = eval_normalization(t(weight), t(bias), t(running_mean), t(running_var), BN_EPS);
            self.norms[b] = Norm { scale, shift, ..Norm::default() };
        }
        let (classes, image) = (model.output_classes(), model.input.len());
        let mut logits = std::mem::take(&mut self.eval_logits);
        logits.resize(n * classes, 0.0);
        let (ctx, _) = self.pass(state, DropoutMode::Off);
        logits
            .par_chunks_mut(classes)
            .zip(input.par_chunks(image))
            .enumerate()
            .for_each(|(img, (logits, x))| ctx.eval_image(img, x, logits));
        self.eval_logits = logits;
        self.time_pass(0..self.model.layers.len(), false, started);
    }

    /// Sizes the store and the stored gradients for a batch of `n` (allocating only when the batch
    /// grows).
    fn size_store(&mut self, n: usize) {
        self.store.size_for(n, &self.model, &self.lens);
        let model = &self.model;
        let widest = self.plan.passes.backward.iter().filter_map(|p| p.to).map(|b| model.shapes[b].len()).max();
        for g in &mut self.grad {
            g.resize(n * widest.unwrap_or(0), 0.0);
        }
    }

    /// Batchnorm `b`'s gradient sums over the batch (in image order): its dgamma and dbeta, and the
    /// sums its dx reads in the next pass.
    fn gradient_sums(&mut self, b: usize) {
        let c = self.model.shapes[b].c;
        let totals = image_order_sums(&self.store.image_sums[b][..self.n * 2 * c], 2 * c);
        let sums: Vec<(f64, f64)> = totals.chunks_exact(2).map(|t| (t[0], t[1])).collect();
        let LayerParams::BatchNorm { weight, bias, .. } = self.model.layer_params[b] else {
            unreachable!("layer {b} is a batchnorm")
        };
        let (pw, pb) = (self.model.params[weight].offset, self.model.params[bias].offset);
        for (ch, &(dy, dy_xhat)) in sums.iter().enumerate() {
            self.grads[pw + ch] = dy_xhat as f32;
            self.grads[pb + ch] = dy as f32;
        }
        self.norms[b].sums = sums;
    }

    /// The convolutions' weight gradients, their groups' added in order, and bias gradients, their
    /// images' added in order.
    fn weight_gradients(&mut self) {
        let n = self.n;
        let groups = n.div_ceil(group_size(n));
        for i in 0..self.model.layers.len() {
            let Some((d, w)) = self.model.conv(i, 1) else { continue };
            let wl = d.weight_len();
            sum_rows(&self.store.partials[i][..groups * wl], &mut self.grads[w..w + wl]);
            if let Some(b) = self.model.conv_bias(i) {
                let totals = image_order_sums(&self.store.image_sums[i][..n * d.cout], d.cout);
                self.grads[b..b + d.cout].iter_mut().zip(totals).for_each(|(g, t)| *g = t as f32);
            }
        }
    }

    /// Records a pass's time when profiling, with its layers' FLOPs and bytes.
    fn time_pass(&mut self, layers: Range<usize>, backward: bool, started: Option<web_time::Instant>) {
        if self.timing.is_none() {
            return;
        }
        let model = &self.model;
        let (mut flops, mut bytes) = (0.0, 0.0);
        for i in layers.clone() {
            let (f, b) = profile::cost(model, i, self.n, backward);
            flops += f;
            bytes += b;
        }
        let mut names: Vec<String> = layers.map(|i| model.layer_name(i)).collect();
        if names.is_empty() {
            names.push("(the input's sums for the first batchnorm)".into());
        }
        let label = format!("fused.{} {}", if backward { "backward" } else { "forward" }, names.join("+"));
        record(&mut self.timing, &label, (flops, bytes), started);
    }
}

impl Executor for FusedNet {
    fn model(&self) -> &Model {
        &self.model
    }

    /// Runs the network on `n` images as `CpuNet` does (training mode updates the running statistics
    /// in `state`).
    fn forward(&mut self, state: &mut [f32], input: &[f32], n: usize, mode: Mode) -> &[f32] {
        assert_eq!(state.len(), self.model.num_state, "state buffer length");
        assert_eq!(input.len(), n * self.model.input.len(), "input length");
        match mode {
            Mode::Train(dropout) => self.forward_train(state, input, n, dropout),
            Mode::Eval => self.forward_eval(state, input, n),
        }
        self.logits()
    }

    fn backward(&mut self, state: &[f32], dlogits: &[f32]) -> &[f32] {
        assert!(self.trained, "backward needs a training-mode forward pass first");
        assert_eq!(dlogits.len(), self.logits().len(), "dlogits length");
        let n = self.n;
        for k in 0..self.plan.passes.backward.len() {
            let pass = self.plan.passes.backward[k].clone();
            let started = self.timing.is_some().then(web_time::Instant::now);
            // The gradient at the pass's top, and where its bottom's goes: the two stored ones in turn.
            let mut grad = std::mem::take(&mut self.grad);
            let [g0, g1] = &mut grad;
            let (read, write) = if k % 2 == 0 { (g1, g0) } else { (g0, g1) };
            let len = |b: Option<usize>| b.map_or(0, |b| n * self.model.shapes[b].len());
            let (grad_in, grad_out) = (len(pass.from), len(pass.to));
            let grad_in: &[f32] = if pass.from.is_none() { dlogits } else { &read[..grad_in] };
            let (ctx, store) = self.pass(state, self.dropout);
            let views = views(store, ctx.lens, n, (grad_in, &mut write[..grad_out]));
            views.into_par_iter().for_each(|mut v| {
                for j in 0..v.images {
                    ctx.backward_image(&mut v, j, &pass);
                }
            });
            self.grad = grad;
            if let Some(b) = pass.to {
                self.gradient_sums(b);
            }
            self.time_pass(pass.to.map_or(0, |b| b + 1)..pass.from.map_or(pass.layers.end, |b| b + 1), true, started);
        }
        self.weight_gradients();
        &self.grads
    }

    /// The logits (n x classes) of the last forward pass.
    fn logits(&self) -> &[f32] {
        match self.trained {
            true => &self.store.buffers[self.plan.buffer[self.model.layers.len() - 1]],
            false => &self.eval_logits,
        }
    }

    fn grads(&self) -> &[f32] {
        &self.grads
    }

    fn scratch(&mut self) -> (&mut Vec<f32>, &mut Option<Vec<OpTime>>) {
        (&mut self.dlogits, &mut self.timing)
    }
}
