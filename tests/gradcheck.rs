//! Finite-difference checks of every backward op of the CPU reference, on small random shapes.
//!
//! Each op's output y is reduced to a scalar L = sum_i r_i * y_i with fixed random r (summed in f64);
//! the analytic gradient of L is compared with central differences (L(x + h) - L(x - h)) / 2h at
//! sampled coordinates. The ops compute in f32, so the differences carry rounding error of about
//! eps_f32 * |L| / h; with h = 1e-2 and |L| ~ 10 that is ~1e-4, against gradients of order 0.1 to 1.
//! Linear ops (convolution, pooling, dropout) have no truncation error; for the smooth ones
//! (batchnorm, softmax cross-entropy) it is O(h^2) ~ 1e-4. Tolerance: 5e-4 of the largest gradient
//! magnitude (the worst seen is 3.8e-5), far below the O(1) error of any missing term or wrong index.
//! ReLU and max pooling are checked on inputs kept at least 0.05 away from their kinks and ties.

use mnist_wgpu::cpu::reference::batchnorm::*;
use mnist_wgpu::cpu::reference::conv::*;
use mnist_wgpu::cpu::reference::dropout::*;
use mnist_wgpu::cpu::reference::loss::softmax_cross_entropy;
use mnist_wgpu::cpu::reference::pool::*;
use mnist_wgpu::cpu::reference::relu::*;
use mnist_wgpu::cpu::{CpuNet, DropoutMode, Executor, Mode};
use mnist_wgpu::model::Model;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

const H: f32 = 1e-2;
const TOL: f64 = 5e-4;
const SAMPLES: usize = 40;
// The whole network (with dropout on) is a wiring check: a wrong connection gives O(1) errors, and the
// per-op checks above and the PyTorch golden test are the precise ones. Its loss is only piecewise
// smooth: thousands of ReLU and max-pool decisions, some of which flip inside [x - h, x + h] for any h
// large enough to beat f32 rounding (the logits carry ~1e-6 of it, ~5e-4 / h of the gradient).
// Measured on conv1.weight[11]: the differences go from -0.05 at h = 0.1 to 0.0270 at h = 3e-4, against
// the analytic 0.0281. So the check is on each tensor's sampled vector, |numeric - analytic| / |analytic|
// in 2-norms, with h = 1e-3: measured 1e-3 (bn6) to 6e-2 (conv1), with dropout on or off alike (and
// with it off the same gradients match PyTorch's float64 to 6e-6). Tolerance 0.15; a wiring error is ~1.
const NET_H: f32 = 1e-3;
const NET_TOL: f64 = 0.15;

fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

