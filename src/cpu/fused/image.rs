//! One image's share of a fused pass (`Ctx`, what every image of a pass reads): a training pass's
//! layers, the whole network in evaluation mode, a backward pass, and the per-image sums that the
//! batch adds up in order where the pass ends.

use std::cell::RefCell;

use super::moments::{image_plane_sums, Terms};
use super::pool;
use super::products::{self, Products};
use super::store::{input_image, read_write, Lens, View};
use super::totals::plane_totals;
use crate::cpu::executor::DropoutMode;
use crate::cpu::isa::vectorized;
use crate::cpu::reference::batchnorm::{affine_image, backward_dx_image, BnDims, BnSaved};
use crate::cpu::reference::conv::{with_columns, ConvDims, ImageGrads};
use crate::cpu::reference::dropout::dropout_serial;
use crate::cpu::reference::net::tensor;
use crate::cpu::reference::relu::{relu_backward_serial, relu_forward_serial};
use crate::cpu::scratch::with_scratch;
use crate::model::plan::{BackwardPass, Plan};
use crate::model::{Layer, LayerParams, Model};

thread_local! {
    /// Each thread's gradient of the image it is on (two: an op reads one and writes the other), and
    /// the max poolings' winners of an evaluation pass, which nothing reads.
    static PING: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PONG: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static WINNERS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A convolution's whole output, and one plane of it, where a pooling runs in its epilogue.
    static FULL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PLANE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A batchnorm layer's numbers for the current pass: its normalization as y = x * scale + shift,
/// what its backward pass needs, and (backward) the batch's per-channel sums of dy and dy * xhat.
#[derive(Debug, Clone, Default)]
pub(super) struct Norm {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub saved: BnSaved,
    pub sums: Vec<(f64, f64)>,
}

/// The shared state of a pass: what every image reads.
pub(super) struct Ctx<'a> {
    pub model: &'a Model,
    pub plan: &'a Plan,
    pub state: &'a [f32],
    pub norms: &'a [Norm],
    pub dropout: DropoutMode,
    pub n: usize,
    pub lens: &'a Lens,
    pub products: Products,
    /// Per layer, the weights as a convolution's input gradient reads them (`products::flip`).
    pub flipped: &'a [Vec<f32>],
}

