//! `flotilla retrain ...`: retraining policies and jobs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use flotilla_api::v1::{RetrainJob, RetrainPolicy, RetrainStart, RetrainTrainer};

use crate::client::Client;
use crate::fleet::PlanArgs;
use crate::output::{self, Output};

#[derive(Subcommand, Debug)]
pub enum RetrainCmd {
    /// Per-model retraining policies: trigger, data, trainer, evaluation gate, rollout.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Start a retraining job now (the policy's trigger aside).
    Start {
        #[arg(long)]
        model: String,
        /// Devices whose samples to train on (default: the policy's, else every device running
        /// the model).
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
    },
    /// List retraining jobs, newest first.
    Ls,
    /// Show a job: state, samples, the evaluation against the current model, its bundle and
    /// rollout, and its history.
    Status {
        id: String,
        /// Wait until the job finishes or waits for approval.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Start the rollout of a job that waits for approval. With --key, add your signature to
    /// the candidate bundle first (when the trust root needs more signers than the server's
    /// automation key).
    Approve {
        id: String,
        #[arg(long, value_name = "KEY")]
        key: Option<PathBuf>,
    },
    /// Stop a job (a running trainer is killed).
    Cancel { id: String },
    /// Print a job's trainer log.
    Log { id: String },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Create or replace a model's policy, from a TOML/JSON file and/or flags (flags win).
    ///
    ///   flotilla retrain policy set --model digits \
    ///       --trainer-command 'flotilla-trainer train' --training-data /data/digits-train.json \
    ///       --heldout samples --guard /data/digits-clean-heldout.json \
    ///       --waves 1,100% --gate install_success>=1 --gate 'psi<=0.2'
    ///
    /// The trainer runs in the job's directory with FLOTILLA_BASE_MODEL, FLOTILLA_SAMPLES
    /// (labelled v2 requests), FLOTILLA_TRAINING_DATA, FLOTILLA_OUTPUT (write the candidate
    /// model here), FLOTILLA_WORK_DIR, FLOTILLA_JOB_ID, FLOTILLA_MODEL_NAME and
    /// FLOTILLA_BASE_VERSION in its environment.
    #[command(verbatim_doc_comment)]
    Set(Box<PolicyArgs>),
    /// Show a model's policy.
    Show {
        #[arg(long)]
        model: String,
    },
    /// List policies.
    Ls,
    /// Remove a model's policy (running jobs carry on with the one they started with).
    Rm {
        #[arg(long)]
        model: String,
    },
}

#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    #[arg(long)]
    model: String,
    /// The whole policy as TOML or JSON (fields of `RetrainPolicy`; `model` may be left out).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Trainer program and arguments, split on whitespace.
    #[arg(long, value_name = "COMMAND", conflicts_with = "webhook")]
    trainer_command: Option<String>,
    /// URL of an external training pipeline to POST jobs to.
    #[arg(long, value_name = "URL")]
    webhook: Option<String>,
    /// Reference to the original training data (a path or URL the trainer reads).
    #[arg(long, value_name = "REF")]
    training_data: Option<String>,
    /// Start jobs only by hand, not on drift alerts.
    #[arg(long)]
    manual_only: bool,
    /// Start a job when an alert has lasted this many windows (default: when it is raised).
    #[arg(long, value_name = "K")]
    alert_windows: Option<u32>,
    /// Devices whose samples to use (default: the alerting cohort).
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    selector: Option<String>,
    /// Fewest labelled samples a job may train on.
    #[arg(long, value_name = "N")]
    min_labelled: Option<u64>,
    /// Share of the labelled samples held out for evaluation (0.3).
    #[arg(long, value_name = "SHARE")]
    holdout: Option<f64>,
    /// The evaluation metric (accuracy, or what --evaluator prints).
    #[arg(long)]
    metric: Option<String>,
    /// The set the candidate must match or beat the current model on: `samples` (held-out
    /// device samples) or a path on the server to labelled v2 requests.
    #[arg(long, value_name = "SET")]
    heldout: Option<String>,
    /// How much better it must be there.
    #[arg(long, value_name = "DELTA")]
    min_improvement: Option<f64>,
    /// A set the candidate may not lose more than --max-regression on (repeatable).
    #[arg(long = "guard", value_name = "SET")]
    guards: Vec<String>,
    #[arg(long, value_name = "DELTA")]
    max_regression: Option<f64>,
    /// Scoring program (prints a JSON object with the metric), split on whitespace.
    #[arg(long, value_name = "COMMAND")]
    evaluator: Option<String>,
    /// auto: roll out as soon as it is built and signed; manual: wait for `retrain approve`.
    #[arg(long, value_parser = ["auto", "manual"])]
    approval: Option<String>,
    /// The new bundle's drift baseline: samples (what the devices see now) or previous.
    #[arg(long, value_parser = ["samples", "previous"])]
    baseline: Option<String>,
    #[command(flatten)]
    plan: PlanArgs,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn policy_from(a: PolicyArgs) -> anyhow::Result<RetrainPolicy> {
    let mut v: serde_json::Value = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            if text.trim_start().starts_with('{') {
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?
            } else {
                let t: toml::Value = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
                serde_json::to_value(t)?
            }
        }
        None => serde_json::json!({}),
    };
    v["model"] = a.model.clone().into();
    if v.get("trainer").is_none() {
        v["trainer"] = serde_json::to_value(RetrainTrainer {
            command: vec![],
            webhook: None,
            timeout_secs: 3600,
            env: Default::default(),
        })?;
    }
    let mut p: RetrainPolicy = serde_json::from_value(v).context("the policy")?;
    if let Some(c) = &a.trainer_command {
        p.trainer.command = words(c);
        p.trainer.webhook = None;
    }
    if let Some(u) = a.webhook {
        p.trainer.webhook = Some(u);
        p.trainer.command.clear();
    }
    if let Some(t) = a.training_data {
        p.data.training_data = Some(t);
    }
    if a.manual_only {
        p.trigger.on_alert = false;
    }
    if let Some(k) = a.alert_windows {
        p.trigger.windows = Some(k);
    }
    if let Some(s) = a.selector {
        p.data.selector = Some(s);
    }
    if let Some(n) = a.min_labelled {
        p.data.min_labelled = n;
    }
    if let Some(h) = a.holdout {
        p.data.holdout = h;
    }
    if let Some(m) = a.metric {
        p.evaluation.metric = m;
    }
    if let Some(h) = a.heldout {
        p.evaluation.heldout = h;
    }
    if let Some(d) = a.min_improvement {
        p.evaluation.min_improvement = d;
    }
    if !a.guards.is_empty() {
        p.evaluation.guard = a.guards;
    }
    if let Some(d) = a.max_regression {
        p.evaluation.max_regression = d;
    }
    if let Some(e) = &a.evaluator {
        p.evaluation.evaluator = words(e);
    }
    if let Some(x) = a.approval {
        p.rollout.approval = x;
    }
    if let Some(b) = a.baseline {
        p.rollout.baseline = b;
    }
    if let Some(plan) = a.plan.plan()? {
        p.rollout.plan = Some(serde_json::to_value(plan)?);
    }
    Ok(p)
}

