//! The fused executor's convolutions whose output planes are too small for the shifted form (Net3's
//! 5x5 outputs: a row of pixels fills no vector), bit for bit the reference's im2col and GEMM, run
//! with the kernels of `fma.rs`. matrixmultiply sums each output's k products with fused
//! multiply-adds from zero in blocks of `KC`, each block's sum added to what the output holds;
//! `fma::product` sums in order the same way, so running it on each block, adding from the second
//! on, gives the reference's bits, without the GEMM's copying of both operands into panels per image.
//!
//! The columns (im2col's matrix, and the input gradient's) have rows one vector block wide (the
//! plane's pixels, then junk the products compute and nothing reads), so the products run without a
//! tail. The weight gradient sums over the pixels, one image at a time, as the reference does: with
//! the output channels along the vectors (the output gradient transposed), so it comes transposed,
//! taps x channels, and is turned back once per step, after its groups' sums (`untranspose`). Only
//! unpadded convolutions run here (a padded one keeps the reference's GEMM, whose input gradient adds
//! the padding's zeros too).

use std::cell::RefCell;

use super::fma::{self, copy_rows, Every, Operand};
#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::{isa, Isa};
use crate::cpu::reference::conv::{ConvDims, ImageGrads};
use crate::cpu::scratch::with_scratch;

/// matrixmultiply's block of k (`S_KC`, its default, which the reference is built with).
const KC: usize = 256;

thread_local! {
    /// A column matrix: im2col's (forward pass) or the input gradient's, rows `row_width` wide.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The output, or the output gradient, rows `row_width` wide.
    static PLANES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether convolution `d` runs here: an unpadded one, on a CPU with FMA.
pub fn runs(d: &ConvDims) -> bool {
    d.pad == 0 && fma::available()
}

/// `n` rounded up to whole blocks of `fma::product`'s columns.
fn whole_blocks(n: usize) -> usize {
    n.div_ceil(fma::nr()) * fma::nr()
}

/// A column row's width: the pixels in whole blocks.
fn row_width(d: &ConvDims) -> usize {
    whole_blocks(d.col_cols())
}

/// c (m x n, rows `ldc` apart) = a (m x k) x b (k rows of n, `ldb` apart), plus c when `accumulate`,
/// as matrixmultiply sums it: k in blocks of `KC`, each block's sum added to c after the first.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    k: usize,
    n: usize,
    a: Operand,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    for k0 in (0..k.max(1)).step_by(KC) {
        let a = Operand { data: &a.data[k0 * a.col..], ..a };
        let kc = KC.min(k - k0);
        fma::product(m, kc, n, a, &b[k0 * ldb..], Every(ldb), c, ldc, accumulate || k0 > 0);
    }
}

/// One image's forward convolution, each output plane handed to `each` (as `forward_planes`).
pub fn forward_planes(d: &ConvDims, x: &[f32], weight: &[f32], mut each: impl FnMut(usize, &mut [f32], usize)) {
    let (rows, width) = (d.col_rows(), row_width(d));
    with_scratch(&COLUMNS, rows * width, |col| {
        with_scratch(&PLANES, d.cout * width, |y| {
            im2col(d, x, col, width);
            let w = Operand { data: weight, row: rows, col: 1 };
            product(d.cout, rows, width, w, col, width, y, width, false);
            for (c, plane) in y.chunks_exact_mut(width).enumerate() {
                each(c, &mut plane[..d.col_cols()], d.wo());
            }
        })
    })
}

/// One image's forward convolution into y_img.
pub fn forward_image(d: &ConvDims, x: &[f32], weight: &[f32], y_img: &mut [f32]) {
    let plane = d.col_cols();
    forward_planes(d, x, weight, |c, p, _| y_img[c * plane..][..plane].copy_from_slice(p));
}

/// One image's gradients (see `ImageGrads`), its weight gradient transposed: `g.dw` is the group's
/// (taps x `padded_cout`, see `partial_len`).
pub fn backward_image(d: &ConvDims, g: ImageGrads) {
    let ImageGrads { x, weight, dy, dx, dw, beta } = g;
    let (rows, pixels, width, cout) = (d.col_rows(), d.col_cols(), row_width(d), padded_cout(d));
    with_scratch(&COLUMNS, rows * width, |col| {
        with_scratch(&PLANES, pixels.max(d.cout) * width.max(cout), |planes| {
            // dw^T (taps x cout) = col (taps x pixels) x dy^T (pixels x cout): each output's sum over
            // the pixels in order, added to the group's.
            im2col(d, x, col, width);
            let dy_t = &mut planes[..pixels * cout];
            transpose(dy, pixels, dy_t, cout);
            let col_rows = Operand { data: col, row: width, col: 1 };
            product(rows, pixels, cout, col_rows, dy_t, cout, dw, cout, beta == 1.0);
            let Some(dx) = dx else { return };
            // The input gradient's columns (taps x pixels) = weight^T x dy, then added back onto dx.
            let dy_wide = &mut planes[..d.cout * width];
            copy_rows(dy_wide, width, dy, pixels, d.cout, pixels);
            let weight_t = Operand { data: weight, row: 1, col: rows };
            product(rows, d.cout, width, weight_t, dy_wide, width, col, width, false);
            col2im(d, col, width, dx);
        })
    });
}