impl Ctx<'_> {
    /// The op of a training pass that starts at layer `i` (the pass's layers end at `end`) on image
    /// `j` of view `v`, in the plan's buffers; returns the layer after it. A convolution with a 2x2
    /// pooling right after it in the pass pools each output plane in its epilogue (into the pooling's
    /// buffer and winners; nothing reads the convolution's own output, which stays unwritten).
    pub fn train_op(&self, v: &mut View, j: usize, i: usize, end: usize) -> usize {
        let Some(p) = self.pool_in_epilogue(i, i + 1).filter(|&p| p < end) else {
            return self.train_layer(v, j, i, end);
        };
        let (xl, yl, wl) = (self.model.input_of(i).len(), self.model.shapes[p].len(), self.lens.winners[p]);
        let winners = &mut v.winners[p][j * wl..][..wl];
        let out = self.plan.buffer[p];
        let epilogue = self.epilogue(i, i + 1);
        if i == 0 {
            let (x, y) = (&v.input[j * xl..][..xl], &mut v.buffers[out][j * yl..][..yl]);
            self.conv_pool_forward(i, x, y, &epilogue, p, winners);
        } else {
            let (x, y) = read_write(&mut v.buffers, self.plan.buffer[i - 1], out);
            self.conv_pool_forward(i, &x[j * xl..][..xl], &mut y[j * yl..][..yl], &epilogue, p, winners);
        }
        p + 1
    }

    /// Whether layer `i` is a batchnorm whose ReLU (in its buffer, inside the pass that ends at `end`)
    /// runs in the same loop over the image.
    fn relu_joins(&self, i: usize, end: usize) -> bool {
        let layers = &self.model.layers;
        matches!(layers[i], Layer::BatchNorm { .. })
            && i + 1 < end
            && matches!(layers[i + 1], Layer::Relu)
            && self.plan.buffer[i + 1] == self.plan.buffer[i]
    }

    /// Layer `i` of a training pass that ends at `end` on image `j` of view `v`, in the plan's buffers
    /// (a batchnorm with the ReLU after it where `relu_joins`); returns the layer after what ran.
    fn train_layer(&self, v: &mut View, j: usize, i: usize, end: usize) -> usize {
        let (xl, yl) = (self.model.input_of(i).len(), self.model.shapes[i].len());
        let out = self.plan.buffer[i];
        let wl = self.lens.winners[i];
        let winners = &mut v.winners[i][j * wl..][..wl];
        let img = v.first + j;
        let (x, y) = if i == 0 {
            (Some(&v.input[j * xl..][..xl]), &mut v.buffers[out][j * yl..][..yl])
        } else if self.plan.buffer[i - 1] == out {
            (None, &mut v.buffers[out][j * yl..][..yl])
        } else {
            let (x, y) = read_write(&mut v.buffers, self.plan.buffer[i - 1], out);
            (Some(&x[j * xl..][..xl]), &mut y[j * yl..][..yl])
        };
        if self.relu_joins(i, end) {
            let (s, norm) = (self.model.input_of(i), &self.norms[i]);
            let x = x.expect("a batchnorm reads another buffer");
            let hw = s.h * s.w;
            // A dropout in the same buffer right after: each plane dropped while it is in cache.
            let Some(p) = self.dropout_joins(i + 1, end) else {
                affine_relu_image(hw, x, &norm.scale, &norm.shift, y);
                return i + 2;
            };
            for (c, (yp, xp)) in y.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).enumerate() {
                affine_relu_image(hw, xp, &norm.scale[c..], &norm.shift[c..], yp);
                self.drop(i + 2, p, img * yl + c * hw, yp);
            }
            return i + 3;
        }
        self.layer_forward(i, img, x, y, winners);
        i + 1
    }

    /// The rate of the dropout right after layer `i` in its buffer, inside the pass that ends at `end`.
    fn dropout_joins(&self, i: usize, end: usize) -> Option<f32> {
        match self.model.layers.get(i + 1) {
            Some(&Layer::Dropout { p }) if i + 1 < end && self.plan.buffer[i + 1] == self.plan.buffer[i] => Some(p),
            _ => None,
        }
    }

    /// Dropout `i` on values `first`, `first + 1`, ... of its batch-wide mask, in place (as `CpuNet`
    /// draws it, by element index).
    fn drop(&self, i: usize, p: f32, first: usize, y: &mut [f32]) {
        if let (DropoutMode::Hash { seed, step }, true) = (self.dropout, p > 0.0) {
            dropout_serial(seed, step, i as u32, p, first, y);
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
            Layer::Conv { .. } | Layer::Linear { .. } => self.conv_forward(i, read(), y, &self.epilogue(i, i + 1)),
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
                self.drop(i, p, img * y.len(), y);
            }
            layer if layer.is_pooling() => pool::forward_serial(layer, sin, read(), y, winners),
            layer => unreachable!("layer {layer:?}"),
        }
    }

    /// Convolution (or linear layer) `i`'s forward pass on one image, x into y, then its epilogue.
    fn conv_forward(&self, i: usize, x: &[f32], y: &mut [f32], epilogue: &Epilogue) {
        let (d, w) = self.model.conv(i, 1).expect("a convolution layer");
        with_columns(&d, |col| {
            products::forward_image(&d, x, &self.state[w..w + d.weight_len()], y, col, self.products)
        });
        for (c, plane) in y.chunks_exact_mut(d.ho() * d.wo()).enumerate() {
            epilogue.apply(c, plane);
        }
    }

    /// Convolution `i`'s forward pass on one image with its epilogue, then the 2x2 pooling layer
    /// `pool` on each output plane while it is in cache, into y, the pooled image, and the max
    /// pooling's `winners` (as long as y).
    fn conv_pool_forward(
        &self,
        i: usize,
        x: &[f32],
        y: &mut [f32],
        epilogue: &Epilogue,
        pool: usize,
        winners: &mut [u8],
    ) {
        let (d, w) = self.model.conv(i, 1).expect("a convolution layer");
        let (ho, wo, layer) = (d.ho(), d.wo(), &self.model.layers[pool]);
        let (out, max) = (ho / 2 * (wo / 2), matches!(layer, Layer::MaxPool2));
        with_scratch(&FULL, d.cout * ho * wo, |full| {
            with_scratch(&PLANE, ho * wo, |compact| {
                with_columns(&d, |col| {
                    let weight = &self.state[w..w + d.weight_len()];
                    products::forward_planes(&d, x, weight, (full, col), self.products, |c, plane, ld| {
                        epilogue.apply(c, plane);
                        let won = if max { &mut winners[c * out..][..out] } else { &mut [][..] };
                        pool::pool_plane(layer, (ho, wo, ld), plane, &mut y[c * out..][..out], won, compact);
                    })
                })
            })
        })
    }

    /// The 2x2 pooling that runs in the epilogue of convolution `i`, whose op ends at `end`: one right
    /// after the op, on an output of even size, before the batched layers.
    fn pool_in_epilogue(&self, i: usize, end: usize) -> Option<usize> {
        let s = self.model.shapes[i];
        let pooling = matches!(self.model.layers.get(end), Some(Layer::MaxPool2 | Layer::AvgPool2));
        let conv = matches!(self.model.layers[i], Layer::Conv { .. });
        (conv && pooling && end < self.plan.passes.batched.start && s.h.is_multiple_of(2) && s.w.is_multiple_of(2))
            .then_some(end)
    }

    /// Convolution `i`'s epilogue: its bias, then what layers i + 1 .. `end` ask for (a batchnorm's
    /// evaluation normalization, a ReLU; a dropout is the identity there).
    fn epilogue(&self, i: usize, end: usize) -> Epilogue<'_> {
        let mut e = Epilogue {
            bias: self.model.conv_bias(i).map(|b| &self.state[b..b + self.model.shapes[i].c]),
            norm: None,
            relu: false,
        };
        for j in i + 1..end {
            match self.model.layers[j] {
                Layer::BatchNorm { .. } => e.norm = Some((&self.norms[j].scale[..], &self.norms[j].shift[..])),
                Layer::Relu => e.relu = true,
                Layer::Dropout { .. } => {}
                ref layer => unreachable!("{layer:?} in a convolution's epilogue (see eval_op_end)"),
            }
        }
        e
    }

    /// Where evaluation's op for convolution `i` ends: the batchnorm, ReLU and dropout after it that
    /// the plan runs with it (`Plan::eval`).
    fn eval_op_end(&self, i: usize) -> usize {
        let op_end = self.plan.eval.iter().find(|op| op.contains(&i)).map_or(i + 1, |op| op.end);
        let in_epilogue = |l: &Layer| matches!(l, Layer::BatchNorm { .. } | Layer::Relu | Layer::Dropout { .. });
        (i + 1..op_end).find(|&j| !in_epilogue(&self.model.layers[j])).unwrap_or(op_end)
    }

    /// Image `j`'s sums of x and x^2 per channel, for batchnorm `b`'s statistics.
    pub fn image_moments(&self, v: &mut View, j: usize, b: usize) {
        let s = self.model.input_of(b);
        let x = input_image(self.plan, self.model, v.input, &v.buffers, j, b);
        let sums = &mut v.image_sums[b][j * 2 * s.c..][..2 * s.c];
        image_plane_sums(x, x, s.h * s.w, Terms::Moments, sums);
    }

    /// Image `img` through the network's layers before the batched ones in evaluation mode, in this
    /// thread's scratch, into `out`.
    pub fn eval_image(&self, img: usize, x: &[f32], out: &mut [f32]) {
        let largest = self.lens.largest;
        with_scratch(&PING, largest, |a| {
            with_scratch(&PONG, largest, |b| {
                with_scratch(&WINNERS, largest, |winners| {
                    // Where the image is: the input, then a and b in turn.
                    let (mut cur, mut other): (&mut [f32], &mut [f32]) = (a, b);
                    let mut len = x.len();
                    cur[..len].copy_from_slice(x);
                    let mut i = 0;
                    while i < self.plan.passes.batched.start {
                        match self.model.layers[i] {
                            Layer::Dropout { .. } => {}
                            Layer::Relu => relu_forward_serial(&mut cur[..len]),
                            Layer::Conv { .. } | Layer::Linear { .. } => {
                                let end = self.eval_op_end(i);
                                let epilogue = self.epilogue(i, end);
                                let (yl, next) = match self.pool_in_epilogue(i, end) {
                                    Some(p) => {
                                        let yl = self.model.shapes[p].len();
                                        let won = &mut winners[..yl];
                                        self.conv_pool_forward(i, &cur[..len], &mut other[..yl], &epilogue, p, won);
                                        (yl, p + 1)
                                    }
                                    None => {
                                        let yl = self.model.shapes[i].len();
                                        self.conv_forward(i, &cur[..len], &mut other[..yl], &epilogue);
                                        (yl, end)
                                    }
                                };
                                std::mem::swap(&mut cur, &mut other);
                                (len, i) = (yl, next);
                                continue;
                            }
                            _ => {
                                let yl = self.model.shapes[i].len();
                                let wl = self.lens.winners[i];
                                self.layer_forward(i, img, Some(&cur[..len]), &mut other[..yl], &mut winners[..wl]);
                                std::mem::swap(&mut cur, &mut other);
                                len = yl;
                            }
                        }
                        i += 1;
                    }
                    out.copy_from_slice(&cur[..len]);
                })
            })
        })
    }

    /// Image `j` of view `v` through backward pass `pass`, in this thread's scratch.
    pub fn backward_image(&self, v: &mut View, j: usize, pass: &BackwardPass) {
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
                        let len = model.shapes[pass.layers.end - 1].len();
                        cur[..len].copy_from_slice(&v.grad_in[j * len..][..len]);
                        len
                    }
                };
                // The pass's last layer that writes a new gradient writes it into the stored one (and
                // any in-place layers after it work there), so that it needs no copy.
                let last_writer = pass.to.and(pass.layers.clone().find(|&i| writes_dx(&model.layers[i])));
                let stored = std::mem::take(&mut v.grad_out);
                let mut in_stored = false;
                let mut layers = pass.layers.clone().rev();
                while let Some(i) = layers.next() {
                    let xl = model.input_of(i).len();
                    if self.dropout_over_relu(i, pass.layers.start) {
                        let dy = if in_stored { &mut stored[j * len..][..len] } else { &mut cur[..len] };
                        self.dropout_relu_backward(v, j, i, dy);
                        layers.next();
                    } else if in_stored {
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
                let g = ImageGrads { x, weight, dy, dx, dw: v.partials[i], beta };
                let flipped = &self.flipped[i];
                with_columns(&d, |col| products::backward_image(&d, g, col, self.products, flipped));
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
                self.drop(i, p, img * dy.len(), dy);
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

    /// Whether layer `i` is a dropout that ran in place over the output of the ReLU before it, inside
    /// a backward pass that starts at `first`: the two backward passes then run as one loop.
    fn dropout_over_relu(&self, i: usize, first: usize) -> bool {
        let layers = &self.model.layers;
        matches!(layers[i], Layer::Dropout { .. })
            && i > first
            && matches!(layers[i - 1], Layer::Relu)
            && self.plan.buffer[i - 1] == self.plan.buffer[i]
    }

    /// Dropout `i`'s backward pass and the ReLU's under it on image `j`, in place in dy, from the
    /// dropout's output (`dropout_relu_backward_image`).
    fn dropout_relu_backward(&self, v: &View, j: usize, i: usize, dy: &mut [f32]) {
        let Layer::Dropout { p } = self.model.layers[i] else { unreachable!("layer {i} is a dropout") };
        let keep = match (self.dropout, p > 0.0) {
            (DropoutMode::Hash { .. }, true) => 1.0 / (1.0 - p),
            _ => 1.0,
        };
        let y = &v.buffers[self.plan.buffer[i]][j * dy.len()..][..dy.len()];
        dropout_relu_backward_image(y, keep, dy);
    }

    /// Image `j`'s sums of dy and dy * xhat per channel at batchnorm `b`'s output.
    fn image_gradient_sums(&self, v: &mut View, j: usize, b: usize, dy: &[f32]) {
        let s = self.model.shapes[b];
        let x = input_image(self.plan, self.model, v.input, &v.buffers, j, b);
        let sums = &mut v.image_sums[b][j * 2 * s.c..][..2 * s.c];
        image_plane_sums(dy, x, s.h * s.w, Terms::DyXhat(&self.norms[b].saved), sums);
    }

    /// Batchnorm `b`'s weight (gamma).
    fn gamma(&self, b: usize) -> &[f32] {
        let LayerParams::BatchNorm { weight, .. } = self.model.layer_params[b] else {
            unreachable!("layer {b} is a batchnorm")
        };
        tensor(self.model, self.state, weight)
    }
}

/// What a convolution's forward pass applies to each output plane while it is in cache, in this order:
/// its bias, a batchnorm's evaluation normalization (y = x * scale + shift), a ReLU. Each step is the
/// reference's own, so the bits are those of the layers run one after another.
pub(super) struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    norm: Option<(&'a [f32], &'a [f32])>,
    relu: bool,
}

