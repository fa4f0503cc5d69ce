//! Whole GPU training steps: against the PyTorch golden fixture (float64 truth), against the CPU
//! reference with dropout on, and bitwise determinism.
//!
//! Tolerances, relative to each tensor's largest magnitude, as in tests/golden.rs for the CPU reference
//! (whose measured errors are ten or more times smaller): logits, loss, running statistics 1e-5;
//! gradients 2e-5; weights, statistics, losses and evaluation logits after ten SGD steps 1e-5.

mod common;

use common::{assert_close as check, assert_zero_gradient, gpu, zero_bias_gradient_scale, Fixture};
use mnist_wgpu::cpu::reference::sgd::SgdStep;
use mnist_wgpu::cpu::{CpuNet, DropoutMode, Executor, Mode, Update};
use mnist_wgpu::gpu::{GpuNet, StepUniform};
use mnist_wgpu::model::Model;
use mnist_wgpu::train::schedule::OneCycle;
use pollster::FutureExt as _;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

const WEIGHT_DECAY: f32 = 1e-5;

fn fixture_state(fx: &Fixture, model: &Model, prefix: &str) -> Vec<f32> {
    let mut state = vec![f32::NAN; model.num_state];
    for p in &model.params {
        state[p.offset..p.offset + p.len].copy_from_slice(&fx.get(&format!("{prefix}{}", p.name)).f32s());
    }
    state
}

/// Net3's launches at the recipe's batch of 100, as `profile` counts them: 29 per training step
/// (forward, the loss, backward, one update) and 7 per evaluation batch. A change that adds a launch
/// to the recipe's network fails here.
#[test]
fn net3_runs_29_launches_per_training_step_and_7_per_evaluation_batch() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    let net = GpuNet::new(ctx, k, &model, 100, &model.init_state(1)).unwrap();
    assert_eq!((net.train_launches(), net.eval_launches()), (29, 7));
}

#[test]
fn gpu_step_matches_pytorch() {
    steps_match_pytorch(&Fixture::load(), &Model::net3());
}

/// The same for the golden test's second network (tests/fixtures/bias_linear.toml): convolution bias,
/// linear layers, a batchnorm after a linear layer.
#[test]
fn gpu_steps_of_a_network_with_bias_and_linear_layers_match_pytorch() {
    let text = include_str!("fixtures/bias_linear.toml");
    let input = mnist_wgpu::model::Shape { c: 1, h: 28, w: 28 };
    let model = mnist_wgpu::model::file::parse(text, "tests/fixtures/bias_linear.toml", input, 10).unwrap();
    steps_match_pytorch(&Fixture::load_named("torch_reference_bias_linear"), &model);
}

fn steps_match_pytorch(fx: &Fixture, model: &Model) {
    let Some((ctx, k)) = gpu() else { return };
    let state = fixture_state(fx, model, "weights.");
    let input = fx.get("input").f32s();
    let labels: Vec<u8> = fx.get("labels").data.iter().map(|&l| l as u8).collect();
    let n = labels.len();
    let net = GpuNet::new(ctx, k, model, n, &state).unwrap();

    // One forward and backward pass.
    net.gradients_only(ctx, &input, &labels, StepUniform::default());
    check("logits", &net.read_logits(ctx).block_on().unwrap(), &fx.get("f64.step0.logits").f32s(), 1e-5);
    let m = net.metrics(ctx).block_on().unwrap();
    check("loss", &[m.loss_sum / n as f32], &fx.get("f64.step0.loss").f32s(), 1e-5);
    let grads = net.read_grads(ctx).block_on().unwrap();
    let mut worst = 0.0f32;
    for p in model.params.iter().filter(|p| p.trainable) {
        let got = &grads[p.offset..p.offset + p.len];
        if let Some(scale) = zero_bias_gradient_scale(fx, &p.name) {
            assert_zero_gradient(&format!("grad {}", p.name), got, scale, 2e-5);
            continue;
        }
        let want = fx.get(&format!("f64.step0.grad.{}", p.name)).f32s();
        worst = worst.max(check(&format!("grad {}", p.name), got, &want, 2e-5));
    }
    eprintln!("largest GPU gradient error against PyTorch float64: {worst:.2e}");
    let after = net.read_state(ctx).block_on().unwrap();
    for p in model.params.iter().filter(|p| !p.trainable) {
        let want = fx.get(&format!("f64.step0.running.{}", p.name)).f32s();
        check(&p.name, &after[p.offset..p.offset + p.len], &want, 1e-5);
    }

    // Ten SGD steps with the recipe's schedule, from the initial weights.
    net.write_state(ctx, &state);
    net.write_moments(ctx, &vec![0.0; model.num_trainable]);
    let schedule = OneCycle::recipe(12_000, 0.1);
    let mut losses = Vec::new();
    for step in 0..10 {
        let (lr, momentum) = schedule.at(step);
        let u =
            StepUniform { lr: lr as f32, momentum: momentum as f32, weight_decay: WEIGHT_DECAY, ..Default::default() };
        net.reset_metrics(ctx);
        let m = net.train_step(ctx, &input, &labels, u, true).block_on().unwrap().unwrap();
        losses.push(m.loss_sum / n as f32);
    }
    check("ten-step losses", &losses, &fx.get("f64.train.losses").f32s(), 1e-5);
    let final_state = net.read_state(ctx).block_on().unwrap();
    check("ten-step state", &final_state, &fixture_state(fx, model, "f64.final."), 1e-5);
    for p in &model.params {
        let want = fx.get(&format!("f64.final.{}", p.name)).f32s();
        check(&format!("final {}", p.name), &final_state[p.offset..p.offset + p.len], &want, 1e-5);
    }
    net.reset_metrics(ctx);
    net.evaluate_batch(ctx, &input, &labels);
    check("eval logits", &net.read_logits(ctx).block_on().unwrap(), &fx.get("f64.final.eval_logits").f32s(), 1e-5);
}

