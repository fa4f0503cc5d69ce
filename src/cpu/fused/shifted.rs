//! The fused executor's k x k convolutions (k > 1) without im2col. Over an image padded by `pad` with
//! rows `width` = w + 2 pad apart, output pixel (oy, ox) at oy * width + ox reads input pixel
//! oy * width + ox + ky * width + kx of each padded plane: so the k * k * cin rows of im2col are the
//! padded planes shifted by their tap, and the kernels (`fma.rs`) read them there through a table
//! of offsets instead of a copied matrix. The output comes on a grid `width` wide, whose last
//! width - wo columns are dropped. The input gradient is the full convolution of the output gradient
//! (padded by k - 1 - pad) with the weights flipped and transposed: the same product again.

use std::cell::RefCell;
use std::thread::LocalKey;

use super::fma::{self, copy_rows, Operand};
use crate::cpu::reference::conv::{ConvDims, ImageGrads};
use crate::cpu::scratch::with_scratch;

thread_local! {
    /// The padded inputs (forward pass and weight gradient), one per grid shape.
    static INPUTS: RefCell<Vec<Planes>> = const { RefCell::new(Vec::new()) };
    /// The output gradients on the output's grid (weight gradient), one per grid shape.
    static GRADIENTS: RefCell<Vec<Planes>> = const { RefCell::new(Vec::new()) };
    /// The padded output gradients (input gradient), one per grid shape.
    static PADDED_GRADIENTS: RefCell<Vec<Planes>> = const { RefCell::new(Vec::new()) };
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether the shifted form runs convolution `d`: a k x k one (k > 1) with pad < k.
pub fn runs(d: &ConvDims) -> bool {
    d.k > 1 && d.pad < d.k
}

/// Planes of h x w, `pad` rows above and columns left of them, in rows `width` apart; zeros around
/// them (the padding, the columns right of them, and one spare row, which the last taps of a grid
/// row's junk columns read). A plane's length is a whole number of AVX-512 vectors and `with_planes`
/// puts the first plane's first inside value on a cache line, so every plane's is: the weight
/// gradient's kernel (`fma::dots`) loads an output gradient's rows without splitting a load across
/// two lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grid {
    h: usize,
    w: usize,
    pad: usize,
    width: usize,
    plane: usize,
}

impl Grid {
    /// Padded by `pad` on every side: rows w + 2 pad wide.
    fn new(h: usize, w: usize, pad: usize) -> Grid {
        let width = w + 2 * pad;
        Grid { h, w, pad, width, plane: (width * (h + 2 * pad + 1)).next_multiple_of(16) }
    }

    /// On the output grid of a convolution over rows `width` wide: h rows of w, then zeros.
    fn output(h: usize, w: usize, width: usize) -> Grid {
        Grid { h, w, pad: 0, width, plane: (h * width).next_multiple_of(16) }
    }

    /// `x`'s planes into `out`'s insides (the zeros around them are the buffer's since `with_planes`
    /// made it).
    fn fill(&self, x: &[f32], out: &mut [f32]) {
        let (pad, width, w) = (self.pad, self.width, self.w);
        for (p, xp) in out.chunks_exact_mut(self.plane).zip(x.chunks_exact(self.h * w)) {
            match width == w {
                // Rows as wide as the grid's: one block.
                true => p[..xp.len()].copy_from_slice(xp),
                false => copy_rows(&mut p[pad * width + pad..], width, xp, w, self.h, w),
            }
        }
    }

    /// The offset of each tap (c, ky, kx) of a k x k convolution over `count` of these planes, in
    /// im2col's row order (none for k = 0).
    fn taps_for(&self, count: usize, k: usize) -> Vec<usize> {
        let mut taps = vec![0; count * k * k];
        if k == 0 {
            return taps;
        }
        for (c, channel) in taps.chunks_exact_mut(k * k).enumerate() {
            for (ky, row) in channel.chunks_exact_mut(k).enumerate() {
                for (kx, at) in row.iter_mut().enumerate() {
                    *at = c * self.plane + ky * self.width + kx;
                }
            }
        }
        taps
    }
}

