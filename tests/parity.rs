//! Each kernel against the CPU reference, forward and backward, on random inputs at the model's real
//! layer shapes with a batch of 4 (lavapipe is slow; the shapes, not the batch, exercise the indexing).
//!
//! Tolerances, as max |gpu - cpu| relative to the largest |cpu| value of the tensor (f32 both sides;
//! the difference is summation order, and on GPUs fused multiply-adds and exp/log approximations):
//! - element-wise results (pooling, dropout, SGD): 1e-6, a few ulps;
//! - everything that sums (convolutions forward and backward, batchnorm statistics, its outputs and
//!   gradients, softmax and the loss): 1e-5. Measured on lavapipe: at most 6.6e-7 (conv4 dx), so the
//!   tolerance leaves room for a GPU's fused multiply-adds and faster exp/log, not for a wrong index.
//!
//! Dropout masks and max-pool winners must agree exactly.

mod common;

use common::{gpu, rel_err};
use mnist_wgpu::cpu::batchnorm::*;
use mnist_wgpu::cpu::conv::{conv_backward, conv_forward};
use mnist_wgpu::cpu::dropout::dropout_mask;
use mnist_wgpu::cpu::loss::softmax_cross_entropy;
use mnist_wgpu::cpu::pool::*;
use mnist_wgpu::cpu::relu::{relu_backward, relu_forward};
use mnist_wgpu::cpu::sgd::{sgd_update, SgdStep};
use mnist_wgpu::gpu::batchnorm::{BnBuffers, BnLayer, BnOffsets};
use mnist_wgpu::gpu::kernel::run;
use mnist_wgpu::gpu::{GpuContext, StepUniform};
use mnist_wgpu::model::{ConvDims, Layer, Model};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

const N: usize = 4;

fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len).map(|_| g.random_range(-scale..scale)).collect()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite GPU value");
    let err = rel_err(got, want, 1e-6);
    eprintln!("{what:<44} max rel err {err:.2e} (tol {tol:.0e})");
    assert!(err <= tol, "{what}: GPU differs from the CPU reference by {err:e} (tol {tol:e})");
}

fn read(ctx: &GpuContext, b: &wgpu::Buffer, len: usize) -> Vec<f32> {
    ctx.read(b, len).unwrap()
}

/// Every convolution of Net3, forward, dx and dweight; and two odd shapes whose channel counts are
/// not multiples of the kernels' channel blocks.
#[test]
fn conv_kernels_match_reference() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    let mut cases: Vec<(String, ConvDims)> =
        (0..model.layers.len()).filter_map(|i| model.conv(i, N).map(|(d, _)| (model.layer_name(i), d))).collect();
    cases.push(("odd 3x3".into(), ConvDims { n: 3, cin: 3, h: 9, w: 7, cout: 5, k: 3, pad: 1 }));
    cases.push(("odd 1x1".into(), ConvDims { n: 3, cin: 3, h: 4, w: 5, cout: 7, k: 1, pad: 0 }));
    for (i, (name, d)) in cases.into_iter().enumerate() {
        let (n, cin, cout, ksize, pad) = (d.n, d.cin, d.cout, d.k, d.pad);
        let s = (d.h, d.w);
        // The weights sit at a non-zero offset of a larger buffer, as in the model's state.
        let w_off = 7;
        let x = random(i as u64, n * d.in_image(), 1.0);
        let w = random(100 + i as u64, d.weight_len(), 0.3);
        let dy = random(200 + i as u64, n * d.out_image(), 1.0);
        let mut state = vec![0.0; w_off];
        state.extend_from_slice(&w);
        let (xb, sb, dyb) = (ctx.upload("x", &x), ctx.upload("state", &state), ctx.upload("dy", &dy));
        let (yb, dxb, gb) =
            (ctx.zeros("y", n * d.out_image()), ctx.zeros("dx", n * d.in_image()), ctx.zeros("grads", state.len()));
        let conv = k.conv_for(&d).unwrap();
        let launches = [
            conv.forward(ctx, &d, w_off, &xb, &sb, &yb).unwrap(),
            conv.backward_data(ctx, &d, w_off, &dyb, &sb, &dxb).unwrap(),
            conv.backward_weight(ctx, &d, w_off, &xb, &dyb, &gb).unwrap(),
        ];
        run(ctx, &launches.iter().collect::<Vec<_>>());
        let mut y = vec![0.0; n * d.out_image()];
        conv_forward(&d, &x, &w, &mut y);
        let (mut dx, mut dw) = (vec![0.0; n * d.in_image()], vec![0.0; d.weight_len()]);
        conv_backward(&d, &x, &w, &dy, Some(&mut dx), &mut dw);
        let tag = format!("{name} ({ksize}x{ksize} pad {pad}, {cin}->{cout} @{}x{})", s.0, s.1);
        check(&format!("{tag} forward"), &read(ctx, &yb, y.len()), &y, 1e-5);
        check(&format!("{tag} dx"), &read(ctx, &dxb, dx.len()), &dx, 1e-5);
        let g = read(ctx, &gb, state.len());
        assert!(g[..w_off].iter().all(|&v| v == 0.0), "{tag}: wrote outside its weights");
        check(&format!("{tag} dweight"), &g[w_off..], &dw, 1e-5);
    }
}

