//! The runner's first steps: collecting the job's labelled samples (split into training and
//! held-out shares), and running the trainer (a command here, or a webhook to a pipeline).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_api::v1::{RetrainJob, RetrainPolicy};
use flotilla_proto::tags::Selector;
use serde::Serialize;

use crate::service::retrain::{JobDoc, job, transition, update};
use crate::service::samples::{Record, record};
use crate::service::{Fleet, devices, tokens};
use crate::util::{now_s, rfc3339};

/// A collected sample: who sent it and the record (inputs, labels).
struct Collected {
    records: Vec<Record>,
}

/// The samples of the job's base version from the devices its selector picks.
async fn collected(s: &Fleet, job: &RetrainJob) -> anyhow::Result<Collected> {
    let sel = Selector::parse(&job.selector).map_err(anyhow::Error::msg)?;
    let tags: std::collections::HashMap<String, flotilla_proto::tags::Tags> =
        s.store.devices().await?.iter().map(|d| (d.id.clone(), devices::facts(d))).collect();
    let mut records = Vec::new();
    for (dev, version, body) in s.store.samples(&job.model, Some(job.base_version)).await? {
        if tags.get(&dev).is_some_and(|t| sel.matches(t)) {
            records.push(record(dev, version, &job.model, &body)?);
        }
    }
    Ok(Collected { records })
}

/// Deterministic hold-out: a sample is held out when the hash of (device, request id) falls
/// under the share, so a re-run splits the same way.
fn held_out(r: &Record, share: f64) -> bool {
    let h = flotilla_bundle::format::sha256_hex(format!("{}\0{}", r.device, r.id).as_bytes());
    let x = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
    x < share
}

fn samples_in(records: &[&Record]) -> u64 {
    records.iter().map(|r| r.labels.as_ref().map_or(0, |l| l.len() as u64)).sum()
}

/// Collected → training: write the labelled samples (split) and the base model to the job's
/// directory.
pub(super) async fn prepare(s: &Arc<Fleet>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id).await?.context("job vanished")?;
    let dir = s.retrain.job_dir(id);
    std::fs::create_dir_all(&dir)?;
    let c = collected(s, &d.job).await?;
    let labelled: Vec<&Record> = c.records.iter().filter(|r| r.labels.is_some()).collect();
    let n = samples_in(&labelled);
    if n < p.data.min_labelled {
        bail!(
            "{n} labelled samples from {} ({} unlabelled requests); the policy needs {} (apps send labels with POST /v2/models/{}/feedback)",
            d.job.selector,
            c.records.len() - labelled.len(),
            p.data.min_labelled,
            d.job.model
        );
    }
    let (heldout, train): (Vec<&Record>, Vec<&Record>) = labelled.iter().partition(|r| held_out(r, p.data.holdout));
    std::fs::write(dir.join("samples.json"), serde_json::to_vec(&train)?)?;
    std::fs::write(dir.join("heldout.json"), serde_json::to_vec(&heldout)?)?;
    std::fs::write(dir.join("reference.json"), serde_json::to_vec(&c.records)?)?;
    let bundle = s.store.bundle_by_name(&d.job.model, d.job.base_version).await?.context("the base bundle is gone")?;
    let path = s.files.path(&bundle.id).context("the base bundle's file is gone")?;
    let bytes = std::fs::read(&path)?;
    let model = tokio::task::spawn_blocking(move || flotilla_builder::model_of(&bytes)).await??;
    std::fs::write(dir.join("base-model"), model)?;
    let (tr, ho) = (samples_in(&train), samples_in(&heldout));
    let reason = format!("{tr} labelled samples to train on, {ho} held out");
    transition(s, id, "collecting", "training", Some(reason), |j| {
        j.samples_train = tr;
        j.samples_heldout = ho;
    })
    .await?;
    s.wake.notify_one();
    Ok(())
}

