//! How the fused executor's convolutions run their matrix products: the register-block kernels of
//! `fma.rs` where this CPU has FMA and a row of output pixels fills several vectors (over the padded
//! image's taps, `shifted.rs`, for a k x k convolution; over the image itself for a 1x1 one), the
//! reference's products computed as it sums them where the output plane is small (`small.rs`), else
//! the reference's own per-image functions (im2col and the GEMM).

use super::fma::{self, Every, Operand};
use super::shifted;
use super::small;
use crate::cpu::reference::conv::{self, col2im, im2col, ConvDims, ImageGrads};

/// How a convolution's matrix products run: the reference's GEMM (matrixmultiply), or the kernels of
/// `fma.rs` (on CPUs with FMA), over whole rows of pixels or (`Small`) as the reference sums them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    Gemm,
    Kernel,
    Small,
}

impl Products {
    /// The kernel where this CPU runs it, else the GEMM.
    pub fn fastest() -> Products {
        if fma::available() {
            Products::Kernel
        } else {
            Products::Gemm
        }
    }

    /// The kernels over rows of pixels pay where a row fills several vectors; below that (a 5x5
    /// output), their partial vectors and lane sums cost more than the GEMM's packing, and the weight
    /// gradient summed over the pixels in another order than the reference's drifts further from
    /// float64 in the golden Adam steps (2.9e-4 on conv1's weights after ten steps, against
    /// PyTorch's 4e-6): there `small.rs` keeps the reference's order.
    const KERNEL_MIN_PIXELS: usize = 64;

    /// What convolution `d` runs with.
    fn for_conv(self, d: &ConvDims) -> Products {
        match self {
            Products::Kernel if d.col_cols() < Self::KERNEL_MIN_PIXELS && small::runs(d) => Products::Small,
            Products::Kernel if d.col_cols() < Self::KERNEL_MIN_PIXELS => Products::Gemm,
            p => p,
        }
    }

    /// dw = dy x col^T (cout x col_rows, summed over the pixels) with the kernels, added to dw when
    /// `accumulate`.
    fn weight_gradient(d: &ConvDims, dy: &[f32], col: &[f32], dw: &mut [f32], accumulate: bool) {
        let (rows, cols) = (d.col_rows(), d.col_cols());
        fma::dots(d.cout, cols, rows, dy, cols, col, Every(cols), dw, rows, accumulate)
    }

    /// c = weight x b (cout x cols), or weight^T x b (col_rows x cols) when `transposed`, with the
    /// kernels, for a b of col_rows (or cout) rows of `cols` pixels.
    fn weights_times(d: &ConvDims, weight: &[f32], transposed: bool, b: &[f32], c: &mut [f32]) {
        let (rows, cols) = (d.col_rows(), d.col_cols());
        let (m, k, a) = match transposed {
            true => (rows, d.cout, Operand { data: weight, row: 1, col: rows }),
            false => (d.cout, rows, Operand { data: weight, row: rows, col: 1 }),
        };
        fma::product(m, k, cols, a, b, Every(cols), c, cols, false)
    }
}

/// The weights as `backward_image` reads them for the input gradient (empty where that needs no
/// copy of them).
pub fn flip(d: &ConvDims, weight: &[f32], p: Products, flipped: &mut Vec<f32>) {
    if p.for_conv(d) == Products::Kernel && shifted::runs(d) {
        flipped.resize(weight.len(), 0.0);
        shifted::flip(d, weight, flipped);
    } else {
        flipped.clear();
    }
}

/// One image's forward convolution, y_img = weight x x_img's columns, with `col` (from
/// `conv::with_columns`) as scratch where im2col runs.
pub fn forward_image(d: &ConvDims, x_img: &[f32], weight: &[f32], y_img: &mut [f32], col: &mut [f32], p: Products) {
    let p = p.for_conv(d);
    if p == Products::Gemm {
        conv::forward_image(d, x_img, weight, y_img, col);
    } else if p == Products::Small {
        small::forward_image(d, x_img, weight, y_img);
    } else if shifted::runs(d) {
        shifted::forward_image(d, x_img, weight, y_img);
    } else if d.is_pointwise() {
        Products::weights_times(d, weight, false, x_img, y_img);
    } else {
        im2col(d, x_img, col);
        Products::weights_times(d, weight, false, col, y_img);
    }
}

/// One image's forward convolution, each output plane c handed to `each` with its rows' distance
/// (ho rows, the first wo values of each the output's): on the shifted form's grid, where it runs,
/// else from `y_img`, which `forward_image` fills first.
pub fn forward_planes(
    d: &ConvDims,
    x_img: &[f32],
    weight: &[f32],
    (y_img, col): (&mut [f32], &mut [f32]),
    p: Products,
    mut each: impl FnMut(usize, &mut [f32], usize),
) {
    match p.for_conv(d) {
        Products::Kernel if shifted::runs(d) => return shifted::forward_planes(d, x_img, weight, each),
        Products::Small => return small::forward_planes(d, x_img, weight, each),
        _ => {}
    }
    forward_image(d, x_img, weight, y_img, col, p);
    for (c, plane) in y_img.chunks_exact_mut(d.ho() * d.wo()).enumerate() {
        each(c, plane, d.wo());
    }
}

/// One image's gradients (see `ImageGrads`), with `col` as scratch where im2col runs; `flipped` is
/// what `flip` gave for these weights.
pub fn backward_image(d: &ConvDims, g: ImageGrads, col: &mut [f32], p: Products, flipped: &[f32]) {
    match p.for_conv(d) {
        Products::Gemm => return conv::backward_image(d, g, col),
        Products::Small => return small::backward_image(d, g),
        _ => {}
    }
    if shifted::runs(d) {
        return shifted::backward_image(d, g, flipped);
    }
    let ImageGrads { x, weight, dy, dx, dw, beta } = g;
    let columns: &[f32] = match d.is_pointwise() {
        true => x,
        false => {
            im2col(d, x, col);
            col
        }
    };
    Products::weight_gradient(d, dy, columns, dw, beta == 1.0);
    let Some(dx) = dx else { return };
    if d.is_pointwise() {
        Products::weights_times(d, weight, true, dy, dx);
    } else {
        Products::weights_times(d, weight, true, dy, col);
        col2im(d, col, dx);
    }
}

/// The length of a group's weight gradient for convolution `d` (see `gradient_from_partial`).
pub fn partial_len(d: &ConvDims, p: Products) -> usize {
    match p.for_conv(d) {
        Products::Small => small::partial_len(d),
        _ => d.weight_len(),
    }
}

/// The weight gradient from the sum of the groups' (as `backward_image` keeps them: transposed
/// where `small.rs` runs).
pub fn gradient_from_partial(d: &ConvDims, p: Products, summed: &[f32], dw: &mut [f32]) {
    match p.for_conv(d) {
        Products::Small => small::untranspose(d, summed, dw),
        _ => dw.copy_from_slice(summed),
    }
}
