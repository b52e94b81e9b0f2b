//! The retraining runner: carries each active job through its steps. A drift alert (or
//! `flotilla retrain start`) opens a job that collects the affected devices' labelled samples,
//! runs the policy's trainer (a command, or a webhook to an external pipeline), scores the
//! candidate against the current model on held-out data, and only if it matches or beats it
//! builds the successor bundle, signs it with the automation key, and starts a staged rollout
//! (or waits for `flotilla retrain approve`). A restarted server carries on from the stored
//! state (a step that was running when it stopped runs again).

mod evaluate;
mod prepare;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use flotilla_api::v1::RetrainPolicy;
use tokio_util::sync::CancellationToken;

use crate::service::retrain::{ACTIVE, JobDoc, created_s, jobs, open, policies, policy_of, transition, update};
use crate::service::{Fleet, Kind, devices, samples};
use crate::util::{now_s, rfc3339};
use evaluate::{build, evaluate};
use prepare::{call_webhook, prepare, train_command};

pub async fn run(shared: Arc<Fleet>, cancel: CancellationToken) {
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

async fn step(s: &Arc<Fleet>) -> anyhow::Result<()> {
    triggers(s).await?;
    for d in jobs(s).await? {
        // One replica at a time carries a job on (renewed each step, so while a long step runs).
        if !ACTIVE.contains(&d.job.state.as_str()) || !s.lease(&format!("job/{}", d.job.id)).await? {
            continue;
        }
        if let Err(e) = advance(s, &d).await {
            let msg = format!("{e:#}");
            tracing::warn!(job = %d.job.id, error = %msg, "retrain job failed");
            let state = d.job.state.clone();
            transition(s, &d.job.id, &state, "failed", Some(msg), |_| {}).await?;
        }
    }
    Ok(())
}

/// Open a job for every firing alert a policy reacts to.
async fn triggers(s: &Fleet) -> anyhow::Result<()> {
    let policies: Vec<RetrainPolicy> = policies(s).await?.into_iter().filter(|p| p.trigger.on_alert).collect();
    if policies.is_empty() {
        return Ok(());
    }
    let jobs = jobs(s).await?;
    let now = now_s();
    for alert in s.store.alerts(false).await? {
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
        if s.store.bundle_by_name(&alert.model, alert.version).await?.is_none() {
            continue;
        }
        let selector = p.data.selector.clone().unwrap_or_else(|| alert.cohort.clone());
        let trigger = format!(
            "alert {}: {} {} {} over {} windows",
            alert.id, alert.cohort, alert.signal, alert.metrics, alert.windows
        );
        match open(s, p, alert.version, selector, trigger, Some(alert.id)).await {
            Ok(_) => return Ok(()),                         // one per step: the next sees this job
            Err(e) if e.kind == Kind::Conflict => continue, // another opened one meanwhile
            Err(e) => return Err(anyhow::anyhow!("{e}")),
        }
    }
    Ok(())
}

/// Runs `f` as this job's background step unless one is already running.
fn spawn_step<F>(s: &Arc<Fleet>, id: &str, f: impl FnOnce(Arc<Fleet>, String) -> F)
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
                d.job.reason = Some(msg.clone());
                true
            })
            .await;
        }
        s2.retrain.running.lock().expect("running lock").remove(&id2);
    });
}

async fn advance(s: &Arc<Fleet>, d: &JobDoc) -> anyhow::Result<()> {
    let id = d.job.id.clone();
    let now = now_s();
    match d.job.state.as_str() {
        "collecting" => {
            let p = policy_of(s, d).await?;
            let Some(upload) = &d.job.upload_id else {
                let sel = devices::selector(Some(&d.job.selector)).map_err(|e| anyhow::anyhow!("{e}"))?;
                let (upload_id, devices) = samples::request(s, &d.job.model, Some(d.job.base_version), &sel)
                    .await
                    .map_err(|e| anyhow::anyhow!("collecting samples: {e}"))?;
                update(s, &id, |d| {
                    d.job.upload_id = Some(upload_id.clone());
                    d.job.history.push(format!(
                        "[{}] asked {} for samples ({upload_id})",
                        rfc3339(now),
                        devices.join(", ")
                    ));
                    true
                })
                .await?;
                return Ok(());
            };
            let parts = s.store.sample_upload(upload).await?;
            let all_done = !parts.is_empty() && parts.iter().all(|(_, _, _, done)| *done);
            if all_done || now - d.since >= p.data.collect_secs as i64 {
                spawn_step(s, &id, |s, id| async move { prepare(&s, &id, &p).await });
            }
        }
        "training" => {
            let p = policy_of(s, d).await?;
            if !p.trainer.command.is_empty() {
                spawn_step(s, &id, |s, id| async move { train_command(&s, &id, &p).await });
            } else if !d.webhook_sent {
                spawn_step(s, &id, |s, id| async move { call_webhook(&s, &id, &p).await });
            } else if now - d.since >= p.trainer.timeout_secs as i64 {
                bail!("the pipeline did not upload a model within {} s of the webhook", p.trainer.timeout_secs);
            }
        }
        "evaluating" => {
            let p = policy_of(s, d).await?;
            spawn_step(s, &id, |s, id| async move { evaluate(&s, &id, &p).await });
        }
        "building" => {
            let p = policy_of(s, d).await?;
            spawn_step(s, &id, |s, id| async move { build(&s, &id, &p).await });
        }
        "rolling_out" => {
            let r = match d.job.rollout_id.as_deref() {
                Some(r) => s.store.rollout(r).await?,
                None => None,
            };
            let Some(r) = r else {
                bail!("its rollout is gone");
            };
            match r.state.as_str() {
                "completed" => {
                    // The cohort no longer runs the base version: its alerts on it are over
                    // (the one that started the job, and any other signal's).
                    for a in s.store.alerts(false).await? {
                        let same =
                            a.model == d.job.model && a.version == d.job.base_version && a.cohort == d.job.selector;
                        if same || Some(a.id) == d.job.alert_id {
                            s.store.resolve_alert(a.id, now).await?;
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
                    )
                    .await?;
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
                    )
                    .await?;
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}