/// The width of a weight gradient's transposed rows: the output channels in whole blocks.
fn padded_cout(d: &ConvDims) -> usize {
    whole_blocks(d.cout)
}

/// The length of a group's weight gradient as `backward_image` keeps it, transposed.
pub fn partial_len(d: &ConvDims) -> usize {
    d.col_rows() * padded_cout(d)
}

/// The weight gradient (cout x taps) from the groups' summed transposed one.
pub fn untranspose(d: &ConvDims, summed: &[f32], dw: &mut [f32]) {
    let (rows, cout) = (d.col_rows(), padded_cout(d));
    for (co, dw_row) in dw.chunks_exact_mut(rows).enumerate() {
        dw_row.iter_mut().zip(summed[co..].iter().step_by(cout)).for_each(|(w, s)| *w = *s);
    }
}

/// `a` (planes of `len` values) transposed into `t` (len rows `ld` apart), the rows' last ld -
/// planes values zero.
fn transpose(a: &[f32], len: usize, t: &mut [f32], ld: usize) {
    let planes = a.len() / len;
    for (i, row) in t.chunks_exact_mut(ld).enumerate().take(len) {
        row.iter_mut().zip(a[i..].iter().step_by(len)).for_each(|(t, v)| *t = *v);
        row[planes..].fill(0.0);
    }
}

/// im2col of an unpadded convolution's image into `col`, rows `width` apart.
fn im2col(d: &ConvDims, x: &[f32], col: &mut [f32], width: usize) {
    assert!(x.len() == d.in_image() && col.len() >= d.col_rows() * width && width.is_multiple_of(16) && width <= 64);
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F; the slices' lengths are checked above.
        return unsafe { avx512::im2col(d, x, col, width) };
    }
    let (k, wo) = (d.k, d.wo());
    for (ci, plane) in x.chunks_exact(d.h * d.w).enumerate() {
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * width..][..d.col_cols()];
                copy_rows(row, wo, &plane[ky * d.w + kx..], d.w, d.ho(), wo);
            }
        }
    }
}

