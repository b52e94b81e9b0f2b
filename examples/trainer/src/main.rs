//! `flotilla-trainer`: the retraining step Flotilla's control plane runs (or any pipeline can).
//! See [`flotilla_trainer::cli`].

fn main() {
    if let Err(e) = flotilla_trainer::cli::run(std::env::args_os()) {
        eprintln!("flotilla-trainer: {e:#}");
        std::process::exit(1);
    }
}
