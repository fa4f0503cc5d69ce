//! Convolution k x k (3x3 with padding 0 or 1, and 1x1), stride 1, no bias; NCHW.
//!
//! Each image is lowered to a column matrix (im2col: one row per (ci, ky, kx), one column per output
//! pixel), so forward and both backward products are single matrix products over contiguous memory.
//! Images are spread across threads; weight gradients are summed per image and then reduced in image
//! order, so the result does not depend on the number of threads.

use rayon::prelude::*;

use super::gemm::{gemm, Layout};
pub use crate::model::ConvDims;

/// im2col of one image into `col` (col_rows x col_cols); padding reads as 0.
fn im2col(d: &ConvDims, x: &[f32], col: &mut [f32]) {
    let (ho, wo) = (d.ho(), d.wo());
    for ci in 0..d.cin {
        for ky in 0..d.k {
            for kx in 0..d.k {
                let row = &mut col[((ci * d.k + ky) * d.k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    let iy = (oy + ky) as isize - d.pad as isize;
                    if iy < 0 || iy >= d.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &x[(ci * d.h + iy as usize) * d.w..][..d.w];
                    // Output columns ox whose input column ox + kx - pad lies inside the image.
                    let lo = d.pad.saturating_sub(kx);
                    let hi = (d.w + d.pad - kx).min(wo);
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    out[lo..hi].copy_from_slice(&src[lo + kx - d.pad..hi + kx - d.pad]);
                }
            }
        }
    }
}

/// The adjoint of im2col: adds each column entry back onto the input pixel it was read from.
fn col2im(d: &ConvDims, col: &[f32], dx: &mut [f32]) {
    let (ho, wo) = (d.ho(), d.wo());
    dx.fill(0.0);
    for ci in 0..d.cin {
        for ky in 0..d.k {
            for kx in 0..d.k {
                let row = &col[((ci * d.k + ky) * d.k + kx) * ho * wo..][..ho * wo];
                for oy in 0..ho {
                    let iy = (oy + ky) as isize - d.pad as isize;
                    if iy < 0 || iy >= d.h as isize {
                        continue;
                    }
                    let dst = &mut dx[(ci * d.h + iy as usize) * d.w..][..d.w];
                    let lo = d.pad.saturating_sub(kx);
                    let hi = (d.w + d.pad - kx).min(wo);
                    for (t, s) in dst[lo + kx - d.pad..hi + kx - d.pad].iter_mut().zip(&row[oy * wo + lo..oy * wo + hi])
                    {
                        *t += s;
                    }
                }
            }
        }
    }
}

/// y = conv(x, weight). x: n x cin x h x w; weight: cout x cin x k x k; y: n x cout x ho x wo.
pub fn conv_forward(d: &ConvDims, x: &[f32], weight: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), d.n * d.in_image());
    assert_eq!(weight.len(), d.weight_len());
    assert_eq!(y.len(), d.n * d.out_image());
    y.par_chunks_mut(d.out_image()).zip(x.par_chunks(d.in_image())).for_each_init(
        || vec![0.0f32; if d.is_pointwise() { 0 } else { d.col_rows() * d.col_cols() }],
        |col, (y_img, x_img)| {
            let col: &[f32] = if d.is_pointwise() {
                x_img
            } else {
                im2col(d, x_img, col);
                col
            };
            gemm(d.cout, d.col_rows(), d.col_cols(), weight, Layout::Normal, col, Layout::Normal, 0.0, y_img);
        },
    );
}

/// Gradients of the convolution: `dweight` (overwritten) and, when asked, `dx` (overwritten).
pub fn conv_backward(d: &ConvDims, x: &[f32], weight: &[f32], dy: &[f32], dx: Option<&mut [f32]>, dweight: &mut [f32]) {
    assert_eq!(x.len(), d.n * d.in_image());
    assert_eq!(dy.len(), d.n * d.out_image());
    assert_eq!(dweight.len(), d.weight_len());
    let (rows, cols) = (d.col_rows(), d.col_cols());
    // Per image: its weight gradient, and its input gradient when asked.
    let per_image =
        |x_img: &[f32], dy_img: &[f32], dx_img: Option<&mut [f32]>, col: &mut Vec<f32>, dw_img: &mut [f32]| {
            if d.is_pointwise() {
                gemm(d.cout, cols, rows, dy_img, Layout::Normal, x_img, Layout::Transposed, 0.0, dw_img);
                if let Some(dx_img) = dx_img {
                    gemm(rows, d.cout, cols, weight, Layout::Transposed, dy_img, Layout::Normal, 0.0, dx_img);
                }
                return;
            }
            im2col(d, x_img, col);
            gemm(d.cout, cols, rows, dy_img, Layout::Normal, col, Layout::Transposed, 0.0, dw_img);
            if let Some(dx_img) = dx_img {
                gemm(rows, d.cout, cols, weight, Layout::Transposed, dy_img, Layout::Normal, 0.0, col);
                col2im(d, col, dx_img);
            }
        };
    let mut partial = vec![0.0f32; d.n * d.weight_len()];
    let scratch = || vec![0.0f32; if d.is_pointwise() { 0 } else { rows * cols }];
    // Per image: where its input gradient goes, if anywhere.
    let dx_images: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => {
            assert_eq!(dx.len(), d.n * d.in_image());
            dx.chunks_mut(d.in_image()).map(Some).collect()
        }
        None => (0..d.n).map(|_| None).collect(),
    };
    partial
        .par_chunks_mut(d.weight_len())
        .zip(dx_images)
        .zip(x.par_chunks(d.in_image()).zip(dy.par_chunks(d.out_image())))
        .for_each_init(scratch, |col, ((dw_img, dx_img), (x_img, dy_img))| {
            per_image(x_img, dy_img, dx_img, col, dw_img)
        });
    sum_rows(&partial, dweight);
}

/// out[j] = sum over rows r of rows[r * out.len() + j], rows added in order.
pub(crate) fn sum_rows(rows: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for row in rows.chunks_exact(out.len()) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}
