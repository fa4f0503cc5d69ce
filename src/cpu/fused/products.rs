//! How the fused executor's convolutions run their matrix products: the register-block kernels of
//! `fma.rs` where this CPU has FMA (over the padded image's taps, `shifted.rs`, for a k x k convolution
//! whose rows of output pixels fill several vectors; over the im2col matrix, or the image itself for a
//! 1x1 one, otherwise), else the reference's own per-image functions (im2col and the GEMM).

use std::cell::RefCell;

use super::fma::{self, Every, Operand};
use super::shifted;
use crate::cpu::reference::conv::{self, col2im, im2col, ConvDims, ImageGrads};
use crate::cpu::scratch::with_scratch;

thread_local! {
    /// A small convolution's columns transposed: each output pixel's taps in a row.
    static PIXEL_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// How a convolution's matrix products run: the reference's GEMM (matrixmultiply), or the kernels of
/// `fma.rs` (on CPUs with FMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    Gemm,
    Kernel,
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

    /// Below this many output pixels (a 5x5 or 7x7 output) the weight gradient's dot products along
    /// the pixels are too short to pay for their lane sums: it runs as a product over the pixels
    /// instead, from rows that hold each pixel's taps (`pixel_rows_product`).
    pub(super) const DOTS_MIN_PIXELS: usize = 64;

    /// dw = dy x col^T (cout x col_rows, summed over the pixels) with the kernels, added to dw when
    /// `accumulate`.
    fn weight_gradient(d: &ConvDims, dy: &[f32], col: &[f32], dw: &mut [f32], accumulate: bool) {
        let (rows, cols) = (d.col_rows(), d.col_cols());
        if cols >= Self::DOTS_MIN_PIXELS {
            return fma::dots(d.cout, cols, rows, dy, cols, col, Every(cols), dw, rows, accumulate);
        }
        pixel_rows_product(d, dy, dw, accumulate, |pixels| {
            for (r, row) in col.chunks_exact(cols).enumerate() {
                row.iter().enumerate().for_each(|(p, &v)| pixels[p * rows + r] = v);
            }
        })
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
    if p == Products::Kernel && shifted::runs(d) {
        flipped.resize(weight.len(), 0.0);
        shifted::flip(d, weight, flipped);
    } else {
        flipped.clear();
    }
}

/// dw = dy (cout x pixels) times the pixel rows (pixels x col_rows: each output pixel's taps, which
/// `fill` writes into this thread's scratch), added to dw when `accumulate`: each weight's gradient a
/// sum over the pixels in order.
pub(super) fn pixel_rows_product(
    d: &ConvDims,
    dy: &[f32],
    dw: &mut [f32],
    accumulate: bool,
    fill: impl FnOnce(&mut [f32]),
) {
    let (rows, pixels) = (d.col_rows(), d.col_cols());
    with_scratch(&PIXEL_ROWS, pixels * rows, |pixel_rows| {
        fill(pixel_rows);
        let a = Operand { data: dy, row: pixels, col: 1 };
        fma::product(d.cout, pixels, rows, a, pixel_rows, Every(rows), dw, rows, accumulate)
    })
}

/// One image's forward convolution, y_img = weight x x_img's columns, with `col` (from
/// `conv::with_columns`) as scratch where im2col runs.
pub fn forward_image(d: &ConvDims, x_img: &[f32], weight: &[f32], y_img: &mut [f32], col: &mut [f32], p: Products) {
    if p == Products::Gemm {
        conv::forward_image(d, x_img, weight, y_img, col);
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
    if p == Products::Kernel && shifted::runs(d) {
        return shifted::forward_planes(d, x_img, weight, each);
    }
    forward_image(d, x_img, weight, y_img, col, p);
    for (c, plane) in y_img.chunks_exact_mut(d.ho() * d.wo()).enumerate() {
        each(c, plane, d.wo());
    }
}

/// One image's gradients (see `ImageGrads`), with `col` as scratch where im2col runs; `flipped` is
/// what `flip` gave for these weights.
pub fn backward_image(d: &ConvDims, g: ImageGrads, col: &mut [f32], p: Products, flipped: &[f32]) {
    if p == Products::Gemm {
        return conv::backward_image(d, g, col);
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
