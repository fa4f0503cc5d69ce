//! `mnist-wgpu train`: the recipe (or a model file's network and [train] table) trained with the
//! one-cycle schedule, evaluated after every epoch, checkpointed, reported; once or once per seed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use mnist_wgpu::backend::Backend;
use mnist_wgpu::data::augment::{Augment, BatchAugment};
use mnist_wgpu::data::loader::{epoch_order, train_batch, LoaderConfig};
use mnist_wgpu::data::{self, IMAGE_PIXELS, IMAGE_SIDE};
use mnist_wgpu::model::Model;
use mnist_wgpu::optim::{parse_betas, Optimizer, OptimizerKind};
use mnist_wgpu::train::files::{self, TrainOptions};
use mnist_wgpu::train::{self, Recipe};

use super::report::write_report;
use super::{checkpoint_model, first_images, load_data, make_backend, DeviceArgs, Interrupted};

#[derive(Args)]
pub struct TrainArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k, net3-avgpool2, mlp3, fast-recipe). With
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
    /// The optimizer: sgd (with the one-cycle momentum), adam or adamw, as PyTorch's (default: the model
    /// file's [train] optimizer, else sgd).
    #[arg(long, value_name = "NAME", value_parser = OptimizerKind::parse)]
    optimizer: Option<OptimizerKind>,
    /// Adam's and AdamW's betas (default: the model file's [train] betas, else PyTorch's 0.9,0.999).
    #[arg(long, value_name = "B1,B2", value_parser = parse_betas)]
    betas: Option<(f64, f64)>,
    /// Adam's and AdamW's eps, added after the square root (default: the model file's [train] eps,
    /// else PyTorch's 1e-8).
    #[arg(long)]
    eps: Option<f64>,
    /// Weight decay: added to the gradient for sgd and adam, decoupled for adamw (default: the model
    /// file's [train] weight_decay, else the recipe's 1e-5 for sgd and PyTorch's 0 for adam, 0.01 for
    /// adamw).
    #[arg(long)]
    weight_decay: Option<f32>,
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

/// `mnist-wgpu train`: one run, or one per seed.
pub fn run(args: TrainArgs) -> Result<()> {
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
        files::resume_point(resume, &model, &recipe)?;
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
    let base = Recipe::for_model(model);
    let kind = args.optimizer.unwrap_or(base.optimizer.kind);
    let recipe = Recipe {
        epochs: args.epochs.unwrap_or(base.epochs),
        batch_size: args.batch_size.unwrap_or(base.batch_size),
        max_lr: args.max_lr.unwrap_or(base.max_lr),
        optimizer: Optimizer {
            kind,
            betas: args.betas.unwrap_or(base.optimizer.betas),
            eps: args.eps.unwrap_or(base.optimizer.eps),
        },
        // The default follows the optimizer the flags chose, not the one the model file names.
        weight_decay: args.weight_decay.or(model.train.weight_decay).unwrap_or(kind.default_weight_decay()),
        seed: args.seed,
        augment: Augment {
            translate: args.translate.unwrap_or(base.augment.translate),
            jitter: args.jitter.unwrap_or(base.augment.jitter),
            rotate: args.rotate.unwrap_or(base.augment.rotate),
            cutout: args.cutout.unwrap_or(base.augment.cutout),
        },
        batch_augment: BatchAugment {
            swell: args.swell || base.batch_augment.swell,
            darken: args.darken || base.batch_augment.darken,
            squeeze: args.squeeze || base.batch_augment.squeeze,
        },
        ..base
    };
    if let Some(fault) = recipe.augment.fault() {
        bail!("augmentation (--translate, --jitter, --rotate, --cutout or the model file's [train]): {fault}");
    }
    if let Some(fault) = recipe.fault() {
        bail!("--betas, --eps, --weight-decay or the model file's [train]: {fault}");
    }
    Ok(recipe)
}

/// The run's folder: --out, else the resumed checkpoint's, else a new timestamped one; a new run
/// refuses a folder that holds one already.
fn run_folder(args: &TrainArgs) -> Result<PathBuf> {
    let out_dir = match (&args.out, &args.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(resume)) => resume.parent().map(Path::to_path_buf).unwrap_or_default(),
        (None, None) => files::timestamped_dir(Path::new("runs")),
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
        let outcome = files::train(backend.as_mut(), model, self.set, opts)?;
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
    let o = r.optimizer;
    let optimizer = match o.kind {
        OptimizerKind::Sgd => format!("sgd, weight decay {}", r.weight_decay),
        _ => format!(
            "{}, betas ({}, {}), eps {:e}, weight decay {}",
            o.kind.name(),
            o.betas.0,
            o.betas.1,
            o.eps,
            r.weight_decay
        ),
    };
    println!(
        "Recipe: {} epochs, batch {}, max lr {}, {optimizer}; augmentation: shift {} px, jitter {}, rotation {} \
         degrees, cutout {}{extra}",
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
