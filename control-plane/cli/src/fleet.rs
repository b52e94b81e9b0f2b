//! `flotilla devices ...` and `flotilla rollout ...`.

use clap::Subcommand;
use flotilla_api::v1::{Device, Rollout, RolloutCreate, RolloutCreated};

use crate::client::Client;
use crate::output::{self, Output};

#[derive(Subcommand, Debug)]
pub enum DevicesCmd {
    /// List registered devices.
    Ls,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start rolling a pushed bundle out (all registered devices, one wave). Prints the id.
    Start {
        /// NAME@VERSION of a pushed bundle.
        #[arg(long, value_name = "NAME@VERSION")]
        bundle: String,
        /// Limit to these devices (repeatable).
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
    },
    /// Show a rollout's progress per device.
    Status { id: String },
    /// List rollouts.
    Ls,
}

pub fn devices(cmd: DevicesCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        DevicesCmd::Ls => {
            let list: Vec<Device> = client.get("/api/v1/devices")?;
            match out {
                Output::Json => output::json(&list),
                Output::Table => {
                    output::table(
                        &["ID", "ONLINE", "ARCH", "AGENT", "MODELS", "LAST SEEN"],
                        list.iter()
                            .map(|d| {
                                vec![
                                    d.id.clone(),
                                    if d.online { "yes".into() } else { "no".into() },
                                    d.arch.clone().unwrap_or_default(),
                                    d.agent_version.clone().unwrap_or_default(),
                                    d.models
                                        .iter()
                                        .map(|m| format!("{}@{}", m.name, m.version))
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    d.last_seen.clone().unwrap_or_default(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}

pub fn rollout(cmd: RolloutCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        RolloutCmd::Start { bundle, devices } => {
            let created: RolloutCreated = client.post("/api/v1/rollouts", &RolloutCreate { bundle, devices })?;
            match out {
                Output::Json => output::json(&created),
                Output::Table => {
                    println!("{}", created.id);
                    Ok(())
                }
            }
        }
        RolloutCmd::Status { id } => {
            let r: Rollout = client.get(&format!("/api/v1/rollouts/{id}"))?;
            match out {
                Output::Json => output::json(&r),
                Output::Table => {
                    println!(
                        "rollout {} of {}: {} ({} of {} succeeded, {} failed, {} in progress, {} pending)",
                        r.id, r.bundle, r.state, r.succeeded, r.total, r.failed, r.offered, r.pending
                    );
                    output::table(
                        &["DEVICE", "STATE", "REASON"],
                        r.devices
                            .iter()
                            .map(|d| vec![d.device.clone(), d.state.clone(), d.reason.clone().unwrap_or_default()])
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
        RolloutCmd::Ls => {
            let list: Vec<Rollout> = client.get("/api/v1/rollouts")?;
            match out {
                Output::Json => output::json(&list),
                Output::Table => {
                    output::table(
                        &["ID", "BUNDLE", "STATE", "SUCCEEDED", "FAILED", "TOTAL", "CREATED"],
                        list.iter()
                            .map(|r| {
                                vec![
                                    r.id.clone(),
                                    r.bundle.clone(),
                                    r.state.clone(),
                                    r.succeeded.to_string(),
                                    r.failed.to_string(),
                                    r.total.to_string(),
                                    r.created.clone(),
                                ]
                            })
                            .collect(),
                    );
                    Ok(())
                }
            }
        }
    }
}