/// The environment every trainer command gets.
fn trainer_env(s: &Fleet, d: &JobDoc, p: &RetrainPolicy) -> Vec<(String, String)> {
    let dir = s.retrain.job_dir(&d.job.id);
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut env = vec![
        ("FLOTILLA_JOB_ID".into(), d.job.id.clone()),
        ("FLOTILLA_MODEL_NAME".into(), d.job.model.clone()),
        ("FLOTILLA_BASE_VERSION".into(), d.job.base_version.to_string()),
        ("FLOTILLA_BASE_MODEL".into(), path("base-model")),
        ("FLOTILLA_SAMPLES".into(), path("samples.json")),
        ("FLOTILLA_OUTPUT".into(), path("candidate-model")),
        ("FLOTILLA_WORK_DIR".into(), dir.to_string_lossy().into_owned()),
    ];
    if let Some(t) = &p.data.training_data {
        env.push(("FLOTILLA_TRAINING_DATA".into(), t.clone()));
    }
    env.extend(p.trainer.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Runs a command in the job's directory with its output appended to `log`, killing it on
/// timeout or when the job leaves `state`.
pub(super) async fn run_logged(
    s: &Fleet,
    id: &str,
    state: &str,
    argv: &[String],
    env: &[(String, String)],
    log: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let dir = s.retrain.job_dir(id);
    let log_path = dir.join(log);
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let (prog, args) = argv.split_first().context("empty command")?;
    let mut child = tokio::process::Command::new(prog)
        .args(args)
        .current_dir(&dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(out.try_clone()?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {prog:?}"))?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf).await;
        buf
    });
    let started = tokio::time::Instant::now();
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let gone = job(s, id).await?.is_none_or(|d| d.job.state != state);
                if gone || started.elapsed() > timeout {
                    let _ = child.kill().await;
                    if gone {
                        bail!("stopped: the job left {state}");
                    }
                    bail!("{prog} did not finish within {} s (log: {})", timeout.as_secs(), log_path.display());
                }
            }
        }
    };
    let stdout = String::from_utf8_lossy(&reader.await.unwrap_or_default()).into_owned();
    {
        use std::io::Write;
        let mut out = out;
        let _ = out.write_all(stdout.as_bytes());
    }
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{prog} exited with {status}: {}", tail.join(" | "));
    }
    Ok(stdout)
}

pub(super) async fn train_command(s: &Arc<Fleet>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id).await?.context("job vanished")?;
    let env = trainer_env(s, &d, p);
    let timeout = Duration::from_secs(p.trainer.timeout_secs);
    let _ = std::fs::remove_file(s.retrain.job_dir(id).join("candidate-model"));
    run_logged(s, id, "training", &p.trainer.command, &env, "trainer.log", timeout).await?;
    let out = s.retrain.job_dir(id).join("candidate-model");
    if !out.is_file() {
        bail!("the trainer exited 0 but wrote no model to FLOTILLA_OUTPUT ({})", out.display());
    }
    transition(s, id, "training", "evaluating", Some("the trainer wrote a candidate".into()), |_| {}).await?;
    s.wake.notify_one();
    Ok(())
}

/// What the server POSTs to a webhook trainer.
#[derive(Serialize)]
struct WebhookCall<'a> {
    job: &'a str,
    model: &'a str,
    base_version: u64,
    base_model_url: String,
    samples_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    training_data: Option<&'a str>,
    /// POST the candidate model's bytes here.
    upload_url: String,
}

pub(super) async fn call_webhook(s: &Arc<Fleet>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id).await?.context("job vanished")?;
    let url = p.trainer.webhook.as_deref().context("no webhook")?;
    let base = s
        .settings
        .public_url
        .as_deref()
        .context("webhooks need the server's --public-url for the pipeline to call back")?;
    // The URLs carry a capability for this job's files and upload only.
    let cap = tokens::capability(&s.settings.capability_key, "job", id);
    let files = format!("{base}/api/v1/retrain/jobs/{id}/files");
    let call = WebhookCall {
        job: id,
        model: &d.job.model,
        base_version: d.job.base_version,
        base_model_url: format!("{files}/base-model?token={cap}"),
        samples_url: format!("{files}/samples.json?token={cap}"),
        training_data: p.data.training_data.as_deref(),
        upload_url: format!("{base}/api/v1/retrain/jobs/{id}/candidate?token={cap}"),
    };
    let resp = reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(30))
        .json(&call)
        .send()
        .await
        .with_context(|| format!("calling the webhook {url}"))?;
    if !resp.status().is_success() {
        bail!("the webhook {url} answered {}", resp.status());
    }
    update(s, id, |d| {
        d.webhook_sent = true;
        d.job.history.push(format!("[{}] webhook {url} called; waiting for the model", rfc3339(now_s())));
        true
    })
    .await?;
    Ok(())
}
