//! The fused executor's 2x2 poolings in vector registers. A plain loop over a plane's outputs cannot
//! use vectors on rows of 14 or 7 outputs; here a row's outputs are a vector or two: the two input
//! rows of their windows are loaded (masked) and split into their even and odd columns by permutes
//! (forward), or the window's four gradients are interleaved back into the two rows (the max
//! pooling's backward). Each value is computed with the reference's operations in the reference's
//! order, so the bits are the reference's (the tests below). On AVX-512 a row of up to 32 inputs is
//! one vector, on AVX2 a row is cut into vectors of 8 outputs; other CPUs run the reference's.

#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::{isa, Isa};
use crate::cpu::reference::pool;
use crate::model::{Layer, Shape};

/// Planes of s in x, and the output count, for a 2x2 max or average pooling `layer` the vector
/// forms run (h and w even; None for any other layer); panics if x or y has the wrong length.
#[cfg(target_arch = "x86_64")]
fn pooled(layer: &Layer, s: Shape, x: usize, y: usize) -> Option<(usize, usize)> {
    let runs = isa() != Isa::Baseline && matches!(layer, Layer::MaxPool2 | Layer::AvgPool2);
    if !runs || !s.w.is_multiple_of(2) || !s.h.is_multiple_of(2) {
        return None;
    }
    let planes = x / (s.h * s.w);
    let outputs = planes * (s.h / 2) * (s.w / 2);
    assert!(x == planes * s.h * s.w && y == outputs, "pooling: the input or output has the wrong length");
    Some((planes, outputs))
}

/// Pooling layer `layer` over as many planes of `s` as x holds, as `pool::forward_serial`.
pub fn forward_serial(layer: &Layer, s: Shape, x: &[f32], y: &mut [f32], winners: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if let Some((planes, outputs)) = pooled(layer, s, x.len(), y.len()) {
        return in_vectors(layer, Rows { planes, h: s.h, w: s.w, ld: s.w }, outputs, (x, y, winners));
    }
    pool::forward_serial(layer, s, x, y, winners)
}

/// A 2x2 max or average pooling in the vector form this CPU runs, whose lengths `pooled` checked
/// (`outputs`: y's).
#[cfg(target_arch = "x86_64")]
fn in_vectors(layer: &Layer, rows: Rows, outputs: usize, (x, y, winners): (&[f32], &mut [f32], &mut [u8])) {
    let winners = match layer {
        Layer::MaxPool2 => {
            assert_eq!(winners.len(), outputs, "max pooling: winners has the wrong length");
            Some(winners)
        }
        _ => None,
    };
    // SAFETY: the CPU has the features of the form isa() picks; the caller checked x's and y's lengths.
    unsafe {
        match isa() {
            Isa::Avx512 if rows.w <= 32 => avx512::pool2(rows, x, y, winners),
            _ => avx2::pool2(rows, x, y, winners),
        }
    }
}

/// 2x2 pooling layer `layer` of one plane of h rows of w values `ld` apart (a convolution's output
/// on its grid, `products::forward_planes`), as `forward_serial` pools the plane compacted; `compact`
/// is scratch of h * w values for a CPU the vector forms do not run on.
pub fn pool_plane(
    layer: &Layer,
    (h, w, ld): (usize, usize, usize),
    x: &[f32],
    y: &mut [f32],
    winners: &mut [u8],
    compact: &mut [f32],
) {
    let s = Shape { c: 1, h, w };
    assert!(h > 0 && x.len() >= (h - 1) * ld + w && ld >= w, "pool_plane: x holds fewer than {h} rows of {w}");
    #[cfg(target_arch = "x86_64")]
    if let Some((_, outputs)) = pooled(layer, s, h * w, y.len()) {
        return in_vectors(layer, Rows { planes: 1, h, w, ld }, outputs, (x, y, winners));
    }
    for (row, from) in compact[..h * w].chunks_exact_mut(w).zip(x.chunks(ld)) {
        row.copy_from_slice(&from[..w]);
    }
    pool::forward_serial(layer, s, &compact[..h * w], y, winners)
}

