//! `mnist-wgpu eval`: a checkpoint's test loss, accuracy and confusion matrix, and its logits on request.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use mnist_wgpu::backend::{Backend, Sums};
use mnist_wgpu::data;

use super::{checkpoint_model, first_images, load_data, make_backend, DeviceArgs};

#[derive(Args)]
pub struct EvalArgs {
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
}

/// `mnist-wgpu eval`: the test set through the checkpoint's network, its loss, accuracy and confusion
/// matrix printed.
pub fn run(args: EvalArgs) -> Result<()> {
    let EvalArgs { checkpoint, model, data, test_images, batch_size, logits, device } = args;
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
    Ok(())
}

/// Counts of (true digit, predicted digit) over a split, and the backend's loss and correct sums.
pub fn confusion_matrix(
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
            let pred = mnist_wgpu::cpu::reference::loss::argmax(row);
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
