//! The fast CPU executor: the network of `CpuNet` (the plain reference, which the tests and `verify`
//! hold everything against) run in a few passes over the batch instead of one pass per layer.
//!
//! A pass takes each image through every layer between two points where the whole batch must meet,
//! while the image is in cache: a batchnorm's statistics in the forward pass, its gradient sums in
//! the backward pass. Net3's training step is 7 passes forward and 7 backward (45 layer ops in
//! `CpuNet`); evaluation, which needs no batch statistics, is one pass. Each layer runs the
//! reference's own per-image functions, the convolutions with the products of `kernel.rs` over the
//! padded image's taps (`shifted.rs`) where the CPU has FMA. What differs from `CpuNet` is the order
//! of some sums: a batchnorm's mean and variance come from one pass of sums and sums of squares
//! (f64), and the weight gradients are dot products summed in vector lanes, then in `GROUPS` groups
//! of images. Every sum is kept per image or per group and added in image order, so the results do
//! not depend on the number of threads.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::batchnorm::{
    affine_image, backward_dx_image, batchnorm_update_running, dy_xhat, eval_normalization, normalization, plane_sum,
    BnDims, BnSaved,
};
use super::conv::{
    backward_image, bias_forward_image, forward_image, plane_total, sum_rows, with_columns, with_scratch, ConvDims,
    Products,
};
use super::dropout::dropout_serial;
use super::net::{tensor, DropoutMode, Executor, Mode};
use super::pool;
use super::profile::{self, OpTime};
use super::relu::{relu_backward_serial, relu_forward_serial};
use crate::model::plan::Plan;
use crate::model::{Layer, LayerParams, Model, BN_EPS, BN_MOMENTUM};

/// The batch is cut into at most this many groups of consecutive images (a split that depends on the
/// batch size only): the unit of parallel work, and of the weight gradients' partial sums.
const GROUPS: usize = 32;

thread_local! {
    /// Each thread's gradient of the image it is on (two: an op reads one and writes the other), and
    /// the max poolings' winners of an evaluation pass, which nothing reads.
    static PING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PONG: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static WINNERS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A batchnorm layer's numbers for the current pass: its normalization as y = x * scale + shift,
/// what its backward pass needs, and (backward) the batch's per-channel sums of dy and dy * xhat.
#[derive(Debug, Clone, Default)]
struct Norm {
    scale: Vec<f32>,
    shift: Vec<f32>,
    saved: BnSaved,
    sums: Vec<(f64, f64)>,
}

/// What holds the whole batch between passes.
#[derive(Debug, Default)]
struct Store {
    input: Vec<f32>,
    /// The plan's training buffers (ReLUs, and dropouts inside a batchnorm's op, in place).
    buffers: Vec<Vec<f32>>,
    /// Per layer: a max pooling's winners.
    winners: Vec<Vec<u8>>,
    /// Per layer, per image: a batchnorm's two sums per channel (forward: of x and x^2; backward: of
    /// dy and dy * xhat), a convolution's bias gradient per channel.
    image_sums: Vec<Vec<f64>>,
    /// Per convolution layer, per group: the group's weight gradient.
    partials: Vec<Vec<f32>>,
}

/// Per-image (or, for `partials`, per-group) lengths of the store's parts.
#[derive(Debug, Clone)]
struct Lens {
    buffers: Vec<usize>,
    winners: Vec<usize>,
    image_sums: Vec<usize>,
    partials: Vec<usize>,
    /// The largest image any layer reads or writes: the per-thread scratch's length.
    largest: usize,
}

/// One group's share of the store: its images' slices of each part.
struct View<'a> {
    first: usize,
    images: usize,
    input: &'a [f32],
    buffers: Vec<&'a mut [f32]>,
    winners: Vec<&'a mut [u8]>,
    image_sums: Vec<&'a mut [f64]>,
    partials: Vec<&'a mut [f32]>,
    grad_in: &'a [f32],
    grad_out: &'a mut [f32],
}