fn random(rng: &mut Xoshiro256PlusPlus, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

fn dot(r: &[f32], y: &[f32]) -> f64 {
    r.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Compares `analytic` (dL/dx) with central differences of `loss` at sampled coordinates of `x`.
fn check(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let scale = analytic.iter().fold(1e-3f64, |m, &g| m.max(g.abs() as f64));
    let mut pick = rng(x.len() as u64);
    let coords: Vec<usize> = if x.len() <= SAMPLES {
        (0..x.len()).collect()
    } else {
        (0..SAMPLES).map(|_| pick.random_range(0..x.len())).collect()
    };
    let mut worst = 0.0f64;
    let mut probe = x.to_vec();
    for &i in &coords {
        probe[i] = x[i] + H;
        let up = loss(&probe);
        probe[i] = x[i] - H;
        let down = loss(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * (H as f64));
        let err = (numeric - analytic[i] as f64).abs() / scale;
        assert!(
            err <= TOL,
            "{what}[{i}]: analytic {} numeric {numeric} (error {err:e} of the largest gradient {scale})",
            analytic[i]
        );
        worst = worst.max(err);
    }
    eprintln!("{what:<28} worst error {worst:.1e} of the largest gradient (tol {TOL:.0e})");
}

fn conv_case(k: usize, pad: usize, seed: u64) {
    let d = ConvDims { n: 2, cin: 3, h: 6, w: 5, cout: 4, k, pad };
    let mut g = rng(seed);
    let x = random(&mut g, d.n * d.in_image(), 1.0);
    let w = random(&mut g, d.weight_len(), 0.5);
    let r = random(&mut g, d.n * d.out_image(), 1.0);
    let forward = |x: &[f32], w: &[f32]| {
        let mut y = vec![0.0; d.n * d.out_image()];
        conv_forward(&d, x, w, &mut y);
        dot(&r, &y)
    };
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    conv_backward(&d, &x, &w, &r, Some(&mut dx), &mut dw);
    check(&format!("conv{k}x{k} pad {pad} dx"), &x, &dx, |x| forward(x, &w));
    check(&format!("conv{k}x{k} pad {pad} dweight"), &w, &dw, |w| forward(&x, w));
    // The weight gradient without dx is the same computation.
    let mut dw2 = vec![0.0; w.len()];
    conv_backward(&d, &x, &w, &r, None, &mut dw2);
    assert_eq!(dw, dw2);
}

#[test]
fn conv3x3_pad1() {
    conv_case(3, 1, 1);
}

#[test]
fn conv3x3_pad0() {
    conv_case(3, 0, 2);
}

#[test]
fn conv1x1() {
    conv_case(1, 0, 3);
}

/// The forward convolution against the textbook sum, so forward and backward are both pinned down.
#[test]
fn conv_forward_is_the_direct_sum() {
    for (k, pad) in [(3, 1), (3, 0), (1, 0)] {
        let d = ConvDims { n: 2, cin: 3, h: 7, w: 6, cout: 5, k, pad };
        let mut g = rng(10 + k as u64 + pad as u64);
        let x = random(&mut g, d.n * d.in_image(), 1.0);
        let w = random(&mut g, d.weight_len(), 1.0);
        let mut y = vec![0.0; d.n * d.out_image()];
        conv_forward(&d, &x, &w, &mut y);
        let (ho, wo) = (d.ho(), d.wo());
        for n in 0..d.n {
            for co in 0..d.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut sum = 0.0f64;
                        for ci in 0..d.cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) =
                                        ((oy + ky) as isize - pad as isize, (ox + kx) as isize - pad as isize);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < d.h && (ix as usize) < d.w {
                                        let xv = x[((n * d.cin + ci) * d.h + iy as usize) * d.w + ix as usize];
                                        sum += xv as f64 * w[((co * d.cin + ci) * k + ky) * k + kx] as f64;
                                    }
                                }
                            }
                        }
                        let got = y[((n * d.cout + co) * ho + oy) * wo + ox] as f64;
                        assert!((got - sum).abs() <= 1e-5, "k {k} pad {pad}: {got} vs {sum}");
                    }
                }
            }
        }
    }
}

#[test]
fn batchnorm_training() {
    let d = BnDims { n: 3, c: 4, hw: 5 };
    let mut g = rng(4);
    let x: Vec<f32> = random(&mut g, d.n * d.c * d.hw, 2.0).iter().map(|v| v + 0.5).collect();
    let gamma: Vec<f32> = random(&mut g, d.c, 0.5).iter().map(|v| v + 1.0).collect();
    let beta = random(&mut g, d.c, 0.5);
    let r = random(&mut g, x.len(), 1.0);
    let forward = |x: &[f32], gamma: &[f32], beta: &[f32]| {
        let mut y = vec![0.0; x.len()];
        batchnorm_forward_train(&d, x, gamma, beta, 1e-5, &mut y);
        dot(&r, &y)
    };
    let mut y = vec![0.0; x.len()];
    let saved = batchnorm_forward_train(&d, &x, &gamma, &beta, 1e-5, &mut y);
    let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; x.len()], vec![0.0; d.c], vec![0.0; d.c]);
    batchnorm_backward(&d, &x, &r, &gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);
    check("batchnorm dx", &x, &dx, |x| forward(x, &gamma, &beta));
    check("batchnorm dgamma", &gamma, &dgamma, |gm| forward(&x, gm, &beta));
    check("batchnorm dbeta", &beta, &dbeta, |b| forward(&x, &gamma, b));
    // Normalized output: zero mean and unit (biased) variance per channel before the affine part.
    for c in 0..d.c {
        let vals: Vec<f64> = (0..d.n)
            .flat_map(|n| (0..d.hw).map(move |i| (n, i)))
            .map(|(n, i)| ((y[(n * d.c + c) * d.hw + i] - beta[c]) / gamma[c]) as f64)
            .collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "channel {c}: mean {mean} var {var}");
    }
}