fn random_batch(seed: u64, n: usize, model: &Model) -> (Vec<f32>, Vec<u8>) {
    let mut g = Xoshiro256PlusPlus::seed_from_u64(seed);
    let input = (0..n * model.input.len()).map(|_| g.random_range(-0.5f32..2.5)).collect();
    let labels = (0..n).map(|_| g.random_range(0..10u8)).collect();
    (input, labels)
}

/// Three steps with dropout on: the GPU draws the CPU's masks, so the two agree step by step.
#[test]
fn gpu_steps_with_dropout_match_cpu_reference() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    let n = 8;
    let mut cpu_state = model.init_state(21);
    let mut cpu_momenta = vec![0.0; model.num_trainable];
    let net = GpuNet::new(ctx, k, &model, n, &cpu_state).unwrap();
    let mut cpu = CpuNet::new(&model);
    for step in 0..3u32 {
        let (input, labels) = random_batch(step as u64, n, &model);
        let sgd = SgdStep { lr: 0.05, momentum: 0.9, weight_decay: WEIGHT_DECAY };
        let dropout = DropoutMode::Hash { seed: 99, step };
        let want = cpu.train_step(&mut cpu_state, &mut cpu_momenta, &input, &labels, Update::Sgd(sgd), dropout);
        let u = StepUniform {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: WEIGHT_DECAY,
            dropout_seed: 99,
            dropout_step: step,
            dropout_on: 1,
            ..Default::default()
        };
        net.reset_metrics(ctx);
        let got = net.train_step(ctx, &input, &labels, u, true).block_on().unwrap().unwrap();
        check(&format!("step {step} loss"), &[got.loss_sum / n as f32], &[want.loss], 1e-5);
        assert_eq!(got.correct, want.correct, "step {step} correct count");
        check(&format!("step {step} gradients"), &net.read_grads(ctx).block_on().unwrap(), &cpu.grads, 2e-5);
        check(&format!("step {step} state"), &net.read_state(ctx).block_on().unwrap(), &cpu_state, 1e-5);
    }
    // Evaluation mode over the same net: running statistics, no dropout.
    let (input, labels) = random_batch(50, n, &model);
    net.reset_metrics(ctx);
    net.evaluate_batch(ctx, &input, &labels);
    cpu.forward(&mut cpu_state, &input, n, Mode::Eval);
    check("eval logits", &net.read_logits(ctx).block_on().unwrap(), cpu.logits(), 1e-5);
}

/// The same step from the same state twice gives bitwise-identical parameters, momenta and metrics.
#[test]
fn gpu_step_is_deterministic() {
    let Some((ctx, k)) = gpu() else { return };
    let model = Model::net3();
    let n = 8;
    let state = model.init_state(5);
    let (input, labels) = random_batch(7, n, &model);
    let u = StepUniform {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: WEIGHT_DECAY,
        dropout_seed: 3,
        dropout_step: 11,
        dropout_on: 1,
        ..Default::default()
    };
    let net = GpuNet::new(ctx, k, &model, n, &state).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        net.write_state(ctx, &state);
        net.write_moments(ctx, &vec![0.0; model.num_trainable]);
        net.reset_metrics(ctx);
        let m = net.train_step(ctx, &input, &labels, u, true).block_on().unwrap().unwrap();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        runs.push((
            bits(net.read_state(ctx).block_on().unwrap()),
            bits(net.read_moments(ctx).block_on().unwrap()),
            m.loss_sum.to_bits(),
            m.correct,
        ));
    }
    assert_ne!(runs[0].0, state.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "the step changed nothing");
    assert!(runs[0] == runs[1], "two runs of the same step differ");
}

/// An error wgpu reports outside any call's result (here a buffer the device refuses) no longer panics
/// in wgpu's default handler: the next check ends the run with wgpu's account, which names the buffer.
#[test]
fn a_gpu_validation_error_becomes_an_error_naming_the_buffer() {
    let Some(_) = gpu() else { return };
    let ctx = mnist_wgpu::gpu::GpuContext::new(common::adapter_choice().as_deref()).unwrap();
    ctx.check().unwrap();
    let _refused = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("far too large"),
        size: ctx.device.limits().max_buffer_size + 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let err = format!("{:#}", ctx.wait().block_on().unwrap_err());
    eprintln!("{err}");
    assert!(err.contains("the GPU failed") && err.contains("far too large"), "{err}");
    assert!(err.contains("validation error") || err.contains("out of GPU memory"), "{err}");
}
