//! The fused executor's matrix product, for CPUs with FMA (AVX-512 or AVX2): c = a x b with b's rows
//! contiguous, both operands read where they lie. A convolution's products have this shape: the
//! weights (cout x K, or read transposed) times the im2col matrix or the output gradient, whose rows
//! are pixels in a row. A general GEMM (matrixmultiply) copies both operands into panels on every
//! call; here each output block of `MR` rows by `NR` columns keeps its sums in registers while the
//! loop over k broadcasts one weight per row and loads `NR` contiguous values of b's row k. Each
//! output sums its k products in order with fused multiply-adds, so the AVX-512 and AVX2 forms give
//! the same bits.
//!
//! The plain reference (`reference/conv.rs`, through `reference/gemm.rs`) keeps matrixmultiply;
//! `tests/fused.rs` holds the two together.

use std::cell::RefCell;

use crate::cpu::isa::{isa, Isa};
use crate::cpu::scratch::with_scratch;

thread_local! {
    /// The last columns of b and c when fewer than `NR` remain, zero-padded to a full block.
    static TAIL_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static TAIL_C: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An operand read element (i, k) at `data[i * row + k * col]`.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub row: usize,
    pub col: usize,
}

/// Where each row of b starts in its slice: rows `ldb` apart (`Every(ldb)`), or at a table of offsets
/// (a convolution's taps over a padded image: row (ci, ky, kx) is plane ci shifted by ky rows and kx
/// columns).
///
/// # Safety
/// `product` and `dots` check every row's start against b once, then read b at the starts the kernels
/// ask for again: an implementation must return the same offset for the same k on every call.
pub unsafe trait Starts: Copy {
    /// Row k's offset.
    ///
    /// # Safety
    /// k must be below the row count the caller checked.
    unsafe fn at(self, k: usize) -> usize;
}

/// Rows a fixed distance apart.
#[derive(Debug, Clone, Copy)]
pub struct Every(pub usize);

// SAFETY: a pure function of k.
unsafe impl Starts for Every {
    #[inline(always)]
    unsafe fn at(self, k: usize) -> usize {
        k * self.0
    }
}

// SAFETY: a shared slice does not change while it is borrowed.
unsafe impl Starts for &[usize] {
    #[inline(always)]
    unsafe fn at(self, k: usize) -> usize {
        *self.get_unchecked(k)
    }
}

/// The largest of the first k row offsets (each checked against the slice by the caller).
fn last_start(starts: impl Starts, k: usize) -> usize {
    // SAFETY: kk < k, the row count.
    (0..k).map(|kk| unsafe { starts.at(kk) }).max().unwrap_or(0)
}

/// Whether this CPU runs `product` (it has FMA); otherwise the caller uses the reference's GEMM.
pub fn available() -> bool {
    isa() != Isa::Baseline
}

/// c (m x n, rows `ldc` apart) = a (m x k) x b (k x n, rows at `starts`, columns contiguous), plus c
/// when `accumulate`. Panics if an operand is too short or the CPU lacks FMA (see `available`).
#[allow(clippy::too_many_arguments)]
pub fn product<S: Starts>(
    m: usize,
    k: usize,
    n: usize,
    a: Operand,
    b: &[f32],
    starts: S,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || (m - 1) * a.row + (k - 1) * a.col < a.data.len(), "product: a too short");
    assert!(k == 0 || last_start(starts, k) + n <= b.len(), "product: b too short");
    assert!((m - 1) * ldc + n <= c.len(), "product: c too short");
    assert!(available(), "product: this CPU has no FMA");
    let nr = nr();
    let full = n / nr * nr;
    for n0 in (0..full).step_by(nr) {
        // SAFETY: the checks above bound every index a block reads or writes.
        unsafe { rows(m, k, a, b[n0..].as_ptr(), starts, c[n0..].as_mut_ptr(), ldc, accumulate) };
    }
    if full < n {
        tail(m, k, a, &b[full..], starts, &mut c[full..], ldc, n - full, accumulate);
    }
}