/// Every batchnorm of Net3 (with its ReLU fused): training forward with running statistics, evaluation
/// forward, and backward.
#[test]
fn batchnorm_kernels_match_reference() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    for (i, layer) in model.layers.iter().enumerate() {
        let &Layer::BatchNorm { name, c } = layer else {
            continue;
        };
        let s = model.input_of(i);
        let d = BnDims { n: N, c, hw: s.h * s.w };
        let len = N * c * d.hw;
        let x: Vec<f32> = random(i as u64, len, 2.0).iter().map(|v| v + 0.3).collect();
        let gamma: Vec<f32> = random(10 + i as u64, c, 0.5).iter().map(|v| v + 1.0).collect();
        let beta = random(20 + i as u64, c, 0.5);
        let rm = random(30 + i as u64, c, 0.5);
        let rv: Vec<f32> = random(40 + i as u64, c, 0.5).iter().map(|v| v + 1.0).collect();
        let dy = random(50 + i as u64, len, 1.0);
        // State layout: gamma, beta, running mean, running var.
        let state: Vec<f32> = [&gamma[..], &beta, &rm, &rv].concat();
        let offsets = BnOffsets { gamma: 0, beta: c, running_mean: 2 * c, running_var: 3 * c };
        let l = BnLayer { n: N, c, hw: d.hw, relu: true, offsets, momentum: 0.1, eps: 1e-5 };
        let (xb, sb, dyb) = (ctx.upload("x", &x), ctx.upload("state", &state), ctx.upload("dy", &dy));
        let (yb, savedb, dxb, gb) =
            (ctx.zeros("y", len), ctx.zeros("saved", 2 * c), ctx.zeros("dx", len), ctx.zeros("grads", 2 * c));
        let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb };
        let fwd = k.batchnorm.forward_train(ctx, &l, &b);
        let bwd = k.batchnorm.backward(ctx, &l, &b, &dyb, &dxb, &gb);
        run(ctx, &fwd.iter().chain(&bwd).collect::<Vec<_>>());

        // CPU: batchnorm, ReLU; backward through ReLU then batchnorm.
        let mut y = vec![0.0; len];
        let saved = batchnorm_forward_train(&d, &x, &gamma, &beta, 1e-5, &mut y);
        relu_forward(&mut y);
        let (mut rm2, mut rv2) = (rm.clone(), rv.clone());
        batchnorm_update_running(&d, &saved, 0.1, &mut rm2, &mut rv2);
        let mut g = dy.clone();
        relu_backward(&y, &mut g);
        let (mut dx, mut dgamma, mut dbeta) = (vec![0.0; len], vec![0.0; c], vec![0.0; c]);
        batchnorm_backward(&d, &x, &g, &gamma, &saved, &mut dx, &mut dgamma, &mut dbeta);

        let tag = format!("{name} (c {c} @{}x{})", s.h, s.w);
        let sv = read(ctx, &savedb, 2 * c);
        check(&format!("{tag} batch mean"), &sv[..c], &saved.mean, 1e-5);
        check(&format!("{tag} invstd"), &sv[c..], &saved.invstd, 1e-5);
        check(&format!("{tag} forward + relu"), &read(ctx, &yb, len), &y, 1e-5);
        let st = read(ctx, &sb, 4 * c);
        check(&format!("{tag} running mean"), &st[2 * c..3 * c], &rm2, 1e-5);
        check(&format!("{tag} running var"), &st[3 * c..], &rv2, 1e-5);
        let gr = read(ctx, &gb, 2 * c);
        check(&format!("{tag} dgamma"), &gr[..c], &dgamma, 1e-5);
        check(&format!("{tag} dbeta"), &gr[c..], &dbeta, 1e-5);
        check(&format!("{tag} dx"), &read(ctx, &dxb, len), &dx, 1e-5);

        // Evaluation mode, on the original running statistics.
        let sb = ctx.upload("state", &state);
        let b = BnBuffers { x: &xb, y: &yb, state: &sb, saved: &savedb };
        run(ctx, &[&k.batchnorm.forward_eval(ctx, &l, &b)]);
        let mut ye = vec![0.0; len];
        batchnorm_forward_eval(&d, &x, &gamma, &beta, &rm, &rv, 1e-5, &mut ye);
        relu_forward(&mut ye);
        check(&format!("{tag} eval forward + relu"), &read(ctx, &yb, len), &ye, 1e-5);
    }
}

