//! The command line: `mnist-wgpu COMMAND`, each command in its own file of `commands/`. This file
//! parses the arguments and dispatches.

use std::path::Path;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod commands;

use commands::*;

/// Train the recipe's 17,900-parameter CNN on MNIST with WGSL compute shaders.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train the recipe (docs/recipe.md) and evaluate after every epoch.
    Train(train::TrainArgs),
    /// Test loss, accuracy and confusion matrix of a checkpoint.
    Eval(eval::EvalArgs),
    /// Draw a run folder's pictures (curves.png, confusion.png, misclassified.png) and its page
    /// (report.html), from its metrics and its last checkpoint; `train` does this when it ends.
    Report(report::ReportArgs),
    /// Write a checkpoint's network in evaluation mode as an ONNX model (opset 13).
    Export(export::ExportArgs),
    /// Classify your own digit images (PNG or JPEG; any size, colour or grey) with a checkpoint: the top
    /// three classes and their probabilities per image, after MNIST-style preprocessing.
    Predict(predict::PredictArgs),
    /// Measure training, augmentation and evaluation throughput (images/s, medians).
    Bench(bench::BenchArgs),
    /// Time every kernel of a GPU training step (GPU timestamp queries), or every pass of a CPU step.
    Profile(profile::ProfileArgs),
    /// Check every GPU kernel at every layer shape, and whole training steps, against the CPU reference.
    Verify(verify::VerifyArgs),
    /// The summary table of a dist/run.sh output folder (run.sh prints it last).
    #[command(hide = true)]
    BundleSummary(bundle_summary::BundleSummaryArgs),
    /// Print the network: one row per layer with its output shape and parameter count.
    Summary(summary::SummaryArgs),
    /// List every GPU adapter wgpu finds (index, name, backend, device type).
    Adapters,
    /// Load and check a data folder, and print what it holds.
    Data(data_info::DataArgs),
    /// Time to accuracy: train the preset made for a target accuracy, once per seed, and time it.
    Speedrun(speedrun::SpeedrunArgs),
}

fn main() {
    // Die quietly on a closed pipe (`mnist-wgpu eval ... | head`), as command-line tools do, instead of
    // panicking in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default action of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(unix)]
    set_runtime_dir();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Negative numbers are values (`--max-lr -1` gets the flag's own message), not unknown flags.
    let command = Cli::command().mut_subcommands(|sub| sub.allow_negative_numbers(true));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    if let Err(e) = run(cli.command) {
        if e.is::<Interrupted>() {
            // As a shell reports a process stopped by Ctrl-C; what was saved is already said.
            std::process::exit(130);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Report(args) => report::run(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Verify(args) => verify::run(args),
        Command::BundleSummary(args) => bundle_summary::run(args),
        Command::Summary(args) => summary::run(args),
        Command::Adapters => adapters::run(),
        Command::Data(args) => data_info::run(args),
        Command::Speedrun(args) => speedrun::run(args),
    }
}

/// Mesa's Vulkan and GL drivers print "XDG_RUNTIME_DIR is invalid or not set" when a plain machine (a
/// container, a CI runner, ssh without a login session) has none. Give them a private one, as a login
/// session would (owned by the user, mode 0700), before any thread starts.
#[cfg(unix)]
fn set_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir()) {
        return;
    }
    // SAFETY: getuid has no preconditions.
    let dir = std::env::temp_dir().join(format!("mnist-wgpu-runtime-{}", unsafe { libc::getuid() }));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let private = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o077 == 0);
    if private {
        // The program is still single-threaded here: nothing reads the environment concurrently.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_and_argument_has_a_help_line() {
        let mut missing = Vec::new();
        let root = Cli::command();
        for sub in root.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| !["help", "version"].contains(&a.get_id().as_str())) {
                if arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "no help line: {missing:?}");
    }
}
