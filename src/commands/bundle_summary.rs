//! `mnist-wgpu bundle-summary` (hidden): the table that ends a GPU bundle's run (`dist/run.sh`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BundleSummaryArgs {
    /// The folder dist/run.sh wrote into.
    dir: PathBuf,
    /// The runner's step log: one line per step, tab-separated: name, exit status, seconds, limit.
    #[arg(long)]
    steps: Option<PathBuf>,
    /// The profile (JSON) of an older build, run beside this one on the same card.
    #[arg(long, requires = "baseline_rev")]
    baseline_profile: Option<PathBuf>,
    /// That build's revision, as the summary names it.
    #[arg(long, requires = "baseline_profile")]
    baseline_rev: Option<String>,
}

pub fn run(args: BundleSummaryArgs) -> Result<()> {
    let BundleSummaryArgs { dir, steps, baseline_profile, baseline_rev } = args;
    let baseline = baseline_profile.as_deref().zip(baseline_rev.as_deref());
    print!("{}", mnist_wgpu::bundle_summary::render(&dir, steps.as_deref(), baseline));
    Ok(())
}
