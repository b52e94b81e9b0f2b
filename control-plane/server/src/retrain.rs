//! The retraining loop: a drift alert (or `flotilla retrain start`) opens a job that collects
//! the affected devices' labelled samples, runs the policy's trainer (a command, or a webhook to
//! an external pipeline), scores the candidate against the current model on held-out data, and
//! only if it matches or beats it builds the successor bundle, signs it with the automation key,
//! and starts a staged rollout (or waits for `flotilla retrain approve`).
//!
//! Every job is a JSON document in the store, saved on each transition; its files (samples, the
//! base and candidate models, the trainer's log, the candidate bundle) live in
//! `DATA_DIR/retrain/{id}/`. A restarted server carries on from the stored state (a step that
//! was running when it stopped runs again).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_api::v1::{RetrainJob, RetrainPolicy, RetrainScore, SampleRecord};
use flotilla_bundle::keys::SecretKey;
use flotilla_proto::tags::Selector;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::BundleRow;
use crate::{Shared, now_s};

/// States in which a job still has work to do.
pub const ACTIVE: [&str; 6] = ["collecting", "training", "evaluating", "building", "awaiting_approval", "rolling_out"];

/// The retraining side of the server: the automation signing key and which jobs have a step
/// running in this process.
pub struct Retrain {
    pub key: Option<SecretKey>,
    pub dir: PathBuf,
    running: Mutex<HashSet<String>>,
    /// Serialises read-modify-write of job documents (the runner and HTTP handlers).
    lock: Mutex<()>,
}

/// What the store holds for a job: the API view plus the runner's bookkeeping.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobDoc {
    #[serde(flatten)]
    pub job: RetrainJob,
    /// When the job entered its current state (seconds).
    pub since: i64,
    #[serde(default)]
    pub webhook_sent: bool,
    #[serde(default)]
    pub policy: Option<RetrainPolicy>,
}