fn policy_line(p: &RetrainPolicy) -> Vec<String> {
    let trainer = match &p.trainer.webhook {
        Some(u) => format!("webhook {u}"),
        None => p.trainer.command.join(" "),
    };
    let trigger = if p.trigger.on_alert {
        match p.trigger.windows {
            Some(k) => format!("alert ≥{k} windows"),
            None => "alert".into(),
        }
    } else {
        "manual".into()
    };
    vec![
        p.model.clone(),
        trigger,
        p.data.selector.clone().unwrap_or_else(|| "(alerting cohort)".into()),
        trainer,
        format!("{} on {}", p.evaluation.metric, p.evaluation.heldout),
        p.rollout.approval.clone(),
    ]
}

fn show_policies(ps: &[RetrainPolicy], out: Output) -> anyhow::Result<()> {
    match out {
        Output::Json | Output::Yaml => output::json(&ps),
        Output::Table => {
            output::table(
                &["MODEL", "TRIGGER", "DATA FROM", "TRAINER", "MUST BEAT", "APPROVAL"],
                ps.iter().map(policy_line).collect(),
            );
            Ok(())
        }
    }
}

fn job_line(j: &RetrainJob) -> Vec<String> {
    let eval = j
        .evaluation
        .iter()
        .find(|e| e.role == "beat")
        .map(|e| format!("{:.3}→{:.3}", e.current, e.candidate))
        .unwrap_or_else(|| "-".into());
    vec![
        j.id.clone(),
        j.model.clone(),
        j.state.clone(),
        format!("v{}→{}", j.base_version, j.candidate_version.map_or("?".into(), |v| format!("v{v}"))),
        format!("{}+{}", j.samples_train, j.samples_heldout),
        eval,
        j.rollout_id.clone().unwrap_or_else(|| "-".into()),
        j.created.clone(),
    ]
}