impl Epilogue<'_> {
    /// The epilogue on output channel `c`'s plane.
    fn apply(&self, c: usize, plane: &mut [f32]) {
        if let Some(bias) = self.bias {
            add_in_place(plane, bias[c]);
        }
        if let Some((scale, shift)) = self.norm {
            affine_in_place(plane, scale[c], shift[c]);
        }
        if self.relu {
            relu_forward_serial(plane);
        }
    }
}

vectorized! {
    /// y += bias, as `bias_forward_image` adds it.
    fn add_in_place(y: &mut [f32], bias: f32) {
        y.iter_mut().for_each(|v| *v += bias);
    }
}

vectorized! {
    /// One image's batchnorm and the ReLU after it in one loop: y = x * scale[c] + shift[c], then
    /// max(y, 0), as `affine_image` and `relu_forward_serial` compute them one after the other.
    fn affine_relu_image(hw: usize, x_img: &[f32], scale: &[f32], shift: &[f32], y_img: &mut [f32]) {
        for (c, (yp, xp)) in y_img.chunks_exact_mut(hw).zip(x_img.chunks_exact(hw)).enumerate() {
            let (s, t) = (scale[c], shift[c]);
            for (o, &v) in yp.iter_mut().zip(xp) {
                let y = v * s + t;
                *o = if y.is_nan() { y } else { y.max(0.0) };
            }
        }
    }
}

