//! A convolution's bias gradient per image: the f64 sum of each output plane, in the reference's
//! order (`plane_total`: value after value), bit for bit. One plane's sum is a chain of additions,
//! each waiting on the last; here eight planes are summed side by side in a vector's lanes (eight
//! rows of eight values transposed in registers, so that each vector holds one position of the eight
//! planes), which keeps each plane's order, and up to four such groups at once, so that their chains
//! overlap.

#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::{isa, Isa};
use crate::cpu::reference::conv::plane_total;

/// The planes of a group, summed in one vector's lanes.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 8;

/// The groups whose chains of additions run side by side.
#[cfg(target_arch = "x86_64")]
const GROUPS: usize = 4;

/// `plane_total` of each plane of `len` values in `planes`, into `totals`.
pub fn plane_totals(planes: &[f32], len: usize, totals: &mut [f64]) {
    assert_eq!(planes.len(), len * totals.len(), "plane_totals: planes holds other than totals.len() planes");
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Baseline && len > 0 {
        for (t, p) in totals.chunks_mut(GROUPS * GROUP).zip(planes.chunks(GROUPS * GROUP * len)) {
            // SAFETY: the CPU has AVX2 (isa() is not the baseline); p holds t.len() planes of len
            // values, at most as many as the groups hold.
            unsafe {
                // AVX-512's 32 registers keep the sums and the transposes' values in registers.
                match (t.len().div_ceil(GROUP), isa() == Isa::Avx512) {
                    (1, false) => avx2::group_totals::<1>(p, len, t),
                    (2, false) => avx2::group_totals::<2>(p, len, t),
                    (3, false) => avx2::group_totals::<3>(p, len, t),
                    (_, false) => avx2::group_totals::<GROUPS>(p, len, t),
                    (1, true) => avx2::group_totals_avx512::<1>(p, len, t),
                    (2, true) => avx2::group_totals_avx512::<2>(p, len, t),
                    (3, true) => avx2::group_totals_avx512::<3>(p, len, t),
                    (_, true) => avx2::group_totals_avx512::<GROUPS>(p, len, t),
                }
            }
        }
        return;
    }
    for (c, t) in totals.iter_mut().enumerate() {
        *t = plane_total(&planes[c * len..][..len]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sums of the planes of `len` values in `p` (as many as `totals` has, in G groups of eight
    /// or fewer), each value after value, into `totals`: each group in a vector's lanes, the groups'
    /// chains of additions side by side.
    ///
    /// # Safety
    /// The CPU has AVX2; p holds totals.len() * len values, totals.len() <= 8 G <= 32.
    #[target_feature(enable = "avx2")]
    pub unsafe fn group_totals<const G: usize>(p: &[f32], len: usize, totals: &mut [f64]) {
        group_totals_body::<G>(p, len, totals)
    }

    /// `group_totals` with AVX-512's 32 registers.
    ///
    /// # Safety
    /// As `group_totals`, and the CPU has AVX-512 F and VL.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    pub unsafe fn group_totals_avx512<const G: usize>(p: &[f32], len: usize, totals: &mut [f64]) {
        group_totals_body::<G>(p, len, totals)
    }

    #[inline(always)]
    unsafe fn group_totals_body<const G: usize>(p: &[f32], len: usize, totals: &mut [f64]) {
        let planes = totals.len();
        assert!(planes <= 8 * G && G <= 4 && p.len() == planes * len);
        // -0.0 is the sum of no values, as `Sum` starts it: a plane of -0.0 sums to -0.0.
        let (mut lo, mut hi) = ([_mm256_set1_pd(-0.0); G], [_mm256_set1_pd(-0.0); G]);
        let main = len / 8 * 8;
        for i in (0..main).step_by(8) {
            for g in 0..G {
                // Missing planes read as zeros; their sums are not kept.
                let rows: [__m256; 8] = std::array::from_fn(|r| match 8 * g + r < planes {
                    true => _mm256_loadu_ps(p.as_ptr().add((8 * g + r) * len + i)),
                    false => _mm256_setzero_ps(),
                });
                for position in transpose(rows) {
                    lo[g] = _mm256_add_pd(lo[g], _mm256_cvtps_pd(_mm256_castps256_ps128(position)));
                    hi[g] = _mm256_add_pd(hi[g], _mm256_cvtps_pd(_mm256_extractf128_ps(position, 1)));
                }
            }
        }
        let mut sums = [0.0f64; 32];
        for g in 0..G {
            _mm256_storeu_pd(sums.as_mut_ptr().add(8 * g), lo[g]);
            _mm256_storeu_pd(sums.as_mut_ptr().add(8 * g + 4), hi[g]);
        }
        for i in main..len {
            for (c, t) in sums[..planes].iter_mut().enumerate() {
                *t += p[c * len + i] as f64;
            }
        }
        totals.copy_from_slice(&sums[..planes]);
    }

    /// Eight rows of eight values as eight columns: column k holds value k of each row, in row order.
    #[inline(always)]
    unsafe fn transpose(r: [__m256; 8]) -> [__m256; 8] {
        let t: [__m256; 8] = std::array::from_fn(|k| {
            let (a, b) = (r[k / 2 * 2], r[k / 2 * 2 + 1]);
            if k % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // t[0..4]: rows 0-1 and 2-3 interleaved (lo, hi); t[4..8]: rows 4-5, 6-7.
        let u = [
            _mm256_shuffle_ps(t[0], t[2], 0x44),
            _mm256_shuffle_ps(t[0], t[2], 0xee),
            _mm256_shuffle_ps(t[1], t[3], 0x44),
            _mm256_shuffle_ps(t[1], t[3], 0xee),
            _mm256_shuffle_ps(t[4], t[6], 0x44),
            _mm256_shuffle_ps(t[4], t[6], 0xee),
            _mm256_shuffle_ps(t[5], t[7], 0x44),
            _mm256_shuffle_ps(t[5], t[7], 0xee),
        ];
        let low: [__m256; 4] = std::array::from_fn(|k| _mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
        let high: [__m256; 4] = std::array::from_fn(|k| _mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
        [low[0], low[1], low[2], low[3], high[0], high[1], high[2], high[3]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plane_totals_are_plane_total_bit_for_bit() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for (channels, len) in [
            (1, 5),
            (8, 3),
            (8, 8),
            (11, 100),
            (24, 576),
            (32, 25),
            (16, 13),
            (10, 576),
            (20, 100),
            (3, 0),
            (40, 9),
            (64, 17),
        ] {
            let mut planes: Vec<f32> = (0..channels * len).map(|i| next() * 10f32.powi(i as i32 % 9 - 4)).collect();
            // A plane of negative zeros, whose sum is -0.0.
            planes[..len].fill(-0.0);
            let mut totals = vec![0.0; channels];
            plane_totals(&planes, len, &mut totals);
            for (c, t) in totals.iter().enumerate() {
                assert_eq!(
                    t.to_bits(),
                    plane_total(&planes[c * len..][..len]).to_bits(),
                    "{channels}x{len}, channel {c}"
                );
            }
        }
    }
}