fn show_job(j: &RetrainJob, out: Output) -> anyhow::Result<()> {
    if out != Output::Table {
        return output::json(j);
    }
    println!("job {} for {}: {}", j.id, j.model, j.state);
    if let Some(r) = &j.reason {
        println!("  {r}");
    }
    println!("  trigger: {}", j.trigger);
    println!("  samples from {}: {} to train on, {} held out", j.selector, j.samples_train, j.samples_heldout);
    for e in &j.evaluation {
        println!(
            "  {} on {} ({} samples, {}): current v{} {:.4}, candidate {:.4} — {}",
            e.metric,
            e.set,
            e.samples,
            e.role,
            j.base_version,
            e.current,
            e.candidate,
            if e.passed { "passed" } else { "FAILED" }
        );
    }
    if let Some(b) = &j.bundle {
        let signers: Vec<&str> = j.signers.iter().map(|k| &k[..k.len().min(16)]).collect();
        println!(
            "  bundle {b}, signed by {}",
            if signers.is_empty() { "nobody yet".into() } else { signers.join(", ") }
        );
    }
    if let Some(r) = &j.rollout_id {
        println!("  rollout {r} (flotilla rollout status {r})");
    }
    println!("  history:");
    for h in &j.history {
        println!("    {h}");
    }
    Ok(())
}

pub fn run(cmd: RetrainCmd, server: Option<&str>, out: Output) -> anyhow::Result<()> {
    let client = Client::new(server)?;
    match cmd {
        RetrainCmd::Policy(PolicyCmd::Set(a)) => {
            let p = policy_from(*a)?;
            let saved: RetrainPolicy = client.put(&format!("/api/v1/retrain/policies/{}", p.model), &p)?;
            show_policies(&[saved], out)
        }
        RetrainCmd::Policy(PolicyCmd::Show { model }) => {
            let p: RetrainPolicy = client.get(&format!("/api/v1/retrain/policies/{model}"))?;
            match out {
                Output::Json | Output::Yaml => output::json(&p),
                Output::Table => {
                    print!("{}", toml::to_string_pretty(&p)?);
                    Ok(())
                }
            }
        }
        RetrainCmd::Policy(PolicyCmd::Ls) => {
            let ps: Vec<RetrainPolicy> = client.get("/api/v1/retrain/policies")?;
            show_policies(&ps, out)
        }
        RetrainCmd::Policy(PolicyCmd::Rm { model }) => {
            client.delete(&format!("/api/v1/retrain/policies/{model}"))?;
            if out == Output::Table {
                println!("removed the retraining policy of {model}");
            }
            Ok(())
        }
        RetrainCmd::Start { model, selector } => {
            let j: RetrainJob = client.post("/api/v1/retrain/jobs", &RetrainStart { model, selector })?;
            match out {
                Output::Json | Output::Yaml => output::json(&j),
                Output::Table => {
                    println!("{}", j.id);
                    Ok(())
                }
            }
        }
        RetrainCmd::Ls => {
            let jobs: Vec<RetrainJob> = client.get("/api/v1/retrain/jobs")?;
            match out {
                Output::Json | Output::Yaml => output::json(&jobs),
                Output::Table => {
                    output::table(
                        &["ID", "MODEL", "STATE", "VERSIONS", "SAMPLES", "HELD-OUT", "ROLLOUT", "CREATED"],
                        jobs.iter().map(job_line).collect(),
                    );
                    Ok(())
                }
            }
        }
        RetrainCmd::Status { id, wait, timeout } => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            let mut last = String::new();
            loop {
                let j: RetrainJob = client.get(&format!("/api/v1/retrain/jobs/{id}"))?;
                let settled = !["collecting", "training", "evaluating", "building"].contains(&j.state.as_str());
                if !wait || settled || std::time::Instant::now() >= deadline {
                    return show_job(&j, out);
                }
                if out == Output::Table && j.state != last {
                    eprintln!("{}: {}", j.state, j.reason.clone().unwrap_or_default());
                    last = j.state.clone();
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        RetrainCmd::Approve { id, key } => {
            let path = format!("/api/v1/retrain/jobs/{id}/approve");
            let j: RetrainJob = match key {
                Some(k) => {
                    let key = flotilla_bundle::keys::SecretKey::load(&k)
                        .with_context(|| format!("reading key {}", k.display()))?;
                    let bundle = client.get_bytes(&format!("/api/v1/retrain/jobs/{id}/files/candidate.flb"))?;
                    let mut signed = Vec::with_capacity(bundle.len() + 128);
                    flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(&bundle), &key, &mut signed)?;
                    client.post_bytes(&path, signed)?
                }
                None => client.post_bytes(&path, vec![])?,
            };
            show_job(&j, out)
        }
        RetrainCmd::Cancel { id } => {
            let j: RetrainJob = client.post(&format!("/api/v1/retrain/jobs/{id}/cancel"), &serde_json::json!({}))?;
            show_job(&j, out)
        }
        RetrainCmd::Log { id } => {
            let log = client.get_bytes(&format!("/api/v1/retrain/jobs/{id}/files/trainer.log"))?;
            print!("{}", String::from_utf8_lossy(&log));
            Ok(())
        }
    }
}