/// dx from dy for pooling layer `layer`, as `pool::backward_serial`.
pub fn backward_serial(layer: &Layer, s: Shape, winners: &[u8], dy: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some((planes, _)) = pooled(layer, s, dx.len(), dy.len()) {
        // SAFETY: the CPU has the features of the form isa() picks; the lengths are checked (pooled
        // and below).
        match (layer, isa()) {
            (Layer::MaxPool2, isa) => {
                assert_eq!(winners.len(), dy.len(), "max pooling: winners has the wrong length");
                return unsafe {
                    match isa {
                        Isa::Avx512 if s.w <= 32 => avx512::maxpool2_backward(planes, s.h, s.w, winners, dy, dx),
                        _ => avx2::maxpool2_backward(planes, s.h, s.w, winners, dy, dx),
                    }
                };
            }
            (Layer::AvgPool2, Isa::Avx512) if s.w <= 32 => {
                return unsafe { avx512::avgpool2_backward(planes, s.h, s.w, dy, dx) };
            }
            _ => {}
        }
    }
    pool::backward_serial(layer, s, winners, dy, dx)
}

/// Where a pooling's input lies: `planes` planes of h rows of w values, rows `ld` apart.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Rows {
    planes: usize,
    h: usize,
    w: usize,
    ld: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu::fused::pool::Rows;
    use std::arch::x86_64::*;

    /// A mask of the first n (at most 8) lanes, for masked loads and stores.
    #[inline(always)]
    unsafe fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The even and odd values of the first `len` (at most 16) at p.
    #[inline(always)]
    unsafe fn split(p: *const f32, len: usize) -> (__m256, __m256) {
        let lo = _mm256_maskload_ps(p, first(len.min(8)));
        let hi = _mm256_maskload_ps(p.add(8), first(len.saturating_sub(8)));
        let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0b11_01_10_00));
        (order(_mm256_shuffle_ps(lo, hi, 0b10_00_10_00)), order(_mm256_shuffle_ps(lo, hi, 0b11_01_11_01)))
    }

    /// As `avx512::pool2`, for any even w, 8 outputs of a row at a time.
    ///
    /// # Safety
    /// The CPU has AVX2; x holds planes * h rows of w values `ld` apart, y (and winners) planes * h * w
    /// / 4 values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pool2(rows: Rows, x: &[f32], y: &mut [f32], mut winners: Option<&mut [u8]>) {
        let Rows { planes, h, w, ld } = rows;
        let (ho, wo) = (h / 2, w / 2);
        for r in 0..planes * ho {
            let top = x.as_ptr().add(2 * r * ld);
            for ox in (0..wo).step_by(8) {
                let n = (wo - ox).min(8);
                let ((a, b), (c, d)) = (split(top.add(2 * ox), 2 * n), split(top.add(ld + 2 * ox), 2 * n));
                let at = r * wo + ox;
                match winners.as_deref_mut() {
                    None => {
                        let sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a, b), c), d);
                        _mm256_maskstore_ps(y.as_mut_ptr().add(at), first(n), _mm256_div_ps(sum, _mm256_set1_ps(4.0)));
                    }
                    Some(winners) => {
                        let (mut best, mut index) = (a, _mm256_setzero_ps());
                        for (i, v) in [(1, b), (2, c), (3, d)] {
                            let wins =
                                _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                            best = _mm256_blendv_ps(best, v, wins);
                            index = _mm256_blendv_ps(index, _mm256_castsi256_ps(_mm256_set1_epi32(i)), wins);
                        }
                        _mm256_maskstore_ps(y.as_mut_ptr().add(at), first(n), best);
                        let mut lanes = [0i32; 8];
                        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_castps_si256(index));
                        winners[at..at + n].iter_mut().zip(lanes).for_each(|(w, l)| *w = l as u8);
                    }
                }
            }
        }
    }

    /// The max pooling's backward pass: each output gradient to its window's winner, 0 to the other
    /// three; dx is overwritten.
    ///
    /// # Safety
    /// The CPU has AVX2; dx holds planes * h * w values, dy and winners a quarter.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn maxpool2_backward(planes: usize, h: usize, w: usize, winners: &[u8], dy: &[f32], dx: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        let zero = _mm256_setzero_ps();
        for r in 0..planes * ho {
            for ox in (0..wo).step_by(8) {
                let (n, at) = ((wo - ox).min(8), r * wo + ox);
                let g = _mm256_maskload_ps(dy.as_ptr().add(at), first(n));
                let mut lanes = [0i32; 8];
                lanes.iter_mut().zip(&winners[at..at + n]).for_each(|(l, &w)| *l = w as i32);
                let index = _mm256_loadu_si256(lanes.as_ptr().cast());
                let to = |i: i32| {
                    _mm256_blendv_ps(zero, g, _mm256_castsi256_ps(_mm256_cmpeq_epi32(index, _mm256_set1_epi32(i))))
                };
                // The window's row of two back in order: even, odd, even, odd.
                let rows = [(to(0), to(1), 2 * r * w), (to(2), to(3), (2 * r + 1) * w)];
                for (even, odd, row) in rows {
                    let (lo, hi) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
                    let out = dx.as_mut_ptr().add(row + 2 * ox);
                    _mm256_maskstore_ps(out, first((2 * n).min(8)), _mm256_permute2f128_ps(lo, hi, 0x20));
                    _mm256_maskstore_ps(
                        out.add(8),
                        first((2 * n).saturating_sub(8)),
                        _mm256_permute2f128_ps(lo, hi, 0x31),
                    );
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::cpu::fused::pool::Rows;
    use std::arch::x86_64::*;

    /// For a row of w <= 32 inputs: the masks of its first 16 values and of the rest, and of its w / 2
    /// outputs.
    #[inline(always)]
    fn row_masks(w: usize) -> (__mmask16, __mmask16, __mmask16) {
        let (low, high) = crate::cpu::fused::fma::row_masks(w);
        (low, high, ((1u32 << (w / 2)) - 1) as u16)
    }

    /// 2x2 max pooling (with `winners`) or average pooling (without) of `planes` planes of h rows of w
    /// values, `ld` apart (w <= 32 and even).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and DQ; x holds planes * h rows of w values `ld` apart, y (and
    /// winners) planes * h * w / 4 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn pool2(rows: Rows, x: &[f32], y: &mut [f32], mut winners: Option<&mut [u8]>) {
        let Rows { planes, h, w, ld } = rows;
        let (ho, wo) = (h / 2, w / 2);
        let (low, high, out) = row_masks(w);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // A row's even and odd columns.
        let split = |row: *const f32| {
            let (a, b) = (_mm512_maskz_loadu_ps(low, row), _mm512_maskz_loadu_ps(high, row.add(16)));
            (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
        };
        for r in 0..planes * ho {
            let top = x.as_ptr().add(2 * r * ld);
            let ((a, b), (c, d)) = (split(top), split(top.add(ld)));
            let at = y.as_mut_ptr().add(r * wo);
            match winners.as_deref_mut() {
                None => {
                    // As the reference: the window's four values added in row-major order, then / 4.
                    let sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), c), d);
                    _mm512_mask_storeu_ps(at, out, _mm512_div_ps(sum, _mm512_set1_ps(4.0)));
                }
                Some(winners) => {
                    // As the reference: a later value wins when greater or NaN.
                    let (mut best, mut index) = (a, _mm512_setzero_si512());
                    for (i, v) in [(1, b), (2, c), (3, d)] {
                        let wins = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                        best = _mm512_mask_blend_ps(wins, best, v);
                        index = _mm512_mask_blend_epi32(wins, index, _mm512_set1_epi32(i));
                    }
                    _mm512_mask_storeu_ps(at, out, best);
                    _mm512_mask_cvtepi32_storeu_epi8(winners.as_mut_ptr().add(r * wo).cast(), out, index);
                }
            }
        }
    }

    /// As `pool::avgpool2_backward` for w <= 32: each output gradient / 4 into its window's four
    /// inputs, a row of outputs per vector.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; dx holds planes * h * w values, dy a quarter; w <= 32.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avgpool2_backward(planes: usize, h: usize, w: usize, dy: &[f32], dx: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        let (low, high, out) = row_masks(w);
        // Each value twice, in order: the first 16 of a row, then the rest.
        let first = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let rest = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
        for r in 0..planes * ho {
            let g = _mm512_div_ps(_mm512_maskz_loadu_ps(out, dy.as_ptr().add(r * wo)), _mm512_set1_ps(4.0));
            let (a, b) = (_mm512_permutexvar_ps(first, g), _mm512_permutexvar_ps(rest, g));
            for row in [2 * r, 2 * r + 1] {
                let at = dx.as_mut_ptr().add(row * w);
                _mm512_mask_storeu_ps(at, low, a);
                _mm512_mask_storeu_ps(at.add(16), high, b);
            }
        }
    }

    /// As `avx2::maxpool2_backward` for w <= 32: a row of outputs is one vector, its window's two rows
    /// two vectors each.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; dx holds planes * h * w values, dy and winners a quarter;
    /// w <= 32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn maxpool2_backward(planes: usize, h: usize, w: usize, winners: &[u8], dy: &[f32], dx: &mut [f32]) {
        let (ho, wo) = (h / 2, w / 2);
        let (low, high, out) = row_masks(w);
        // Even and odd columns back into a row: the first 16 values, then the rest.
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let rest = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        for r in 0..planes * ho {
            let g = _mm512_maskz_loadu_ps(out, dy.as_ptr().add(r * wo));
            let index = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(out, winners.as_ptr().add(r * wo).cast()));
            let to = |i: i32| _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(index, _mm512_set1_epi32(i)), g);
            for (even, odd, row) in [(to(0), to(1), 2 * r), (to(2), to(3), 2 * r + 1)] {
                let at = dx.as_mut_ptr().add(row * w);
                _mm512_mask_storeu_ps(at, low, _mm512_permutex2var_ps(even, first, odd));
                _mm512_mask_storeu_ps(at.add(16), high, _mm512_permutex2var_ps(even, rest, odd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector forms against the reference, bit for bit, at every even width up to 40 and with
    /// ties and NaNs in the windows (forward and the max pooling's backward). This runs the widest form
    /// this CPU has; MNIST_WGPU_CPU_ISA=avx2 runs the AVX2 form.
    #[test]
    fn the_poolings_give_the_reference_bits() {
        for w in (2..=40).step_by(2) {
            let s = Shape { c: 3, h: 6, w };
            let mut x: Vec<f32> = (0..s.len()).map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0).collect();
            // Ties (the first wins), and NaNs (a NaN wins over what is before it; a NaN first stays).
            x[1] = x[0];
            x[w + 2] = f32::NAN;
            x[2 * w + 4] = f32::NAN;
            // The global average pooling passes through to the reference.
            for layer in [Layer::MaxPool2, Layer::AvgPool2, Layer::GlobalAvgPool] {
                let outputs = if layer == Layer::GlobalAvgPool { s.c } else { s.len() / 4 };
                let winners_len = if layer == Layer::MaxPool2 { outputs } else { 0 };
                let (mut y, mut winners) = (vec![0.0; outputs], vec![0u8; winners_len]);
                let (mut want, mut want_winners) = (vec![0.0; outputs], vec![0u8; winners_len]);
                forward_serial(&layer, s, &x, &mut y, &mut winners);
                pool::forward_serial(&layer, s, &x, &mut want, &mut want_winners);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "{layer:?} at width {w}");
                assert_eq!(winners, want_winners, "{layer:?}'s winners at width {w}");
                if layer != Layer::GlobalAvgPool {
                    // One plane read off a grid 3 wider than it.
                    let plane = Shape { c: 1, ..s };
                    let ld = w + 3;
                    let grid: Vec<f32> =
                        (0..plane.h * ld).map(|i| if i % ld < w { x[i / ld * w + i % ld] } else { 1e9 }).collect();
                    let (mut py, mut pw) = (vec![0.0; plane.len() / 4], vec![0u8; winners_len / 3]);
                    pool_plane(&layer, (plane.h, w, ld), &grid, &mut py, &mut pw, &mut vec![0.0; plane.len()]);
                    assert_eq!(
                        bits(&py),
                        bits(&want[..plane.len() / 4]),
                        "{layer:?} of one plane on a grid at width {w}"
                    );
                    assert_eq!(pw, want_winners[..winners_len / 3], "{layer:?}'s winners of one plane at width {w}");
                }
                let dy: Vec<f32> = (0..outputs).map(|i| i as f32 - 7.5).collect();
                let (mut dx, mut want_dx) = (vec![f32::NAN; s.len()], vec![f32::NAN; s.len()]);
                backward_serial(&layer, s, &winners, &dy, &mut dx);
                pool::backward_serial(&layer, s, &want_winners, &dy, &mut want_dx);
                assert_eq!(bits(&dx), bits(&want_dx), "{layer:?}'s backward at width {w}");
            }
        }
    }
}
