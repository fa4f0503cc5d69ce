//! The fused CPU executor (`FusedNet`, what the CPU backend trains with) against the plain reference
//! (`CpuNet`): the same logits, running statistics, gradients and evaluation logits, on every preset and
//! on networks that exercise each layer and fusion boundary; the same bits whatever the number of
//! threads; and its update (each batched linear layer's weights by the threads that own their rows)
//! bit for bit `Update::apply`'s. Errors are relative to each tensor's largest magnitude.
//!
//! Tolerances, from measured errors (2026-12-07, Xeon, AVX-512): the executors run the same products
//! and differ in the order of some sums. Forward: the fused executor's kernels add each output's
//! products in the order of the reference's GEMM (k by k, fused multiply-adds), and a batchnorm's
//! moments come from one pass of sums and sums of squares in f64 instead of two passes, which rounds
//! to the same f32 statistics here: forward values, running statistics and evaluation logits measured
//! 0 on every network below but those whose linear layers run batched, as dot products summed in
//! vector lanes: up to 5.4e-7 (fast-recipe at batch 64; the same with MNIST_WGPU_CPU_ISA=avx2); 1e-6.
//! Gradients: the weight
//! gradients are dot products summed in vector lanes, then in groups of images: measured up to 1.6e-6
//! (small5k at batch 64); 1e-5, half the golden tests' gradient tolerance against PyTorch.

mod common;

use common::rel_err;
use mnist_wgpu::cpu::reference::loss::softmax_cross_entropy;
use mnist_wgpu::cpu::reference::sgd::SgdStep;
use mnist_wgpu::cpu::{CpuNet, DropoutMode, Executor, FusedNet, Mode, Update};
use mnist_wgpu::model::{file, Model, Shape};
use mnist_wgpu::optim::{Optimizer, OptimizerKind, MOMENT_SLOTS};
use rand::{RngExt, SeedableRng};

const FORWARD_TOL: f32 = 1e-6;
const GRAD_TOL: f32 = 1e-5;

fn model(spec: &str) -> Model {
    file::for_mnist(Some(spec)).unwrap()
}

fn parsed(text: &str) -> Model {
    file::parse(text, "test network", Shape { c: 1, h: 28, w: 28 }, 10).unwrap()
}

/// The state after one training forward pass, the logits, the gradients, and then the evaluation
/// logits, of executor `E`.
fn run<E: Executor>(mut net: E, model: &Model, n: usize, dropout: DropoutMode) -> [Vec<f32>; 4] {
    let mut g = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(7);
    let mut state = model.init_state(3);
    let input: Vec<f32> = (0..n * model.input.len()).map(|_| g.random_range(-1.0..2.5)).collect();
    let labels: Vec<u8> = (0..n).map(|_| g.random_range(0..10)).collect();
    let logits = net.forward(&mut state, &input, n, Mode::Train(dropout)).to_vec();
    let mut dlogits = vec![0.0; logits.len()];
    softmax_cross_entropy(&logits, &labels, model.output_classes(), Some(&mut dlogits));
    let grads = net.backward(&state, &dlogits).to_vec();
    let eval = net.forward(&mut state, &input, n, Mode::Eval).to_vec();
    [state, logits, grads, eval]
}

fn check(what: &str, model: &Model, n: usize) {
    let dropout = DropoutMode::Hash { seed: 9, step: 4 };
    let want = run(CpuNet::new(model), model, n, dropout);
    let got = run(FusedNet::new(model), model, n, dropout);
    for (k, (name, tol)) in
        [("state", FORWARD_TOL), ("logits", FORWARD_TOL), ("gradients", GRAD_TOL), ("eval logits", FORWARD_TOL)]
            .iter()
            .enumerate()
    {
        assert!(got[k].iter().all(|v| v.is_finite()), "{what}: {name} not finite");
        let err = rel_err(&got[k], &want[k], 1e-6);
        eprintln!("{what:<28} n {n:>3} {name:<12} rel err {err:.2e} (tol {tol:.0e})");
        assert!(err <= *tol, "{what}, batch {n}: {name} differ by {err:e} relative to the largest, over {tol:e}");
    }
    // Per parameter tensor too, so that a small tensor's error is not hidden by a large one's scale;
    // except a gradient that is rounding noise (a bias feeding a batchnorm: zero in exact arithmetic),
    // which the whole vector's check above judges at the gradient's scale.
    let largest = want[2].iter().fold(0.0f32, |m, g| m.max(g.abs()));
    for p in model.params.iter().filter(|p| p.trainable) {
        let r = p.offset..p.offset + p.len;
        if want[2][r.clone()].iter().all(|g| g.abs() < 1e-4 * largest) {
            continue;
        }
        let err = rel_err(&got[2][r.clone()], &want[2][r], 1e-6);
        assert!(err <= GRAD_TOL, "{what}, batch {n}: gradient of {} differs by {err:e}", p.name);
    }
}