#[test]
fn batchnorm_running_statistics_and_eval() {
    let d = BnDims { n: 2, c: 1, hw: 2 };
    let x = [1.0f32, 3.0, 5.0, 7.0];
    let mut y = [0.0; 4];
    let saved = batchnorm_forward_train(&d, &x, &[1.0], &[0.0], 1e-5, &mut y);
    assert_eq!(saved.mean, vec![4.0]);
    assert_eq!(saved.var, vec![5.0]);
    let (mut rm, mut rv) = ([0.0f32], [1.0f32]);
    batchnorm_update_running(&d, &saved, 0.1, &mut rm, &mut rv);
    // Unbiased variance 20 / 3; PyTorch: 0.9 * 1 + 0.1 * 20 / 3.
    assert!((rm[0] - 0.4).abs() < 1e-6 && (rv[0] - (0.9 + 0.1 * 20.0 / 3.0)).abs() < 1e-6);
    let mut out = [0.0; 4];
    batchnorm_forward_eval(&d, &x, &[2.0], &[1.0], &[4.0], &[4.0], 0.0, &mut out);
    assert_eq!(out, [-2.0, 0.0, 2.0, 4.0]);
}

/// Values at least `gap` apart from each other and from zero, in random order.
fn separated(g: &mut Xoshiro256PlusPlus, len: usize, gap: f32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..len).map(|i| (i as f32 - len as f32 / 2.0 + 0.5) * gap).collect();
    for i in (1..len).rev() {
        v.swap(i, g.random_range(0..=i));
    }
    v
}

#[test]
fn relu() {
    let mut g = rng(5);
    let x = separated(&mut g, 40, 0.1);
    let r = random(&mut g, x.len(), 1.0);
    let mut y = x.clone();
    relu_forward(&mut y);
    let mut dx = r.clone();
    relu_backward(&y, &mut dx);
    check("relu dx", &x, &dx, |x| {
        let mut y = x.to_vec();
        relu_forward(&mut y);
        dot(&r, &y)
    });
}

#[test]
fn maxpool2() {
    let (planes, h, w) = (3, 4, 6);
    let mut g = rng(6);
    let x = separated(&mut g, planes * h * w, 0.1);
    let r = random(&mut g, planes * h * w / 4, 1.0);
    let mut y = vec![0.0; r.len()];
    let mut argmax = vec![0; y.len()];
    maxpool2_forward(planes, h, w, &x, &mut y, &mut argmax);
    let mut dx = vec![0.0; x.len()];
    maxpool2_backward(planes, h, w, &argmax, &r, &mut dx);
    check("maxpool2 dx", &x, &dx, |x| {
        let mut y = vec![0.0; r.len()];
        maxpool2_forward(planes, h, w, x, &mut y, &mut vec![0; r.len()]);
        dot(&r, &y)
    });
    // Ties go to the first element of the window, as in PyTorch.
    let mut y1 = [0.0];
    let mut winner = [0u8];
    maxpool2_forward(1, 2, 2, &[1.0, 2.0, 2.0, 0.0], &mut y1, &mut winner);
    assert_eq!(winner, [1]);
}

