use std::path::PathBuf;

use clap::{Parser, Subcommand};

use mnist_wgpu::data;
use mnist_wgpu::model::Model;

/// Train the recipe's 17,900-parameter CNN on MNIST with WGSL compute shaders.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the network: one row per layer with its output shape and parameter count.
    Summary,
    /// List every GPU adapter wgpu finds (index, name, backend, device type); `--adapter` takes the
    /// index or part of the name.
    Adapters,
    /// Load and check a data folder, and print what it holds.
    Data {
        /// A folder with the four standard MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Cli::parse().command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Summary => print!("{}", Model::net3().summary()),
        Command::Adapters => {
            let adapters = mnist_wgpu::gpu::list_adapters();
            if adapters.is_empty() {
                anyhow::bail!(mnist_wgpu::gpu::INSTALL_HINT);
            }
            println!(
                "{:<6}{:<40}{:<9}{:<15}driver",
                "index", "name", "backend", "type"
            );
            for a in adapters {
                println!(
                    "{:<6}{:<40}{:<9}{:<15}{}",
                    a.index, a.name, a.backend, a.device_type, a.driver
                );
            }
        }
        Command::Data { data } => {
            let dir = data.unwrap_or_else(data::default_dir);
            let set = data::load_dir(&dir)?;
            println!("{}", dir.display());
            for (name, split) in [("train", &set.train), ("test", &set.test)] {
                let mut counts = [0usize; data::NUM_CLASSES];
                split.labels.iter().for_each(|&l| counts[l as usize] += 1);
                let mean = split.images.iter().map(|&p| p as f64).sum::<f64>()
                    / split.images.len() as f64
                    / 255.0;
                println!(
                    "{name:<5} {:>6} images of {}x{}, mean pixel {mean:.4}, per class {counts:?}",
                    split.len(),
                    data::IMAGE_SIDE,
                    data::IMAGE_SIDE
                );
            }
        }
    }
    Ok(())
}