/// The last `width` (< NR) columns: b's and c's copied into zero-padded blocks, the product run on
/// those, and c's columns copied back.
#[allow(clippy::too_many_arguments)]
fn tail<S: Starts>(
    m: usize,
    k: usize,
    a: Operand,
    b: &[f32],
    starts: S,
    c: &mut [f32],
    ldc: usize,
    width: usize,
    accumulate: bool,
) {
    let nr = nr();
    with_scratch(&TAIL_B, k * nr, |tb| {
        with_scratch(&TAIL_C, m * nr, |tc| {
            for kk in 0..k {
                // SAFETY: kk < k; the caller checked every start against b.
                copy_row(&mut tb[kk * nr..][..width], &b[unsafe { starts.at(kk) }..][..width]);
                tb[kk * nr + width..(kk + 1) * nr].iter_mut().for_each(|v| *v = 0.0);
            }
            for i in 0..m {
                if accumulate {
                    copy_row(&mut tc[i * nr..][..width], &c[i * ldc..][..width]);
                }
            }
            // SAFETY: tb holds k rows of nr, tc m rows of nr; a was checked by the caller.
            unsafe { rows(m, k, a, tb.as_ptr(), Every(nr), tc.as_mut_ptr(), nr, accumulate) };
            for i in 0..m {
                copy_row(&mut c[i * ldc..][..width], &tc[i * nr..][..width]);
            }
        })
    })
}

/// dst = src for a short row (an image row: a call to memcpy for each costs more than the copy):
/// eight values at a time in registers.
#[inline(always)]
pub(super) fn copy_row(dst: &mut [f32], src: &[f32]) {
    let mut to = dst.chunks_exact_mut(8);
    let mut from = src.chunks_exact(8);
    for (t, f) in (&mut to).zip(&mut from) {
        let f: &[f32; 8] = f.try_into().expect("a chunk of 8");
        <&mut [f32; 8]>::try_from(t).expect("a chunk of 8").clone_from(f);
    }
    for (t, f) in to.into_remainder().iter_mut().zip(from.remainder()) {
        *t = *f;
    }
}

/// `rows` rows of `w` values from `src` (rows `src_ld` apart) into `dst` (rows `dst_ld` apart): on
/// AVX-512 a row of up to 32 values is one or two masked moves, else `copy_row` each.
pub(super) fn copy_rows(dst: &mut [f32], dst_ld: usize, src: &[f32], src_ld: usize, rows: usize, w: usize) {
    if rows == 0 || w == 0 {
        return;
    }
    assert!(dst.len() >= (rows - 1) * dst_ld + w && src.len() >= (rows - 1) * src_ld + w, "copy_rows: short slices");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 && w <= 32 {
        // SAFETY: the CPU has AVX-512 F; every row read and written lies in the slices (checked above).
        return unsafe { copy_rows_avx512(dst.as_mut_ptr(), dst_ld, src.as_ptr(), src_ld, rows, w) };
    }
    for r in 0..rows {
        copy_row(&mut dst[r * dst_ld..][..w], &src[r * src_ld..][..w]);
    }
}

/// For a row of w <= 32 values: the AVX-512 masks of its first 16 and of the rest.
#[cfg(target_arch = "x86_64")]
pub(super) fn row_masks(w: usize) -> (u16, u16) {
    let low = if w >= 16 { 0xffff } else { (1u16 << w) - 1 };
    let high = if w > 16 { ((1u32 << (w - 16)) - 1) as u16 } else { 0 };
    (low, high)
}

/// `copy_rows` for w <= 32.
///
/// # Safety
/// The CPU has AVX-512 F; dst and src hold `rows` rows of w values `dst_ld` and `src_ld` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_rows_avx512(dst: *mut f32, dst_ld: usize, src: *const f32, src_ld: usize, rows: usize, w: usize) {
    use std::arch::x86_64::*;
    let (low, high) = row_masks(w);
    for r in 0..rows {
        let (from, to) = (src.add(r * src_ld), dst.add(r * dst_ld));
        _mm512_mask_storeu_ps(to, low, _mm512_maskz_loadu_ps(low, from));
        if high != 0 {
            _mm512_mask_storeu_ps(to.add(16), high, _mm512_maskz_loadu_ps(high, from.add(16)));
        }
    }
}

/// Columns per block: two vectors.
pub(super) fn nr() -> usize {
    match isa() {
        Isa::Avx512 => 32,
        _ => 16,
    }
}