#[test]
fn avgpool2() {
    let (planes, h, w) = (3, 4, 6);
    let mut g = rng(12);
    let x = random(&mut g, planes * h * w, 1.0);
    let r = random(&mut g, planes * h * w / 4, 1.0);
    let mut dx = vec![0.0; x.len()];
    avgpool2_backward(planes, h, w, &r, &mut dx);
    check("avgpool2 dx", &x, &dx, |x| {
        let mut y = vec![0.0; r.len()];
        avgpool2_forward(planes, h, w, x, &mut y);
        dot(&r, &y)
    });
    // The window's mean, as PyTorch's AvgPool2d: (1 + 2 + 3 + 6) / 4.
    let mut y = [0.0];
    avgpool2_forward(1, 2, 2, &[1.0, 2.0, 3.0, 6.0], &mut y);
    assert_eq!(y, [3.0]);
}

#[test]
fn global_avg_pool() {
    let mut g = rng(7);
    let x = random(&mut g, 2 * 3 * 25, 1.0);
    let r = random(&mut g, 6, 1.0);
    let mut dx = vec![0.0; x.len()];
    global_avg_pool_backward(25, &r, &mut dx);
    check("global avg pool dx", &x, &dx, |x| {
        let mut y = vec![0.0; 6];
        global_avg_pool_forward(25, x, &mut y);
        dot(&r, &y)
    });
}

#[test]
fn dropout() {
    let mut g = rng(8);
    let x = random(&mut g, 50, 1.0);
    let r = random(&mut g, 50, 1.0);
    let mask = dropout_mask(1, 2, 6, 0.3, x.len());
    let mut dx = r.clone();
    dropout_apply(&mask, &mut dx);
    check("dropout dx", &x, &dx, |x| {
        let mut y = x.to_vec();
        dropout_apply(&mask, &mut y);
        dot(&r, &y)
    });
}

#[test]
fn dropout_mask_statistics() {
    let p = 0.05;
    let mask = dropout_mask(42, 7, 6, p, 200_000);
    let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
    // Binomial standard deviation sqrt(p(1-p)/n) ~ 4.9e-4; allow 5 of them.
    assert!((dropped - p as f64).abs() < 2.5e-3, "dropped fraction {dropped}");
    assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0 / (1.0 - p)));
    // Another step or seed draws another mask; the same draws the same.
    assert_ne!(mask, dropout_mask(42, 8, 6, p, 200_000));
    assert_ne!(mask, dropout_mask(43, 7, 6, p, 200_000));
    // Each dropout layer draws its own mask.
    assert_ne!(mask, dropout_mask(42, 7, 9, p, 200_000));
    assert_eq!(mask, dropout_mask(42, 7, 6, p, 200_000));
}

#[test]
fn softmax_cross_entropy_gradient() {
    let mut g = rng(9);
    let labels = [3u8, 0, 9, 3];
    let logits = random(&mut g, 40, 3.0);
    let mut dlogits = vec![0.0; 40];
    let out = softmax_cross_entropy(&logits, &labels, 10, Some(&mut dlogits));
    check("softmax cross-entropy", &logits, &dlogits, |l| softmax_cross_entropy(l, &labels, 10, None).loss as f64);
    // The loss by its definition, and the argmax count.
    let mut want = 0.0f64;
    let mut correct = 0;
    for (row, &l) in logits.chunks(10).zip(&labels) {
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        want += lse - row[l as usize] as f64;
        let arg = (0..10).fold(0, |a, j| if row[j] > row[a] { j } else { a });
        correct += (arg == l as usize) as u32;
    }
    assert!((out.loss as f64 - want / 4.0).abs() < 1e-5);
    assert_eq!(out.correct, correct);
}

/// The whole network's parameter gradients, through every layer, on 4 real-sized images.
#[test]
fn whole_network_parameter_gradients() {
    check_network_gradients(&Model::net3());
}