/// One backward pass: the batchnorm whose dx starts it (from the stored gradient; none: the first
/// pass, from dlogits), the layers below it down to the next batchnorm, and that batchnorm (whose
/// output gradient and sums end the pass; none: the last pass, down to the input).
#[derive(Debug, Clone)]
struct BackPass {
    from: Option<usize>,
    layers: Range<usize>,
    to: Option<usize>,
}

pub struct FusedNet {
    pub model: Model,
    plan: Plan,
    lens: Lens,
    /// The training forward passes: each a range of layers, a batchnorm (the first layer) normalizing
    /// with the statistics gathered at the end of the pass before.
    forward_passes: Vec<Range<usize>>,
    backward_passes: Vec<BackPass>,
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
        let count = model.layers.len();
        let norms: Vec<usize> = (0..count).filter(|&i| matches!(model.layers[i], Layer::BatchNorm { .. })).collect();
        // A batchnorm first (at 0) makes an empty first pass: its input's sums.
        let mut bounds = vec![0];
        bounds.extend(norms.iter().copied());
        bounds.push(count);
        let forward_passes = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let mut backward_passes = Vec::new();
        let mut top: Option<usize> = None;
        for &b in norms.iter().rev() {
            backward_passes.push(BackPass { from: top, layers: b + 1..top.unwrap_or(count), to: Some(b) });
            top = Some(b);
        }
        backward_passes.push(BackPass { from: top, layers: 0..top.unwrap_or(count), to: None });
        FusedNet {
            lens: lens(model, &plan),
            model: model.clone(),
            plan,
            forward_passes,
            backward_passes,
            n: 0,
            dropout: DropoutMode::Off,
            norms: vec![Norm::default(); count],
            store: Store::default(),
            grad: [Vec::new(), Vec::new()],
            eval_logits: Vec::new(),
            dlogits: Vec::new(),
            grads: vec![0.0; model.num_trainable],
            trained: false,
            timing: None,
        }
    }

    /// The logits (n x classes) of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        match self.trained {
            true => &self.store.buffers[self.plan.buffer[self.model.layers.len() - 1]],
            false => &self.eval_logits,
        }
    }

    /// Runs the network on `n` images as `CpuNet::forward` does (training mode updates the running
    /// statistics in `state`).
    pub fn forward(&mut self, state: &mut [f32], input: &[f32], n: usize, mode: Mode) -> &[f32] {
        assert_eq!(state.len(), self.model.num_state, "state buffer length");
        assert_eq!(input.len(), n * self.model.input.len(), "input length");
        match mode {
            Mode::Train(dropout) => self.forward_train(state, input, n, dropout),
            Mode::Eval => self.forward_eval(state, input, n),
        }
        self.logits()
    }

    fn forward_train(&mut self, state: &mut [f32], input: &[f32], n: usize, dropout: DropoutMode) {
        self.n = n;
        self.dropout = dropout;
        self.trained = true;
        self.size_store(n);
        self.store.input.copy_from_slice(input);
        for k in 0..self.forward_passes.len() {
            let layers = self.forward_passes[k].clone();
            let started = self.timing.is_some().then(web_time::Instant::now);
            if !layers.is_empty() && matches!(self.model.layers[layers.start], Layer::BatchNorm { .. }) {
                self.batch_statistics(state, layers.start);
            }
            let stats_for = (layers.end < self.model.layers.len()).then_some(layers.end);
            let ctx = Ctx {
                model: &self.model,
                plan: &self.plan,
                state,
                norms: &self.norms,
                dropout,
                n,
                lens: &self.lens,
                products: Products::fastest(),
            };
            let views = views(&mut self.store, &self.lens, n, (&[], &mut []));
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
        let classes = model.output_classes();
        self.eval_logits.resize(n * classes, 0.0);
        let ctx = Ctx {
            model,
            plan: &self.plan,
            state,
            norms: &self.norms,
            dropout: DropoutMode::Off,
            n,
            lens: &self.lens,
            products: Products::fastest(),
        };
        let image = model.input.len();
        self.eval_logits
            .par_chunks_mut(classes)
            .zip(input.par_chunks(image))
            .enumerate()
            .for_each(|(img, (logits, x))| ctx.eval_image(img, x, logits));
        self.time_pass(0..self.model.layers.len(), false, started);
    }

    /// Backpropagates `dlogits` through the last training-mode forward pass; returns the gradients of
    /// the trainable prefix of the state buffer.
    pub fn backward(&mut self, state: &[f32], dlogits: &[f32]) -> &[f32] {
        assert!(self.trained, "backward needs a training-mode forward pass first");
        assert_eq!(dlogits.len(), self.logits().len(), "dlogits length");
        let n = self.n;
        for (k, pass) in self.backward_passes.clone().into_iter().enumerate() {
            let started = self.timing.is_some().then(web_time::Instant::now);
            let ctx = Ctx {
                model: &self.model,
                plan: &self.plan,
                state,
                norms: &self.norms,
                dropout: self.dropout,
                n,
                lens: &self.lens,
                products: Products::fastest(),
            };
            // The gradient at the pass's top, and where its bottom's goes: the two stored ones in turn.
            let [g0, g1] = &mut self.grad;
            let (read, write) = if k % 2 == 0 { (g1, g0) } else { (g0, g1) };
            let len = |b: Option<usize>| b.map_or(0, |b| n * self.model.shapes[b].len());
            let grad_in: &[f32] = if pass.from.is_none() { dlogits } else { &read[..len(pass.from)] };
            let views = views(&mut self.store, &self.lens, n, (grad_in, &mut write[..len(pass.to)]));
            views.into_par_iter().for_each(|mut v| {
                for j in 0..v.images {
                    ctx.backward_image(&mut v, j, &pass);
                }
            });
            if let Some(b) = pass.to {
                self.gradient_sums(b);
            }
            self.time_pass(pass.to.map_or(0, |b| b + 1)..pass.from.map_or(pass.layers.end, |b| b + 1), true, started);
        }
        self.weight_gradients();
        &self.grads
    }
}