/// A thread's planes of one grid shape: zeros where the grid has them from the start, since each
/// image writes only the insides (zeroing the padding for every image cost more than the copy), and
/// the offsets of a k x k convolution's taps over them.
struct Planes {
    grid: Grid,
    k: usize,
    values: Vec<f32>,
    taps: Vec<usize>,
}

/// The grid shapes a thread keeps (a network has a few; the oldest goes first).
const KEPT_GRIDS: usize = 32;

/// Values a kept buffer has beyond its planes, so that they can start where `with_planes` aligns them.
const SLACK: usize = 16;

/// Runs `f` on this thread's `count` planes of `grid` from `kept` (made, zeroed, the first time),
/// the first inside value on a 64-byte boundary, and their taps for a k x k convolution (none for
/// k = 0).
fn with_planes<R>(
    kept: &'static LocalKey<RefCell<Vec<Planes>>>,
    (grid, count, k): (Grid, usize, usize),
    f: impl FnOnce(&mut [f32], &[usize]) -> R,
) -> R {
    kept.with(|cell| {
        // In use further up this thread's stack (`with_scratch` says how): planes of its own.
        let Ok(mut kept) = cell.try_borrow_mut() else {
            return f(&mut vec![0.0; count * grid.plane], &grid.taps_for(count, k));
        };
        let len = count * grid.plane;
        let at = match kept.iter().position(|p| p.grid == grid && p.k == k && p.values.len() == len + SLACK) {
            Some(at) => at,
            None => {
                if kept.len() == KEPT_GRIDS {
                    kept.remove(0);
                }
                kept.push(Planes { grid, k, values: vec![0.0; len + SLACK], taps: grid.taps_for(count, k) });
                kept.len() - 1
            }
        };
        let Planes { values, taps, .. } = &mut kept[at];
        // At most SLACK (align_offset may give up, which costs speed only).
        let start = values.as_ptr().wrapping_add(grid.pad * (grid.width + 1)).align_offset(64).min(SLACK);
        f(&mut values[start..start + len], taps)
    })
}

/// From a grid of `rows` rows `width` wide per plane, the first `w` columns of each row into `out`.
fn compact(wide: &[f32], rows: usize, width: usize, w: usize, out: &mut [f32]) {
    for (o, g) in out.chunks_exact_mut(rows * w).zip(wide.chunks_exact(rows * width)) {
        copy_rows(o, w, g, width, rows, w);
    }
}

/// One image's forward convolution: y_img = weight x (the padded image's taps).
pub fn forward_image(d: &ConvDims, x_img: &[f32], weight: &[f32], y_img: &mut [f32]) {
    forward_planes(d, x_img, weight, |c, plane, width| {
        compact(plane, d.ho(), width, d.wo(), &mut y_img[c * d.ho() * d.wo()..][..d.ho() * d.wo()]);
    })
}

/// One image's forward convolution, each output plane c handed to `each` on the grid the product
/// writes: ho rows `width` apart, the first wo values of each the output's.
pub fn forward_planes(d: &ConvDims, x_img: &[f32], weight: &[f32], mut each: impl FnMut(usize, &mut [f32], usize)) {
    let g = Grid::new(d.h, d.w, d.pad);
    let (rows, cols) = (d.col_rows(), d.ho() * g.width);
    with_planes(&INPUTS, (g, d.cin, d.k), |padded, taps| {
        with_scratch(&WIDE, d.cout * cols, |wide| {
            g.fill(x_img, padded);
            let a = Operand { data: weight, row: rows, col: 1 };
            fma::product(d.cout, rows, cols, a, padded, taps, wide, cols, false);
            for (c, plane) in wide.chunks_exact_mut(cols).enumerate() {
                each(c, plane, g.width);
            }
        })
    })
}