/// The same for a network with the layers Net3 lacks: convolution bias, a linear layer (with its
/// bias) over a flattened 8 x 6 x 6 input, a dropout and a max pooling without a batchnorm before.
#[test]
fn bias_and_linear_parameter_gradients() {
    let text = "[[layer]]\ntype = \"conv\"\nout = 8\nkernel = 3\npadding = 1\nbias = true\n\n\
                [[layer]]\ntype = \"batchnorm\"\n\n[[layer]]\ntype = \"relu\"\n\n[[layer]]\ntype = \"maxpool\"\n\n\
                [[layer]]\ntype = \"conv\"\nout = 8\nkernel = 3\nbias = true\n\n[[layer]]\ntype = \"maxpool\"\n\n\
                [[layer]]\ntype = \"dropout\"\np = 0.1\n\n[[layer]]\ntype = \"linear\"\nout = 10\n";
    let input = mnist_wgpu::model::Shape { c: 1, h: 28, w: 28 };
    let model = mnist_wgpu::model::file::parse(text, "test model", input, 10).unwrap();
    assert!(model.param("conv2.bias").is_some() && model.param("fc1.bias").is_some());
    assert_eq!(model.param("fc1.weight").unwrap().shape, vec![10, 8 * 6 * 6]);
    check_network_gradients(&model);
}

/// Net3 with 2x2 average poolings for its max poolings (models/net3-avgpool2.toml).
#[test]
fn average_pooling_network_parameter_gradients() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/net3-avgpool2.toml");
    let model = mnist_wgpu::model::file::for_mnist(Some(path)).unwrap();
    assert_eq!(model.layers.iter().filter(|l| **l == mnist_wgpu::model::Layer::AvgPool2).count(), 2);
    check_network_gradients(&model);
}

fn check_network_gradients(model: &Model) {
    let n = 4;
    let mut g = rng(11);
    let state = model.init_state(3);
    let input = random(&mut g, n * model.input.len(), 2.0);
    let labels = [1u8, 7, 2, 7];
    let classes = model.output_classes();
    let loss = |state: &[f32]| {
        let mut s = state.to_vec();
        let mut net = CpuNet::new(model);
        net.forward(&mut s, &input, n, Mode::Train(DropoutMode::Hash { seed: 5, step: 0 }));
        softmax_cross_entropy(net.logits(), &labels, classes, None).loss as f64
    };
    let mut net = CpuNet::new(model);
    let mut s = state.clone();
    net.forward(&mut s, &input, n, Mode::Train(DropoutMode::Hash { seed: 5, step: 0 }));
    let mut dlogits = vec![0.0; n * classes];
    softmax_cross_entropy(net.logits(), &labels, classes, Some(&mut dlogits));
    let grads = net.backward(&s, &dlogits).to_vec();
    for p in model.params.iter().filter(|p| p.trainable) {
        let range = p.offset..p.offset + p.len;
        let name = format!("net {}", p.name);
        let f = |t: &[f32]| {
            let mut s = state.clone();
            s[range.clone()].copy_from_slice(t);
            loss(&s)
        };
        let (x, analytic) = (&state[range.clone()], &grads[range.clone()]);
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        let mut probe = x.to_vec();
        for i in (0..x.len()).step_by(x.len().div_ceil(SAMPLES)) {
            probe[i] = x[i] + NET_H;
            let up = f(&probe);
            probe[i] = x[i] - NET_H;
            let down = f(&probe);
            probe[i] = x[i];
            let numeric = (up - down) / (2.0 * NET_H as f64);
            diff += (numeric - analytic[i] as f64).powi(2);
            norm += (analytic[i] as f64).powi(2);
        }
        let err = (diff / norm.max(1e-12)).sqrt();
        eprintln!("{name:<28} relative 2-norm error {err:.1e} (tol {NET_TOL:.0e})");
        assert!(err <= NET_TOL, "{name}: relative 2-norm error {err:e} exceeds {NET_TOL:e}");
    }
}
