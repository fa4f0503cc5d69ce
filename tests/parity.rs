//! Each kernel against the CPU reference, forward and backward, at the model's real layer shapes with a
//! batch of 4 (lavapipe is slow; the shapes, not the batch, exercise the indexing), and whole training
//! steps against the CPU backend. Both run the code of `mnist-wgpu verify` (src/verify/), whose
//! header gives the tolerances and why.

mod common;

use common::gpu;
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::kernel::{validate, SHADERS};
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::plan::Plan;
use mnist_wgpu::model::Model;
use mnist_wgpu::verify::{failures, format_row, header, kernel_checks, step_checks, Check};
use pollster::FutureExt as _;

const N: usize = 4;

fn assert_all_pass(checks: &[Check]) {
    eprintln!("{}", header());
    checks.iter().for_each(|c| eprintln!("{}", format_row(c)));
    let failed = failures(checks);
    assert!(failed.is_empty(), "{} checks failed:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn every_kernel_matches_the_reference_at_every_layer_shape() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    let checks = kernel_checks(ctx, k, &model, N).block_on().unwrap();
    assert_all_pass(&checks);
    // Every entry point of every shader is among the checks, and every layer of the model with a kernel.
    for (name, body) in SHADERS {
        let (module, _) = validate(name, body).unwrap();
        for ep in &module.entry_points {
            let kernel = format!("{name}.{}", ep.name);
            assert!(checks.iter().any(|c| c.kernel.starts_with(&kernel)), "no check runs {kernel}");
        }
    }
    // Layers that run inside a batchnorm's kernels (its ReLU, a dropout after it, a max pooling after
    // those) are covered by that batchnorm's checks, whose kernel names say so.
    let plan = Plan::new(&model);
    for i in 0..model.layers.len() {
        let layer = model.layer_name(i);
        let inside_bn = plan.backward.iter().any(|op| op.start < i && op.contains(&i));
        if !inside_bn {
            assert!(checks.iter().any(|c| c.layer == layer), "no check covers layer {layer}");
        }
    }
    assert!(checks.iter().any(|c| c.kernel.contains("+dropout")), "no check runs a fused dropout");
    assert!(checks.iter().any(|c| c.kernel.contains("(dy of max pool)")), "no check runs a fused max pooling");
}

/// The kernel checks of the network of model file `path` (relative to the repository), all passed.
fn model_file_checks(path: &str) -> Option<(Model, Vec<Check>)> {
    let (ctx, k) = gpu()?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let model = mnist_wgpu::model::file::for_mnist(Some(path.to_str().unwrap())).unwrap();
    let checks = kernel_checks(ctx, k, &model, N).block_on().unwrap();
    assert_all_pass(&checks);
    Some((model, checks))
}

/// A network with 2x2 average poolings (models/net3-avgpool2.toml): its kernels at its shapes.
#[test]
fn a_network_with_average_pooling_matches_at_its_shapes() {
    let Some((_, checks)) = model_file_checks("models/net3-avgpool2.toml") else { return };
    for layer in ["avgpool2#7", "avgpool2#14"] {
        let rows = checks.iter().filter(|c| c.layer == layer && c.kernel.starts_with("pool.avgpool2_")).count();
        assert_eq!(rows, 2, "the forward and backward of {layer}");
    }
}

/// The fast recipe's network (models/fast-recipe.toml): no batchnorm, so its ReLUs run in
/// the forward epilogue of the max pooling or linear layer before them, and their backward on its
/// own; every layer has rows at its shapes.
#[test]
fn a_network_without_batchnorm_matches_at_its_shapes() {
    let Some((model, checks)) = model_file_checks("models/fast-recipe.toml") else { return };
    for i in 0..model.layers.len() {
        let layer = model.layer_name(i);
        assert!(checks.iter().any(|c| c.layer == layer), "no check covers layer {layer}");
    }
    let relu_rows = checks.iter().filter(|c| c.kernel.starts_with("relu.") && c.layer != "odd shape").count();
    assert_eq!(relu_rows, 3 * 3, "three rows for each of the three ReLUs");
    assert!(
        checks.iter().any(|c| c.layer == "fc1" && c.kernel.ends_with(".forward_relu")),
        "no forward_relu row for fc1"
    );
}

/// Dropout after ReLU epilogues of every kind (tests/fixtures/dropout_epilogues.toml): each such
/// dropout runs in the forward epilogue before it and in its ReLU's backward, and has rows there; the
/// dropout after a bare convolution runs (and is checked) alone.
#[test]
fn dropouts_in_epilogues_match_at_their_shapes() {
    let Some((_, checks)) = model_file_checks("tests/fixtures/dropout_epilogues.toml") else { return };
    let rows = |kernel: &str| checks.iter().filter(|c| c.kernel.ends_with(kernel) && c.layer != "odd shape").count();
    assert_eq!(rows("forward_relu_dropout"), 4, "conv1, maxpool#3, avgpool2#8 and fc1");
    assert_eq!(rows("relu.backward_dropout"), 4, "one for each ReLU with a dropout after it");
    assert_eq!(rows("dropout.apply"), 1, "dropout#7 alone");
}

/// One step without dropout and three with it, on the GPU backend against the CPU backend: every
/// parameter, momentum and running statistic, and the losses.
#[test]
fn whole_steps_match_the_reference() {
    if gpu().is_none() {
        return;
    }
    let model = Model::net3();
    // A backend of its own: it owns its device.
    let ctx = GpuContext::new(common::adapter_choice().as_deref()).unwrap();
    let mut backend = GpuBackend::new(ctx, &model, &model.init_state(1)).unwrap();
    let steps = step_checks(&model, &mut backend, 8, 3).block_on().unwrap();
    eprintln!("{}", steps.set_aside_line());
    let checks = steps.checks;
    assert_all_pass(&checks);
    // Every tensor of the model is compared after each run of steps: SGD without dropout, SGD with it,
    // AdamW with it (its two moments too).
    assert_eq!(checks.iter().filter(|c| c.layer == "bn6.running_var").count(), 3);
    assert_eq!(checks.iter().filter(|c| c.layer == "conv1.weight" && c.kernel.ends_with("(exp_avg_sq)")).count(), 1);
}

/// A NaN stays a NaN through every ReLU, as in PyTorch, on both backends, in training and in
/// evaluation (where the GPU runs the ReLU in the convolution's epilogue), so that a diverging run
/// shows in its loss instead of being cut to 0 by a max.
#[test]
fn a_nan_survives_the_relu_on_both_backends() {
    use mnist_wgpu::backend::{Backend, StepParams};
    use mnist_wgpu::cpu::backend::CpuBackend;
    let model = Model::net3();
    let mut state = model.init_state(1);
    // bn1's first channel becomes NaN everywhere; every ReLU after it must pass that on.
    state[model.param("bn1.weight").unwrap().offset] = f32::NAN;
    let n = 4;
    let input: Vec<f32> = (0..n * model.input.len()).map(|i| (i % 7) as f32 * 0.3 - 0.5).collect();
    let labels: Vec<u8> = (0..n as u8).collect();
    let params = StepParams {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
        dropout_seed: 1,
        step: 0,
        dropout: false,
        optimizer: Default::default(),
    };
    let mut backends: Vec<Box<dyn Backend>> = vec![Box::new(CpuBackend::new(&model, state.clone()))];
    if gpu().is_some() {
        let ctx = GpuContext::new(common::adapter_choice().as_deref()).unwrap();
        backends.push(Box::new(GpuBackend::new(ctx, &model, &state).unwrap()));
    }
    for backend in &mut backends {
        let name = backend.describe();
        let logits = backend.eval_logits(&input, &labels).block_on().unwrap();
        assert!(logits.iter().all(|v| v.is_nan()), "{name}: evaluation logits {logits:?}");
        backend.reset_sums().block_on().unwrap();
        backend.train_step(&input, &labels, params).block_on().unwrap();
        let sums = backend.train_sums().block_on().unwrap();
        assert!(sums.loss_sum.is_nan(), "{name}: training loss sum {}", sums.loss_sum);
    }
}