/// Every row block of one column block (NR columns at b and c).
///
/// # Safety
/// b must hold k rows of NR values at `starts`, c m rows of NR values `ldc` apart, and a every (i, k)
/// with i < m; the CPU must have the features of the form `isa()` picks.
#[allow(clippy::too_many_arguments)]
unsafe fn rows<S: Starts>(
    m: usize,
    k: usize,
    a: Operand,
    b: *const f32,
    starts: S,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let a_at = |i: usize| a.data.as_ptr().add(i * a.row);
        let mut i = 0;
        macro_rules! blocks {
            ($kernel:ident, $mr:literal) => {{
                while i + $mr <= m {
                    $kernel::<$mr, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate);
                    i += $mr;
                }
                match m - i {
                    0 => {}
                    1 => $kernel::<1, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    2 => $kernel::<2, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    3 => $kernel::<3, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    4 => $kernel::<4, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    5 => $kernel::<5, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    6 => $kernel::<6, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    7 => $kernel::<7, S>(k, a_at(i), a.row, a.col, b, starts, c.add(i * ldc), ldc, accumulate),
                    r => unreachable!("{r} rows left of a block"),
                }
            }};
        }
        match isa() {
            Isa::Avx512 => blocks!(block_avx512, 8),
            Isa::Avx2 => blocks!(block_avx2, 6),
            Isa::Baseline => unreachable!("checked by product"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, k, a, b, starts, c, ldc, accumulate);
        unreachable!("checked by product");
    }
}

/// Defines one block kernel per instruction set: MR rows by two vectors of columns, each output's k
/// products summed in order with fused multiply-adds in a register.
macro_rules! block_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:literal, $zero:ident, $load:ident, $splat:ident, $fma:ident,
     $add:ident, $store:ident) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As `rows`, for MR rows; the CPU has the features named.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const MR: usize, S: Starts>(
            k: usize,
            a: *const f32,
            rsa: usize,
            csa: usize,
            b: *const f32,
            starts: S,
            c: *mut f32,
            ldc: usize,
            accumulate: bool,
        ) {
            use std::arch::x86_64::*;
            let mut acc = [[$zero(); 2]; MR];
            for kk in 0..k {
                let row = b.add(starts.at(kk));
                let (b0, b1) = ($load(row), $load(row.add($lanes)));
                for (i, sums) in acc.iter_mut().enumerate() {
                    let w = $splat(*a.add(i * rsa + kk * csa));
                    sums[0] = $fma(w, b0, sums[0]);
                    sums[1] = $fma(w, b1, sums[1]);
                }
            }
            for (i, sums) in acc.iter().enumerate() {
                let out = c.add(i * ldc);
                for (j, &s) in sums.iter().enumerate() {
                    let s = if accumulate { $add($load(out.add($lanes * j)), s) } else { s };
                    $store(out.add($lanes * j), s);
                }
            }
        }
    };
}

block_kernel!(
    /// One block of MR rows by 32 columns, AVX-512.
    block_avx512, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
    _mm512_storeu_ps
);
block_kernel!(
    /// One block of MR rows by 16 columns, AVX2 with FMA.
    block_avx2, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
    _mm256_storeu_ps
);

/// c (m x n, rows `ldc` apart) = a x b^T, plus c when `accumulate`: a holds m rows of k contiguous
/// values `lda` apart and b n rows of k at `starts`, so each output is the dot product of two rows. A
/// convolution's weight gradient has this shape: output gradient rows times im2col rows, both along
/// the pixels. Each dot product sums in vector lanes along k (the last partial vector through a
/// masked load), then adds the lanes in a fixed order: the same bits on every run, different ones on
/// AVX2 (8 lanes) and AVX-512 (16). Panics if an operand is too short or the CPU lacks FMA.
#[allow(clippy::too_many_arguments)]
pub fn dots<S: Starts>(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    starts: S,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * lda + k <= a.len() && last_start(starts, n) + k <= b.len(), "dots: operand too short");
    assert!((m - 1) * ldc + n <= c.len(), "dots: c too short");
    assert!(available(), "dots: this CPU has no FMA");
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY (both): the CPU has the kernel's features; `dot_blocks` hands it rows of k values.
        Isa::Avx512 => {
            let kernel =
                |k, a, b, out: &mut _| unsafe { dots_avx512::<{ DOTS_AVX512.0 }, { DOTS_AVX512.1 }>(k, a, b, out) };
            return dot_blocks((m, k, n), (a, lda), (b, starts), (c, ldc, accumulate), kernel);
        }
        Isa::Avx2 => {
            let kernel = |k, a, b, out: &mut _| unsafe { dots_avx2::<{ DOTS_AVX2.0 }, { DOTS_AVX2.1 }>(k, a, b, out) };
            return dot_blocks((m, k, n), (a, lda), (b, starts), (c, ldc, accumulate), kernel);
        }
        Isa::Baseline => {}
    }
    let _ = (k, a, lda, b, starts, c, ldc, accumulate);
    unreachable!("checked above");
}

