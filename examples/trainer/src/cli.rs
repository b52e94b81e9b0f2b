//! The `flotilla-trainer` command line, callable from other binaries (the demo runs itself as
//! the control plane's trainer command with `flotilla-demo trainer train ...`).
//!
//!   flotilla-trainer train --base model.onnx --samples samples.json [--data more.json] --out new.onnx
//!   flotilla-trainer eval --model new.onnx --data heldout.json
//!
//! Paths also come from the environment the control plane sets for a trainer command:
//! FLOTILLA_BASE_MODEL, FLOTILLA_SAMPLES, FLOTILLA_TRAINING_DATA, FLOTILLA_OUTPUT; `eval` reads
//! FLOTILLA_MODEL and FLOTILLA_HELDOUT (an evaluator command) and prints `{"accuracy": ...}`.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::{Dataset, TrainOptions, accuracy, read_samples, retrain};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// Retrain a classifier's last layer on labelled device samples, or score a model.
#[derive(Parser, Debug)]
#[command(name = "flotilla-trainer", version, about, long_about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Fine-tune the last layer on labelled samples and write the new model.
    Train {
        /// The model to start from.
        #[arg(long, env = "FLOTILLA_BASE_MODEL")]
        base: PathBuf,
        /// Labelled samples collected from devices (`flotilla drift samples export`).
        #[arg(long, env = "FLOTILLA_SAMPLES")]
        samples: PathBuf,
        /// More labelled data, e.g. the original training set, so the model does not forget it.
        #[arg(long, env = "FLOTILLA_TRAINING_DATA")]
        data: Option<PathBuf>,
        /// The Gemm node to retrain (default `fc`; else the last Gemm).
        #[arg(long, default_value = "fc")]
        layer: String,
        #[arg(long, default_value_t = 300)]
        epochs: usize,
        #[arg(long, default_value_t = 0.01)]
        learning_rate: f32,
        #[arg(long, env = "FLOTILLA_OUTPUT")]
        out: PathBuf,
    },
    /// Print a model's accuracy on labelled data.
    Eval {
        #[arg(long, env = "FLOTILLA_MODEL")]
        model: PathBuf,
        #[arg(long, env = "FLOTILLA_HELDOUT")]
        data: PathBuf,
    },
}

fn load(path: &PathBuf) -> anyhow::Result<Dataset> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    read_samples(&bytes).with_context(|| format!("{}", path.display()))
}

/// Parse `args` (the first is the program name) and run.
pub fn run(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    match Args::parse_from(args).cmd {
        Cmd::Train { base, samples, data, layer, epochs, learning_rate, out } => {
            let model = std::fs::read(&base).with_context(|| format!("reading {}", base.display()))?;
            let mut set = load(&samples)?;
            let from_devices = set.len();
            if let Some(d) = &data {
                set.extend(load(d)?)?;
            }
            let before = accuracy(&model, &set)?;
            let new = retrain(&model, &set, &TrainOptions { layer, epochs, learning_rate })?;
            let after = accuracy(&new, &set)?;
            std::fs::write(&out, &new).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}",
                serde_json::json!({
                    "samples": set.len(), "from_devices": from_devices,
                    "train_accuracy_before": before, "train_accuracy_after": after, "model": out,
                })
            );
        }
        Cmd::Eval { model, data } => {
            let bytes = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let set = load(&data)?;
            println!("{}", serde_json::json!({ "samples": set.len(), "accuracy": accuracy(&bytes, &set)? }));
        }
    }
    Ok(())
}
