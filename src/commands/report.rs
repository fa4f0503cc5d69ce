//! `mnist-wgpu report`: a run folder's pictures and page from its metrics and last checkpoint (what
//! `train` draws when it ends).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use mnist_wgpu::backend::Backend;
use mnist_wgpu::data;
use mnist_wgpu::model::Model;

use super::eval::confusion_matrix;
use super::{checkpoint_model, load_data, make_backend, DeviceArgs};

#[derive(Args)]
pub struct ReportArgs {
    /// The run folder (with metrics.jsonl and last.safetensors).
    run_dir: PathBuf,
    /// A folder with the four MNIST-format IDX files (.gz or raw); default: the bundled MNIST.
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `mnist-wgpu report`: the test set evaluated with the folder's final weights, then its pictures and page.
pub fn run(args: ReportArgs) -> Result<()> {
    let ReportArgs { run_dir, data, device } = args;
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
    Ok(())
}

/// Draws the pictures and the page of run folder `dir`, the test set evaluated by `backend`, which holds
/// the weights of `checkpoint`.
pub fn write_report(
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
