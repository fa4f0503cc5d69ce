//! The CPU executors' roofline: what each op of a training step must do at the least (FLOPs, and
//! bytes if every input were read once and every output written once, as the GPU's launches count
//! them), how a step's ops are timed (`record`), and the machine's own peak to hold the measured rates
//! against: a large matrix product with the reference's `sgemm`, on every core; above it, the most
//! fused multiply-adds the cores do at all (`fma_ceiling_gflops`).

use rayon::prelude::*;

use super::reference::gemm::{gemm, Layout};
use crate::model::{Layer, Model};

/// One op of a profiled training step: its label (`conv.forward conv2`), what it must do, and its
/// wall time.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub label: String,
    pub flops: f64,
    pub bytes: f64,
    pub ns: f64,
}

/// Records an op's time when profiling (`timing` is Some): its label, its cost (FLOPs, bytes) and the
/// time since `started`.
pub(crate) fn record(
    timing: &mut Option<Vec<OpTime>>,
    label: &str,
    cost: (f64, f64),
    started: Option<web_time::Instant>,
) {
    if let (Some(t), Some(started)) = (timing, started) {
        let ns = started.elapsed().as_secs_f64() * 1e9;
        t.push(OpTime { label: label.into(), flops: cost.0, bytes: cost.1, ns });
    }
}

/// The label of layer `i`'s forward or backward op, in the GPU profile's style.
pub fn label(model: &Model, i: usize, backward: bool) -> String {
    let kind = match (&model.layers[i], backward) {
        (Layer::Conv { .. } | Layer::Linear { .. }, false) => "conv.forward",
        (Layer::Conv { .. } | Layer::Linear { .. }, true) => "conv.backward",
        (Layer::BatchNorm { .. }, false) => "batchnorm.forward",
        (Layer::BatchNorm { .. }, true) => "batchnorm.backward",
        (Layer::Relu, false) => "relu.forward",
        (Layer::Relu, true) => "relu.backward",
        (Layer::Dropout { .. }, _) => "dropout.apply",
        (Layer::MaxPool2, false) => "pool.maxpool_forward",
        (Layer::MaxPool2, true) => "pool.maxpool_backward",
        (Layer::AvgPool2, false) => "pool.avgpool2_forward",
        (Layer::AvgPool2, true) => "pool.avgpool2_backward",
        (Layer::GlobalAvgPool, false) => "pool.gap_forward",
        (Layer::GlobalAvgPool, true) => "pool.gap_backward",
    };
    format!("{kind} {}", model.layer_name(i))
}

/// FLOPs and minimum bytes of layer `i`'s training-mode forward (or backward) over a batch of `n`.
pub fn cost(model: &Model, i: usize, n: usize, backward: bool) -> (f64, f64) {
    let (input, output) = (n * model.input_of(i).len(), n * model.shapes[i].len());
    let (flops, floats) = match (&model.layers[i], model.conv(i, n)) {
        (_, Some((d, _))) => {
            let product = 2 * d.n * d.ho() * d.wo() * d.weight_len();
            let weights = d.weight_len();
            match (backward, i > 0) {
                (false, _) => (product, input + weights + output),
                // The weight gradient, and dx but for the first layer.
                (true, true) => (2 * product, 2 * input + 2 * weights + output),
                (true, false) => (product, input + weights + output),
            }
        }
        // Forward: the mean, the variance and the normalization; backward: two sums, then dx.
        (Layer::BatchNorm { .. }, _) if !backward => (8 * input, 2 * input + output),
        (Layer::BatchNorm { .. }, _) => (10 * input, 3 * input + output),
        (Layer::Relu | Layer::Dropout { .. }, _) => (input, 2 * input),
        (Layer::MaxPool2 | Layer::AvgPool2, _) => (3 * output, input + output),
        (Layer::GlobalAvgPool, _) => (input, input + output),
        (layer, None) => unreachable!("{layer:?} without its convolution"),
    };
    (flops as f64, 4.0 * floats as f64)
}

/// FLOPs and minimum bytes of the loss over `n` images of `classes` logits (softmax, log, gradient),
/// and of the SGD update of `params` parameters (read parameter, gradient and momentum; write two).
pub fn loss_cost(n: usize, classes: usize) -> (f64, f64) {
    ((5 * n * classes) as f64, 4.0 * (2 * n * classes + n) as f64)
}

pub fn sgd_cost(params: usize) -> (f64, f64) {
    ((5 * params) as f64, 4.0 * (5 * params) as f64)
}

