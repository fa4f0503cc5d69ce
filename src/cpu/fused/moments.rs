//! A batchnorm's per-image sums per channel, in f64, bit for bit the reference's `plane_sums`: in the
//! forward pass each plane's sums of x and x^2 (its moments), in the backward pass its sums of dy and
//! dy * xhat. `plane_sums` adds value i of a plane into lane i % 8 of eight f64 lanes, then the lanes
//! in order; the compiler leaves that loop scalar. Here the eight lanes are one AVX-512 register (two
//! AVX2 ones), and four planes run side by side, so that their chains of additions overlap.

use crate::cpu::reference::batchnorm::{dy_xhat, plane_sums, BnSaved};

/// What a plane's two sums add up.
#[derive(Clone, Copy)]
pub enum Terms<'a> {
    /// x and x^2, of the planes in `a`.
    Moments,
    /// dy (the planes in `a`) and dy * xhat (xhat from the planes in `b`, normalized as `saved` says).
    DyXhat(&'a BnSaved),
}

impl Terms<'_> {
    /// The second sum's term for channel `c`, as the reference computes it.
    fn second(self, c: usize) -> impl Fn(f32, f32) -> f64 {
        let xhat = match self {
            Terms::Moments => None,
            Terms::DyXhat(saved) => Some(dy_xhat(saved, c)),
        };
        move |a, b| match &xhat {
            None => a as f64 * a as f64,
            Some(f) => f(a, b),
        }
    }
}

/// The planes run side by side.
#[cfg(target_arch = "x86_64")]
const SIDE: usize = 4;