#[test]
fn the_fused_executor_matches_the_reference_on_every_preset() {
    for preset in ["net3", "small8k", "small5k", "best20k", "net3-avgpool2", "fast-recipe", "speed99", "mlp3"] {
        for n in [1, 7, 64] {
            check(preset, &model(preset), n);
        }
    }
}

#[test]
fn the_fused_executor_matches_the_reference_on_other_layers() {
    check("dropout epilogues", &parsed(include_str!("fixtures/dropout_epilogues.toml")), 9);
    check("bias and linear layers", &parsed(include_str!("fixtures/bias_linear.toml")), 9);
    check("unpadded 3x3 on 28x28", &parsed(UNPADDED), 5);
    let batchnorm_first = format!("[[layer]]\ntype = \"batchnorm\"\n{}", include_str!("fixtures/bias_linear.toml"));
    check("a batchnorm first", &parsed(&batchnorm_first), 6);
}

/// 3x3 convolutions without padding on planes large enough for the shifted form (its input gradient
/// pads by 2), one with a bias and a ReLU but no batchnorm, then a 1x1 convolution and global pooling.
const UNPADDED: &str = r#"
[[layer]]
type = "conv"
out = 6
kernel = 3
padding = 0
bias = true

[[layer]]
type = "relu"

[[layer]]
type = "conv"
out = 8
kernel = 3
padding = 0

[[layer]]
type = "batchnorm"

[[layer]]
type = "relu"

[[layer]]
type = "maxpool"

[[layer]]
type = "conv"
out = 10
kernel = 1
padding = 0

[[layer]]
type = "gap"
"#;

#[test]
fn the_fused_executor_gives_the_same_bits_on_any_number_of_threads() {
    // Net3's passes between batchnorms; a network whose linear layers (with a dropout) run batched.
    let networks =
        [("net3", model("net3")), ("dropout epilogues", parsed(include_str!("fixtures/dropout_epilogues.toml")))];
    for (what, model) in networks {
        let dropout = DropoutMode::Hash { seed: 2, step: 1 };
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run(FusedNet::new(&model), &model, 37, dropout))
        };
        let one = on(1);
        for threads in [2, 3] {
            let other = on(threads);
            for (k, name) in ["state", "logits", "gradients", "eval logits"].iter().enumerate() {
                let same = one[k].iter().zip(&other[k]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: {name} on {threads} threads differ from those on 1 thread");
            }
        }
    }
}

/// Three training steps of `FusedNet` with `update`: the state and moments after them. Between the
/// steps, the update applied as `Update::apply` applies it (`reference`), or as the fused executor
/// does, each batched linear layer's weight rows by the thread that owns them.
fn three_steps(model: &Model, update: Update, reference: bool) -> (Vec<f32>, Vec<f32>) {
    let mut g = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(5);
    let (mut net, mut state, n) = (FusedNet::new(model), model.init_state(4), 29);
    let mut moments = vec![0.0; MOMENT_SLOTS * model.num_trainable];
    for step in 0..3 {
        let input: Vec<f32> = (0..n * model.input.len()).map(|_| g.random_range(-1.0..2.5)).collect();
        let labels: Vec<u8> = (0..n).map(|_| g.random_range(0..10)).collect();
        let dropout = DropoutMode::Hash { seed: 3, step };
        if reference {
            let logits = net.forward(&mut state, &input, n, Mode::Train(dropout)).to_vec();
            let mut dlogits = vec![0.0; logits.len()];
            softmax_cross_entropy(&logits, &labels, model.output_classes(), Some(&mut dlogits));
            let grads = net.backward(&state, &dlogits).to_vec();
            let params = &mut state[..model.num_trainable];
            let (m, v) = update.split_moments(&mut moments, params.len());
            update.apply(params, &grads, m, v);
        } else {
            net.train_step(&mut state, &mut moments, &input, &labels, update, dropout);
        }
    }
    (state, moments)
}

#[test]
fn the_fused_update_is_the_reference_update_on_any_number_of_threads() {
    let sgd = Update::Sgd(SgdStep { lr: 0.05, momentum: 0.9, weight_decay: 1e-4 });
    let adam =
        Update::Adam(Optimizer { kind: OptimizerKind::AdamW, ..Optimizer::default() }.adam_scalars(1e-3, 0.01, 2));
    // Linear layers only; convolutions before linear layers (one with a dropout between them).
    let networks =
        [("mlp3", model("mlp3")), ("dropout epilogues", parsed(include_str!("fixtures/dropout_epilogues.toml")))];
    for (what, model) in &networks {
        for (name, update) in [("SGD", sgd), ("AdamW", adam)] {
            let want = three_steps(model, update, true);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let got = pool.install(|| three_steps(model, update, false));
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same(&got.0, &want.0), "{what}, {name}, {threads} threads: the state differs");
                assert!(same(&got.1, &want.1), "{what}, {name}, {threads} threads: the moments differ");
            }
        }
    }
}