/// The adjoint of `im2col` as the reference's `col2im` runs it: dx zeroed, then each column row added
/// back onto the pixels it was read from, rows in order (so each pixel adds its taps in order).
fn col2im(d: &ConvDims, col: &[f32], width: usize, dx: &mut [f32]) {
    assert!(dx.len() == d.in_image() && col.len() >= d.col_rows() * width);
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 && d.w <= 16 {
        // SAFETY: the CPU has AVX-512 F; the slices' lengths are checked above, a row fits a vector.
        return unsafe { avx512::col2im(d, col, width, dx) };
    }
    let (k, wo) = (d.k, d.wo());
    dx.fill(0.0);
    for (ci, plane) in dx.chunks_exact_mut(d.h * d.w).enumerate() {
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * width..][..d.col_cols()];
                for (oy, from) in row.chunks_exact(wo).enumerate() {
                    let to = &mut plane[(oy + ky) * d.w + kx..][..wo];
                    to.iter_mut().zip(from).for_each(|(t, f)| *t += f);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::cpu::reference::conv::ConvDims;

    /// The lanes first..end of a vector (end - first <= 16).
    fn lanes(first: usize, end: usize) -> u16 {
        (((1u32 << (end - first)) - 1) << first) as u16
    }

    /// `im2col`: each vector of a column row gathered from the plane's rows by masked loads (a 5x5
    /// output's row is two vectors, six loads), its lanes past the pixels zero.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; x holds an image, col d.col_rows() rows of `width` (a multiple of 16,
    /// at most 64).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn im2col(d: &ConvDims, x: &[f32], col: &mut [f32], width: usize) {
        let (k, ho, wo) = (d.k, d.ho(), d.wo());
        // Per vector of a column row, the output rows it holds: their lanes, and where lane 0 would
        // read (relative to the tap's window) for lane l to read its pixel.
        let mut parts = [[(0u16, 0isize); 17]; 4];
        let mut counts = [0usize; 4];
        for (v, first) in (0..width).step_by(16).enumerate() {
            for oy in first / wo..ho.min((first + 16).div_ceil(wo)) {
                let (a, b) = ((oy * wo).max(first), (oy * wo + wo).min(first + 16));
                // Lane l holds pixel first + l: column first + l - oy * wo of row oy.
                parts[v][counts[v]] = (lanes(a - first, b - first), (oy * d.w + first) as isize - (oy * wo) as isize);
                counts[v] += 1;
            }
        }
        for ci in 0..d.cin {
            for ky in 0..k {
                for kx in 0..k {
                    let window = x.as_ptr().add(ci * d.h * d.w + ky * d.w + kx);
                    let row = col.as_mut_ptr().add(((ci * k + ky) * k + kx) * width);
                    for (v, parts) in parts.iter().enumerate().take(width / 16) {
                        // Each row's lanes loaded on their own (no load waits on another), then joined.
                        let mut joined = _mm512_setzero_si512();
                        for &(m, at) in &parts[..counts[v]] {
                            let part = _mm512_maskz_loadu_ps(m, window.wrapping_offset(at));
                            joined = _mm512_or_si512(joined, _mm512_castps_si512(part));
                        }
                        _mm512_storeu_ps(row.add(16 * v), _mm512_castsi512_ps(joined));
                    }
                }
            }
        }
    }

    /// `col2im`, a row of dx in a register while its taps' column rows are added onto it under masks,
    /// taps in order (no pixel is stored and read back between two of its additions).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; d.w <= 16; dx holds an image, col d.col_rows() rows of `width`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn col2im(d: &ConvDims, col: &[f32], width: usize, dx: &mut [f32]) {
        let (k, ho, wo) = (d.k, d.ho(), d.wo());
        for ci in 0..d.cin {
            for iy in 0..d.h {
                let mut sums = _mm512_setzero_ps();
                for ky in (0..k).filter(|&ky| iy >= ky && iy - ky < ho) {
                    for kx in 0..k {
                        // Column row (ci, ky, kx)'s output row iy - ky lands on columns kx..kx + wo.
                        let from = col.as_ptr().add(((ci * k + ky) * k + kx) * width + (iy - ky) * wo);
                        let m = lanes(kx, kx + wo);
                        let v = _mm512_maskz_loadu_ps(m, from.wrapping_sub(kx));
                        sums = _mm512_mask_add_ps(sums, m, sums, v);
                    }
                }
                _mm512_mask_storeu_ps(dx.as_mut_ptr().add((ci * d.h + iy) * d.w), lanes(0, d.w), sums);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference::conv;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Forward pass, weight gradient (written, then added) and input gradient, bit for bit the
    /// reference's, on shapes with more taps than a block of k (`KC`), fewer channels than a vector,
    /// 1x1 convolutions, rows of two blocks of pixels and outputs one pixel wide.
    #[test]
    fn small_products_are_the_references_bit_for_bit() {
        let shapes = [(32, 7, 7, 3, 32), (16, 7, 7, 3, 12), (30, 7, 7, 3, 10), (32, 5, 5, 1, 10), (3, 6, 6, 2, 40)];
        // Rows of more than one block of pixels (7x7 outputs), and outputs one pixel wide.
        let others = [(8, 9, 9, 3, 16), (4, 9, 3, 3, 5), (2, 20, 1, 1, 3)];
        for (cin, h, w, k, cout) in shapes.into_iter().chain(others) {
            let d = ConvDims { n: 2, cin, h, w, cout, k, pad: 0 };
            // Without FMA (MNIST_WGPU_CPU_ISA=baseline) the reference's GEMM runs instead.
            assert_eq!(runs(&d), fma::available());
            if !runs(&d) {
                continue;
            }
            let (x, weight) = (values(2 * d.in_image(), 1), values(d.weight_len(), 2));
            let dy = values(2 * d.out_image(), 3);
            let what = format!("cin {cin}, {h}x{w}, k {k}, cout {cout}");
            let (mut y, mut y_ref) = (vec![0.0; d.out_image()], vec![0.0; d.out_image()]);
            forward_image(&d, &x[..d.in_image()], &weight, &mut y);
            conv::with_columns(&d, |col| conv::forward_image(&d, &x[..d.in_image()], &weight, &mut y_ref, col));
            assert_eq!(bits(&y), bits(&y_ref), "{what}: forward");
            let (mut dw_t, mut dw_ref) = (vec![0.0; partial_len(&d)], vec![0.0; d.weight_len()]);
            let (mut dx, mut dx_ref) = (vec![0.0; d.in_image()], vec![0.0; d.in_image()]);
            for img in 0..2 {
                let (xi, dyi) = (&x[img * d.in_image()..][..d.in_image()], &dy[img * d.out_image()..][..d.out_image()]);
                let beta = img as f32;
                let g = ImageGrads { x: xi, weight: &weight, dy: dyi, dx: Some(&mut dx), dw: &mut dw_t, beta };
                backward_image(&d, g);
                let g = ImageGrads { x: xi, weight: &weight, dy: dyi, dx: Some(&mut dx_ref), dw: &mut dw_ref, beta };
                conv::with_columns(&d, |col| conv::backward_image(&d, g, col));
                let mut dw = vec![0.0; d.weight_len()];
                untranspose(&d, &dw_t, &mut dw);
                assert_eq!(bits(&dw), bits(&dw_ref), "{what}: weight gradient after image {img}");
                assert_eq!(bits(&dx), bits(&dx_ref), "{what}: input gradient of image {img}");
            }
        }
    }
}
