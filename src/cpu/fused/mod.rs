//! The fast CPU executor: the network of `CpuNet` (the plain reference, which the tests and `verify`
//! hold everything against) run in a few passes over the batch instead of one pass per layer.
//!
//! A pass takes each image through every layer between two points where the whole batch must meet,
//! while the image is in cache: a batchnorm's statistics in the forward pass, its gradient sums in
//! the backward pass. The plan decides the passes (`Plan::passes`); Net3's training step is 7 passes
//! forward and 7 backward (45 layer ops in `CpuNet`); evaluation, which needs no batch statistics, is
//! one pass. The linear layers that end a network run after the forward passes, layer by layer over
//! the whole batch (`batched.rs`), as one product each instead of one per image. Each layer runs the
//! reference's own per-image functions (`image.rs`), the convolutions with the products of `fma.rs`
//! where the CPU has FMA (`products.rs` decides): over the padded image's taps (`shifted.rs`), or in
//! the reference's order where the output plane is small (`small.rs`). A batchnorm's per-image sums
//! run in vector lanes (`moments.rs`), a convolution's bias (and in evaluation the batchnorm and ReLU
//! after it) as its epilogue, the 2x2 poolings in vector registers (`pool.rs`). What differs from
//! `CpuNet` is the order of some sums: a batchnorm's mean and variance come from one pass of sums and
//! sums of squares (f64), and the larger convolutions' weight gradients are dot products summed in
//! vector lanes, then in groups of images (`store.rs`). Every sum is kept per image or per group and
//! added in image order, so the results do not depend on the number of threads.