/// `dots`'s blocks: 8 rows of a by 3 of b on AVX-512 (24 sums of its 32 registers), 4 by 3 on AVX2
/// (12 of 16, with the 3 rows of b and one of a: a 4 x 4 block's 16 sums left no register for the
/// operands, and mlp3's evaluation took 1.7x as long there). Each vector loaded serves a whole row
/// or column of the block.
#[cfg(target_arch = "x86_64")]
const DOTS_AVX512: (usize, usize) = (8, 3);
#[cfg(target_arch = "x86_64")]
const DOTS_AVX2: (usize, usize) = (4, 3);

/// `dots` block by block: MR rows of a by NR rows of b, each block's sums from `kernel`. A partial
/// block repeats its last row of a (or of b); those sums are not stored.
#[cfg(target_arch = "x86_64")]
fn dot_blocks<const MR: usize, const NR: usize, S: Starts>(
    (m, k, n): (usize, usize, usize),
    (a, lda): (&[f32], usize),
    (b, starts): (&[f32], S),
    (c, ldc, accumulate): (&mut [f32], usize, bool),
    kernel: impl Fn(usize, [*const f32; MR], [*const f32; NR], &mut [[f32; NR]; MR]),
) {
    let mut out = [[0.0f32; NR]; MR];
    for i in (0..m).step_by(MR) {
        let rows = MR.min(m - i);
        let a_rows: [*const f32; MR] = std::array::from_fn(|r| a[(i + r.min(rows - 1)) * lda..].as_ptr());
        for j in (0..n).step_by(NR) {
            let cols = NR.min(n - j);
            // SAFETY: j + s < n, the row count `dots` checked.
            let b_rows: [*const f32; NR] =
                std::array::from_fn(|s| b[unsafe { starts.at(j + s.min(cols - 1)) }..].as_ptr());
            kernel(k, a_rows, b_rows, &mut out);
            let c = &mut c[i * ldc + j..][..(rows - 1) * ldc + cols];
            match (accumulate, rows == MR && cols == NR) {
                // A whole block: each row's NR sums at once.
                (true, true) => {
                    for (r, sums) in out.iter().enumerate() {
                        let row: &mut [f32; NR] = (&mut c[r * ldc..][..NR]).try_into().expect("NR values");
                        row.iter_mut().zip(sums).for_each(|(v, s)| *v += s);
                    }
                }
                (false, true) => {
                    for (r, sums) in out.iter().enumerate() {
                        c[r * ldc..][..NR].copy_from_slice(sums);
                    }
                }
                _ => {
                    for (r, sums) in out.iter().enumerate().take(rows) {
                        for (v, &s) in c[r * ldc..][..cols].iter_mut().zip(sums) {
                            *v = if accumulate { *v + s } else { s };
                        }
                    }
                }
            }
        }
    }
}

/// Defines one dot-block kernel per instruction set: MR x NR sums of `$lanes` lanes along k (a's row
/// i with b's row j), the last partial vector through a masked load, then each sum's lanes added in a
/// fixed order (`$block_sum`).
macro_rules! dots_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:literal, $vec:ty, $zero:ident, $fma:ident,
     $all:expr, $mask_of:expr, $masked_load:expr, $block_sum:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Each pointer leads k values; the CPU has the features named.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const MR: usize, const NR: usize>(
            k: usize,
            a: [*const f32; MR],
            b: [*const f32; NR],
            out: &mut [[f32; NR]; MR],
        ) {
            use std::arch::x86_64::*;
            let mut acc = [[$zero(); NR]; MR];
            let step = |p: usize, mask, acc: &mut [[$vec; NR]; MR]| {
                let load = |r: *const f32| $masked_load(r.add(p), mask);
                let bv: [$vec; NR] = std::array::from_fn(|j| load(b[j]));
                for (i, sums) in acc.iter_mut().enumerate() {
                    let av = load(a[i]);
                    for (s, &bj) in sums.iter_mut().zip(&bv) {
                        *s = $fma(av, bj, *s);
                    }
                }
            };
            let full = k / $lanes * $lanes;
            for p in (0..full).step_by($lanes) {
                step(p, $all, &mut acc);
            }
            if full < k {
                step(full, $mask_of(k - full), &mut acc);
            }
            $block_sum(acc.as_flattened(), out.as_flattened_mut());
        }
    };
}