/// The shared state of a pass: what every image reads.
struct Ctx<'a> {
    model: &'a Model,
    plan: &'a Plan,
    state: &'a [f32],
    norms: &'a [Norm],
    dropout: DropoutMode,
    n: usize,
    lens: &'a Lens,
    products: Products,
}

/// Per-image lengths of the store's parts for `model` as `plan` buffers it.
fn lens(model: &Model, plan: &Plan) -> Lens {
    let count = model.layers.len();
    let mut buffers = vec![0; plan.buffers];
    for i in 0..count {
        buffers[plan.buffer[i]] = model.shapes[i].len();
    }
    let by_layer = |f: &dyn Fn(usize) -> usize| (0..count).map(f).collect::<Vec<_>>();
    Lens {
        buffers,
        winners: by_layer(&|i| if matches!(model.layers[i], Layer::MaxPool2) { model.shapes[i].len() } else { 0 }),
        image_sums: by_layer(&|i| match &model.layers[i] {
            Layer::BatchNorm { c, .. } => 2 * c,
            _ => model.conv_bias(i).map_or(0, |_| model.conv(i, 1).expect("a convolution").0.cout),
        }),
        partials: by_layer(&|i| model.conv(i, 1).map_or(0, |(d, _)| d.weight_len())),
        largest: model.shapes.iter().map(|s| s.len()).chain([model.input.len()]).max().unwrap_or(0),
    }
}

/// Images per group for a batch of `n`.
fn group_size(n: usize) -> usize {
    n.div_ceil(GROUPS).max(1)
}

/// `v` cut into `groups` consecutive pieces of `per_group` (the last ones shorter or empty).
fn split<T>(v: &mut [T], per_group: usize, groups: usize) -> impl Iterator<Item = &mut [T]> {
    let mut chunks = (per_group > 0).then(|| v.chunks_mut(per_group));
    (0..groups).map(move |_| chunks.as_mut().and_then(|c| c.next()).unwrap_or_default())
}