mod batched;
mod fma;
mod image;
mod moments;
mod owned;
mod pool;
mod products;
mod shifted;
mod small;
mod store;
mod totals;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use self::batched::Batched;
use self::image::{Ctx, Norm};
use self::products::Products;
use self::store::{group_size, image_order_sums, lens, views, Lens, Store};
use super::executor::{DropoutMode, Executor, Mode, Update};
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
    /// The batched layers' two batch-wide buffers: a backward pass's gradients (one read, one
    /// written), an evaluation's activations.
    batch: [Vec<f32>; 2],
    /// Per layer, the weights as a convolution's input gradient reads them, for a backward pass.
    flipped: Vec<Vec<f32>>,
    /// The logits of the last evaluation pass.
    eval_logits: Vec<f32>,
    dlogits: Vec<f32>,
    /// Gradients of the trainable prefix of the state buffer, from the last backward pass.
    pub grads: Vec<f32>,
    /// A convolution's groups' weight gradients summed, as the groups keep them.
    summed: Vec<f32>,
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
            batch: [Vec::new(), Vec::new()],
            flipped: vec![Vec::new(); model.layers.len()],
            eval_logits: Vec::new(),
            dlogits: Vec::new(),
            grads: vec![0.0; model.num_trainable],
            summed: Vec::new(),
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
            flipped: &self.flipped,
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
            let stats_for = (layers.end < self.plan.passes.batched.start).then_some(layers.end);
            let (ctx, store) = self.pass(state, dropout);
            let views = views(store, ctx.lens, n, (&[], &mut []));
            views.into_par_iter().for_each(|mut v| {
                for j in 0..v.images {
                    let mut i = layers.start;
                    while i < layers.end {
                        i = ctx.train_op(&mut v, j, i, layers.end);
                    }
                    if let Some(b) = stats_for {
                        ctx.image_moments(&mut v, j, b);
                    }
                }
            });
            self.time_pass("fused", layers, false, started);
        }
        self.batched_forward_train(state, dropout);
    }

    /// What the batched layers read (`dropout` None: an evaluation pass).
    fn batched<'a>(&'a self, state: &'a [f32], n: usize, dropout: Option<DropoutMode>) -> Batched<'a> {
        let (dropout, training) = (dropout.unwrap_or(DropoutMode::Off), dropout.is_some());
        let (model, first) = (&self.model, self.plan.passes.batched.start);
        Batched { model, first, state, n, dropout, training, products: Products::fastest() }
    }

    /// The batched layers of a training forward pass, each over the whole batch in the plan's buffers.
    fn batched_forward_train(&mut self, state: &[f32], dropout: DropoutMode) {
        let mut buffers = std::mem::take(&mut self.store.buffers);
        let mut i = self.plan.passes.batched.start;
        while i < self.plan.passes.batched.end {
            let started = self.timing.is_some().then(web_time::Instant::now);
            let batch = self.batched(state, self.n, Some(dropout));
            let out = self.plan.buffer[i];
            let next = if i == 0 {
                batch.forward(i, Some(&self.store.input), &mut buffers[out])
            } else if self.plan.buffer[i - 1] == out {
                batch.forward(i, None, &mut buffers[out])
            } else {
                let (x, y) = two(&mut buffers, self.plan.buffer[i - 1], out);
                batch.forward(i, Some(x), y)
            };
            self.time_pass("batched", i..next, false, started);
            i = next;
        }
        self.store.buffers = buffers;
    }

    /// The batched layers of an evaluation pass, from the per-image pass's output in the first batch
    /// buffer (or from the input, when every layer is batched) into the logits.
    fn batched_eval(&mut self, state: &[f32], input: &[f32]) {
        let n = self.n;
        if self.plan.passes.batched.is_empty() {
            return;
        }
        let mut buffers = std::mem::take(&mut self.batch);
        // The activations are in buffers[cur].
        let mut cur = 0;
        let mut i = self.plan.passes.batched.start;
        while i < self.plan.passes.batched.end {
            let started = self.timing.is_some().then(web_time::Instant::now);
            let batch = self.batched(state, n, None);
            let yl = n * self.model.shapes[i].len();
            let next = match self.model.layers[i] {
                Layer::Dropout { .. } => {
                    i += 1;
                    continue;
                }
                Layer::Relu => batch.forward(i, None, &mut buffers[cur][..yl]),
                _ => {
                    let [a, b] = &mut buffers;
                    let (x, y) = if cur == 0 { (a, b) } else { (b, a) };
                    let x = if i == 0 { input } else { &x[..n * self.model.input_of(i).len()] };
                    cur = 1 - cur;
                    batch.forward(i, Some(x), &mut y[..yl])
                }
            };
            self.time_pass("batched", i..next, false, started);
            i = next;
        }
        let logits = self.eval_logits.len();
        self.eval_logits.copy_from_slice(&buffers[cur][..logits]);
        self.batch = buffers;
    }

    /// The batched layers' backward pass, from dlogits, each over the whole batch; their weight
    /// gradients into `grads`. Returns the batch buffer that holds the gradient at their input (None
    /// when no layer is batched).
    fn batched_backward(&mut self, state: &[f32], dlogits: &[f32]) -> Option<usize> {
        let (n, tail) = (self.n, self.plan.passes.batched.clone());
        if tail.is_empty() {
            return None;
        }
        let mut buffers = std::mem::take(&mut self.batch);
        buffers[0][..dlogits.len()].copy_from_slice(dlogits);
        // The gradient is in buffers[cur].
        let mut cur = 0;
        let mut grads = std::mem::take(&mut self.grads);
        // The layers below `top` are left.
        let mut top = tail.end;
        while top > tail.start {
            let i = top - 1;
            let started = self.timing.is_some().then(web_time::Instant::now);
            let batch = self.batched(state, n, Some(self.dropout));
            let x: &[f32] = if i == 0 { &self.store.input } else { &self.store.buffers[self.plan.buffer[i - 1]] };
            let y = &self.store.buffers[self.plan.buffer[i]];
            let [a, b] = &mut buffers;
            let (dy, dx) = if cur == 0 { (a, b) } else { (b, a) };
            let dx = (i > 0).then(|| &mut dx[..x.len()]);
            let (wrote, below) = batch.backward(i, x, y, &mut dy[..y.len()], dx, &mut grads);
            cur = if wrote { 1 - cur } else { cur };
            self.time_pass("batched", below..top, true, started);
            top = below;
        }
        self.grads = grads;
        self.batch = buffers;
        Some(cur)
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
        self.eval_logits.resize(n * classes, 0.0);
        self.size_batch(n);
        let tail = self.plan.passes.batched.clone();
        if tail.start > 0 {
            let mut out = std::mem::take(self.per_image_out());
            let row = self.model.shapes[tail.start - 1].len();
            let (ctx, _) = self.pass(state, DropoutMode::Off);
            out[..n * row]
                .par_chunks_mut(row)
                .zip(input.par_chunks(image))
                .enumerate()
                .for_each(|(img, (out, x))| ctx.eval_image(img, x, out));
            *self.per_image_out() = out;
            self.time_pass("fused", 0..tail.start, false, started);
        }
        self.batched_eval(state, input);
    }

    /// Where an evaluation's per-image pass writes: the logits, or the batched layers' input.
    fn per_image_out(&mut self) -> &mut Vec<f32> {
        match self.plan.passes.batched.is_empty() {
            true => &mut self.eval_logits,
            false => &mut self.batch[0],
        }
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
        self.size_batch(n);
    }

    /// Sizes the batched layers' buffers for a batch of `n`: each as long as the longest of their
    /// inputs and outputs.
    fn size_batch(&mut self, n: usize) {
        let model = &self.model;
        let tail = self.plan.passes.batched.clone();
        let widest = tail.map(|i| model.shapes[i].len().max(model.input_of(i).len())).max().unwrap_or(0);
        for b in &mut self.batch {
            b.resize(n * widest, 0.0);
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
        for i in 0..self.plan.passes.batched.start {
            let Some((d, w)) = self.model.conv(i, 1) else { continue };
            let (wl, pl) = (d.weight_len(), self.lens.partials[i]);
            self.summed.resize(pl, 0.0);
            sum_rows(&self.store.partials[i][..groups * pl], &mut self.summed);
            products::gradient_from_partial(&d, Products::fastest(), &self.summed, &mut self.grads[w..w + wl]);
            if let Some(b) = self.model.conv_bias(i) {
                let totals = image_order_sums(&self.store.image_sums[i][..n * d.cout], d.cout);
                self.grads[b..b + d.cout].iter_mut().zip(totals).for_each(|(g, t)| *g = t as f32);
            }
        }
    }

    /// Records a pass's time when profiling (`what`: fused or batched), with its layers' FLOPs and
    /// bytes.
    fn time_pass(&mut self, what: &str, layers: Range<usize>, backward: bool, started: Option<web_time::Instant>) {
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
        let label = format!("{what}.{} {}", if backward { "backward" } else { "forward" }, names.join("+"));
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
        for i in 1..self.plan.passes.batched.start {
            if let Some((d, w)) = self.model.conv(i, 1) {
                products::flip(&d, &state[w..w + d.weight_len()], Products::fastest(), &mut self.flipped[i]);
            }
        }
        let top = self.batched_backward(state, dlogits);
        let batch = std::mem::take(&mut self.batch);
        for k in 0..self.plan.passes.backward.len() {
            let pass = self.plan.passes.backward[k].clone();
            let started = self.timing.is_some().then(web_time::Instant::now);
            // The gradient at the pass's top, and where its bottom's goes: the two stored ones in turn.
            let mut grad = std::mem::take(&mut self.grad);
            let [g0, g1] = &mut grad;
            let (read, write) = if k % 2 == 0 { (g1, g0) } else { (g0, g1) };
            let len = |b: Option<usize>| b.map_or(0, |b| n * self.model.shapes[b].len());
            let (grad_in, grad_out) = (len(pass.from), len(pass.to));
            let grad_in: &[f32] = match (pass.from, top) {
                (Some(_), _) => &read[..grad_in],
                (None, Some(c)) => &batch[c][..n * self.model.shapes[pass.layers.end - 1].len()],
                (None, None) => dlogits,
            };
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
            let layers = pass.to.map_or(0, |b| b + 1)..pass.from.map_or(pass.layers.end, |b| b + 1);
            self.time_pass("fused", layers, true, started);
        }
        self.batch = batch;
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

    /// The update, each batched linear layer's weight rows by the thread that owns them (`owned`),
    /// the values between them (every other parameter) in chunks.
    fn update(&mut self, update: &Update, params: &mut [f32], moments: &mut [f32]) -> bool {
        let (mut m, mut v) = update.split_moments(moments, params.len());
        let (mut params, mut grads) = (params, &self.grads[..]);
        // Where `params` (what is left to update) starts in the trainable prefix.
        let mut at = 0;
        let mut nonfinite = false;
        for i in self.plan.passes.batched.clone() {
            let Some((d, w)) = self.model.conv(i, 1) else { continue };
            assert!(w >= at, "layer {i}'s weights lie before the layer's before it");
            let (off, len, flag) = (w - at, d.weight_len(), AtomicBool::new(false));
            let [before, weights, after] = split3(params, off, len);
            let ([mb, mw, ma], [vb, vw, va]) = (split3(m, off, len), split3(v, off, len));
            nonfinite |= update.apply(before, &grads[..off], mb, vb);
            let gw = &grads[off..off + len];
            owned::broadcast_rows(d.cout, d.cin, [weights, mw, vw], |r, [pr, mr, vr]| {
                if update.apply_serial(pr, &gw[r.start * d.cin..r.end * d.cin], mr, vr) {
                    flag.store(true, Ordering::Relaxed);
                }
            });
            nonfinite |= flag.into_inner();
            (params, m, v, grads, at) = (after, ma, va, &grads[off + len..], w + len);
        }
        nonfinite | update.apply(params, grads, m, v)
    }

    fn scratch(&mut self) -> (&mut Vec<f32>, &mut Option<Vec<OpTime>>) {
        (&mut self.dlogits, &mut self.timing)
    }
}

/// `buf` cut at `at` and `at + len` (an empty buffer into three empty ones: an update's second moments
/// where it has none).
fn split3(buf: &mut [f32], at: usize, len: usize) -> [&mut [f32]; 3] {
    if buf.is_empty() {
        return [&mut [], &mut [], &mut []];
    }
    let (before, rest) = buf.split_at_mut(at);
    let (middle, after) = rest.split_at_mut(len);
    [before, middle, after]
}

/// Buffers x (read) and y (written), two different ones.
fn two(buffers: &mut [Vec<f32>], x: usize, y: usize) -> (&[f32], &mut [f32]) {
    assert_ne!(x, y);
    if x < y {
        let (lo, hi) = buffers.split_at_mut(y);
        (&lo[x], &mut hi[0])
    } else {
        let (lo, hi) = buffers.split_at_mut(x);
        (&hi[0], &mut lo[y])
    }
}
