//! The fused executor's batched layers (`Passes::batched`): the linear layers at the end of a network,
//! with the ReLUs and dropouts between them, run layer by layer over the whole batch. A linear layer's
//! weights are large next to one image's activations, so it runs as one product over the batch, which
//! reads its weights once per block of images instead of once per image: the forward pass as dot
//! products of input rows and weight rows, the input gradient and the weight gradient as products
//! whose every output sums over k in order (`fma.rs`). Each output is one sum in a fixed order, so the
//! bits do not depend on how the rows are cut between threads.

use std::cell::RefCell;
use std::sync::Mutex;

use rayon::prelude::*;

use super::fma::{self, Every, Operand};
use super::owned;
use super::products::Products;
use crate::cpu::executor::DropoutMode;
use crate::cpu::reference::conv::{bias_forward, ConvDims};
use crate::cpu::reference::dropout::dropout_serial;
use crate::cpu::reference::gemm::{gemm, Layout};
use crate::cpu::reference::relu::{relu_backward, relu_backward_serial, relu_forward, relu_forward_serial};
use crate::cpu::scratch::with_scratch;
use crate::model::{Layer, Model};

/// Images per parallel task of an input gradient and of an evaluation's product: one of `dots`'s
/// register blocks on AVX-512, two on AVX2; tasks this small keep the two cores' shares of a batch of
/// 100 within one task of each other.
const ROWS: usize = 8;

thread_local! {
    /// A thread's columns of a linear layer's output (its weight rows' outputs for every image).
    static OUTPUTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Elements per parallel task of a dropout.
const CHUNK: usize = 1 << 14;

/// What every batched layer reads.
pub(super) struct Batched<'a> {
    pub model: &'a Model,
    /// The first batched layer.
    pub first: usize,
    pub state: &'a [f32],
    pub n: usize,
    pub dropout: DropoutMode,
    /// A training pass: the products run by the threads that own the weight rows (`owned`), which
    /// the update leaves in their caches; an evaluation pass shares its images out as tasks instead,
    /// which a busy core cannot hold up.
    pub training: bool,
    pub products: Products,
}