/// One image's gradients: its weight gradient added into `dw` (beta 1) or written (beta 0), and its
/// input gradient when asked (from the weights as `flip` gives them).
pub fn backward_image(d: &ConvDims, g: ImageGrads, flipped: &[f32]) {
    let ImageGrads { x: x_img, dy: dy_img, dx: dx_img, dw, beta, .. } = g;
    let g = Grid::new(d.h, d.w, d.pad);
    let (rows, cols) = (d.col_rows(), d.ho() * g.width);
    let accumulate = beta == 1.0;
    let dy_grid = Grid::new(d.ho(), d.wo(), d.k - 1 - d.pad);
    with_planes(&INPUTS, (g, d.cin, d.k), |padded, taps| {
        g.fill(x_img, padded);
        // dw: each output gradient row (on the grid, zero in the dropped columns) dotted with each
        // tap. Where the input gradient's padded grid has the input's rows (k - 1 = 2 pad), the output
        // gradient padded for it is such a grid from its first inside value on: one copy serves both.
        match dx_img {
            Some(dx_img) if dy_grid.width == g.width => {
                with_planes(&PADDED_GRADIENTS, (dy_grid, d.cout, d.k), |padded_dy, dy_taps| {
                    dy_grid.fill(dy_img, padded_dy);
                    let dy_wide = &padded_dy[dy_grid.pad * (dy_grid.width + 1)..];
                    fma::dots(d.cout, cols, rows, dy_wide, dy_grid.plane, padded, taps, dw, rows, accumulate);
                    input_gradient_from(d, flipped, (dy_grid, padded_dy, dy_taps), dx_img);
                })
            }
            dx_img => {
                let on_grid = Grid::output(d.ho(), d.wo(), g.width);
                with_planes(&GRADIENTS, (on_grid, d.cout, 0), |dy_wide, _| {
                    on_grid.fill(dy_img, dy_wide);
                    fma::dots(d.cout, cols, rows, dy_wide, on_grid.plane, padded, taps, dw, rows, accumulate);
                });
                if let Some(dx_img) = dx_img {
                    input_gradient(d, flipped, dy_img, dx_img);
                }
            }
        }
    });
}

/// The weights as the input gradient reads them: flipped in both directions and transposed
/// (cin x cout x k x k), once per backward pass.
pub fn flip(d: &ConvDims, weight: &[f32], flipped: &mut [f32]) {
    let taps = d.k * d.k;
    for ci in 0..d.cin {
        for co in 0..d.cout {
            let from = &weight[(co * d.cin + ci) * taps..][..taps];
            let to = &mut flipped[(ci * d.cout + co) * taps..][..taps];
            to.iter_mut().zip(from.iter().rev()).for_each(|(t, f)| *t = *f);
        }
    }
}

/// dx = the output gradient, padded by k - 1 - pad, convolved with the weights flipped in both
/// directions and transposed (`flip`).
fn input_gradient(d: &ConvDims, flipped: &[f32], dy_img: &[f32], dx_img: &mut [f32]) {
    let g = Grid::new(d.ho(), d.wo(), d.k - 1 - d.pad);
    with_planes(&PADDED_GRADIENTS, (g, d.cout, d.k), |padded, taps| {
        g.fill(dy_img, padded);
        input_gradient_from(d, flipped, (g, padded, taps), dx_img);
    })
}

/// `input_gradient` from the output gradient already on its padded grid (with its taps).
fn input_gradient_from(d: &ConvDims, flipped: &[f32], (g, padded, taps): (Grid, &[f32], &[usize]), dx_img: &mut [f32]) {
    let (rows, cols) = (d.cout * d.k * d.k, d.h * g.width);
    with_scratch(&WIDE, d.cin * cols, |wide| {
        let a = Operand { data: flipped, row: rows, col: 1 };
        fma::product(d.cin, rows, cols, a, padded, taps, wide, cols, false);
        compact(wide, d.h, g.width, d.w, dx_img);
    })
}
