//! Retraining jobs as the API and the runner share them: policies, opening a job (once per
//! model at a time), moving it on (every save compares the job's revision, so an operator's
//! cancel and a step that read older state cannot overwrite each other), approving, cancelling,
//! and starting the candidate's rollout. The runner that carries jobs through their steps is
//! [`crate::worker::retrain`].
//!
//! Every job is a JSON document in the store; its files (samples, the base and candidate models,
//! the trainer's log, the candidate bundle) live in `DATA_DIR/retrain/{id}/`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use flotilla_api::v1::{RetrainJob, RetrainPolicy};
use flotilla_bundle::keys::SecretKey;
use flotilla_proto::tags::Selector;
use serde::{Deserialize, Serialize};

use super::{Error, Fleet, Result};
use crate::store::BundleRow;
use crate::util::{new_id, now_s, parse_rfc3339, rfc3339};

/// States in which a job still has work to do.
pub const ACTIVE: [&str; 6] = ["collecting", "training", "evaluating", "building", "awaiting_approval", "rolling_out"];

/// The retraining side of the server: the automation signing key and which jobs have a step
/// running in this process.
pub struct Retrain {
    pub key: Option<SecretKey>,
    pub dir: PathBuf,
    pub running: Mutex<HashSet<String>>,
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
        Retrain { key, dir: data_dir.join("retrain"), running: Default::default() }
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

fn no_policy(model: &str) -> Error {
    Error::not_found("policy_not_found", format!("no retraining policy for {model:?}"))
        .hint("set one with `flotilla retrain policy set --model NAME --trainer-command '...'` or `--file policy.toml`")
}

fn no_job(id: &str) -> Error {
    Error::not_found("job_not_found", format!("no retraining job {id:?}")).hint("list jobs with `flotilla retrain ls`")
}

pub async fn policies(f: &Fleet) -> anyhow::Result<Vec<RetrainPolicy>> {
    f.store.retrain_policies().await?.iter().map(|p| Ok(serde_json::from_str(p)?)).collect()
}

pub async fn policy(f: &Fleet, model: &str) -> anyhow::Result<Option<RetrainPolicy>> {
    Ok(policies(f).await?.into_iter().find(|p| p.model == model))
}

pub async fn get_policy(f: &Fleet, model: &str) -> Result<RetrainPolicy> {
    policy(f, model).await?.ok_or_else(|| no_policy(model))
}

/// Check and store a policy for `model`.
pub async fn set_policy(f: &Fleet, model: &str, p: &RetrainPolicy) -> Result<()> {
    let bad =
        |m: String| Error::invalid("bad_policy", m).hint("see `flotilla retrain policy set --help` for the fields");
    if p.model != model {
        return Err(bad(format!("the policy is for {:?} but was sent to {model:?}", p.model)));
    }
    validate(p).map_err(bad)?;
    f.store.set_retrain_policy(model, &serde_json::to_string(p).map_err(anyhow::Error::from)?, now_s()).await?;
    Ok(())
}

pub async fn delete_policy(f: &Fleet, model: &str) -> Result<()> {
    if f.store.delete_retrain_policy(model).await? { Ok(()) } else { Err(no_policy(model)) }
}

/// Check a policy before it is stored.
pub fn validate(p: &RetrainPolicy) -> std::result::Result<(), String> {
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

pub async fn jobs(f: &Fleet) -> anyhow::Result<Vec<JobDoc>> {
    f.store.retrain_jobs().await?.iter().map(|j| Ok(serde_json::from_str(&j.json)?)).collect()
}

pub async fn job(f: &Fleet, id: &str) -> anyhow::Result<Option<JobDoc>> {
    f.store.retrain_job(id).await?.map(|j| Ok(serde_json::from_str(&j.json)?)).transpose()
}

/// A job, or `NotFound`.
pub async fn get(f: &Fleet, id: &str) -> Result<JobDoc> {
    job(f, id).await?.ok_or_else(|| no_job(id))
}

/// Apply `change` to a stored job, stamp and save it; if another save came first, read it again
/// and apply `change` to that. `change` returns false to leave the job as it is (it moved on, or
/// was cancelled, while a step ran).
pub async fn update(
    f: &Fleet,
    id: &str,
    mut change: impl FnMut(&mut JobDoc) -> bool,
) -> anyhow::Result<Option<JobDoc>> {
    loop {
        let Some(row) = f.store.retrain_job(id).await? else { return Ok(None) };
        let mut d: JobDoc = serde_json::from_str(&row.json)?;
        let state = d.job.state.clone();
        if !change(&mut d) {
            return Ok(None);
        }
        let now = now_s();
        d.job.updated = rfc3339(now);
        if d.job.state != state {
            d.since = now;
            let detail = d.job.reason.clone().unwrap_or_default();
            d.job.history.push(format!(
                "[{}] {}{}",
                d.job.updated,
                d.job.state,
                if detail.is_empty() { String::new() } else { format!(": {detail}") }
            ));
        }
        if f.store.save_retrain_job(id, row.rev, &d.job.state, &serde_json::to_string(&d)?).await? {
            if d.job.state != state {
                let reason = d.job.reason.as_deref().unwrap_or_default();
                tracing::info!(job = %id, model = %d.job.model, state = %d.job.state, reason, "retrain job moved");
            }
            return Ok(Some(d));
        }
    }
}

/// Move a job from `from` to `to` (with a reason), unless it left `from` meanwhile.
pub async fn transition(
    f: &Fleet,
    id: &str,
    from: &str,
    to: &str,
    reason: Option<String>,
    mut change: impl FnMut(&mut RetrainJob),
) -> anyhow::Result<bool> {
    Ok(update(f, id, |d| {
        if d.job.state != from {
            return false;
        }
        d.job.state = to.into();
        d.job.reason = reason.clone();
        change(&mut d.job);
        true
    })
    .await?
    .is_some())
}

fn job_running(model: &str) -> Error {
    Error::conflict("job_running", format!("a job for {model} is still running"))
        .hint("wait for it, or stop it with `flotilla retrain cancel ID`")
}

/// Open a job for `model` at `base_version` (the version whose devices drifted), unless one of
/// its jobs is still active (`Conflict`, checked in the same store operation as the insert).
pub async fn open(
    f: &Fleet,
    policy: &RetrainPolicy,
    base_version: u64,
    selector: String,
    trigger: String,
    alert_id: Option<i64>,
) -> Result<JobDoc> {
    let now = now_s();
    let id = format!("j-{}", new_id());
    let stamp = rfc3339(now);
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
    std::fs::create_dir_all(f.retrain.job_dir(&id)).map_err(anyhow::Error::from)?;
    let json = serde_json::to_string(&d).map_err(anyhow::Error::from)?;
    if !f.store.open_retrain_job(&id, &policy.model, "collecting", now, &json, &ACTIVE).await? {
        let _ = std::fs::remove_dir(f.retrain.job_dir(&id));
        return Err(job_running(&policy.model));
    }
    tracing::info!(job = %id, model = %policy.model, base_version, %selector, %trigger, "retrain job opened");
    f.wake.notify_one();
    Ok(d)
}

/// `flotilla retrain start`: a job for `model` on the devices `selector` picks (default: the
/// policy's), at the version they run most (ties: the newest).
pub async fn start_manual(f: &Fleet, model: &str, selector: Option<String>) -> Result<JobDoc> {
    let p = get_policy(f, model).await?;
    let sel_text = selector.or_else(|| p.data.selector.clone()).unwrap_or_default();
    let sel = super::devices::selector(Some(&sel_text))?;
    if jobs(f).await?.iter().any(|j| j.job.model == model && ACTIVE.contains(&j.job.state.as_str())) {
        return Err(job_running(model));
    }
    let mut counts: std::collections::BTreeMap<u64, u32> = Default::default();
    for d in f.store.devices().await?.iter().filter(|d| sel.matches(&d.tags)) {
        for m in d.models.iter().filter(|m| m.name == model) {
            *counts.entry(m.version).or_default() += 1;
        }
    }
    let Some(version) = counts.iter().max_by_key(|(v, n)| (**n, **v)).map(|(v, _)| *v) else {
        return Err(Error::conflict("no_devices", format!("no device matching {sel_text:?} runs {model}"))
            .hint("see `flotilla devices ls` for what runs where"));
    };
    let shown = if sel_text.is_empty() { "every device".to_string() } else { sel_text.clone() };
    open(f, &p, version, sel_text, format!("manual, samples from {shown}"), None).await
}

pub fn created_s(j: &RetrainJob) -> i64 {
    parse_rfc3339(&j.created).unwrap_or(0)
}

/// The job's policy as it is now, or as it was when the job opened.
pub async fn policy_of(f: &Fleet, d: &JobDoc) -> anyhow::Result<RetrainPolicy> {
    match policy(f, &d.job.model).await? {
        Some(p) => Ok(p),
        None => d.policy.clone().with_context(|| format!("no retraining policy for {}", d.job.model)),
    }
}

/// A pipeline delivered the candidate (`POST /api/v1/retrain/jobs/{id}/candidate`).
pub async fn accept_candidate(f: &Fleet, id: &str, model: &[u8]) -> Result<JobDoc> {
    let d = get(f, id).await?;
    flotilla_builder::detect_format(model)
        .map_err(|e| Error::unacceptable("bad_model", format!("the candidate: {e}")))?;
    let not_training =
        |state: &str| Error::conflict("not_training", format!("job {id} is {state}, not waiting for a model"));
    if d.job.state != "training" {
        return Err(not_training(&d.job.state));
    }
    std::fs::write(f.retrain.job_dir(id).join("candidate-model"), model).map_err(anyhow::Error::from)?;
    let reason = format!("the pipeline uploaded a candidate ({} bytes)", model.len());
    if !transition(f, id, "training", "evaluating", Some(reason), |_| {}).await? {
        return Err(not_training(&get(f, id).await?.job.state));
    }
    f.wake.notify_one();
    get(f, id).await
}

/// Start the candidate's rollout: the policy's plan, targeted at the job's devices unless the
/// plan names its own target.
pub async fn start_rollout(f: &Fleet, id: &str, bundle: &BundleRow, p: &RetrainPolicy) -> anyhow::Result<String> {
    let d = job(f, id).await?.context("job vanished")?;
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
    let rollout = super::rollouts::start(f, bundle, Some(plan), &[])
        .await
        .map_err(|e| anyhow::anyhow!("starting the rollout: {e}"))?;
    let from = d.job.state.clone();
    let reason = format!("rollout {rollout} of {}@{} to {}", bundle.name, bundle.version, d.job.selector);
    transition(f, id, &from, "rolling_out", Some(reason), |j| j.rollout_id = Some(rollout.clone())).await?;
    Ok(rollout)
}

/// `flotilla retrain approve`: start the rollout of a job waiting for approval, after adding the
/// signatures in `signed` (the candidate bundle with a key holder's signature) when given.
pub async fn approve(f: &Fleet, id: &str, signed: Option<bytes::Bytes>) -> Result<JobDoc> {
    let cannot = |m: String| Error::conflict("cannot_approve", m).hint("see the job with `flotilla retrain status ID`");
    let d = get(f, id).await?;
    if d.job.state != "awaiting_approval" {
        return Err(cannot(format!("job {id} is {}, not awaiting approval", d.job.state)));
    }
    let p = policy_of(f, &d).await?;
    let version = d.job.candidate_version.ok_or_else(|| cannot("the job has no candidate".into()))?;
    let row = match f.store.bundle_by_name(&d.job.model, version).await? {
        Some(row) => row,
        None => {
            let Some(bytes) = signed else {
                return Err(cannot(format!(
                    "{}@{version} does not carry enough signatures yet: sign it with `flotilla retrain approve {id} --key KEY`",
                    d.job.model
                )));
            };
            let ours = std::fs::read(f.retrain.job_dir(id).join("candidate.flb")).map_err(anyhow::Error::from)?;
            let manifest = |b: &[u8]| flotilla_bundle::format::parse_envelope(b).map(|(doc, _)| doc.signed);
            let theirs = manifest(&bytes).map_err(|e| cannot(e.to_string()))?;
            if theirs != manifest(&ours).map_err(|e| cannot(e.to_string()))? {
                return Err(cannot("that bundle is not this job's candidate (its manifest differs)".into()));
            }
            let row = super::bundles::push(f, bytes.clone()).await.map_err(|e| cannot(e.message))?;
            let _ = std::fs::write(f.retrain.job_dir(id).join("candidate.flb"), &bytes);
            row
        }
    };
    let signers = row.signers.clone();
    update(f, id, |d| {
        d.job.signers = signers.clone();
        true
    })
    .await?;
    start_rollout(f, id, &row, &p).await.map_err(|e| cannot(format!("{e:#}")))?;
    get(f, id).await
}

/// `flotilla retrain cancel`.
pub async fn cancel(f: &Fleet, id: &str) -> Result<JobDoc> {
    let moved = update(f, id, |d| {
        if !ACTIVE.contains(&d.job.state.as_str()) {
            return false;
        }
        d.job.state = "cancelled".into();
        d.job.reason = Some("cancelled by an operator".into());
        true
    })
    .await?;
    match moved {
        Some(d) => Ok(d),
        None => {
            let d = get(f, id).await?;
            Err(Error::conflict("cannot_cancel", format!("job {id} is already {}", d.job.state)))
        }
    }
}
