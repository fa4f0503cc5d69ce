//! `mnist-wgpu summary`: the network layer by layer, its parameter count and its execution plan.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct SummaryArgs {
    /// The network: a model file, or a preset (net3, the default; small8k, small5k, best20k, net3-avgpool2, mlp3, fast-recipe).
    #[arg(long, value_name = "FILE|PRESET")]
    model: Option<String>,
}

pub fn run(args: SummaryArgs) -> Result<()> {
    let SummaryArgs { model } = args;
    let model = mnist_wgpu::model::file::for_mnist(model.as_deref())?;
    let plan = mnist_wgpu::model::plan::Plan::new(&model);
    print!("{}\n{}", model.summary(), plan.describe(&model));
    Ok(())
}
