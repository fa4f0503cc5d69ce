//! The fused executor's 2x2 poolings (forward) on AVX-512. A plain loop over a plane's outputs
//! cannot use vectors on rows of 14 or 7 outputs; here each output row is one vector: the two input
//! rows of its windows are loaded (masked) and split into their even and odd columns by a permute, and
//! each output is computed with the reference's operations in the reference's order, so the bits are
//! the reference's (the tests below). Other CPUs, and rows of more than 32 inputs, run the reference's.

use crate::cpu::reference::pool;
use crate::model::{Layer, Shape};

/// Pooling layer `layer` over as many planes of `s` as x holds, as `pool::forward_serial`.
pub fn forward_serial(layer: &Layer, s: Shape, x: &[f32], y: &mut [f32], winners: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(layer, Layer::MaxPool2 | Layer::AvgPool2)
        && crate::cpu::isa::isa() == crate::cpu::isa::Isa::Avx512
        && s.w <= 32
        && s.w.is_multiple_of(2)
        && s.h.is_multiple_of(2)
    {
        let planes = x.len() / (s.h * s.w);
        let outputs = planes * (s.h / 2) * (s.w / 2);
        assert!(x.len() == planes * s.h * s.w && y.len() == outputs, "pooling: x or y has the wrong length");
        let winners = match layer {
            Layer::MaxPool2 => {
                assert_eq!(winners.len(), outputs, "max pooling: winners has the wrong length");
                Some(winners)
            }
            _ => None,
        };
        // SAFETY: the CPU has AVX-512 (isa); the lengths are checked above.
        return unsafe { avx512::pool2(planes, s.h, s.w, x, y, winners) };
    }
    pool::forward_serial(layer, s, x, y, winners)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// 2x2 max pooling (with `winners`) or average pooling (without) of `planes` planes of h x w,
    /// w <= 32 and even.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and DQ; x holds planes * h * w values, y (and winners) a quarter.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub unsafe fn pool2(planes: usize, h: usize, w: usize, x: &[f32], y: &mut [f32], mut winners: Option<&mut [u8]>) {
        let (ho, wo) = (h / 2, w / 2);
        let low: __mmask16 = if w >= 16 { 0xffff } else { (1u16 << w) - 1 };
        let high: __mmask16 = if w > 16 { ((1u32 << (w - 16)) - 1) as u16 } else { 0 };
        let out: __mmask16 = ((1u32 << wo) - 1) as u16;
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // A row's even and odd columns.
        let split = |row: *const f32| {
            let (a, b) = (_mm512_maskz_loadu_ps(low, row), _mm512_maskz_loadu_ps(high, row.add(16)));
            (_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
        };
        for r in 0..planes * ho {
            let top = x.as_ptr().add(2 * r * w);
            let ((a, b), (c, d)) = (split(top), split(top.add(w)));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 form against the reference, bit for bit, at every even width up to 32 and with
    /// ties and NaNs in the windows; on a CPU without AVX-512 both run the reference.
    #[test]
    fn the_poolings_give_the_reference_bits() {
        for w in (2..=32).step_by(2) {
            let s = Shape { c: 3, h: 6, w };
            let mut x: Vec<f32> = (0..s.len()).map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0).collect();
            // Ties (the first wins), and NaNs (a NaN wins over what is before it; a NaN first stays).
            x[1] = x[0];
            x[w + 2] = f32::NAN;
            x[2 * w + 4] = f32::NAN;
            for layer in [Layer::MaxPool2, Layer::AvgPool2] {
                let outputs = s.len() / 4;
                let winners_len = if layer == Layer::MaxPool2 { outputs } else { 0 };
                let (mut y, mut winners) = (vec![0.0; outputs], vec![0u8; winners_len]);
                let (mut want, mut want_winners) = (vec![0.0; outputs], vec![0u8; winners_len]);
                forward_serial(&layer, s, &x, &mut y, &mut winners);
                pool::forward_serial(&layer, s, &x, &mut want, &mut want_winners);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "{layer:?} at width {w}");
                assert_eq!(winners, want_winners, "{layer:?}'s winners at width {w}");
            }
        }
    }
}
