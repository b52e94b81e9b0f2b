//! The runner's last steps: scoring the candidate against the current model (accuracy here, or
//! the policy's evaluator), and building, signing and pushing the successor bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_api::v1::{RetrainPolicy, RetrainScore};
use serde::Deserialize;

use super::prepare::run_logged;
use crate::service::retrain::{job, start_rollout, transition};
use crate::service::{Fleet, Kind, bundles};
use crate::util::now_s;

/// Labelled requests of a set: `samples` (the job's held-out share) or a file on the server.
fn set_path(s: &Fleet, id: &str, set: &str) -> PathBuf {
    if set == "samples" { s.retrain.job_dir(id).join("heldout.json") } else { PathBuf::from(set) }
}

async fn score(s: &Fleet, id: &str, p: &RetrainPolicy, model: &Path, set: &Path) -> anyhow::Result<(f64, u64)> {
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

pub(super) async fn evaluate(s: &Arc<Fleet>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
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
    transition(s, id, "evaluating", to, Some(reason), |j| j.evaluation = scores.clone()).await?;
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

pub(super) async fn build(s: &Arc<Fleet>, id: &str, p: &RetrainPolicy) -> anyhow::Result<()> {
    let d = job(s, id).await?.context("job vanished")?;
    let dir = s.retrain.job_dir(id);
    let base = s.store.bundle_by_name(&d.job.model, d.job.base_version).await?.context("the base bundle is gone")?;
    let prev = std::fs::read(s.files.path(&base.id).context("the base bundle's file is gone")?)?;
    let version =
        s.store.bundles().await?.iter().filter(|b| b.name == d.job.model).map(|b| b.version).max().unwrap_or(0) + 1;
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
    let pushed = bundles::push(s, signed.into()).await;
    let name = format!("{}@{version}", d.job.model);
    match pushed {
        Ok(row) => {
            let signers = row.signers.clone();
            if p.rollout.approval == "manual" {
                let reason = format!("{name} built and signed; start its rollout with `flotilla retrain approve {id}`");
                transition(s, id, "building", "awaiting_approval", Some(reason), |j| {
                    j.candidate_version = Some(version);
                    j.bundle = Some(name.clone());
                    j.signers = signers.clone();
                })
                .await?;
            } else {
                transition(s, id, "building", "building", None, |j| {
                    j.candidate_version = Some(version);
                    j.bundle = Some(name.clone());
                    j.signers = signers.clone();
                })
                .await?;
                start_rollout(s, id, &row, p).await?;
            }
        }
        Err(e) if e.kind == Kind::Unacceptable => {
            let why = e.message;
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
            })
            .await?;
        }
        Err(e) => bail!("{e}"),
    }
    s.wake.notify_one();
    Ok(())
}