/// The store cut into each group's views, with the gradient read and written by a backward pass
/// (`grads`: per image as long as they are for the pass, or empty).
fn views<'a>(store: &'a mut Store, lens: &Lens, n: usize, grads: (&'a [f32], &'a mut [f32])) -> Vec<View<'a>> {
    let group = group_size(n);
    let groups = n.div_ceil(group);
    let (grad_in, grad_out) = grads;
    let mut views: Vec<View<'a>> = (0..groups)
        .map(|g| View {
            first: g * group,
            images: group.min(n - g * group),
            input: &[],
            buffers: Vec::new(),
            winners: Vec::new(),
            image_sums: Vec::new(),
            partials: Vec::new(),
            grad_in: &[],
            grad_out: &mut [],
        })
        .collect();
    let image = store.input.len() / n.max(1);
    for (v, x) in views.iter_mut().zip(store.input.chunks((group * image).max(1))) {
        v.input = x;
    }
    let (gin, gout) = (grad_in.len() / n.max(1), grad_out.len() / n.max(1));
    for (v, g) in views.iter_mut().zip(grad_in.chunks((group * gin).max(1))) {
        v.grad_in = g;
    }
    for (v, g) in views.iter_mut().zip(split(grad_out, group * gout, groups)) {
        v.grad_out = g;
    }
    for (b, buf) in store.buffers.iter_mut().enumerate() {
        views.iter_mut().zip(split(buf, group * lens.buffers[b], groups)).for_each(|(v, s)| v.buffers.push(s));
    }
    for (i, w) in store.winners.iter_mut().enumerate() {
        views.iter_mut().zip(split(w, group * lens.winners[i], groups)).for_each(|(v, s)| v.winners.push(s));
    }
    for (i, s) in store.image_sums.iter_mut().enumerate() {
        views.iter_mut().zip(split(s, group * lens.image_sums[i], groups)).for_each(|(v, s)| v.image_sums.push(s));
    }
    for (i, p) in store.partials.iter_mut().enumerate() {
        views.iter_mut().zip(split(p, lens.partials[i], groups)).for_each(|(v, s)| v.partials.push(s));
    }
    views
}

/// Per-image rows of `width` sums, added in image order.
fn image_order_sums(rows: &[f64], width: usize) -> Vec<f64> {
    let mut total = vec![0.0f64; width];
    for row in rows.chunks_exact(width) {
        total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
    }
    total
}

/// x (read) and y (written), two different buffers of a view.
fn read_write<'b>(buffers: &'b mut [&mut [f32]], x: usize, y: usize) -> (&'b [f32], &'b mut [f32]) {
    assert_ne!(x, y);
    if x < y {
        let (lo, hi) = buffers.split_at_mut(y);
        (&*lo[x], &mut *hi[0])
    } else {
        let (lo, hi) = buffers.split_at_mut(x);
        (&*hi[0], &mut *lo[y])
    }
}

/// Layer `b`'s input image `j` of a view: the batch's input, or the buffer of the layer before.
fn input_image<'v>(
    plan: &Plan,
    model: &Model,
    input: &'v [f32],
    buffers: &'v [&mut [f32]],
    j: usize,
    b: usize,
) -> &'v [f32] {
    let len = model.input_of(b).len();
    match b {
        0 => &input[j * len..][..len],
        _ => &buffers[plan.buffer[b - 1]][j * len..][..len],
    }
}

