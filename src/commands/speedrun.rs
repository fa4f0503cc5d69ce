//! `mnist-wgpu speedrun`: time to accuracy. Trains the preset made for a target accuracy on all the
//! training images, once per seed, each epoch straight after the one before, then evaluates once on
//! the test images; prints per seed the training seconds (first step to the end of the last, the
//! loader's work included, the data already read), the evaluation's and the whole run's seconds and
//! the accuracy; then the mean, min and max accuracy, how many seeds reached the target, and the
//! median training seconds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use pollster::block_on;

use mnist_wgpu::data::loader::default_threads;
use mnist_wgpu::model::Model;
use mnist_wgpu::train::seeds::{parse_seeds, spread};
use mnist_wgpu::train::{timed_run, Recipe, TimedRun};

use super::bench::median;
use super::{load_data, make_backend, DeviceArgs};

/// The presets made for each target (`models/<name>.toml`).
const TARGETS: &[(&str, &str)] = &[("99.0", "speed99"), ("99.4", "speed994")];

/// Images held out of the training set with `--validation` (the last ones).
const VALIDATION_IMAGES: usize = 10_000;

#[derive(Args)]
pub struct SpeedrunArgs {
    /// The test accuracy to reach, in percent: 99.0 (preset speed99) or 99.4 (preset speed994).
    #[arg(long, value_name = "PERCENT")]
    target: String,
    /// One run per seed: a range (1-5), a list (1,4,9) or both (1-3,7).
    #[arg(long, value_name = "LIST", default_value = "1-5")]
    seeds: String,
    /// Another network and recipe than the target's preset: a model file or a preset (its [train]
    /// table is the recipe).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
    /// Hold out the last 10,000 training images and evaluate on them instead of the test set: how the
    /// presets are chosen, never on the test set.
    #[arg(long)]
    validation: bool,
    /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// One seed's run.
struct SeedTime {
    seed: u64,
    run: TimedRun,
    total_seconds: f64,
}

pub fn run(args: SpeedrunArgs) -> Result<()> {
    // 99 and 99.0 name the same target.
    let wanted: Option<f64> = args.target.parse().ok();
    let Some(&(target, preset)) = TARGETS.iter().find(|(t, _)| Some(t.parse::<f64>().expect("a number")) == wanted)
    else {
        bail!("--target {}: the targets are 99.0 and 99.4", args.target)
    };
    let target: f64 = target.parse()?;
    let name = args.model.clone().unwrap_or_else(|| preset.to_string());
    let model = mnist_wgpu::model::file::for_mnist(Some(&name))?;
    let seeds = parse_seeds(&args.seeds)?;
    let set = load_data(args.data.clone())?;
    let (train, eval, evaluated_on) = match args.validation {
        true if set.train.len() <= VALIDATION_IMAGES => {
            bail!("--validation holds out {VALIDATION_IMAGES} training images; the data has only {}", set.train.len())
        }
        true => {
            let kept = set.train.len() - VALIDATION_IMAGES;
            (set.train.first(kept), set.train.skip(kept), "the last 10,000 training images (validation)")
        }
        false => (set.train.clone(), set.test.clone(), "the test images"),
    };
    let base = Recipe::for_model(&model);
    if base.batch_size > train.len() {
        bail!("{name}'s batch size {} is larger than the {} training images", base.batch_size, train.len());
    }
    if !args.json {
        println!(
            "Speedrun to {target:.1}%: {name} ({} parameters), {} training images, evaluated on {evaluated_on}",
            model.num_trainable,
            train.len()
        );
    }
    let mut runs = Vec::new();
    for &seed in &seeds {
        let started = Instant::now();
        let recipe = Recipe { seed, ..base };
        let mut backend = make_backend(&args.device, &model, model.init_state(seed))?;
        block_on(backend.check_batch(recipe.batch_size))?;
        if runs.is_empty() && !args.json {
            println!("Backend: {}\n\n  seed   train s   eval s   total s   accuracy", backend.describe());
        }
        let run = block_on(timed_run(backend.as_mut(), (&train, &eval), &recipe, default_threads()))?;
        let time = SeedTime { seed, run, total_seconds: started.elapsed().as_secs_f64() };
        if !args.json {
            println!(
                "{:>6} {:>9.2} {:>8.2} {:>9.2} {:>9.2}%",
                seed,
                run.train_seconds,
                run.eval_seconds,
                time.total_seconds,
                run.accuracy()
            );
        }
        runs.push(time);
    }
    report(&runs, target, (&name, &model), args.json);
    Ok(())
}

/// The summary after the runs, as lines or JSON.
fn report(runs: &[SeedTime], target: f64, (name, model): (&str, &Model), json: bool) {
    let accuracies: Vec<f64> = runs.iter().map(|r| r.run.accuracy()).collect();
    let s = spread(&accuracies);
    let reached = accuracies.iter().filter(|&&a| a >= target).count();
    let train_median = median(runs.iter().map(|r| r.run.train_seconds).collect()).0;
    if json {
        let runs: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "seed": r.seed,
                    "train_seconds": r.run.train_seconds,
                    "eval_seconds": r.run.eval_seconds,
                    "total_seconds": r.total_seconds,
                    "accuracy": r.run.accuracy(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "target": target,
            "model": name,
            "parameters": model.num_trainable,
            "runs": runs,
            "mean_accuracy": s.mean,
            "min_accuracy": s.min,
            "max_accuracy": s.max,
            "reached": reached,
            "median_train_seconds": train_median,
        });
        println!("{out}");
        return;
    }
    println!(
        "\nAccuracy: mean {:.2}%, min {:.2}%, max {:.2}%; {reached} of {} seeds reached {target:.1}%; median training \
         time {train_median:.2} s",
        s.mean,
        s.min,
        s.max,
        runs.len()
    );
}