vectorized! {
    /// The backward passes of a dropout (scale 0 or `keep`) and of the ReLU whose output it scaled in
    /// place, from y, the dropout's output: dy * keep where y > 0, else 0. y > 0 exactly where the
    /// element was kept (keep >= 1 leaves a positive value positive; a dropped one is 0 or NaN) and
    /// the ReLU passed it, so this is the dropout's dy * scale followed by `relu_backward_serial`,
    /// bit for bit, without drawing the mask again.
    fn dropout_relu_backward_image(y: &[f32], keep: f32, dy: &mut [f32]) {
        for (g, &y) in dy.iter_mut().zip(y) {
            *g = if y > 0.0 { *g * keep } else { 0.0 };
        }
    }
}

vectorized! {
    /// y = y * scale + shift, as `affine_image` computes it.
    fn affine_in_place(y: &mut [f32], scale: f32, shift: f32) {
        y.iter_mut().for_each(|v| *v = *v * scale + shift);
    }
}

/// Whether a layer's backward pass writes a new gradient (a convolution's or a pooling's), rather than
/// transforming the one it gets in place (a ReLU's, a dropout's).
fn writes_dx(layer: &Layer) -> bool {
    matches!(layer, Layer::Conv { .. } | Layer::Linear { .. }) || layer.is_pooling()
}

/// One image's bias gradient per output channel, in f64 (added over the batch in image order).
fn bias_image_sums(d: &ConvDims, dy_img: &[f32], sums: &mut [f64]) {
    plane_totals(dy_img, d.ho() * d.wo(), sums);
}