/// Each plane's two sums (`plane_sums` of the planes of `len` values in `a` and `b`, with `terms`),
/// into `sums` as (first, second) pairs in channel order.
pub fn image_plane_sums(a: &[f32], b: &[f32], len: usize, terms: Terms, sums: &mut [f64]) {
    assert!(
        a.len() == b.len() && len > 0 && a.len() == len * sums.len() / 2,
        "image_plane_sums: planes and sums disagree"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::isa::isa() != crate::cpu::isa::Isa::Baseline {
        let mut c = 0;
        for side in [SIDE, 1] {
            while c + side <= sums.len() / 2 {
                let (a, b) = (&a[c * len..][..side * len], &b[c * len..][..side * len]);
                let out = &mut sums[2 * c..][..2 * side];
                // SAFETY: the CPU has AVX2 (isa() is not the baseline), AVX-512 where isa() says so;
                // a, b and out hold `side` planes.
                unsafe { x86::side_by_side(side, x86::Planes { a, b, len, terms, c }, out) };
                c += side;
            }
        }
        return;
    }
    for (c, out) in sums.chunks_exact_mut(2).enumerate() {
        let (a, b) = (&a[c * len..][..len], &b[c * len..][..len]);
        (out[0], out[1]) = plane_sums(a, b, |v, _| v as f64, terms.second(c));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu::fused::moments::{Terms, SIDE};
    use crate::cpu::isa::{isa, Isa};

    /// Eight f64 lanes: one AVX-512 register, or two AVX2 ones.
    trait Lanes: Copy {
        unsafe fn zero() -> Self;
        /// Eight f32 values from `p`, widened.
        unsafe fn widen(p: *const f32) -> Self;
        /// (x - mean) * invstd of eight x from `p` (in f32, as `dy_xhat`), widened.
        unsafe fn xhat(p: *const f32, mean: f32, invstd: f32) -> Self;
        unsafe fn add(self, o: Self) -> Self;
        unsafe fn mul(self, o: Self) -> Self;
        unsafe fn lanes(self) -> [f64; 8];
    }

    #[derive(Clone, Copy)]
    struct Zmm(__m512d);

    impl Lanes for Zmm {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Zmm(_mm512_setzero_pd())
        }
        #[inline(always)]
        unsafe fn widen(p: *const f32) -> Self {
            Zmm(_mm512_cvtps_pd(_mm256_loadu_ps(p)))
        }
        #[inline(always)]
        unsafe fn xhat(p: *const f32, mean: f32, invstd: f32) -> Self {
            let x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_set1_ps(mean)), _mm256_set1_ps(invstd));
            Zmm(_mm512_cvtps_pd(x))
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Zmm(_mm512_add_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Zmm(_mm512_mul_pd(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn lanes(self) -> [f64; 8] {
            let mut out = [0.0; 8];
            _mm512_storeu_pd(out.as_mut_ptr(), self.0);
            out
        }
    }

    /// Lanes 0-3 and 4-7.
    #[derive(Clone, Copy)]
    struct Ymm2(__m256d, __m256d);

    impl Ymm2 {
        #[inline(always)]
        unsafe fn of(v: __m256) -> Self {
            Ymm2(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))
        }
    }

    impl Lanes for Ymm2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Ymm2(_mm256_setzero_pd(), _mm256_setzero_pd())
        }
        #[inline(always)]
        unsafe fn widen(p: *const f32) -> Self {
            Ymm2::of(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn xhat(p: *const f32, mean: f32, invstd: f32) -> Self {
            Ymm2::of(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_set1_ps(mean)), _mm256_set1_ps(invstd)))
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Ymm2(_mm256_add_pd(self.0, o.0), _mm256_add_pd(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Ymm2(_mm256_mul_pd(self.0, o.0), _mm256_mul_pd(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn lanes(self) -> [f64; 8] {
            let mut out = [0.0; 8];
            _mm256_storeu_pd(out.as_mut_ptr(), self.0);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), self.1);
            out
        }
    }

    /// What `planes` reads: planes of `len` values in `a` and `b` from channel `c` on, and their terms.
    #[derive(Clone, Copy)]
    pub struct Planes<'a> {
        pub a: &'a [f32],
        pub b: &'a [f32],
        pub len: usize,
        pub terms: Terms<'a>,
        pub c: usize,
    }

    /// `image_plane_sums` of `side` (1 or SIDE) planes.
    ///
    /// # Safety
    /// The CPU has AVX2, and AVX-512 where `isa()` says so; p.a and p.b hold `side` planes of p.len
    /// values, out 2 * side sums.
    pub unsafe fn side_by_side(side: usize, p: Planes, out: &mut [f64]) {
        match (side, isa() == Isa::Avx512, matches!(p.terms, Terms::Moments)) {
            (1, true, true) => avx512::<1, false>(p, out),
            (1, true, false) => avx512::<1, true>(p, out),
            (_, true, true) => avx512::<SIDE, false>(p, out),
            (_, true, false) => avx512::<SIDE, true>(p, out),
            (1, false, true) => avx2::<1, false>(p, out),
            (1, false, false) => avx2::<1, true>(p, out),
            (_, false, true) => avx2::<SIDE, false>(p, out),
            (_, false, false) => avx2::<SIDE, true>(p, out),
        }
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    unsafe fn avx512<const P: usize, const XHAT: bool>(p: Planes, out: &mut [f64]) {
        planes::<Zmm, P, XHAT>(p, out)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2<const P: usize, const XHAT: bool>(p: Planes, out: &mut [f64]) {
        planes::<Ymm2, P, XHAT>(p, out)
    }

    /// P planes' sums, each in its eight lanes: value i into lane i % 8 in order (the last len % 8
    /// values one by one), then the lanes added in order, as `plane_sums` does.
    #[inline(always)]
    unsafe fn planes<L: Lanes, const P: usize, const XHAT: bool>(planes: Planes, out: &mut [f64]) {
        let Planes { a, b, len, terms, c } = planes;
        assert!(a.len() == P * len && b.len() == P * len && out.len() == 2 * P);
        let (mut mean, mut invstd) = ([0.0f32; P], [0.0f32; P]);
        if let Terms::DyXhat(saved) = terms {
            mean.copy_from_slice(&saved.mean[c..c + P]);
            invstd.copy_from_slice(&saved.invstd[c..c + P]);
        }
        let (mut first, mut second) = ([L::zero(); P], [L::zero(); P]);
        let main = len / 8 * 8;
        for i in (0..main).step_by(8) {
            for p in 0..P {
                let v = L::widen(a.as_ptr().add(p * len + i));
                first[p] = first[p].add(v);
                let other = if XHAT { L::xhat(b.as_ptr().add(p * len + i), mean[p], invstd[p]) } else { v };
                second[p] = second[p].add(v.mul(other));
            }
        }
        for p in 0..P {
            let (mut f, mut g) = (first[p].lanes(), second[p].lanes());
            let term = terms.second(c + p);
            for (k, i) in (main..len).enumerate() {
                let (va, vb) = (a[p * len + i], b[p * len + i]);
                f[k] += va as f64;
                g[k] += term(va, vb);
            }
            out[2 * p] = f.iter().sum();
            out[2 * p + 1] = g.iter().sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_plane_sums_are_plane_sums_bit_for_bit() {
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for (channels, len) in [(1, 5), (8, 784), (16, 196), (32, 25), (10, 25), (7, 49), (5, 8), (6, 1)] {
            let a: Vec<f32> = (0..channels * len).map(|i| next() * 10f32.powi(i as i32 % 9 - 4)).collect();
            let mut b: Vec<f32> = (0..channels * len).map(|_| next() * 3.0).collect();
            b[..len].fill(-0.0);
            let saved = BnSaved {
                mean: (0..channels).map(|_| next()).collect(),
                invstd: (0..channels).map(|_| next().abs() * 4.0 + 0.1).collect(),
                var: vec![1.0; channels],
            };
            for terms in [Terms::Moments, Terms::DyXhat(&saved)] {
                let (x, b) = match terms {
                    Terms::Moments => (&b, &b),
                    Terms::DyXhat(_) => (&a, &b),
                };
                let mut sums = vec![0.0; 2 * channels];
                image_plane_sums(x, b, len, terms, &mut sums);
                for c in 0..channels {
                    let (pa, pb) = (&x[c * len..][..len], &b[c * len..][..len]);
                    let (f, g) = plane_sums(pa, pb, |v, _| v as f64, terms.second(c));
                    let what = format!("{channels}x{len}, channel {c}");
                    assert_eq!(sums[2 * c].to_bits(), f.to_bits(), "{what}: first sum");
                    assert_eq!(sums[2 * c + 1].to_bits(), g.to_bits(), "{what}: second sum");
                }
            }
        }
    }
}