dots_kernel!(
    /// `dots`'s block on AVX-512: 16 lanes, each sum's added in `_mm512_reduce_add_ps`'s order, 16
    /// sums at once (`lane_sums_avx512`).
    dots_avx512, "avx512f,fma", 16, __m512, _mm512_setzero_ps, _mm512_fmadd_ps,
    !0u16,
    |left: usize| (1u16 << left) - 1,
    |p: *const f32, mask: __mmask16| _mm512_maskz_loadu_ps(mask, p),
    |acc: &[__m512], out: &mut [f32]| {
        for (vectors, sums) in acc.chunks(16).zip(out.chunks_mut(16)) {
            // Zero vectors fill the last group: each sum adds one vector's own lanes only.
            let v: [__m512; 16] = std::array::from_fn(|t| vectors.get(t).copied().unwrap_or(_mm512_setzero_ps()));
            let all = lane_sums_avx512(&v);
            sums.iter_mut().enumerate().for_each(|(t, s)| *s = all[t]);
        }
    }
);

/// The lanes of each of 16 vectors added as `_mm512_reduce_add_ps` adds them (lane i with i + 8, then
/// with i + 4, i + 2 and i + 1), the 16 at once: each step adds the halves of two vectors side by side
/// in one, so four steps leave the 16 sums in one vector. Sum t is vector t's.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lane_sums_avx512(v: &[std::arch::x86_64::__m512; 16]) -> [f32; 16] {
    use std::arch::x86_64::*;
    // Lane i with i + 8: the 256-bit halves of each pair of vectors.
    let w: [__m512; 8] = std::array::from_fn(|p| {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee))
    });
    // With i + 4: the 128-bit quarters.
    let z: [__m512; 4] = std::array::from_fn(|p| {
        let (a, b) = (w[2 * p], w[2 * p + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd))
    });
    // With i + 2, then i + 1, inside each 128-bit quarter.
    let s: [__m512; 2] = std::array::from_fn(|p| {
        let (a, b) = (z[2 * p], z[2 * p + 1]);
        _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xee))
    });
    let r = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xdd));
    // The steps leave vector t's sum at lane 4 (t % 4) + t / 4.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut sums = [0.0f32; 16];
    _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_permutexvar_ps(order, r));
    sums
}
dots_kernel!(
    /// `dots`'s block on AVX2: 8 lanes, added as halves, then pairs, then the last two.
    dots_avx2, "avx2,fma", 8, __m256, _mm256_setzero_ps, _mm256_fmadd_ps,
    _mm256_set1_epi32(-1),
    |left: usize| _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
    |p: *const f32, mask: __m256i| _mm256_maskload_ps(p, mask),
    |acc: &[__m256], out: &mut [f32]| {
        for (&s, v) in acc.iter().zip(out.iter_mut()) {
            let half = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
            *v = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether to run: on a CPU without FMA (which the kernels never run on) only when told to skip
    /// with MNIST_WGPU_CPU_ISA=baseline.
    fn skip_without_fma() -> bool {
        if available() {
            return true;
        }
        let told = std::env::var(crate::cpu::isa::ISA_VAR).is_ok_and(|v| v == "baseline");
        assert!(told, "this CPU has no AVX2 and FMA: set MNIST_WGPU_CPU_ISA=baseline to skip the kernels' tests");
        eprintln!("skipped: MNIST_WGPU_CPU_ISA=baseline");
        false
    }

    /// A fixed pseudo-random operand in [-1, 1).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Largest |got - want| over the largest |want|: sums of up to 100 products of values below 1 in
    /// f32 against f64 stay within a few units in the last place, far below 1e-5.
    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs())) / scale;
        assert!(err < 1e-5, "{what}: error {err:e}");
    }

    #[test]
    fn the_product_matches_a_plain_sum_at_every_shape_and_row_layout() {
        if !skip_without_fma() {
            return;
        }
        for (m, k, n) in [(1, 1, 1), (5, 9, 15), (8, 9, 16), (13, 33, 31), (7, 40, 32), (9, 3, 100), (16, 17, 70)] {
            let a = values(m * k, 1);
            // b's rows at a table of offsets 3 apart beyond the row, as a padded image's taps are.
            let starts: Vec<usize> = (0..k).map(|kk| kk * (n + 3) + kk % 2).collect();
            let b = values(k * (n + 3) + 2, 2);
            let c0 = values(m * (n + 1), 3);
            for accumulate in [false, true] {
                let mut want = vec![0.0f64; m * (n + 1)];
                for i in 0..m {
                    for j in 0..n {
                        let sum: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * b[starts[kk] + j] as f64).sum();
                        want[i * (n + 1) + j] = sum + if accumulate { c0[i * (n + 1) + j] as f64 } else { 0.0 };
                    }
                }
                let mut c = c0.clone();
                product(m, k, n, Operand { data: &a, row: k, col: 1 }, &b, &starts[..], &mut c, n + 1, accumulate);
                let got: Vec<f32> = (0..m).flat_map(|i| c[i * (n + 1)..][..n].to_vec()).collect();
                let want: Vec<f64> = (0..m).flat_map(|i| want[i * (n + 1)..][..n].to_vec()).collect();
                close(&got, &want, &format!("product {m}x{k}x{n}, accumulate {accumulate}"));
                // The column past n is left alone.
                assert!((0..m).all(|i| c[i * (n + 1) + n] == c0[i * (n + 1) + n]), "product wrote past n");
            }
        }
    }

    /// The 16 sums at once give `_mm512_reduce_add_ps`'s bits for each vector (values of mixed signs
    /// and magnitudes, where another order of additions rounds differently).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_lane_sums_add_in_the_order_of_reduce_add() {
        use std::arch::x86_64::*;
        if isa() != Isa::Avx512 {
            let told = std::env::var(crate::cpu::isa::ISA_VAR).is_ok_and(|v| v == "avx2" || v == "baseline");
            assert!(told, "this CPU has no AVX-512: set MNIST_WGPU_CPU_ISA=avx2 to skip the AVX-512 lane sums' test");
            eprintln!("skipped: MNIST_WGPU_CPU_ISA narrows the instruction set below AVX-512");
            return;
        }
        for seed in 0..200 {
            let data = values(256, seed);
            let scaled: Vec<f32> = data.iter().enumerate().map(|(i, v)| v * [1.0, 1e4, 1e-3, 3e7][i % 4]).collect();
            // SAFETY: the CPU has AVX-512 (checked above); each load reads 16 of the 256 values.
            unsafe {
                let acc: [__m512; 16] = std::array::from_fn(|t| _mm512_loadu_ps(scaled[t * 16..].as_ptr()));
                let sums = lane_sums_avx512(&acc);
                for (t, &v) in acc.iter().enumerate() {
                    assert_eq!(sums[t].to_bits(), _mm512_reduce_add_ps(v).to_bits(), "seed {seed}, sum {t}");
                }
            }
        }
    }

    #[test]
    fn the_dot_products_match_a_plain_sum_at_every_shape() {
        if !skip_without_fma() {
            return;
        }
        // Whole and partial blocks of 8 x 3 (AVX-512) and 4 x 3 (AVX2) in both directions.
        let shapes = [(1, 1, 1), (3, 7, 4), (4, 16, 4), (7, 17, 6), (5, 40, 9), (8, 100, 3), (17, 33, 10), (16, 48, 6)];
        for ((m, k, n), accumulate) in shapes.into_iter().flat_map(|s| [(s, true), (s, false)]) {
            let (a, b) = (values(m * k, 4), values(n * k + 5, 5));
            let starts: Vec<usize> = (0..n).map(|j| j * k + j % 3).collect();
            let mut c = values(m * n, 6);
            let c0 = c.clone();
            dots(m, k, n, &a, k, &b, &starts[..], &mut c, n, accumulate);
            let want: Vec<f64> = (0..m * n)
                .map(|at| {
                    let (i, j) = (at / n, at % n);
                    let sum = (0..k).map(|p| a[i * k + p] as f64 * b[starts[j] + p] as f64).sum::<f64>();
                    sum + if accumulate { c0[at] as f64 } else { 0.0 }
                })
                .collect();
            close(&c, &want, &format!("dots {m}x{k}x{n}, accumulate {accumulate}"));
        }
    }
}
