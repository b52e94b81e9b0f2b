//! `flotilla`: the fleet CLI.

mod bundle;
mod client;
mod config;
mod fleet;
mod keys;
mod output;
mod progress;
mod retrain;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::output::Output;

const EXAMPLES: &str = "\
A first rollout:
  flotilla keygen --out ops
  flotilla trust init --key ops.key --out root.cbor
  flotilla-server --data-dir ./fleet --trust-root root.cbor &      # writes ./fleet/admin.token
  flotilla context add local --server http://127.0.0.1:8080 --token-file ./fleet/admin.token
  flotilla bundle build --name digits --version 1 --model digits.onnx --out d1.flb
  flotilla bundle sign d1.flb --key ops.key
  flotilla bundle push d1.flb
  flotilla rollout start --bundle digits@1 --waves 1,100% --gate 'install_success>=1'
  flotilla rollout watch r-…";

/// Flotilla fleet CLI: keys and trust roots, signed model bundles, devices, staged rollouts,
/// drift and retraining.
///
/// Offline commands (keygen, trust, bundle build/sign/verify/inspect) need no server. Commands
/// that talk to a control plane find it, and their token, in this order: --server / --token,
/// FLOTILLA_SERVER / FLOTILLA_TOKEN, then the current context of ~/.config/flotilla/config.toml
/// (`flotilla context add NAME --server URL --token-file DATA_DIR/admin.token`).
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Control plane URL, e.g. https://127.0.0.1:8080 (a bare HOST:PORT means https).
    #[arg(long, global = true, env = "FLOTILLA_SERVER")]
    server: Option<String>,
    /// The CA to trust for the server's certificate: the fleet CA (the server's
    /// DATA_DIR/pki/ca.pem, named in its endpoints.json) or an operator's own; `system` for the
    /// system's public CAs. Never the system store unless asked.
    #[arg(long, global = true, env = "FLOTILLA_CA", value_name = "PEM|system")]
    ca: Option<String>,
    /// API token (a new server writes an admin token to DATA_DIR/admin.token).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use this context of the config file instead of the current one.
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// Output format for listings and results (json and yaml hold the same fields).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per run: the size of the `bundle build` variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate an ed25519 signing key: writes PREFIX.key (mode 0600) and PREFIX.pub.
    Keygen {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Trust roots: which keys may sign bundles.
    #[command(subcommand)]
    Trust(keys::TrustCmd),
    /// Build, sign, verify, inspect and push model bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCmd),
    /// The device registry.
    #[command(subcommand)]
    Devices(fleet::DevicesCmd),
    /// Roll a bundle out to devices.
    #[command(subcommand)]
    Rollout(fleet::RolloutCmd),
    /// Data drift across the fleet, per cohort, against each bundle's baseline.
    #[command(subcommand)]
    Drift(fleet::DriftCmd),
    /// Drift alerts.
    #[command(subcommand)]
    Alerts(fleet::AlertsCmd),
    /// Named control planes and their tokens (~/.config/flotilla/config.toml), like kubectl's
    /// contexts.
    #[command(subcommand)]
    Context(config::ContextCmd),
    /// Print a shell completion script: `flotilla completions bash > /etc/bash_completion.d/flotilla`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Retraining: policies (drift alert → samples → trainer → must beat the current model →
    /// signed bundle → staged rollout) and their jobs.
    #[command(subcommand)]
    Retrain(retrain::RetrainCmd),
}

fn main() {
    let cli = Cli::parse();
    let _ = output::FORMAT.set(cli.output);
    if let Cmd::Context(c) = cli.cmd {
        if let Err(e) = config::run(c, cli.server, cli.token, cli.ca, cli.output) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let (server, token, ca) =
        match config::resolve(cli.server.clone(), cli.token.clone(), cli.ca.clone(), cli.context.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        };
    let _ = client::TOKEN.set(token);
    let _ = client::CA.set(ca);
    let cli = Cli { server, ..cli };
    let result = match cli.cmd {
        Cmd::Context(_) => unreachable!("handled before resolving the server"),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "flotilla", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(())
        }
        Cmd::Keygen { out } => keys::keygen(&out, cli.output),
        Cmd::Trust(c) => keys::trust(c, cli.server.as_deref(), cli.output),
        Cmd::Bundle(c) => bundle::run(c, cli.server.as_deref(), cli.output),
        Cmd::Devices(c) => fleet::devices(c, cli.server.as_deref(), cli.output),
        Cmd::Rollout(c) => fleet::rollout(c, cli.server.as_deref(), cli.output),
        Cmd::Drift(c) => fleet::drift(c, cli.server.as_deref(), cli.output),
        Cmd::Alerts(c) => fleet::alerts(c, cli.server.as_deref(), cli.output),
        Cmd::Retrain(c) => retrain::run(c, cli.server.as_deref(), cli.output),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