/// The machine's peak as this program can reach it: the best of `repeats` products of two `size` x
/// `size` matrices, the columns of the result split over rayon's threads, in GFLOP/s; and a line
/// saying what was measured.
pub fn peak_gflops(size: usize, repeats: usize) -> (f64, String) {
    let threads = rayon::current_num_threads();
    let a: Vec<f32> = (0..size * size).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..size * size).map(|i| (i % 5) as f32 * 0.1).collect();
    // Each thread multiplies a by its own block of columns of b (b transposed, so a block is rows).
    let block = size.div_ceil(threads);
    let mut c = vec![0.0f32; size * size];
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let started = web_time::Instant::now();
        c.par_chunks_mut(block * size).zip(b.par_chunks(block * size)).for_each(|(c, b)| {
            let cols = b.len() / size;
            gemm(cols, size, size, b, Layout::Normal, &a, Layout::Transposed, 0.0, c);
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (size * size * size) as f64 / best / 1e9;
    (gflops, format!("sgemm {size}x{size}x{size} on {threads} threads, best of {repeats}"))
}

/// The ceiling over any product's rate: every thread at once running independent chains of fused
/// multiply-adds in registers of the widest instruction set `isa()` allows, reading and writing
/// nothing, in GFLOP/s (the best of three), with a line saying what ran; None on a CPU without FMA.
/// The chains outnumber an FMA's latency times the ports that run it (4 cycles x 2 on current x86
/// cores) and fit the registers with the two operands: 16 of AVX-512's 32, 12 of AVX2's 16.
pub fn fma_ceiling_gflops() -> Option<(f64, String)> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::isa::{isa, Isa};
        const ROUNDS: usize = 1 << 21;
        // SAFETY (both): isa() picks a form only when the CPU reports its features.
        let (chains, lanes, run): (usize, usize, fn(usize) -> f32) = match isa() {
            Isa::Avx512 => (16, 16, |rounds| unsafe { fma_chains_avx512(rounds) }),
            Isa::Avx2 => (12, 8, |rounds| unsafe { fma_chains_avx2(rounds) }),
            Isa::Baseline => return None,
        };
        let threads = rayon::current_num_threads();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let started = web_time::Instant::now();
            std::hint::black_box(rayon::broadcast(|_| run(ROUNDS)));
            best = best.min(started.elapsed().as_secs_f64());
        }
        let flops = (2 * threads * ROUNDS * chains * lanes) as f64;
        let what = format!("{chains} chains of {} FMAs in registers on {threads} threads", isa().name());
        Some((flops / best / 1e9, what))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Defines `fma_ceiling_gflops`'s loop for one instruction set: `rounds` times, each chain's value
/// times x plus y; returns the chains' sum, so that nothing is left out.
macro_rules! fma_chains {
    ($name:ident, $features:literal, $chains:literal, $set1:ident, $fma:ident, $store:ident, $lanes:literal) => {
        /// # Safety
        /// The CPU has the features named.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(rounds: usize) -> f32 {
            use std::arch::x86_64::*;
            let (x, y) = ($set1(0.999_999), $set1(1e-7));
            let mut chains = [$set1(1.0); $chains];
            for _ in 0..rounds {
                for c in chains.iter_mut() {
                    *c = $fma(*c, x, y);
                }
            }
            let mut lanes = [0.0f32; $lanes];
            chains
                .iter()
                .map(|&c| {
                    $store(lanes.as_mut_ptr(), c);
                    lanes.iter().sum::<f32>()
                })
                .sum()
        }
    };
}

fma_chains!(fma_chains_avx512, "avx512f", 16, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, 16);
fma_chains!(fma_chains_avx2, "avx2,fma", 12, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net3_step_costs_add_up_to_its_flops() {
        let m = Model::net3();
        let n = 100;
        let forward: f64 = (0..m.layers.len()).map(|i| cost(&m, i, n, false).0).sum();
        let backward: f64 = (0..m.layers.len()).map(|i| cost(&m, i, n, true).0).sum();
        // The convolutions dominate: about 5.1 MFLOP per image forward, and twice that backward but
        // for conv1's dx (its input needs no gradient).
        let per_image = (forward + backward) / n as f64;
        assert!((14e6..16e6).contains(&per_image), "{per_image}");
        assert_eq!(label(&m, 0, true), "conv.backward conv1");
        assert_eq!(label(&m, 21, false), "pool.gap_forward gap#21");
        let (peak, what) = peak_gflops(64, 2);
        assert!(peak > 0.0 && what.contains("sgemm 64x64x64"), "{what}");
        // Without FMA (or told to use none) there is no ceiling to measure.
        let ceiling = fma_ceiling_gflops();
        assert_eq!(ceiling.is_some(), crate::cpu::isa::isa() != crate::cpu::isa::Isa::Baseline);
        assert!(ceiling.is_none_or(|(g, what)| g > 0.0 && what.contains("FMAs in registers")));
    }
}
