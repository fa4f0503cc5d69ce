//! Convolution k x k (any k, padding below k), stride 1, and its bias (`bias_forward`,
//! `bias_backward`); a linear layer is the 1x1 convolution of its flattened input. NCHW.
//!
//! Each image is lowered to a column matrix (im2col: one row per (ci, ky, kx), one column per output
//! pixel), so forward and both backward products are single matrix products over contiguous memory.
//! Images are spread across threads in groups fixed by the batch size; weight gradients are summed
//! within each group and then over the groups in order, so the result does not depend on the number
//! of threads.

use std::cell::RefCell;

use rayon::prelude::*;

use super::gemm::{gemm, Layout};
use crate::cpu::isa::vectorized;
use crate::cpu::scratch::with_scratch;
pub use crate::model::ConvDims;

thread_local! {
    /// Each thread's scratch, kept between calls: its im2col matrix, and (on the calling thread) the
    /// per-group weight gradients. Fresh buffers each call cost the kernel a page clearing each time.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// For a "same" convolution (output as large as the input), output pixel j of the plane reads input
/// pixel j + offset of the plane, offset = (ky - pad) * w + (kx - pad), wherever that lies in the image.
/// Returns the offset and the range of j whose j + offset lies inside the plane; within that range the
/// pixels whose column wrapped around a row edge are the ones `wrapped` lists.
fn same_shift(d: &ConvDims, ky: usize, kx: usize) -> (isize, std::ops::Range<usize>) {
    let plane = (d.h * d.w) as isize;
    let offset = (ky as isize - d.pad as isize) * d.w as isize + kx as isize - d.pad as isize;
    let lo = (-offset).clamp(0, plane) as usize;
    let hi = (plane - offset).clamp(0, plane) as usize;
    (offset, lo..hi.max(lo))
}

/// Zeroes the pixels of a "same" im2col row whose input column fell outside the image: the first
/// pad - kx columns of every row, or the last kx - pad (element by element: a call to memset for
/// each row's one or two pixels costs more than the writes).
fn zero_wrapped(d: &ConvDims, kx: usize, row: &mut [f32]) {
    let shift = kx as isize - d.pad as isize;
    let columns = match shift {
        s if s < 0 => 0..(-s) as usize,
        s if s > 0 => d.w - s as usize..d.w,
        _ => return,
    };
    for line in row.chunks_exact_mut(d.w) {
        for x in columns.clone() {
            line[x] = 0.0;
        }
    }
}

/// im2col of one image into `col` (col_rows x col_cols); padding reads as 0.
pub(crate) fn im2col(d: &ConvDims, x: &[f32], col: &mut [f32]) {
    let (ho, wo) = (d.ho(), d.wo());
    let same = ho == d.h && wo == d.w;
    for ci in 0..d.cin {
        let plane = &x[ci * d.h * d.w..][..d.h * d.w];
        for ky in 0..d.k {
            for kx in 0..d.k {
                let row = &mut col[((ci * d.k + ky) * d.k + kx) * ho * wo..][..ho * wo];
                if same {
                    // One contiguous copy of the shifted plane, then the wrapped columns zeroed.
                    let (offset, valid) = same_shift(d, ky, kx);
                    row[..valid.start].fill(0.0);
                    row[valid.end..].fill(0.0);
                    let from = (valid.start as isize + offset) as usize;
                    row[valid.clone()].copy_from_slice(&plane[from..from + valid.len()]);
                    zero_wrapped(d, kx, row);
                    continue;
                }
                for oy in 0..ho {
                    let out = &mut row[oy * wo..(oy + 1) * wo];
                    let iy = (oy + ky) as isize - d.pad as isize;
                    if iy < 0 || iy >= d.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * d.w..][..d.w];
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

vectorized! {
    /// The adjoint of im2col: adds each column entry back onto the input pixel it was read from
    /// (`col` is used as scratch).
    pub(crate) fn col2im(d: &ConvDims, col: &mut [f32], dx: &mut [f32]) {
        let (ho, wo) = (d.ho(), d.wo());
        let same = ho == d.h && wo == d.w;
        dx.fill(0.0);
        for ci in 0..d.cin {
            let plane = &mut dx[ci * d.h * d.w..][..d.h * d.w];
            for ky in 0..d.k {
                for kx in 0..d.k {
                    let row = &mut col[((ci * d.k + ky) * d.k + kx) * ho * wo..][..ho * wo];
                    if same {
                        // Entries read from the padding go nowhere: zero them, then add the rest at once.
                        zero_wrapped(d, kx, row);
                        let (offset, valid) = same_shift(d, ky, kx);
                        let from = (valid.start as isize + offset) as usize;
                        for (t, s) in plane[from..from + valid.len()].iter_mut().zip(&row[valid]) {
                            *t += s;
                        }
                        continue;
                    }
                    for oy in 0..ho {
                        let iy = (oy + ky) as isize - d.pad as isize;
                        if iy < 0 || iy >= d.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * d.w..][..d.w];
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
}

/// Runs `f` on this thread's im2col scratch for a convolution of dims `d` (empty for a 1x1 one).
pub fn with_columns<R>(d: &ConvDims, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let len = if d.is_pointwise() { 0 } else { d.col_rows() * d.col_cols() };
    with_scratch(&COLUMNS, len, f)
}

/// dw = dy x col^T (cout x col_rows, summed over the pixels), added to dw when beta is 1.
fn weight_gradient(d: &ConvDims, dy: &[f32], col: &[f32], dw: &mut [f32], beta: f32) {
    gemm(d.cout, d.col_cols(), d.col_rows(), dy, Layout::Normal, col, Layout::Transposed, beta, dw)
}

/// c = weight x b (cout x cols), or weight^T x b (col_rows x cols) when `transposed`, for a b of
/// col_rows (or cout) rows of `cols` pixels.
fn weights_times(d: &ConvDims, weight: &[f32], transposed: bool, b: &[f32], c: &mut [f32]) {
    let (rows, cols) = (d.col_rows(), d.col_cols());
    let (m, k) = if transposed { (rows, d.cout) } else { (d.cout, rows) };
    let layout = if transposed { Layout::Transposed } else { Layout::Normal };
    gemm(m, k, cols, weight, layout, b, Layout::Normal, 0.0, c)
}

/// One image of `conv_forward`: y_img = weight x im2col(x_img), with `col` (from `with_columns`) as
/// scratch.
pub fn forward_image(d: &ConvDims, x_img: &[f32], weight: &[f32], y_img: &mut [f32], col: &mut [f32]) {
    if d.is_pointwise() {
        weights_times(d, weight, false, x_img, y_img);
    } else {
        im2col(d, x_img, col);
        weights_times(d, weight, false, col, y_img);
    }
}

/// One image's share of a convolution's backward pass: what it reads (its input, the weights, its
/// output gradient) and what it writes (its input gradient when asked; its weight gradient, added into
/// `dw` when `beta` is 1, written when it is 0).
pub struct ImageGrads<'a> {
    pub x: &'a [f32],
    pub weight: &'a [f32],
    pub dy: &'a [f32],
    pub dx: Option<&'a mut [f32]>,
    pub dw: &'a mut [f32],
    pub beta: f32,
}

/// One image of `conv_backward`, with `col` (from `with_columns`) as scratch.
pub fn backward_image(d: &ConvDims, g: ImageGrads, col: &mut [f32]) {
    let ImageGrads { x, weight, dy, dx, dw, beta } = g;
    if d.is_pointwise() {
        weight_gradient(d, dy, x, dw, beta);
        if let Some(dx) = dx {
            weights_times(d, weight, true, dy, dx);
        }
        return;
    }
    im2col(d, x, col);
    weight_gradient(d, dy, col, dw, beta);
    if let Some(dx) = dx {
        weights_times(d, weight, true, dy, col);
        col2im(d, col, dx);
    }
}

/// y = conv(x, weight). x: n x cin x h x w; weight: cout x cin x k x k; y: n x cout x ho x wo.
pub fn conv_forward(d: &ConvDims, x: &[f32], weight: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), d.n * d.in_image());
    assert_eq!(weight.len(), d.weight_len());
    assert_eq!(y.len(), d.n * d.out_image());
    y.par_chunks_mut(d.out_image()).zip(x.par_chunks(d.in_image())).for_each(|(y_img, x_img)| {
        with_columns(d, |col| forward_image(d, x_img, weight, y_img, col));
    });
}

/// Gradients of the convolution: `dweight` (overwritten) and, when asked, `dx` (overwritten).
pub fn conv_backward(d: &ConvDims, x: &[f32], weight: &[f32], dy: &[f32], dx: Option<&mut [f32]>, dweight: &mut [f32]) {
    assert_eq!(x.len(), d.n * d.in_image());
    assert_eq!(dy.len(), d.n * d.out_image());
    assert_eq!(dweight.len(), d.weight_len());
    let per_image =
        |x_img: &[f32], dy_img: &[f32], dx_img: Option<&mut [f32]>, col: &mut [f32], dw: &mut [f32], beta: f32| {
            backward_image(d, ImageGrads { x: x_img, weight, dy: dy_img, dx: dx_img, dw, beta }, col)
        };
    // The images go in at most 16 groups of consecutive images, a split that depends on n only: each
    // group adds up its images' weight gradients in order, then the groups' sums are added in order.
    let group = d.n.div_ceil(16).max(1);
    let groups = d.n.div_ceil(group);
    with_scratch(&PARTIALS, groups * d.weight_len(), |partial| {
        weight_grads_in_groups(d, x, dy, dx, group, partial, &per_image);
        sum_rows(partial, dweight);
    });
}

/// One image's share of `conv_backward`: its weight gradient into `dw` (added with beta 1), its dx
/// when asked, with `col` as its scratch.
type PerImage<'a> = dyn Fn(&[f32], &[f32], Option<&mut [f32]>, &mut [f32], &mut [f32], f32) + Sync + 'a;

/// The images in groups of `group` consecutive ones, in parallel: each group's weight gradient summed
/// in order into its row of `partial`, its images' dx written.
fn weight_grads_in_groups(
    d: &ConvDims,
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    group: usize,
    partial: &mut [f32],
    per_image: &PerImage,
) {
    let groups = d.n.div_ceil(group);
    let dx_groups: Vec<Option<&mut [f32]>> = match dx {
        Some(dx) => {
            assert_eq!(dx.len(), d.n * d.in_image());
            dx.chunks_mut(group * d.in_image()).map(Some).collect()
        }
        None => (0..groups).map(|_| None).collect(),
    };
    partial
        .par_chunks_mut(d.weight_len())
        .zip(dx_groups)
        .zip(x.par_chunks(group * d.in_image()).zip(dy.par_chunks(group * d.out_image())))
        .for_each(|((dw, dx_group), (x_group, dy_group))| {
            with_columns(d, |col| {
                let mut dx_images = dx_group.map(|dx| dx.chunks_mut(d.in_image()));
                let images = x_group.chunks(d.in_image()).zip(dy_group.chunks(d.out_image()));
                for (j, (x_img, dy_img)) in images.enumerate() {
                    let dx_img = dx_images.as_mut().and_then(|images| images.next());
                    per_image(x_img, dy_img, dx_img, col, dw, if j == 0 { 0.0 } else { 1.0 });
                }
            });
        });
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

/// y += bias per output channel (a convolution's or a linear layer's bias).
pub fn bias_forward(d: &ConvDims, bias: &[f32], y: &mut [f32]) {
    assert_eq!(bias.len(), d.cout);
    y.par_chunks_mut(d.out_image()).for_each(|img| bias_forward_image(d, bias, img));
}

/// One image of `bias_forward`.
pub fn bias_forward_image(d: &ConvDims, bias: &[f32], y_img: &mut [f32]) {
    y_img.chunks_mut(d.ho() * d.wo()).zip(bias).for_each(|(p, b)| p.iter_mut().for_each(|v| *v += b));
}

/// dbias = the sum of dy over images and positions, per output channel, in order (image by image).
pub fn bias_backward(d: &ConvDims, dy: &[f32], dbias: &mut [f32]) {
    assert_eq!(dbias.len(), d.cout);
    assert_eq!(dy.len(), d.n * d.out_image());
    let plane = d.ho() * d.wo();
    dbias.par_iter_mut().enumerate().for_each(|(c, db)| {
        let mut sum = 0.0f64;
        for img in dy.chunks(d.out_image()) {
            sum += plane_total(&img[c * plane..(c + 1) * plane]);
        }
        *db = sum as f32;
    });
}

/// A plane's sum in f64, as the bias gradient adds it up (in f64, as the batchnorm sums: the result
/// does not depend on how the sum is cut).
pub fn plane_total(plane: &[f32]) -> f64 {
    plane.iter().map(|&v| v as f64).sum()
}