impl Retrain {
    pub fn new(data_dir: &Path, key: Option<SecretKey>) -> Retrain {
        Retrain { key, dir: data_dir.join("retrain"), running: Default::default(), lock: Mutex::new(()) }
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

pub fn policies(s: &Shared) -> anyhow::Result<Vec<RetrainPolicy>> {
    s.store.retrain_policies()?.iter().map(|p| Ok(serde_json::from_str(p)?)).collect()
}

pub fn policy(s: &Shared, model: &str) -> anyhow::Result<Option<RetrainPolicy>> {
    Ok(policies(s)?.into_iter().find(|p| p.model == model))
}

/// Check a policy before it is stored.
pub fn validate(p: &RetrainPolicy) -> Result<(), String> {
    flotilla_bundle::manifest::check_label("model", &p.model).map_err(|e| e.to_string())?;
    match (p.trainer.command.is_empty(), &p.trainer.webhook) {
        (true, None) => return Err("the trainer needs a `command` or a `webhook`".into()),
        (false, Some(_)) => return Err("give the trainer a `command` or a `webhook`, not both".into()),
        (_, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
            return Err(format!("webhook {u:?} is not an http(s) URL"));
        }
        _ => {}
    }
    if !(0.0..1.0).contains(&p.data.holdout) {
        return Err(format!("data.holdout {} must be in [0, 1)", p.data.holdout));
    }
    if p.evaluation.heldout == "samples" && p.data.holdout <= 0.0 {
        return Err("evaluation on `samples` needs data.holdout > 0".into());
    }
    if p.evaluation.metric != "accuracy" && p.evaluation.evaluator.is_empty() {
        return Err(format!(
            "metric {:?} needs an `evaluator` command (the server computes accuracy only)",
            p.evaluation.metric
        ));
    }
    if !matches!(p.rollout.approval.as_str(), "auto" | "manual") {
        return Err(format!("rollout.approval {:?}: expected auto or manual", p.rollout.approval));
    }
    if !matches!(p.rollout.baseline.as_str(), "samples" | "previous") {
        return Err(format!("rollout.baseline {:?}: expected samples or previous", p.rollout.baseline));
    }
    if let Some(sel) = &p.data.selector {
        Selector::parse(sel).map_err(|e| format!("data.selector: {e}"))?;
    }
    if let Some(plan) = &p.rollout.plan {
        let plan: flotilla_rollout::Plan =
            serde_json::from_value(plan.clone()).map_err(|e| format!("rollout.plan: {e}"))?;
        plan.validate().map_err(|e| format!("rollout.plan: {e}"))?;
    }
    Ok(())
}

pub fn jobs(s: &Shared) -> anyhow::Result<Vec<JobDoc>> {
    s.store.retrain_jobs()?.iter().map(|j| Ok(serde_json::from_str(j)?)).collect()
}

pub fn job(s: &Shared, id: &str) -> anyhow::Result<Option<JobDoc>> {
    s.store.retrain_job(id)?.map(|j| Ok(serde_json::from_str(&j)?)).transpose()
}

fn save(s: &Shared, d: &JobDoc) -> anyhow::Result<()> {
    let created = time::OffsetDateTime::parse(&d.job.created, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(d.since);
    s.store.save_retrain_job(&d.job.id, &d.job.model, &d.job.state, created, &serde_json::to_string(d)?)
}

/// Apply `f` to a stored job under the lock, stamp and save it. `f` returns false to leave the
/// job as it was (e.g. it moved on, or was cancelled, while a step ran).
pub fn update(s: &Shared, id: &str, f: impl FnOnce(&mut JobDoc) -> bool) -> anyhow::Result<Option<JobDoc>> {
    let _g = s.retrain.lock.lock().expect("retrain lock");
    let Some(mut d) = job(s, id)? else { return Ok(None) };
    let state = d.job.state.clone();
    if !f(&mut d) {
        return Ok(None);
    }
    let now = now_s();
    d.job.updated = crate::rfc3339_ms(now * 1000);
    if d.job.state != state {
        d.since = now;
        let detail = d.job.reason.clone().unwrap_or_default();
        d.job.history.push(format!(
            "[{}] {}{}",
            d.job.updated,
            d.job.state,
            if detail.is_empty() { String::new() } else { format!(": {detail}") }
        ));
        tracing::info!(job = %id, model = %d.job.model, state = %d.job.state, reason = %detail, "retrain job moved");
    }
    save(s, &d)?;
    Ok(Some(d))
}

/// Move a job from `from` to `to` (with a reason), unless it left `from` meanwhile.
fn transition(
    s: &Shared,
    id: &str,
    from: &str,
    to: &str,
    reason: Option<String>,
    f: impl FnOnce(&mut RetrainJob),
) -> anyhow::Result<bool> {
    Ok(update(s, id, |d| {
        if d.job.state != from {
            return false;
        }
        d.job.state = to.into();
        d.job.reason = reason;
        f(&mut d.job);
        true
    })?
    .is_some())
}

/// Open a job for `model` at `base_version` (the version whose devices drifted).
pub fn open(
    s: &Shared,
    policy: &RetrainPolicy,
    base_version: u64,
    selector: String,
    trigger: String,
    alert_id: Option<i64>,
) -> anyhow::Result<JobDoc> {
    let _g = s.retrain.lock.lock().expect("retrain lock");
    let now = now_s();
    let id = format!("j-{}", crate::new_id());
    let stamp = crate::rfc3339_ms(now * 1000);
    let d = JobDoc {
        job: RetrainJob {
            id: id.clone(),
            model: policy.model.clone(),
            state: "collecting".into(),
            trigger: trigger.clone(),
            alert_id,
            selector: selector.clone(),
            base_version,
            candidate_version: None,
            upload_id: None,
            samples_train: 0,
            samples_heldout: 0,
            evaluation: vec![],
            bundle: None,
            signers: vec![],
            rollout_id: None,
            reason: None,
            created: stamp.clone(),
            updated: stamp.clone(),
            history: vec![format!("[{stamp}] collecting: {trigger}; samples from {selector}")],
        },
        since: now,
        webhook_sent: false,
        policy: Some(policy.clone()),
    };
    std::fs::create_dir_all(s.retrain.job_dir(&id))?;
    save(s, &d)?;
    tracing::info!(job = %id, model = %policy.model, base_version, %selector, %trigger, "retrain job opened");
    s.wake.notify_one();
    Ok(d)
}

pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        if let Err(e) = step(&shared).await {
            tracing::warn!(error = %format!("{e:#}"), "retrain step failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
}

async fn step(s: &Arc<Shared>) -> anyhow::Result<()> {
    triggers(s)?;
    for d in jobs(s)? {
        if !ACTIVE.contains(&d.job.state.as_str()) {
            continue;
        }
        if let Err(e) = advance(s, &d).await {
            let msg = format!("{e:#}");
            tracing::warn!(job = %d.job.id, error = %msg, "retrain job failed");
            let state = d.job.state.clone();
            transition(s, &d.job.id, &state, "failed", Some(msg), |_| {})?;
        }
    }
    Ok(())
}

/// Open a job for every firing alert a policy reacts to.
fn triggers(s: &Shared) -> anyhow::Result<()> {
    let policies: Vec<RetrainPolicy> = policies(s)?.into_iter().filter(|p| p.trigger.on_alert).collect();
    if policies.is_empty() {
        return Ok(());
    }
    let jobs = jobs(s)?;
    let now = now_s();
    for alert in s.store.alerts(false)? {
        let Some(p) = policies.iter().find(|p| p.model == alert.model) else { continue };
        if p.trigger.windows.is_some_and(|k| alert.windows < k) {
            continue;
        }
        let mine = || jobs.iter().filter(|j| j.job.model == p.model);
        let busy = mine().any(|j| ACTIVE.contains(&j.job.state.as_str()));
        let cooling =
            mine().any(|j| j.job.alert_id.is_some() && now - created_s(&j.job) < p.trigger.cooldown_secs as i64);
        if busy || cooling || mine().any(|j| j.job.alert_id == Some(alert.id)) {
            continue;
        }
        if s.store.bundle_by_name(&alert.model, alert.version)?.is_none() {
            continue;
        }
        let selector = p.data.selector.clone().unwrap_or_else(|| alert.cohort.clone());
        let trigger = format!(
            "alert {}: {} {} {} over {} windows",
            alert.id, alert.cohort, alert.signal, alert.metrics, alert.windows
        );
        open(s, p, alert.version, selector, trigger, Some(alert.id))?;
        return Ok(()); // one per step: the next sees this job
    }
    Ok(())
}

fn created_s(j: &RetrainJob) -> i64 {
    time::OffsetDateTime::parse(&j.created, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

/// Runs `f` as this job's background step unless one is already running.
fn spawn_step<F>(s: &Arc<Shared>, id: &str, f: impl FnOnce(Arc<Shared>, String) -> F)
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    if !s.retrain.running.lock().expect("running lock").insert(id.to_string()) {
        return;
    }
    let fut = f(s.clone(), id.to_string());
    let (s2, id2) = (s.clone(), id.to_string());
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            let msg = format!("{e:#}");
            tracing::warn!(job = %id2, error = %msg, "retrain step failed");
            let _ = update(&s2, &id2, |d| {
                if !ACTIVE.contains(&d.job.state.as_str()) {
                    return false;
                }
                d.job.state = "failed".into();
                d.job.reason = Some(msg);
                true
            });
        }
        s2.retrain.running.lock().expect("running lock").remove(&id2);
    });
}

fn policy_of(s: &Shared, d: &JobDoc) -> anyhow::Result<RetrainPolicy> {
    match policy(s, &d.job.model)? {
        Some(p) => Ok(p),
        None => d.policy.clone().with_context(|| format!("no retraining policy for {}", d.job.model)),
    }
}

async fn advance(s: &Arc<Shared>, d: &JobDoc) -> anyhow::Result<()> {
    let id = d.job.id.clone();
    let now = now_s();
    match d.job.state.as_str() {
        "collecting" => {
            let p = policy_of(s, d)?;
            let Some(upload) = &d.job.upload_id else {
                let (upload_id, devices) =
                    crate::http::request_samples(s, &d.job.model, Some(d.job.base_version), Some(&d.job.selector))
                        .await
                        .map_err(|e| anyhow::anyhow!("collecting samples: {e}"))?;
                update(s, &id, |d| {
                    d.job.upload_id = Some(upload_id.clone());
                    d.job.history.push(format!(
                        "[{}] asked {} for samples ({upload_id})",
                        crate::rfc3339_ms(now * 1000),
                        devices.join(", ")
                    ));
                    true
                })?;
                return Ok(());
            };
            let parts = s.store.sample_upload(upload)?;
            let all_done = !parts.is_empty() && parts.iter().all(|(_, _, _, done)| *done);
            if all_done || now - d.since >= p.data.collect_secs as i64 {
                spawn_step(s, &id, |s, id| async move { prepare(&s, &id, &p).await });
            }
        }
        "training" => {
            let p = policy_of(s, d)?;
            if !p.trainer.command.is_empty() {
                spawn_step(s, &id, |s, id| async move { train_command(&s, &id, &p).await });
            } else if !d.webhook_sent {
                spawn_step(s, &id, |s, id| async move { call_webhook(&s, &id, &p).await });
            } else if now - d.since >= p.trainer.timeout_secs as i64 {
                bail!("the pipeline did not upload a model within {} s of the webhook", p.trainer.timeout_secs);
            }
        }
        "evaluating" => {
            let p = policy_of(s, d)?;
            spawn_step(s, &id, |s, id| async move { evaluate(&s, &id, &p).await });
        }
        "building" => {
            let p = policy_of(s, d)?;
            spawn_step(s, &id, |s, id| async move { build(&s, &id, &p).await });
        }
        "rolling_out" => {
            let Some(r) = d.job.rollout_id.as_deref().map(|r| s.store.rollout(r)).transpose()?.flatten() else {
                bail!("its rollout is gone");
            };
            match r.state.as_str() {
                "completed" => {
                    // The cohort no longer runs the base version: its alerts on it are over
                    // (the one that started the job, and any other signal's).
                    for a in s.store.alerts(false)? {
                        let same =
                            a.model == d.job.model && a.version == d.job.base_version && a.cohort == d.job.selector;
                        if same || Some(a.id) == d.job.alert_id {
                            s.store.resolve_alert(a.id, now)?;
                        }
                    }
                    let v = d.job.candidate_version.unwrap_or_default();
                    transition(
                        s,
                        &id,
                        "rolling_out",
                        "completed",
                        Some(format!("{}@{v} rolled out", d.job.model)),
                        |_| {},
                    )?;
                }
                "aborted" | "rolled_back" => {
                    let why = r.reason.clone().unwrap_or_else(|| r.state.clone());
                    transition(
                        s,
                        &id,
                        "rolling_out",
                        "failed",
                        Some(format!("rollout {} {}: {why}", r.id, r.state)),
                        |_| {},
                    )?;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// A collected sample: who sent it and the record (inputs, labels).
struct Collected {
    records: Vec<SampleRecord>,
}

/// The samples of the job's base version from the devices its selector picks.
fn collected(s: &Shared, job: &RetrainJob) -> anyhow::Result<Collected> {
    let sel = Selector::parse(&job.selector).map_err(anyhow::Error::msg)?;
    let tags: BTreeMap<String, BTreeMap<String, String>> =
        s.store.devices()?.iter().map(|d| (d.id.clone(), crate::driver::device_view(d, None).tags)).collect();
    let mut records = Vec::new();
    for (dev, version, body) in s.store.samples(&job.model, Some(job.base_version))? {
        if tags.get(&dev).is_some_and(|t| sel.matches(t)) {
            records.push(crate::drift::sample_record(dev, version, &job.model, &body)?);
        }
    }
    Ok(Collected { records })
}

/// Deterministic hold-out: a sample is held out when the hash of (device, request id) falls
/// under the share, so a re-run splits the same way.
fn held_out(r: &SampleRecord, share: f64) -> bool {
    let h = flotilla_bundle::format::sha256_hex(format!("{}\0{}", r.device, r.id).as_bytes());
    let x = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
    x < share
}

fn samples_in(records: &[&SampleRecord]) -> u64 {
    records.iter().map(|r| r.labels.as_ref().map_or(0, |l| l.len() as u64)).sum()
}

/// Collected → training: write the labelled samples (split) and the base model to the job's
/// directory.
async fn prepare(s: &Arc<Shared>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id)?.context("job vanished")?;
    let dir = s.retrain.job_dir(id);
    std::fs::create_dir_all(&dir)?;
    let c = collected(s, &d.job)?;
    let labelled: Vec<&SampleRecord> = c.records.iter().filter(|r| r.labels.is_some()).collect();
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
    let (heldout, train): (Vec<&SampleRecord>, Vec<&SampleRecord>) =
        labelled.iter().partition(|r| held_out(r, p.data.holdout));
    std::fs::write(dir.join("samples.json"), serde_json::to_vec(&train)?)?;
    std::fs::write(dir.join("heldout.json"), serde_json::to_vec(&heldout)?)?;
    std::fs::write(dir.join("reference.json"), serde_json::to_vec(&c.records)?)?;
    let bundle = s.store.bundle_by_name(&d.job.model, d.job.base_version)?.context("the base bundle is gone")?;
    let path = s.files.path(&bundle.id).context("the base bundle's file is gone")?;
    let bytes = std::fs::read(&path)?;
    let model = tokio::task::spawn_blocking(move || flotilla_builder::model_of(&bytes)).await??;
    std::fs::write(dir.join("base-model"), model)?;
    let (tr, ho) = (samples_in(&train), samples_in(&heldout));
    let reason = format!("{tr} labelled samples to train on, {ho} held out");
    transition(s, id, "collecting", "training", Some(reason), |j| {
        j.samples_train = tr;
        j.samples_heldout = ho;
    })?;
    s.wake.notify_one();
    Ok(())
}

/// The environment every trainer command gets.
fn trainer_env(s: &Shared, d: &JobDoc, p: &RetrainPolicy) -> Vec<(String, String)> {
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
async fn run_logged(
    s: &Shared,
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
                let gone = job(s, id)?.is_none_or(|d| d.job.state != state);
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

async fn train_command(s: &Arc<Shared>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id)?.context("job vanished")?;
    let env = trainer_env(s, &d, p);
    let timeout = Duration::from_secs(p.trainer.timeout_secs);
    let _ = std::fs::remove_file(s.retrain.job_dir(id).join("candidate-model"));
    run_logged(s, id, "training", &p.trainer.command, &env, "trainer.log", timeout).await?;
    let out = s.retrain.job_dir(id).join("candidate-model");
    if !out.is_file() {
        bail!("the trainer exited 0 but wrote no model to FLOTILLA_OUTPUT ({})", out.display());
    }
    transition(s, id, "training", "evaluating", Some("the trainer wrote a candidate".into()), |_| {})?;
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

async fn call_webhook(s: &Arc<Shared>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id)?.context("job vanished")?;
    let url = p.trainer.webhook.as_deref().context("no webhook")?;
    let base =
        s.public_url.as_deref().context("webhooks need the server's --public-url for the pipeline to call back")?;
    // The URLs carry a capability for this job's files and upload only.
    let cap = crate::auth::capability(&s.capability_key, "job", id);
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
        d.job
            .history
            .push(format!("[{}] webhook {url} called; waiting for the model", crate::rfc3339_ms(now_s() * 1000)));
        true
    })?;
    Ok(())
}

/// A pipeline delivered the candidate (`POST /api/v1/retrain/jobs/{id}/candidate`).
pub fn accept_candidate(s: &Shared, id: &str, model: &[u8]) -> anyhow::Result<bool> {
    flotilla_builder::detect_format(model).map_err(|e| anyhow::anyhow!("the candidate: {e}"))?;
    let d = job(s, id)?.context("no such job")?;
    if d.job.state != "training" {
        return Ok(false);
    }
    std::fs::write(s.retrain.job_dir(id).join("candidate-model"), model)?;
    let moved = transition(
        s,
        id,
        "training",
        "evaluating",
        Some(format!("the pipeline uploaded a candidate ({} bytes)", model.len())),
        |_| {},
    )?;
    s.wake.notify_one();
    Ok(moved)
}

/// Labelled requests of a set: `samples` (the job's held-out share) or a file on the server.
fn set_path(s: &Shared, id: &str, set: &str) -> PathBuf {
    if set == "samples" { s.retrain.job_dir(id).join("heldout.json") } else { PathBuf::from(set) }
}

async fn score(s: &Shared, id: &str, p: &RetrainPolicy, model: &Path, set: &Path) -> anyhow::Result<(f64, u64)> {
    let data = std::fs::read(set).with_context(|| format!("reading {}", set.display()))?;
    let labelled: Vec<Labelled> =
        serde_json::from_slice(&data).with_context(|| format!("{}: expected labelled v2 requests", set.display()))?;
    let n: u64 = labelled.iter().map(|l| l.count() as u64).sum();
    if p.evaluation.evaluator.is_empty() {
        let bytes = std::fs::read(model)?;
        let acc = tokio::task::spawn_blocking(move || accuracy(&bytes, &labelled)).await??;
        return Ok((acc, n));
    }
    let env = vec![
        ("FLOTILLA_MODEL".into(), model.to_string_lossy().into_owned()),
        ("FLOTILLA_HELDOUT".into(), set.to_string_lossy().into_owned()),
        ("FLOTILLA_METRIC".into(), p.evaluation.metric.clone()),
    ];
    let out = run_logged(
        s,
        id,
        "evaluating",
        &p.evaluation.evaluator,
        &env,
        "evaluator.log",
        Duration::from_secs(p.trainer.timeout_secs),
    )
    .await?;
    let line =
        out.lines().rev().find(|l| l.trim_start().starts_with('{')).context("the evaluator printed no JSON object")?;
    let v: serde_json::Value = serde_json::from_str(line).context("the evaluator's JSON")?;
    let x = v[&p.evaluation.metric]
        .as_f64()
        .with_context(|| format!("the evaluator printed no number {:?}: {line}", p.evaluation.metric))?;
    Ok((x, n))
}

#[derive(Deserialize)]
struct Labelled {
    inputs: Vec<flotilla_api::v2::InferTensor>,
    #[serde(default)]
    labels: Option<Vec<u32>>,
    #[serde(default)]
    label: Option<u32>,
}

impl Labelled {
    fn labels(&self) -> Vec<u32> {
        match (&self.labels, self.label) {
            (Some(l), _) => l.clone(),
            (None, Some(l)) => vec![l],
            _ => vec![],
        }
    }

    fn count(&self) -> usize {
        self.labels().len()
    }
}

/// Share of labelled samples whose top class (first output, `[N, C]`) is the label, on the
/// reference CPU runtime.
fn accuracy(model: &[u8], set: &[Labelled]) -> anyhow::Result<f64> {
    let opts = flotilla_builder::BuildOptions::new("eval", 1, model.to_vec(), 0);
    let sig = flotilla_builder::signature(&opts)?;
    let runtimes = flotilla_runtime::Runtimes::with_tflite(None).unwrap_or_default();
    let loaded = runtimes.load(model, &sig, &Default::default())?;
    let (mut right, mut total) = (0u64, 0u64);
    for (i, l) in set.iter().enumerate() {
        let labels = l.labels();
        if labels.is_empty() {
            continue;
        }
        let req = flotilla_api::v2::InferRequest { id: None, inputs: l.inputs.clone() };
        let inputs = flotilla_builder::golden::request_tensors(&req)?;
        let inputs = flotilla_runtime::check_inputs(&sig.inputs, inputs).with_context(|| format!("sample {i}"))?;
        let outputs = flotilla_runtime::run(loaded.as_ref(), inputs)?;
        let out = outputs.first().context("the model has no output")?;
        let classes = out.shape.get(1).copied().unwrap_or(1).max(1);
        let rows: Vec<f64> = out.data.to_f64();
        if rows.len() != classes * labels.len() {
            bail!("sample {i}: {} labels for an output of shape {:?}", labels.len(), out.shape);
        }
        for (row, label) in rows.chunks(classes).zip(&labels) {
            let best =
                row.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (k, &x)| if x > b.1 { (k, x) } else { b });
            right += u64::from(best.0 as u32 == *label);
            total += 1;
        }
    }
    if total == 0 {
        bail!("no labelled samples to evaluate on");
    }
    Ok(right as f64 / total as f64)
}

async fn evaluate(s: &Arc<Shared>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let dir = s.retrain.job_dir(id);
    let (current, candidate) = (dir.join("base-model"), dir.join("candidate-model"));
    let e = &p.evaluation;
    let sign = if e.higher_is_better { 1.0 } else { -1.0 };
    let mut scores = Vec::new();
    let sets = std::iter::once((&e.heldout, "beat")).chain(e.guard.iter().map(|g| (g, "guard")));
    for (set, role) in sets {
        let path = set_path(s, id, set);
        let (cur, n) = score(s, id, p, &current, &path).await?;
        let (cand, _) = score(s, id, p, &candidate, &path).await?;
        let gain = sign * (cand - cur);
        let passed = if role == "beat" { gain >= e.min_improvement - 1e-12 } else { gain >= -e.max_regression };
        scores.push(RetrainScore {
            set: set.clone(),
            metric: e.metric.clone(),
            samples: n,
            current: cur,
            candidate: cand,
            role: role.into(),
            passed,
        });
    }
    let failed: Vec<String> = scores
        .iter()
        .filter(|x| !x.passed)
        .map(|x| format!("{} on {}: candidate {:.4} vs current {:.4}", x.metric, x.set, x.candidate, x.current))
        .collect();
    let summary: Vec<String> =
        scores.iter().map(|x| format!("{} on {} {:.4} → {:.4}", x.metric, x.set, x.current, x.candidate)).collect();
    let (to, reason) = if failed.is_empty() {
        ("building", format!("the candidate passed: {}", summary.join("; ")))
    } else {
        ("rejected", format!("the candidate does not beat the current model: {}", failed.join("; ")))
    };
    transition(s, id, "evaluating", to, Some(reason), |j| j.evaluation = scores)?;
    s.wake.notify_one();
    Ok(())
}

/// The reference data of the new baseline: every collected request of the job (what the
/// devices see now), with labels when all of them have labels.
fn reference(dir: &Path) -> anyhow::Result<flotilla_builder::baseline::Reference> {
    let records: Vec<Labelled> = serde_json::from_slice(&std::fs::read(dir.join("reference.json"))?)?;
    let all_labelled = records.iter().all(|r| r.count() > 0);
    let mut out = flotilla_builder::baseline::Reference::default();
    let mut labels = Vec::new();
    for r in &records {
        let req = flotilla_api::v2::InferRequest { id: None, inputs: r.inputs.clone() };
        out.batches.push(flotilla_builder::golden::request_tensors(&req)?);
        labels.extend(r.labels());
    }
    out.labels = all_labelled.then_some(labels);
    Ok(out)
}

async fn build(s: &Arc<Shared>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id)?.context("job vanished")?;
    let dir = s.retrain.job_dir(id);
    let base = s.store.bundle_by_name(&d.job.model, d.job.base_version)?.context("the base bundle is gone")?;
    let prev = std::fs::read(s.files.path(&base.id).context("the base bundle's file is gone")?)?;
    let version = s.store.bundles()?.iter().filter(|b| b.name == d.job.model).map(|b| b.version).max().unwrap_or(0) + 1;
    let candidate = std::fs::read(dir.join("candidate-model"))?;
    let baseline = p.rollout.baseline.clone();
    let dir2 = dir.clone();
    let built = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let (mut opts, profile) = flotilla_builder::successor_of(&prev, candidate, version, now_s() as u64)?;
        if let Some(previous) = profile {
            if baseline == "samples" {
                opts.drift = Some((reference(&dir2)?, flotilla_builder::baseline::options_of(&previous)));
            } else {
                opts.profile = Some(previous);
            }
        }
        Ok(flotilla_builder::build(&opts)?.bytes)
    })
    .await??;
    let signed = match &s.retrain.key {
        Some(k) => {
            let mut out = Vec::with_capacity(built.len() + 128);
            flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(&built), k, &mut out)?;
            out
        }
        None => built,
    };
    std::fs::write(dir.join("candidate.flb"), &signed)?;
    let pushed = {
        let trust = s.trust.read().expect("trust lock").clone();
        s.files.push(&s.store, &signed, trust.as_ref(), now_s())
    };
    let name = format!("{}@{version}", d.job.model);
    match pushed {
        Ok(row) => {
            let signers = row.signers.clone();
            if p.rollout.approval == "manual" {
                let reason = format!("{name} built and signed; start its rollout with `flotilla retrain approve {id}`");
                transition(s, id, "building", "awaiting_approval", Some(reason), |j| {
                    j.candidate_version = Some(version);
                    j.bundle = Some(name.clone());
                    j.signers = signers;
                })?;
            } else {
                transition(s, id, "building", "building", None, |j| {
                    j.candidate_version = Some(version);
                    j.bundle = Some(name.clone());
                    j.signers = signers;
                })?;
                start(s, id, &row, p)?;
            }
        }
        Err(crate::bundles::PushError::Invalid(why)) => {
            let reason = match &s.retrain.key {
                Some(_) => format!(
                    "{name} is signed by the automation key, which the trust root does not accept alone ({why}); a key holder approves it with `flotilla retrain approve {id} --key KEY`"
                ),
                None => format!(
                    "{name} is built but unsigned (the server has no --retrain-key); approve it with `flotilla retrain approve {id} --key KEY`"
                ),
            };
            transition(s, id, "building", "awaiting_approval", Some(reason), |j| {
                j.candidate_version = Some(version);
                j.bundle = Some(name.clone());
            })?;
        }
        Err(crate::bundles::PushError::Conflict(m)) => bail!("{m}"),
        Err(crate::bundles::PushError::Internal(e)) => return Err(e),
    }
    s.wake.notify_one();
    Ok(())
}