#[test]
fn pool_kernels_match_reference() {
    let Some((ctx, k)) = gpu() else { return };
    // Net3's two max pools and its global average pool.
    for (c, h) in [(16usize, 28usize), (32, 14)] {
        let planes = N * c;
        let len = planes * h * h;
        let x = random(c as u64, len, 1.0);
        let dy = random(1 + c as u64, len / 4, 1.0);
        let (xb, dyb) = (ctx.upload("x", &x), ctx.upload("dy", &dy));
        let (yb, ab, dxb) = (ctx.zeros("y", len / 4), ctx.zeros("argmax", len / 4), ctx.zeros("dx", len));
        let f = k.pool.maxpool_forward(ctx, (planes, h, h), &xb, &yb, &ab);
        let b = k.pool.maxpool_backward(ctx, (planes, h, h), &dyb, &ab, &dxb);
        run(ctx, &[&f, &b]);
        let mut y = vec![0.0; len / 4];
        let mut argmax = vec![0; len / 4];
        maxpool2_forward(planes, h, h, &x, &mut y, &mut argmax);
        let mut dx = vec![0.0; len];
        maxpool2_backward(planes, h, h, &argmax, &dy, &mut dx);
        let ga: Vec<u32> = ctx.read(&ab, len / 4).unwrap();
        assert!(ga.iter().zip(&argmax).all(|(&g, &c)| g == c as u32), "maxpool winners differ");
        check(&format!("maxpool2 {c}x{h}x{h} forward"), &read(ctx, &yb, len / 4), &y, 0.0);
        check(&format!("maxpool2 {c}x{h}x{h} backward"), &read(ctx, &dxb, len), &dx, 0.0);
    }
    let (planes, hw) = (N * 10, 25);
    let x = random(5, planes * hw, 1.0);
    let dy = random(6, planes, 1.0);
    let (xb, dyb, yb, dxb) =
        (ctx.upload("x", &x), ctx.upload("dy", &dy), ctx.zeros("y", planes), ctx.zeros("dx", planes * hw));
    run(ctx, &[&k.pool.gap_forward(ctx, planes, hw, &xb, &yb), &k.pool.gap_backward(ctx, planes, hw, &dyb, &dxb)]);
    let (mut y, mut dx) = (vec![0.0; planes], vec![0.0; planes * hw]);
    global_avg_pool_forward(hw, &x, &mut y);
    global_avg_pool_backward(hw, &dy, &mut dx);
    check("global avg pool forward", &read(ctx, &yb, planes), &y, 1e-6);
    check("global avg pool backward", &read(ctx, &dxb, planes * hw), &dx, 1e-6);
}

