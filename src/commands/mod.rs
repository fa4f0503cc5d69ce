//! The subcommands, one file each (`main.rs` parses the command line and dispatches), and what several
//! of them share: the device flags and the backend they build, the data set, a checkpoint's network.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use mnist_wgpu::backend::Backend;
use mnist_wgpu::cpu::backend::CpuBackend;
use mnist_wgpu::data::{self, IMAGE_SIDE};
use mnist_wgpu::gpu::backend::GpuBackend;
use mnist_wgpu::gpu::GpuContext;
use mnist_wgpu::model::Model;

pub mod adapters;
pub mod bench;
pub mod bundle_summary;
pub mod data_info;
pub mod eval;
pub mod export;
pub mod predict;
pub mod profile;
pub mod report;
pub mod speedrun;
pub mod summary;
pub mod train;
pub mod verify;

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
    pub backend: BackendChoice,
    /// The GPU adapter: an index from `adapters`, or part of its name (default: the best hardware GPU).
    #[arg(long)]
    pub adapter: Option<String>,
}

/// A training run stopped by Ctrl-C after saving: the program exits with status 130.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub fn load_data(dir: Option<PathBuf>) -> Result<data::Mnist> {
    Ok(data::load_dir(&dir.unwrap_or_else(data::default_dir))?)
}

/// The first `train` training and `test` test images of `set` (`--train-images`, `--test-images`).
pub fn first_images(mut set: data::Mnist, train: Option<usize>, test: Option<usize>) -> Result<data::Mnist> {
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
            // Notes on stderr: stdout stays the command's results (JSON, for some).
            Ok(ctx) => {
                eprintln!(
                    "Using the CPU backend: the only GPU adapter, {}, is a software renderer, slower than the \
                     CPU backend. Training on a GPU needs its Vulkan, Metal or DX12 driver installed; \
                     --backend gpu uses the software adapter anyway.",
                    ctx.info.name
                );
                Ok(Box::new(CpuBackend::new(model, state.clone())))
            }
            Err(e) if device.adapter.is_some() => Err(e),
            Err(_) => {
                eprintln!(
                    "Using the CPU backend: no GPU adapter found. Training on a GPU needs its Vulkan, Metal or \
                     DX12 driver installed (on Linux without a GPU, mesa-vulkan-drivers gives a software one, \
                     for tests); then pass --backend gpu."
                );
                Ok(Box::new(CpuBackend::new(model, state.clone())))
            }
        },
    }
}

/// The network of checkpoint `path`: the model file it holds (Net3 for one without), refusing a
/// different `--model`; for a checkpoint without one, `--model` says.
pub fn checkpoint_model(path: &Path, arg: Option<&str>) -> Result<Model> {
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