impl Ctx<'_> {
    /// Layer `i` of a training pass on image `j` of view `v`, in the plan's buffers.
    fn train_layer(&self, v: &mut View, j: usize, i: usize) {
        let (xl, yl) = (self.model.input_of(i).len(), self.model.shapes[i].len());
        let out = self.plan.buffer[i];
        let wl = self.lens.winners[i];
        let winners = &mut v.winners[i][j * wl..][..wl];
        let img = v.first + j;
        if i == 0 {
            self.layer_forward(i, img, Some(&v.input[j * xl..][..xl]), &mut v.buffers[out][j * yl..][..yl], winners);
        } else if self.plan.buffer[i - 1] == out {
            self.layer_forward(i, img, None, &mut v.buffers[out][j * yl..][..yl], winners);
        } else {
            let (x, y) = read_write(&mut v.buffers, self.plan.buffer[i - 1], out);
            self.layer_forward(i, img, Some(&x[j * xl..][..xl]), &mut y[j * yl..][..yl], winners);
        }
    }

    /// Layer `i`'s forward pass on image `img`: x into y, or y in place when x is None (a ReLU or a
    /// dropout in its input's buffer). Dropout draws its mask as `CpuNet` does, by element index.
    fn layer_forward(&self, i: usize, img: usize, x: Option<&[f32]>, y: &mut [f32], winners: &mut [u8]) {
        let model = self.model;
        let layer = &model.layers[i];
        let sin = model.input_of(i);
        let read = || x.unwrap_or_else(|| panic!("layer {i} ({layer:?}) reads another buffer"));
        match layer {
            Layer::Conv { .. } | Layer::Linear { .. } => {
                let (d, w) = model.conv(i, 1).expect("a convolution layer");
                with_columns(&d, |col| {
                    forward_image(&d, read(), &self.state[w..w + d.weight_len()], y, col, self.products)
                });
                if let Some(b) = model.conv_bias(i) {
                    bias_forward_image(&d, &self.state[b..b + d.cout], y);
                }
            }
            Layer::BatchNorm { .. } => {
                affine_image(sin.h * sin.w, read(), &self.norms[i].scale, &self.norms[i].shift, y)
            }
            Layer::Relu => {
                if let Some(x) = x {
                    y.copy_from_slice(x);
                }
                relu_forward_serial(y);
            }
            &Layer::Dropout { p } => {
                if let Some(x) = x {
                    y.copy_from_slice(x);
                }
                if let (DropoutMode::Hash { seed, step }, true) = (self.dropout, p > 0.0) {
                    dropout_serial(seed, step, i as u32, p, img * y.len(), y);
                }
            }
            layer if layer.is_pooling() => pool::forward_serial(layer, sin, read(), y, winners),
            layer => unreachable!("layer {layer:?}"),
        }
    }

    /// Image `j`'s sums of x and x^2 per channel, for batchnorm `b`'s statistics.
    fn image_moments(&self, v: &mut View, j: usize, b: usize) {
        let s = self.model.input_of(b);
        let x = input_image(self.plan, self.model, v.input, &v.buffers, j, b);
        let sums = &mut v.image_sums[b][j * 2 * s.c..][..2 * s.c];
        for (ch, p) in x.chunks_exact(s.h * s.w).enumerate() {
            sums[2 * ch] = plane_sum(p, p, |v, _| v as f64);
            sums[2 * ch + 1] = plane_sum(p, p, |v, _| v as f64 * v as f64);
        }
    }

    /// Image `img` through the whole network in evaluation mode, in this thread's scratch.
    fn eval_image(&self, img: usize, x: &[f32], logits: &mut [f32]) {
        let largest = self.lens.largest;
        with_scratch(&PING, largest, |a| {
            with_scratch(&PONG, largest, |b| {
                with_scratch(&WINNERS, largest, |winners| {
                    // Where the image is: the input, then a and b in turn.
                    let (mut cur, mut other): (&mut [f32], &mut [f32]) = (a, b);
                    let mut len = x.len();
                    cur[..len].copy_from_slice(x);
                    for (i, layer) in self.model.layers.iter().enumerate() {
                        match layer {
                            Layer::Dropout { .. } => continue,
                            Layer::Relu => relu_forward_serial(&mut cur[..len]),
                            _ => {
                                let yl = self.model.shapes[i].len();
                                let wl = self.lens.winners[i];
                                self.layer_forward(i, img, Some(&cur[..len]), &mut other[..yl], &mut winners[..wl]);
                                std::mem::swap(&mut cur, &mut other);
                                len = yl;
                            }
                        }
                    }
                    logits.copy_from_slice(&cur[..len]);
                })
            })
        })
    }

    /// Image `j` of view `v` through backward pass `pass`, in this thread's scratch.
    fn backward_image(&self, v: &mut View, j: usize, pass: &BackPass) {
        let model = self.model;
        let largest = self.lens.largest;
        with_scratch(&PING, largest, |a| {
            with_scratch(&PONG, largest, |b| {
                let (mut cur, mut other): (&mut [f32], &mut [f32]) = (a, b);
                let mut len = match pass.from {
                    Some(b) => {
                        let s = model.shapes[b];
                        let x = input_image(self.plan, model, v.input, &v.buffers, j, b);
                        let (norm, gamma) = (&self.norms[b], self.gamma(b));
                        let d = BnDims { n: self.n, c: s.c, hw: s.h * s.w };
                        let dy = &v.grad_in[j * s.len()..][..s.len()];
                        backward_dx_image(&d, x, dy, gamma, &norm.saved, &norm.sums, &mut cur[..s.len()]);
                        s.len()
                    }
                    None => {
                        let len = model.shapes[model.layers.len() - 1].len();
                        cur[..len].copy_from_slice(&v.grad_in[j * len..][..len]);
                        len
                    }
                };
                // The pass's last layer that writes a new gradient writes it into the stored one (and
                // any in-place layers after it work there), so that it needs no copy.
                let last_writer = pass.to.and(pass.layers.clone().find(|&i| writes_dx(&model.layers[i])));
                let stored = std::mem::take(&mut v.grad_out);
                let mut in_stored = false;
                for i in pass.layers.clone().rev() {
                    let xl = model.input_of(i).len();
                    if in_stored {
                        self.layer_backward(v, j, i, &mut stored[j * len..][..len], &mut []);
                    } else if Some(i) == last_writer {
                        self.layer_backward(v, j, i, &mut cur[..len], &mut stored[j * xl..][..xl]);
                        (in_stored, len) = (true, xl);
                    } else if self.layer_backward(v, j, i, &mut cur[..len], &mut other[..xl]) {
                        std::mem::swap(&mut cur, &mut other);
                        len = xl;
                    }
                }
                if let Some(b) = pass.to {
                    if !in_stored {
                        stored[j * len..][..len].copy_from_slice(&cur[..len]);
                    }
                    self.image_gradient_sums(v, j, b, &stored[j * len..][..len]);
                }
                v.grad_out = stored;
            })
        })
    }

    /// Layer `i`'s backward pass on image `j`: from dy in place (returns false), or into dx (returns
    /// true). A convolution adds its weight gradient into its group's and keeps its bias sums.
    fn layer_backward(&self, v: &mut View, j: usize, i: usize, dy: &mut [f32], dx: &mut [f32]) -> bool {
        let model = self.model;
        let img = v.first + j;
        match &model.layers[i] {
            Layer::Conv { .. } | Layer::Linear { .. } => {
                let (d, w) = model.conv(i, 1).expect("a convolution layer");
                let x = input_image(self.plan, model, v.input, &v.buffers, j, i);
                let weight = &self.state[w..w + d.weight_len()];
                let beta = if j == 0 { 0.0 } else { 1.0 };
                // The input image needs no gradient.
                let dx = (i > 0).then_some(&mut *dx);
                with_columns(&d, |col| backward_image(&d, x, weight, dy, dx, col, v.partials[i], beta, self.products));
                if model.conv_bias(i).is_some() {
                    let sums = &mut v.image_sums[i][j * d.cout..][..d.cout];
                    bias_image_sums(&d, dy, sums);
                }
                true
            }
            Layer::Relu => {
                let y = &v.buffers[self.plan.buffer[i]][j * dy.len()..][..dy.len()];
                relu_backward_serial(y, dy);
                false
            }
            &Layer::Dropout { p } => {
                if let (DropoutMode::Hash { seed, step }, true) = (self.dropout, p > 0.0) {
                    dropout_serial(seed, step, i as u32, p, img * dy.len(), dy);
                }
                false
            }
            layer if layer.is_pooling() => {
                let wl = self.lens.winners[i];
                pool::backward_serial(layer, model.input_of(i), &v.winners[i][j * wl..][..wl], dy, dx);
                true
            }
            layer => unreachable!("{layer:?} inside a backward pass"),
        }
    }

    /// Image `j`'s sums of dy and dy * xhat per channel at batchnorm `b`'s output.
    fn image_gradient_sums(&self, v: &mut View, j: usize, b: usize, dy: &[f32]) {
        let s = self.model.shapes[b];
        let x = input_image(self.plan, self.model, v.input, &v.buffers, j, b);
        let sums = &mut v.image_sums[b][j * 2 * s.c..][..2 * s.c];
        let planes = dy.chunks_exact(s.h * s.w).zip(x.chunks_exact(s.h * s.w));
        for (ch, (g, x)) in planes.enumerate() {
            sums[2 * ch] = plane_sum(g, g, |g, _| g as f64);
            sums[2 * ch + 1] = plane_sum(g, x, dy_xhat(&self.norms[b].saved, ch));
        }
    }

    /// Batchnorm `b`'s weight (gamma).
    fn gamma(&self, b: usize) -> &[f32] {
        let LayerParams::BatchNorm { weight, .. } = self.model.layer_params[b] else {
            unreachable!("layer {b} is a batchnorm")
        };
        tensor(self.model, self.state, weight)
    }
}

