//! `mnist-wgpu predict`: your own digit pictures, prepared as MNIST's were, with their top three classes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use mnist_wgpu::data::{self, IMAGE_PIXELS, IMAGE_SIDE};

use super::{checkpoint_model, make_backend, DeviceArgs};

#[derive(Args)]
pub struct PredictArgs {
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
}

pub fn run(args: PredictArgs) -> Result<()> {
    let PredictArgs { checkpoint, images, save_preprocessed, model, device } = args;
    predict_images(&checkpoint, &images, save_preprocessed.as_deref(), model.as_deref(), &device)
}

/// `predict`: each readable image preprocessed as MNIST's were and classified in one batch; an image
/// that cannot be read or holds no digit is named with the reason, and the others are still predicted.
fn predict_images(
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
            let p = mnist_wgpu::cpu::reference::loss::softmax(row);
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