/// Start the candidate's rollout: the policy's plan, targeted at the job's devices unless the
/// plan names its own target.
pub fn start(s: &Shared, id: &str, bundle: &BundleRow, p: &RetrainPolicy) -> anyhow::Result<String> {
    let d = job(s, id)?.context("job vanished")?;
    let mut plan = p.rollout.plan.clone().unwrap_or_else(|| {
        serde_json::json!({
            "waves": [{"count": 1}, {"percent": 100.0}],
            "gates": ["install_success>=1"],
            "on_failure": "rollback",
        })
    });
    if plan.get("target").and_then(|t| t.as_str()).is_none_or(|t| t.trim().is_empty()) {
        plan["target"] = serde_json::Value::String(d.job.selector.clone());
    }
    let rollout = crate::http::start_rollout(s, bundle, Some(plan), &[])
        .map_err(|e| anyhow::anyhow!("starting the rollout: {e}"))?;
    let from = d.job.state.clone();
    let reason = format!("rollout {rollout} of {}@{} to {}", bundle.name, bundle.version, d.job.selector);
    transition(s, id, &from, "rolling_out", Some(reason), |j| j.rollout_id = Some(rollout.clone()))?;
    Ok(rollout)
}

/// `flotilla retrain approve`: start the rollout of a job waiting for approval, after adding the
/// signatures in `signed` (the candidate bundle with a key holder's signature) when given.
pub fn approve(s: &Shared, id: &str, signed: Option<&[u8]>) -> Result<JobDoc, String> {
    let err = |e: anyhow::Error| format!("{e:#}");
    let d = job(s, id).map_err(err)?.ok_or_else(|| format!("no job {id:?}"))?;
    if d.job.state != "awaiting_approval" {
        return Err(format!("job {id} is {}, not awaiting approval", d.job.state));
    }
    let p = policy_of(s, &d).map_err(err)?;
    let version = d.job.candidate_version.ok_or("the job has no candidate")?;
    let row = match s.store.bundle_by_name(&d.job.model, version).map_err(err)? {
        Some(row) => row,
        None => {
            let Some(bytes) = signed else {
                return Err(format!(
                    "{}@{version} does not carry enough signatures yet: sign it with `flotilla retrain approve {id} --key KEY`",
                    d.job.model
                ));
            };
            let ours = std::fs::read(s.retrain.job_dir(id).join("candidate.flb")).map_err(|e| e.to_string())?;
            let manifest = |b: &[u8]| flotilla_bundle::format::parse_envelope(b).map(|(doc, _)| doc.signed);
            if manifest(bytes).map_err(|e| e.to_string())? != manifest(&ours).map_err(|e| e.to_string())? {
                return Err("that bundle is not this job's candidate (its manifest differs)".into());
            }
            let trust = s.trust.read().expect("trust lock").clone();
            let row = s.files.push(&s.store, bytes, trust.as_ref(), now_s()).map_err(|e| match e {
                crate::bundles::PushError::Invalid(m) | crate::bundles::PushError::Conflict(m) => m,
                crate::bundles::PushError::Internal(e) => format!("{e:#}"),
            })?;
            let _ = std::fs::write(s.retrain.job_dir(id).join("candidate.flb"), bytes);
            row
        }
    };
    let signers = row.signers.clone();
    update(s, id, |d| {
        d.job.signers = signers;
        true
    })
    .map_err(err)?;
    start(s, id, &row, &p).map_err(err)?;
    job(s, id).map_err(err)?.ok_or_else(|| "job vanished".into())
}

/// `flotilla retrain cancel`.
pub fn cancel(s: &Shared, id: &str) -> Result<JobDoc, String> {
    let moved = update(s, id, |d| {
        if !ACTIVE.contains(&d.job.state.as_str()) {
            return false;
        }
        d.job.state = "cancelled".into();
        d.job.reason = Some("cancelled by an operator".into());
        true
    })
    .map_err(|e| format!("{e:#}"))?;
    match moved {
        Some(d) => Ok(d),
        None => match job(s, id).map_err(|e| format!("{e:#}"))? {
            Some(d) => Err(format!("job {id} is already {}", d.job.state)),
            None => Err(format!("no job {id:?}")),
        },
    }
}