/// Whether a layer's backward pass writes a new gradient (a convolution's or a pooling's), rather than
/// transforming the one it gets in place (a ReLU's, a dropout's).
fn writes_dx(layer: &Layer) -> bool {
    matches!(layer, Layer::Conv { .. } | Layer::Linear { .. }) || layer.is_pooling()
}

/// One image's bias gradient per output channel, in f64 (added over the batch in image order).
fn bias_image_sums(d: &ConvDims, dy_img: &[f32], sums: &mut [f64]) {
    for (s, plane) in sums.iter_mut().zip(dy_img.chunks_exact(d.ho() * d.wo())) {
        *s = plane_total(plane);
    }
}

impl FusedNet {
    /// Sizes the store for a batch of `n` (allocating only when the batch grows).
    fn size_store(&mut self, n: usize) {
        let (model, lens, store) = (&self.model, &self.lens, &mut self.store);
        let groups = n.div_ceil(group_size(n));
        store.input.resize(n * model.input.len(), 0.0);
        let fit = |parts: &mut Vec<Vec<f32>>, lens: &[usize], times: usize| {
            parts.resize(lens.len(), Vec::new());
            parts.iter_mut().zip(lens).for_each(|(p, &len)| p.resize(times * len, 0.0));
        };
        fit(&mut store.buffers, &lens.buffers, n);
        fit(&mut store.partials, &lens.partials, groups);
        store.winners.resize(lens.winners.len(), Vec::new());
        store.winners.iter_mut().zip(&lens.winners).for_each(|(w, &len)| w.resize(n * len, 0));
        store.image_sums.resize(lens.image_sums.len(), Vec::new());
        store.image_sums.iter_mut().zip(&lens.image_sums).for_each(|(s, &len)| s.resize(n * len, 0.0));
        let widest = self.backward_passes.iter().filter_map(|p| p.to).map(|b| model.shapes[b].len()).max();
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
        let (Some(t), Some(started)) = (&mut self.timing, started) else { return };
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
        t.push(OpTime { label, flops, bytes, ns: started.elapsed().as_secs_f64() * 1e9 });
    }
}

impl Executor for FusedNet {
    fn model(&self) -> &Model {
        &self.model
    }
    fn forward(&mut self, state: &mut [f32], input: &[f32], n: usize, mode: Mode) -> &[f32] {
        FusedNet::forward(self, state, input, n, mode)
    }
    fn backward(&mut self, state: &[f32], dlogits: &[f32]) -> &[f32] {
        FusedNet::backward(self, state, dlogits)
    }
    fn logits(&self) -> &[f32] {
        FusedNet::logits(self)
    }
    fn grads(&self) -> &[f32] {
        &self.grads
    }
    fn scratch(&mut self) -> (&mut Vec<f32>, &mut Option<Vec<OpTime>>) {
        (&mut self.dlogits, &mut self.timing)
    }
}
