use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use mnist_wgpu::backend::{Backend, Sums};
use mnist_wgpu::cpu::backend::CpuBackend;
use mnist_wgpu::data::augment::{Augment, BatchAugment};
use mnist_wgpu::data::loader::{epoch_order, train_batch, LoaderConfig};
use mnist_wgpu::data::{self, IMAGE_PIXELS, IMAGE_SIDE};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::{GpuContext, INSTALL_HINT};
use mnist_wgpu::model::Model;
use mnist_wgpu::train::{self, Recipe, TrainOptions};

mod commands;

use commands::{bench, verify};

/// Train the recipe's 17,900-parameter CNN on MNIST with WGSL compute shaders.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The GPU on a hardware adapter; the CPU when the only adapter is a software one or there is none.
    Auto,
    Gpu,
    Cpu,
}

#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Which backend runs the math.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// The GPU adapter: an index from `adapters`, or part of its name (default: the best hardware GPU).
    #[arg(long)]
    adapter: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k). With
    /// --resume, the checkpoint's own network is used, and a different --model is refused.
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// Epochs of the one-cycle schedule (default: the model file's [train] epochs, else the recipe's 20).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step (default: the model file's [train] batch_size, else the recipe's 100).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate of the one-cycle schedule (default: the model file's [train] max_lr, else the
    /// recipe's 0.1).
    #[arg(long)]
    max_lr: Option<f64>,
    /// Seeds the initial weights, the shuffling, the augmentation and the dropout masks (the same
    /// seed gives the same run, bit for bit, on one backend).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Train once per seed, each run in its own folder (seed-N) of the run folder, then print per
    /// seed the final and best test accuracy and the time, and their mean, standard deviation, min
    /// and max (also written to seeds.json): a range (1-5), a list (1,4,9) or both (1-3,7).
    #[arg(long, value_name = "LIST", conflicts_with_all = ["seed", "resume", "save_augmented"])]
    seeds: Option<String>,
    /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Train on the first N training images only (default: all of them).
    #[arg(long, value_name = "N")]
    train_images: Option<usize>,
    /// Evaluate after each epoch on the first N test images only (default: all of them).
    #[arg(long, value_name = "N")]
    test_images: Option<usize>,
    /// The run's folder (metrics.jsonl, last.safetensors, best.safetensors); default runs/<UTC time>/,
    /// or the checkpoint's folder with --resume.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a run exactly where its checkpoint stopped (same flags as the run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Write a PNG grid of N augmented training images into the run's folder, and exit.
    #[arg(long, value_name = "N")]
    save_augmented: Option<usize>,
    /// The crop's largest shift, in pixels each way, 0 to 4 (default: the model file's [train]
    /// translate, else the recipe's 4).
    #[arg(long, value_name = "PIXELS")]
    translate: Option<usize>,
    /// Brightness and contrast factors drawn from [1 - J, 1 + J] (default: the model file's [train]
    /// jitter, else the recipe's 0.4).
    #[arg(long, value_name = "J")]
    jitter: Option<f32>,
    /// The largest rotation, in degrees either way (default: the model file's [train] rotate, else the
    /// recipe's 15).
    #[arg(long, value_name = "DEGREES")]
    rotate: Option<f32>,
    /// The probability of an 8x8 cutout (default: the model file's [train] cutout, else the recipe's 0.3).
    #[arg(long, value_name = "P")]
    cutout: Option<f64>,
    /// Batch-level augmentation: grey dilation inside a random 7x7 patch (off in the recipe; on also
    /// where the model file's [train] table says so, as for --darken and --squeeze).
    #[arg(long)]
    swell: bool,
    /// Batch-level augmentation: darken 15% of the bright pixels (off in the recipe).
    #[arg(long)]
    darken: bool,
    /// Batch-level augmentation: max-pool a random 6x6 patch along one axis (off in the recipe).
    #[arg(long)]
    squeeze: bool,
    /// Threads that augment training batches (default: one per core); the batches are the same
    /// for any count.
    #[arg(long, value_name = "N")]
    loader_threads: Option<usize>,
    /// Training steps handed to the backend at once, 1 to 50 (one submission on the GPU; default: as
    /// many as take about a quarter of a second, up to 50). Results do not depend on it.
    #[arg(long, value_name = "N")]
    steps_per_submit: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Train the recipe (docs/recipe.md) and evaluate after every epoch.
    Train(TrainArgs),
    /// Test loss, accuracy and confusion matrix of a checkpoint.
    Eval {
        /// A checkpoint (.safetensors) that `train` wrote; its optimizer file is not needed.
        checkpoint: PathBuf,
        /// The network, when the checkpoint does not say (one saved elsewhere): a model file or a
        /// preset. A checkpoint of this program holds its network, and a different one is refused.
        #[arg(long, value_name = "FILE|PRESET")]
        model: Option<String>,
        /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Evaluate on the first N test images only (default: all of them).
        #[arg(long, value_name = "N")]
        test_images: Option<usize>,
        /// Test images per evaluation batch (the result does not depend on it).
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// Also write every test image's logits (images x classes, float32) to FILE as safetensors,
        /// under the key `logits` (what scripts/check_onnx.py compares an exported model with).
        #[arg(long, value_name = "FILE")]
        logits: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Draw a run folder's pictures (curves.png, confusion.png, misclassified.png) and its page
    /// (report.html), from its metrics and its last checkpoint; `train` does this when it ends.
    Report {
        /// The run folder (with metrics.jsonl and last.safetensors).
        run_dir: PathBuf,
        /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Write a checkpoint's network in evaluation mode as an ONNX model (opset 13).
    Export {
        /// A checkpoint (.safetensors) that `train` wrote; its optimizer file is not needed.
        checkpoint: PathBuf,
        /// The ONNX file to write.
        #[arg(long, value_name = "FILE")]
        onnx: PathBuf,
        /// The network, when the checkpoint does not say (one saved elsewhere): a model file or a
        /// preset. A checkpoint of this program holds its network, and a different one is refused.
        #[arg(long, value_name = "FILE|PRESET")]
        model: Option<String>,
    },
    /// Classify your own digit images (PNG or JPEG; any size, colour or grey) with a checkpoint: the top
    /// three classes and their probabilities per image, after MNIST-style preprocessing.
    Predict {
        /// A checkpoint (.safetensors) that `train` wrote; its optimizer file is not needed.
        checkpoint: PathBuf,
        /// The images: a digit each, dark on light or light on dark.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Also write the 28x28 image the network saw for each input into this folder, as NAME.png.
        #[arg(long, value_name = "DIR")]
        save_preprocessed: Option<PathBuf>,
        /// The network, when the checkpoint does not say (one saved elsewhere): a model file or a
        /// preset. A checkpoint of this program holds its network, and a different one is refused.
        #[arg(long, value_name = "FILE|PRESET")]
        model: Option<String>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Measure training, augmentation and evaluation throughput (images/s, medians).
    Bench(bench::BenchArgs),
    /// Time every kernel of a GPU training step (GPU timestamp queries).
    Profile(bench::ProfileArgs),
    /// Check every GPU kernel at every layer shape, and whole training steps, against the CPU reference.
    Verify(verify::VerifyArgs),
    /// The summary table of a dist/run.sh output folder (run.sh prints it last).
    #[command(hide = true)]
    BundleSummary {
        /// The folder dist/run.sh wrote into.
        dir: PathBuf,
        /// The runner's step log: one line per step, tab-separated: name, exit status, seconds, limit.
        #[arg(long)]
        steps: Option<PathBuf>,
        /// The profile (JSON) of an older build, run beside this one on the same card.
        #[arg(long, requires = "baseline_rev")]
        baseline_profile: Option<PathBuf>,
        /// That build's revision, as the summary names it.
        #[arg(long, requires = "baseline_profile")]
        baseline_rev: Option<String>,
    },
    /// Print the network: one row per layer with its output shape and parameter count.
    Summary {
        /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k).
        #[arg(long, value_name = "FILE|PRESET")]
        model: Option<String>,
    },
    /// List every GPU adapter wgpu finds (index, name, backend, device type).
    Adapters,
    /// Load and check a data folder, and print what it holds.
    Data {
        /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn main() {
    // Die quietly on a closed pipe (`mnist-wgpu eval ... | head`), as command-line tools do, instead of
    // panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default action of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(unix)]
    set_runtime_dir();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Negative numbers are values (`--max-lr -1` gets the flag's own message), not unknown flags.
    let command = Cli::command().mut_subcommands(|sub| sub.allow_negative_numbers(true));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    if let Err(e) = run(cli.command) {
        if e.is::<Interrupted>() {
            // As a shell reports a process stopped by Ctrl-C; what was saved is already said.
            std::process::exit(130);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Mesa's Vulkan and GL drivers print "XDG_RUNTIME_DIR is invalid or not set" when a plain machine (a
/// container, a CI runner, ssh without a login session) has none. Give them a private one, as a login
/// session would (owned by the user, mode 0700), before any thread starts.
#[cfg(unix)]
fn set_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir()) {
        return;
    }
    // SAFETY: getuid has no preconditions.
    let dir = std::env::temp_dir().join(format!("mnist-wgpu-runtime-{}", unsafe { libc::getuid() }));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let private = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o077 == 0);
    if private {
        // The program is still single-threaded here: nothing reads the environment concurrently.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

/// A training run stopped by Ctrl-C after saving: the program exits with status 130.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn load_data(dir: Option<PathBuf>) -> Result<data::Mnist> {
    Ok(data::load_dir(&dir.unwrap_or_else(data::default_dir))?)
}

/// The first `train` training and `test` test images of `set` (`--train-images`, `--test-images`).
fn first_images(mut set: data::Mnist, train: Option<usize>, test: Option<usize>) -> Result<data::Mnist> {
    for (n, split, flag) in [(train, &mut set.train, "--train-images"), (test, &mut set.test, "--test-images")] {
        match n {
            Some(0) => bail!("{flag} must be at least 1"),
            Some(n) => *split = split.first(n),
            None => {}
        }
    }
    Ok(set)
}

/// Builds the backend the flags ask for, holding `state`. `auto` takes a hardware GPU, or the adapter
/// `--adapter` names; otherwise it falls back to the CPU and says why in one line.
pub fn make_backend(device: &DeviceArgs, model: &Model, state: Vec<f32>) -> Result<Box<dyn Backend>> {
    let gpu = |ctx: GpuContext| -> Result<Box<dyn Backend>> { Ok(Box::new(GpuBackend::new(ctx, model, &state)?)) };
    match device.backend {
        BackendChoice::Cpu => Ok(Box::new(CpuBackend::new(model, state.clone()))),
        BackendChoice::Gpu => gpu(GpuContext::new(device.adapter.as_deref())?),
        BackendChoice::Auto => match GpuContext::new(device.adapter.as_deref()) {
            // An adapter named with --adapter is used whatever it is.
            Ok(ctx) if !ctx.is_software() || device.adapter.is_some() => gpu(ctx),
            Ok(ctx) => {
                println!(
                    "Using the CPU backend: the only GPU adapter, {}, is a software renderer, slower than the \
                     CPU backend. Training on a GPU needs its Vulkan, Metal or DX12 driver installed; \
                     --backend gpu uses the software adapter anyway.",
                    ctx.info.name
                );
                Ok(Box::new(CpuBackend::new(model, state.clone())))
            }
            Err(e) if device.adapter.is_some() => Err(e),
            Err(_) => {
                println!(
                    "Using the CPU backend: no GPU adapter found. Training on a GPU needs its Vulkan, Metal or \
                     DX12 driver installed (on Linux without a GPU, mesa-vulkan-drivers gives a software one, \
                     for tests); then pass --backend gpu."
                );
                Ok(Box::new(CpuBackend::new(model, state.clone())))
            }
        },
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Summary { model } => {
            let model = mnist_wgpu::model::file::for_mnist(model.as_deref())?;
            let plan = mnist_wgpu::model::plan::Plan::new(&model);
            print!("{}\n{}", model.summary(), plan.describe(&model));
        }
        Command::Adapters => {
            let adapters = mnist_wgpu::gpu::list_adapters();
            if adapters.is_empty() {
                bail!(INSTALL_HINT);
            }
            println!("{:<6}{:<40}{:<9}{:<15}driver", "index", "name", "backend", "type");
            for a in adapters {
                println!("{:<6}{:<40}{:<9}{:<15}{}", a.index, a.name, a.backend, a.device_type, a.driver);
            }
        }
        Command::Data { data } => {
            let dir = data.unwrap_or_else(data::default_dir);
            let set = data::load_dir(&dir)?;
            println!("{}", dir.display());
            for (name, split) in [("train", &set.train), ("test", &set.test)] {
                let mut counts = [0usize; data::NUM_CLASSES];
                split.labels.iter().for_each(|&l| counts[l as usize] += 1);
                let mean = split.images.iter().map(|&p| p as f64).sum::<f64>() / split.images.len() as f64 / 255.0;
                println!(
                    "{name:<5} {:>6} images of {IMAGE_SIDE}x{IMAGE_SIDE}, mean pixel {mean:.4}, per class {counts:?}",
                    split.len()
                );
            }
        }
        Command::Train(args) => train_command(args)?,
        Command::Report { run_dir, data, device } => {
            // The final weights; a folder that kept only its best epoch's (as docs/results does) those.
            let checkpoint = ["last.safetensors", "best.safetensors"]
                .iter()
                .map(|name| run_dir.join(name))
                .find(|p| p.exists())
                .with_context(|| format!("{}: no last.safetensors or best.safetensors", run_dir.display()))?;
            let model = checkpoint_model(&checkpoint, None)?;
            let ck = mnist_wgpu::checkpoint::load_weights(&checkpoint, &model)?;
            // Read before the evaluation, so that a folder without metrics fails at once.
            mnist_wgpu::report::read_metrics(&run_dir)?;
            let set = load_data(data)?;
            let mut backend = make_backend(&device, &model, ck.state)?;
            write_report(&run_dir, &checkpoint, backend.as_mut(), &model, &set)?;
        }
        Command::Export { checkpoint, onnx, model } => {
            let model = checkpoint_model(&checkpoint, model.as_deref())?;
            let ck = mnist_wgpu::checkpoint::load_weights(&checkpoint, &model)?;
            let bytes = mnist_wgpu::onnx::export(&model, &ck.state);
            std::fs::write(&onnx, &bytes).with_context(|| format!("--onnx: writing {}", onnx.display()))?;
            println!(
                "Wrote {} ({} bytes, ONNX opset {}): input `input` N x 1 x {IMAGE_SIDE} x {IMAGE_SIDE}, \
                 output `logits` N x {}",
                onnx.display(),
                bytes.len(),
                mnist_wgpu::onnx::OPSET,
                model.output_classes()
            );
        }
        Command::Eval { checkpoint, model, data, test_images, batch_size, logits, device } => {
            if batch_size == 0 {
                bail!("--batch-size must be at least 1");
            }
            let model = checkpoint_model(&checkpoint, model.as_deref())?;
            let ck = mnist_wgpu::checkpoint::load_weights(&checkpoint, &model)?;
            let set = first_images(load_data(data)?, None, test_images)?;
            let mut backend = make_backend(&device, &model, ck.state)?;
            pollster::block_on(backend.check_batch(batch_size))?;
            println!("{} on {}", checkpoint.display(), backend.describe());
            let (counts, sums, all_logits) = confusion_matrix(backend.as_mut(), &set.test, batch_size)?;
            if let Some(path) = &logits {
                let bytes: Vec<u8> = all_logits.iter().flat_map(|v| v.to_le_bytes()).collect();
                let shape = vec![set.test.len(), model.output_classes()];
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
                safetensors::serialize_to_file([("logits", view)], None, path)
                    .with_context(|| format!("--logits: writing {}", path.display()))?;
            }
            println!(
                "Test set: Average loss: {:.4}, Accuracy: {}/{} ({:.2}%)",
                sums.loss_sum / set.test.len() as f64,
                sums.correct,
                set.test.len(),
                100.0 * sums.correct as f64 / set.test.len() as f64
            );
            print!("{}", format_confusion(&counts));
        }
        Command::Predict { checkpoint, images, save_preprocessed, model, device } => {
            predict(&checkpoint, &images, save_preprocessed.as_deref(), model.as_deref(), &device)?
        }
        Command::Bench(args) => bench::run(args)?,
        Command::Profile(args) => bench::profile(args)?,
        Command::Verify(args) => verify::run(args)?,
        Command::BundleSummary { dir, steps, baseline_profile, baseline_rev } => {
            let baseline = baseline_profile.as_deref().zip(baseline_rev.as_deref());
            print!("{}", mnist_wgpu::bundle_summary::render(&dir, steps.as_deref(), baseline))
        }
    }
    Ok(())
}

/// `predict`: each readable image preprocessed as MNIST's were and classified in one batch; an image
/// that cannot be read or holds no digit is named with the reason, and the others are still predicted.
fn predict(
    checkpoint: &Path,
    images: &[PathBuf],
    save_to: Option<&Path>,
    model: Option<&str>,
    device: &DeviceArgs,
) -> Result<()> {
    let model = checkpoint_model(checkpoint, model)?;
    let ck = mnist_wgpu::checkpoint::load_weights(checkpoint, &model)?;
    if let Some(dir) = save_to {
        std::fs::create_dir_all(dir).with_context(|| format!("--save-preprocessed: creating {}", dir.display()))?;
    }
    let mut ready: Vec<(&PathBuf, Vec<u8>)> = Vec::new();
    let mut failed = 0;
    for path in images {
        let prepared = data::preprocess::read_file(path)
            .and_then(|bytes| data::preprocess::decode(&bytes))
            .and_then(|img| data::preprocess::preprocess(&img));
        match prepared {
            Ok(pixels) => ready.push((path, pixels)),
            Err(why) => {
                eprintln!("error: {}: {why}", path.display());
                failed += 1;
            }
        }
    }
    if let Some(dir) = save_to {
        for (path, pixels) in &ready {
            let stem = path.file_stem().map_or("image".into(), |s| s.to_string_lossy());
            let out = dir.join(format!("{stem}.png"));
            image::GrayImage::from_raw(IMAGE_SIDE as u32, IMAGE_SIDE as u32, pixels.clone())
                .expect("28 x 28 pixels")
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    if !ready.is_empty() {
        let mut input = vec![0.0f32; ready.len() * IMAGE_PIXELS];
        for (i, (_, pixels)) in ready.iter().enumerate() {
            data::normalize_into(pixels, &mut input[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]);
        }
        let mut backend = make_backend(device, &model, ck.state)?;
        pollster::block_on(backend.check_batch(ready.len()))?;
        let logits = pollster::block_on(backend.eval_logits(&input, &vec![0u8; ready.len()]))?;
        let classes = model.output_classes();
        for ((path, _), row) in ready.iter().zip(logits.chunks(classes)) {
            let p = mnist_wgpu::cpu::loss::softmax(row);
            let mut ranked: Vec<usize> = (0..classes).collect();
            ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let best: Vec<String> = ranked.iter().take(3).map(|&c| format!("{c} ({:.1}%)", 100.0 * p[c])).collect();
            println!("{}: {}", path.display(), best.join(", "));
        }
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be predicted (named above)", images.len());
    }
    Ok(())
}

/// Draws the pictures and the page of run folder `dir`, the test set evaluated by `backend`, which holds
/// the weights of `checkpoint`.
fn write_report(
    dir: &Path,
    checkpoint: &Path,
    backend: &mut dyn Backend,
    model: &Model,
    set: &data::Mnist,
) -> Result<()> {
    let epochs = mnist_wgpu::report::read_metrics(dir)?;
    let (_, _, logits) = confusion_matrix(backend, &set.test, 100)?;
    let test = mnist_wgpu::report::Predictions { split: &set.test, logits: &logits, classes: model.output_classes() };
    let mut info = mnist_wgpu::report::RunInfo::read(dir);
    info.weights = checkpoint.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let written = mnist_wgpu::report::write(dir, &epochs, &test, &info)?;
    let names: Vec<String> =
        written.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    println!("Wrote {} in {}", names.join(", "), dir.display());
    Ok(())
}

/// The network of checkpoint `path`: the model file it holds (Net3 for one without), refusing a
/// different `--model`; for a checkpoint without one, `--model` says.
fn checkpoint_model(path: &Path, arg: Option<&str>) -> Result<Model> {
    let stored = mnist_wgpu::checkpoint::stored_model(path)?;
    let Some(text) = stored else {
        return mnist_wgpu::model::file::for_mnist(arg);
    };
    let input = mnist_wgpu::model::Shape { c: 1, h: IMAGE_SIDE, w: IMAGE_SIDE };
    let origin = format!("{} (its model)", path.display());
    let model = mnist_wgpu::model::file::parse(&text, &origin, input, data::NUM_CLASSES)?;
    if let Some(arg) = arg {
        let asked = mnist_wgpu::model::file::for_mnist(Some(arg))?;
        if asked.layers != model.layers {
            bail!(
                "{} holds another network ({} parameters) than --model {arg} ({} parameters); leave --model out to \
                 use the checkpoint's",
                path.display(),
                model.num_trainable,
                asked.num_trainable
            );
        }
    }
    Ok(model)
}

fn train_command(args: TrainArgs) -> Result<()> {
    check_train_flags(&args)?;
    let seeds = args.seeds.as_deref().map(mnist_wgpu::train::seeds::parse_seeds).transpose()?;
    let model = match &args.resume {
        Some(resume) => checkpoint_model(resume, args.model.as_deref())?,
        None => mnist_wgpu::model::file::for_mnist(args.model.as_deref())?,
    };
    let set = first_images(load_data(args.data.clone())?, args.train_images, args.test_images)?;
    let recipe = train_recipe(&args, &model)?;
    if recipe.batch_size > set.train.len() {
        bail!(
            "--batch-size {} (or the model file's [train] batch_size) is larger than the {} training images",
            recipe.batch_size,
            set.train.len()
        );
    }
    if let Some(resume) = &args.resume {
        // Everything resuming needs, checked before a folder is created or a device opened.
        train::resume_point(resume, &model, &recipe)?;
    }
    let out_dir = run_folder(&args)?;
    if let Some(n) = args.save_augmented {
        let path = out_dir.join("augmented.png");
        save_augmented(&set.train, &recipe, n, &path)?;
        println!("Wrote {n} augmented training images to {}", path.display());
        return Ok(());
    }
    let name = args.model.as_deref().unwrap_or(if args.resume.is_some() { "the checkpoint's network" } else { "net3" });
    let opts = TrainOptions {
        recipe,
        out_dir: out_dir.clone(),
        resume: args.resume.clone(),
        progress: true,
        stop: ctrl_c_flag()?,
        chunk_batches: args.steps_per_submit,
        loader_threads: args.loader_threads.unwrap_or_else(data::loader::default_threads),
    };
    let run = TrainRun { name, device: &args.device, model: &model, set: &set };
    match seeds {
        None => run.one(&opts),
        Some(seeds) => run.per_seed(&seeds, &opts),
    }
}

/// The training flags' values that no run could use.
fn check_train_flags(args: &TrainArgs) -> Result<()> {
    if args.epochs == Some(0) || args.batch_size == Some(0) {
        bail!("--epochs and --batch-size must be at least 1");
    }
    if args.max_lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
        bail!("--max-lr must be a positive number");
    }
    if args.save_augmented == Some(0) {
        bail!("--save-augmented must be at least 1 (the number of images in the grid)");
    }
    if args.loader_threads.is_some_and(|n| n == 0 || n > 1024) {
        bail!("--loader-threads must be 1 to 1024");
    }
    if args.steps_per_submit.is_some_and(|n| n == 0 || n > mnist_wgpu::backend::MAX_CHUNK_BATCHES) {
        bail!("--steps-per-submit must be 1 to {}", mnist_wgpu::backend::MAX_CHUNK_BATCHES);
    }
    Ok(())
}

/// The recipe a run follows: a flag, else the model file's [train] table, else the spec's.
fn train_recipe(args: &TrainArgs, model: &Model) -> Result<Recipe> {
    let (spec, file) = (Recipe::default(), model.train);
    let recipe = Recipe {
        epochs: args.epochs.or(file.epochs).unwrap_or(spec.epochs),
        batch_size: args.batch_size.or(file.batch_size).unwrap_or(spec.batch_size),
        max_lr: args.max_lr.or(file.max_lr).unwrap_or(spec.max_lr),
        seed: args.seed,
        augment: Augment {
            translate: args.translate.or(file.translate).unwrap_or(spec.augment.translate),
            jitter: args.jitter.or(file.jitter).unwrap_or(spec.augment.jitter),
            rotate: args.rotate.or(file.rotate).unwrap_or(spec.augment.rotate),
            cutout: args.cutout.or(file.cutout).unwrap_or(spec.augment.cutout),
        },
        batch_augment: BatchAugment {
            swell: args.swell || file.swell,
            darken: args.darken || file.darken,
            squeeze: args.squeeze || file.squeeze,
        },
        ..spec
    };
    if let Some(fault) = recipe.augment.fault() {
        bail!("augmentation (--translate, --jitter, --rotate, --cutout or the model file's [train]): {fault}");
    }
    Ok(recipe)
}

/// The run's folder: --out, else the resumed checkpoint's, else a new timestamped one; a new run
/// refuses a folder that holds one already.
fn run_folder(args: &TrainArgs) -> Result<PathBuf> {
    let out_dir = match (&args.out, &args.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(resume)) => resume.parent().map(Path::to_path_buf).unwrap_or_default(),
        (None, None) => train::timestamped_dir(Path::new("runs")),
    };
    if args.resume.is_none() && out_dir.join("last.safetensors").exists() {
        bail!(
            "{} already holds a training run; continue it with --resume {}, or choose another --out",
            out_dir.display(),
            out_dir.join("last.safetensors").display()
        );
    }
    Ok(out_dir)
}

/// Installs the Ctrl-C handler: the first sets the returned flag (the run saves and stops), a second
/// exits at once.
fn ctrl_c_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nSecond Ctrl-C: exiting without saving.");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing the steps already handed over, then saving (Ctrl-C again to quit at once).");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// What every run of one `train` command shares.
struct TrainRun<'a> {
    name: &'a str,
    device: &'a DeviceArgs,
    model: &'a Model,
    set: &'a data::Mnist,
}

impl TrainRun<'_> {
    /// One run in `opts.out_dir`, from `opts.recipe.seed`'s initial weights, then its report.
    fn train(&self, opts: &TrainOptions) -> Result<(train::Outcome, Box<dyn Backend>)> {
        let (model, recipe) = (self.model, &opts.recipe);
        let mut backend = make_backend(self.device, model, model.init_state(recipe.seed))?;
        pollster::block_on(backend.check_batch(recipe.batch_size))?;
        describe_run(self.name, model, backend.as_ref(), self.set, &opts.out_dir, recipe);
        record_run(&opts.out_dir, self.name, backend.as_ref(), recipe)?;
        let outcome = train::train(backend.as_mut(), model, self.set, opts)?;
        Ok((outcome, backend))
    }

    fn one(&self, opts: &TrainOptions) -> Result<()> {
        let (outcome, mut backend) = self.train(opts)?;
        if outcome.interrupted {
            return Err(Interrupted.into());
        }
        write_report(&opts.out_dir, &opts.out_dir.join("last.safetensors"), backend.as_mut(), self.model, self.set)
    }

    /// One run per seed, each in its own folder (every folder checked before the first run starts),
    /// then the table of their accuracies, also written to seeds.json.
    fn per_seed(&self, seeds: &[u64], opts: &TrainOptions) -> Result<()> {
        let folder = |seed: u64| opts.out_dir.join(format!("seed-{seed}"));
        if let Some(taken) = seeds.iter().map(|&s| folder(s)).find(|f| f.join("last.safetensors").exists()) {
            bail!("{} already holds a training run; choose another --out", taken.display());
        }
        let mut runs = Vec::new();
        let mut interrupted = false;
        for &seed in seeds {
            let opts = TrainOptions { recipe: Recipe { seed, ..opts.recipe }, out_dir: folder(seed), ..opts.clone() };
            println!("\nSeed {seed} ({} of {}):", runs.len() + 1, seeds.len());
            let started = std::time::Instant::now();
            let (outcome, mut backend) = self.train(&opts)?;
            if outcome.interrupted {
                println!("Interrupted: the table below has the {} seeds that finished.", runs.len());
                interrupted = true;
                break;
            }
            write_report(
                &opts.out_dir,
                &opts.out_dir.join("last.safetensors"),
                backend.as_mut(),
                self.model,
                self.set,
            )?;
            let (Some(last), Some(best)) = (outcome.epochs.last(), outcome.best_accuracy) else { break };
            runs.push(mnist_wgpu::train::seeds::SeedRun {
                seed,
                final_accuracy: last.test_accuracy,
                best_accuracy: best,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        write_seeds(&opts.out_dir, &runs)?;
        if interrupted {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}

/// The per-seed table, printed and written to seeds.json beside the command line.
fn write_seeds(out_dir: &Path, runs: &[mnist_wgpu::train::seeds::SeedRun]) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let json = mnist_wgpu::train::seeds::to_json(runs, &command);
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join("seeds.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\n{}", mnist_wgpu::train::seeds::table(runs));
    println!("Wrote {}", path.display());
    Ok(())
}

/// Writes `run.json` (the command, backend, network and recipe, for the report) into a new run's folder;
/// a resumed run keeps the one it has.
fn record_run(dir: &Path, network: &str, backend: &dyn Backend, recipe: &Recipe) -> Result<()> {
    if dir.join("run.json").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let info = mnist_wgpu::report::RunInfo {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        backend: backend.describe(),
        network: network.to_string(),
        recipe: recipe.to_json(),
        weights: String::new(),
    };
    info.write(dir)
}

/// The lines that start a training run: what trains where, on what, how (flags, else the model file's
/// [train] table, else the recipe) and into which folder.
fn describe_run(name: &str, model: &Model, backend: &dyn Backend, set: &data::Mnist, out: &Path, r: &Recipe) {
    println!(
        "Training {name} ({} parameters) on {}, {} training / {} test images",
        model.num_trainable,
        backend.describe(),
        set.train.len(),
        set.test.len()
    );
    let b = r.batch_augment;
    let extra: Vec<&str> = [("swell", b.swell), ("darken", b.darken), ("squeeze", b.squeeze)]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
    let extra = if extra.is_empty() { String::new() } else { format!(", batch augmentation: {}", extra.join(", ")) };
    let a = r.augment;
    println!(
        "Recipe: {} epochs, batch {}, max lr {}; augmentation: shift {} px, jitter {}, rotation {} degrees, \
         cutout {}{extra}",
        r.epochs, r.batch_size, r.max_lr, a.translate, a.jitter, a.rotate, a.cutout
    );
    println!("Run folder: {}", out.display());
}

/// A grid of `n` augmented training images (epoch 0's first batches), 2 pixels apart, as PNG.
fn save_augmented(split: &data::Split, recipe: &Recipe, n: usize, path: &Path) -> Result<()> {
    let cfg = LoaderConfig {
        seed: recipe.seed,
        batch_size: recipe.batch_size,
        augment: Some(recipe.augment),
        batch_augment: recipe.batch_augment,
    };
    let order = epoch_order(recipe.seed, 0, split.len());
    let mut images = Vec::new();
    let mut index = 0;
    while images.len() < n * IMAGE_PIXELS && index * recipe.batch_size < split.len() {
        images.extend(train_batch(split, &order, &cfg, 0, index).input);
        index += 1;
    }
    let n = n.min(images.len() / IMAGE_PIXELS);
    let cols = (n as f64).sqrt().ceil().max(1.0) as usize;
    let rows = n.div_ceil(cols);
    let cell = IMAGE_SIDE + 2;
    let mut grid = image::GrayImage::new((cols * cell) as u32, (rows * cell) as u32);
    for (k, img) in images.chunks_exact(IMAGE_PIXELS).take(n).enumerate() {
        let (gx, gy) = ((k % cols) * cell + 1, (k / cols) * cell + 1);
        for (i, &v) in img.iter().enumerate() {
            // Undo the normalization for display.
            let p = ((v * data::STD + data::MEAN) * 255.0).round().clamp(0.0, 255.0) as u8;
            grid.put_pixel((gx + i % IMAGE_SIDE) as u32, (gy + i / IMAGE_SIDE) as u32, image::Luma([p]));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    grid.save(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Counts of (true digit, predicted digit) over a split, and the backend's loss and correct sums.
fn confusion_matrix(
    backend: &mut dyn Backend,
    split: &data::Split,
    batch_size: usize,
) -> Result<([[u32; 10]; 10], Sums, Vec<f32>)> {
    let mut counts = [[0u32; 10]; 10];
    let mut all = Vec::with_capacity(split.len() * 10);
    pollster::block_on(backend.reset_sums())?;
    for b in data::loader::eval_batches(split, batch_size) {
        let logits = pollster::block_on(backend.eval_logits(&b.input, &b.labels))?;
        all.extend_from_slice(&logits);
        for (row, &label) in logits.chunks_exact(10).zip(&b.labels) {
            // The first maximum on ties, as the loss kernels count correct predictions.
            let pred = mnist_wgpu::cpu::loss::argmax(row);
            counts[label as usize][pred] += 1;
        }
    }
    let sums = pollster::block_on(backend.eval_sums())?;
    let diagonal: u64 = (0..10).map(|i| counts[i][i] as u64).sum();
    if diagonal != sums.correct {
        bail!("internal error: the confusion matrix counts {diagonal} correct, the backend {}", sums.correct);
    }
    Ok((counts, sums, all))
}

/// Rows: true digit; columns: predicted.
fn format_confusion(counts: &[[u32; 10]; 10]) -> String {
    let mut out = String::from("Confusion matrix (rows: true digit, columns: predicted)\n      ");
    for j in 0..10 {
        out += &format!("{j:>6}");
    }
    out += "\n";
    for (i, row) in counts.iter().enumerate() {
        out += &format!("{i:>6}");
        for c in row {
            out += &format!("{c:>6}");
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_and_argument_has_a_help_line() {
        let mut missing = Vec::new();
        let root = Cli::command();
        for sub in root.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| !["help", "version"].contains(&a.get_id().as_str())) {
                if arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }
}
