use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Cli::parse().command {
        Command::Summary => print!("{}", Model::net3().summary()),
    }
    Ok(())
}