impl Batched<'_> {
    /// Whether linear layer `i`'s ReLU (the layer after it, which runs in place) runs in the
    /// epilogue of its product.
    fn relu_after(&self, i: usize) -> bool {
        matches!(self.model.layers.get(i + 1), Some(Layer::Relu))
    }

    /// Whether the backward pass of the ReLU before linear layer `i` (among the batched layers; its
    /// output, in place, is i's input) runs in the epilogue of i's input gradient.
    fn relu_before(&self, i: usize) -> bool {
        i > self.first && matches!(self.model.layers[i - 1], Layer::Relu)
    }

    /// Layer `i` over the batch: x into y, or y in place when x is None (a ReLU, a dropout); a
    /// linear layer with the ReLU after it (`relu_after`). Returns the layer after what ran.
    pub fn forward(&self, i: usize, x: Option<&[f32]>, y: &mut [f32]) -> usize {
        match &self.model.layers[i] {
            Layer::Linear { .. } => {
                let x = x.expect("a linear layer reads another buffer");
                let (d, w) = self.model.conv(i, self.n).expect("a linear layer");
                let bias = self.model.conv_bias(i).map(|b| &self.state[b..b + d.cout]);
                let relu = self.relu_after(i);
                self.linear_forward(&d, x, &self.state[w..w + d.weight_len()], (bias, relu), y);
                return i + 1 + relu as usize;
            }
            Layer::Relu => {
                if let Some(x) = x {
                    y.copy_from_slice(x);
                }
                relu_forward(y);
            }
            &Layer::Dropout { p } => {
                if let Some(x) = x {
                    y.copy_from_slice(x);
                }
                self.drop(i, p, y);
            }
            layer => unreachable!("{layer:?} is not a batched layer"),
        }
        i + 1
    }

    /// Layer `i`'s backward pass over the batch: from dy into dx (returns true), or in place (returns
    /// false), and the layer below what ran (a linear layer's input gradient runs the backward pass
    /// of the ReLU before it, `relu_before`). `x` is the layer's input, `y` its output; a linear
    /// layer writes its weight and bias gradients into `grads` (the trainable prefix of the state)
    /// and no dx when `dx` is None.
    pub fn backward(
        &self,
        i: usize,
        x: &[f32],
        y: &[f32],
        dy: &mut [f32],
        dx: Option<&mut [f32]>,
        grads: &mut [f32],
    ) -> (bool, usize) {
        match &self.model.layers[i] {
            Layer::Linear { .. } => {
                let (d, w) = self.model.conv(i, self.n).expect("a linear layer");
                let wl = d.weight_len();
                self.weight_gradient(&d, dy, x, &mut grads[w..w + wl]);
                if let Some(b) = self.model.conv_bias(i) {
                    bias_gradient(dy, &mut grads[b..b + d.cout]);
                }
                let Some(dx) = dx else { return (true, i) };
                let relu = self.relu_before(i).then_some(x);
                self.input_gradient(&d, dy, &self.state[w..w + wl], relu, dx);
                (true, i - relu.is_some() as usize)
            }
            Layer::Relu => {
                relu_backward(y, dy);
                (false, i)
            }
            &Layer::Dropout { p } => {
                self.drop(i, p, dy);
                (false, i)
            }
            layer => unreachable!("{layer:?} is not a batched layer"),
        }
    }

    /// A dropout's mask applied in place, drawn by element index as `CpuNet` draws it.
    fn drop(&self, i: usize, p: f32, x: &mut [f32]) {
        if let (DropoutMode::Hash { seed, step }, true) = (self.dropout, p > 0.0) {
            x.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(c, x)| dropout_serial(seed, step, i as u32, p, c * CHUNK, x));
        }
    }

    /// y (n x cout) = x (n x cin) times the weights (cout x cin) transposed, plus the bias (added to
    /// each product as `bias_forward` adds it), then a ReLU when `relu`: the epilogue, while the rows
    /// are in cache. In training, each thread computes the outputs of the weight rows it owns
    /// (`owned`) for the whole batch into its scratch, then copies those columns into y; in
    /// evaluation, tasks of ROWS images.
    fn linear_forward(&self, d: &ConvDims, x: &[f32], weight: &[f32], epilogue: (Option<&[f32]>, bool), y: &mut [f32]) {
        let (cin, cout, n) = (d.cin, d.cout, self.n);
        let (bias, relu) = epilogue;
        let epilogue = |rows: &mut [f32], b: Option<&[f32]>| {
            if let Some(b) = b {
                rows.chunks_exact_mut(b.len()).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
            }
            if relu {
                relu_forward_serial(rows);
            }
        };
        if self.products == Products::Gemm {
            gemm(n, cin, cout, x, Layout::Normal, weight, Layout::Transposed, 0.0, y);
            if let Some(b) = bias {
                bias_forward(d, b, y);
            }
            if relu {
                relu_forward(y);
            }
            return;
        }
        if !self.training {
            return y.par_chunks_mut(ROWS * cout).zip(x.par_chunks(ROWS * cin)).for_each(|(y, x)| {
                fma::dots(y.len() / cout, cin, cout, x, cin, weight, Every(cin), y, cout, false);
                epilogue(y, bias);
            });
        }
        let y = Mutex::new(y);
        rayon::broadcast(|ctx| {
            let r = owned::rows(cout, ctx.index(), ctx.num_threads());
            if r.is_empty() {
                return;
            }
            let w = r.len();
            with_scratch(&OUTPUTS, n * w, |part| {
                fma::dots(n, cin, w, x, cin, &weight[r.start * cin..], Every(cin), part, w, false);
                epilogue(part, bias.map(|b| &b[r.clone()]));
                let mut y = y.lock().unwrap_or_else(|e| e.into_inner());
                for (out, row) in y.chunks_exact_mut(cout).zip(part.chunks_exact(w)) {
                    out[r.clone()].copy_from_slice(row);
                }
            })
        });
    }

    /// dx (n x cin) = dy (n x cout) times the weights (cout x cin), then the backward pass of the ReLU
    /// whose output is `relu` (the layer's input, in place) in the epilogue: dx where that is > 0.
    fn input_gradient(&self, d: &ConvDims, dy: &[f32], weight: &[f32], relu: Option<&[f32]>, dx: &mut [f32]) {
        let (cin, cout) = (d.cin, d.cout);
        if self.products == Products::Gemm {
            gemm(self.n, cout, cin, dy, Layout::Normal, weight, Layout::Normal, 0.0, dx);
            return relu.into_iter().for_each(|y| relu_backward(y, dx));
        }
        dx.par_chunks_mut(ROWS * cin).zip(dy.par_chunks(ROWS * cout)).enumerate().for_each(|(t, (dx, dy))| {
            let a = Operand { data: dy, row: cout, col: 1 };
            fma::product(dx.len() / cin, cout, cin, a, weight, Every(cin), dx, cin, false);
            if let Some(y) = relu {
                relu_backward_serial(&y[t * ROWS * cin..][..dx.len()], dx);
            }
        });
    }

    /// dw (cout x cin) = dy (n x cout) transposed times x (n x cin): each output sums over the images
    /// in order. Each thread computes the rows it owns (`owned`).
    fn weight_gradient(&self, d: &ConvDims, dy: &[f32], x: &[f32], dw: &mut [f32]) {
        let (cin, cout, n) = (d.cin, d.cout, self.n);
        if self.products == Products::Gemm {
            return gemm(cout, n, cin, dy, Layout::Transposed, x, Layout::Normal, 0.0, dw);
        }
        owned::broadcast_rows(cout, cin, [dw], |r, [dw]| {
            let a = Operand { data: &dy[r.start..], row: 1, col: cout };
            fma::product(r.len(), n, cin, a, x, Every(cin), dw, cin, false);
        });
    }
}

/// dbias = the sum of dy (n x cout) over the images, in image order in f64, as `bias_backward` adds
/// a 1 x 1 plane's.
fn bias_gradient(dy: &[f32], db: &mut [f32]) {
    let cout = db.len();
    for (o, g) in db.iter_mut().enumerate() {
        *g = dy.iter().skip(o).step_by(cout).map(|&v| v as f64).sum::<f64>() as f32;
    }
}
