//! `mnist-wgpu export`: a checkpoint's network in evaluation mode as an ONNX model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use mnist_wgpu::data::IMAGE_SIDE;

use super::checkpoint_model;

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint (.safetensors) that `train` wrote; its optimizer file is not needed.
    checkpoint: PathBuf,
    /// The ONNX file to write.
    #[arg(long, value_name = "FILE")]
    onnx: PathBuf,
    /// The network, when the checkpoint does not say (one saved elsewhere): a model file or a
    /// preset. A checkpoint of this program holds its network, and a different one is refused.
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
}

/// `mnist-wgpu export`: writes the ONNX file and says what it holds.
pub fn run(args: ExportArgs) -> Result<()> {
    let ExportArgs { checkpoint, onnx, model } = args;
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
    Ok(())
}