#[test]
fn dropout_masks_are_the_references() {
    let Some((ctx, k)) = gpu() else { return };
    let len = N * 16 * 28 * 28;
    let x = random(9, len, 1.0);
    let step = StepUniform { dropout_seed: 1234, dropout_step: 77, dropout_on: 1, ..Default::default() };
    let (xb, yb, sb) = (ctx.upload("x", &x), ctx.zeros("y", len), ctx.uniform("step", &step));
    run(ctx, &[&k.dropout.apply(ctx, len, 0.05, &sb, &xb, &yb)]);
    let mask = dropout_mask(1234, 77, 0.05, len);
    let want: Vec<f32> = x.iter().zip(&mask).map(|(a, m)| a * m).collect();
    let got = read(ctx, &yb, len);
    let same_mask = got.iter().zip(&want).all(|(g, w)| (*g == 0.0) == (*w == 0.0));
    assert!(same_mask, "GPU and CPU dropout masks differ");
    check("dropout p=0.05", &got, &want, 1e-6);
}

#[test]
fn loss_kernel_matches_reference() {
    let Some((ctx, k)) = gpu() else { return };
    // More images than invocations, so the strided loop and the tree both run.
    let n = 300;
    let logits = random(11, n * 10, 4.0);
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let l32: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let (lb, lab, db, mb) = (
        ctx.upload("logits", &logits),
        ctx.upload("labels", &l32),
        ctx.zeros("dlogits", n * 10),
        ctx.zeros("metrics", 2),
    );
    let launch = k.loss.softmax_cross_entropy(ctx, n, 10, false, &lb, &lab, &db, &mb);
    run(ctx, &[&launch]);
    let mut dlogits = vec![0.0; n * 10];
    let out = softmax_cross_entropy(&logits, &labels, 10, Some(&mut dlogits));
    check("softmax cross-entropy dlogits", &read(ctx, &db, n * 10), &dlogits, 1e-5);
    let m = read(ctx, &mb, 2);
    check("softmax cross-entropy loss", &[m[0] / n as f32], &[out.loss], 1e-5);
    assert_eq!(m[1] as u32, out.correct);
    // Accumulating mode adds a second batch onto the first.
    let acc = k.loss.softmax_cross_entropy(ctx, n, 10, true, &lb, &lab, &db, &mb);
    run(ctx, &[&acc]);
    let m2 = read(ctx, &mb, 2);
    assert_eq!((m2[0], m2[1]), (2.0 * m[0], 2.0 * m[1]));
}

#[test]
fn sgd_kernel_matches_reference() {
    let Some((ctx, k)) = gpu() else { return };
    let len = 17_900;
    let (p, g, m) = (random(1, len, 0.5), random(2, len, 0.1), random(3, len, 0.1));
    let step = StepUniform { lr: 0.05, momentum: 0.9, weight_decay: 1e-5, ..Default::default() };
    let (pb, gb, mb, sb) = (ctx.upload("p", &p), ctx.upload("g", &g), ctx.upload("m", &m), ctx.uniform("step", &step));
    run(ctx, &[&k.sgd.update(ctx, len, &sb, &pb, &gb, &mb)]);
    let (mut p2, mut m2) = (p.clone(), m.clone());
    sgd_update(SgdStep { lr: 0.05, momentum: 0.9, weight_decay: 1e-5 }, &mut p2, &g, &mut m2);
    check("sgd params", &read(ctx, &pb, len), &p2, 1e-6);
    check("sgd momenta", &read(ctx, &mb, len), &m2, 1e-6);
}
