//! `mnist-wgpu data`: a data folder loaded and checked, and what it holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use mnist_wgpu::data::{self, IMAGE_SIDE};

#[derive(Args)]
pub struct DataArgs {
    /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
    #[arg(long)]
    data: Option<PathBuf>,
}

pub fn run(args: DataArgs) -> Result<()> {
    let DataArgs { data } = args;
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
    Ok(())
}
