//! The install pipeline: offered → downloading → verifying → staged → self-testing → active,
//! or failed with the previous model still active.
//!
//! Nothing the offer or the bundle says is used before the signatures over it verified; the
//! model only reaches the blob store after its digests matched, and only becomes active after
//! the self-test passed. The journal in SQLite records each step.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use flotilla_bundle::format::{extract_artifact, extract_artifact_to_vec, parse_envelope, read_envelope};
use flotilla_bundle::golden::GoldenSet;
use flotilla_bundle::manifest::{Artifact, Manifest, Role};
use flotilla_bundle::verify::VerifiedManifest;
use flotilla_proto::{Event, InstallOffer, InstallStage};

use crate::fetch::{self, Plan};
use crate::models::{ActiveModel, load_and_test};
use crate::state::Installed;
use crate::{Ctx, unix_now};

/// Largest bundle an offer may announce (a bound before any allocation or download).
const MAX_BUNDLE: u64 = 8 << 30;

#[derive(Debug)]
pub struct Failure {
    pub stage: InstallStage,
    pub reason: String,
}

fn fail<T>(stage: InstallStage, reason: impl std::fmt::Display) -> Result<T, Failure> {
    Err(Failure { stage, reason: reason.to_string() })
}

/// Handle an install offer end to end, reporting through events. Idempotent on `offer_id`.
pub async fn handle_offer(ctx: Arc<Ctx>, offer: InstallOffer) {
    let journaled = ctx.with_state(|s| s.install_state(&offer.offer_id)).ok().flatten();
    match journaled.as_ref().map(|(s, r)| (s.as_str(), r)) {
        Some(("active", _)) => {
            // Already done: acknowledge again (the first acknowledgement may have been lost),
            // even if a newer version has been activated since.
            let backend = ctx.registry.get(&offer.name).map(|m| m.backend().to_string()).unwrap_or_default();
            ctx.publish_event(Event::InstallSucceeded {
                offer_id: offer.offer_id.clone(),
                name: offer.name.clone(),
                version: offer.version,
                backend,
                self_test_ms: 0,
            })
            .await;
            return;
        }
        Some(("failed", reason)) => {
            ctx.publish_event(Event::InstallFailed {
                offer_id: offer.offer_id.clone(),
                name: offer.name.clone(),
                version: offer.version,
                stage: InstallStage::Offered,
                reason: reason.clone().unwrap_or_default(),
            })
            .await;
            return;
        }
        _ => {}
    }
    if !ctx.busy.lock().expect("busy lock").insert(offer.offer_id.clone()) {
        return; // the same offer is being handled right now
    }
    // One install at a time: a second offer waits (and then finds its work maybe done).
    let _one = ctx.install_lock.lock().await;
    let result = install(&ctx, &offer).await;
    let now = unix_now();
    match result {
        Ok((backend, self_test_ms)) => {
            tracing::info!(offer = %offer.offer_id, name = %offer.name, version = offer.version, %backend, "install succeeded");
            ctx.publish_event(Event::InstallSucceeded {
                offer_id: offer.offer_id.clone(),
                name: offer.name.clone(),
                version: offer.version,
                backend,
                self_test_ms,
            })
            .await;
            ctx.publish_state().await;
        }
        Err(f) => {
            tracing::warn!(offer = %offer.offer_id, name = %offer.name, version = offer.version, stage = f.stage.as_str(), reason = %f.reason, "install failed");
            let _ = ctx.with_state(|s| s.journal(&offer, "failed", Some(&f.reason), now));
            ctx.publish_event(Event::InstallFailed {
                offer_id: offer.offer_id.clone(),
                name: offer.name.clone(),
                version: offer.version,
                stage: f.stage,
                reason: f.reason,
            })
            .await;
        }
    }
    ctx.busy.lock().expect("busy lock").remove(&offer.offer_id);
}

/// Returns the backend that runs the new model and the self-test time.
async fn install(ctx: &Arc<Ctx>, offer: &InstallOffer) -> Result<(String, u64), Failure> {
    use InstallStage::*;
    let journal = |state: &str| {
        let _ = ctx.with_state(|s| s.journal(offer, state, None, unix_now()));
    };
    // 1. Offered: verify the signed manifest the offer carries before anything else.
    let verified = verify_head(ctx, &offer.head).or_else(|e| fail(Offered, e))?;
    let m = &verified.manifest;
    // A verified manifest's creation time is a signed time: the trusted clock moves up to it,
    // so an older bundle that has expired since cannot be replayed to this device.
    ctx.with_state(|s| s.observe_signed_time(m.created)).or_else(|e| fail(Offered, e))?;
    if m.name != offer.name || m.version != offer.version {
        return fail(
            Offered,
            format!("offer says {}@{} but the signed manifest is {}@{}", offer.name, offer.version, m.name, m.version),
        );
    }
    if let Some(active) = ctx.registry.get(&m.name) {
        if active.version == m.version && active.manifest_sha256 == verified.manifest_sha256 {
            journal("active");
            return Ok((active.backend().to_string(), 0));
        }
        if active.version == m.version {
            return fail(
                Offered,
                format!("version {} of {} is already active with a different manifest", m.version, m.name),
            );
        }
    }
    let highest = ctx.with_state(|s| s.highest(&m.name)).or_else(|e| fail(Offered, e))?;
    flotilla_bundle::verify::check_not_rollback(m, highest).or_else(|e| fail(Offered, e))?;
    if !m.target.arch.is_empty() && !m.target.arch.iter().any(|a| a == std::env::consts::ARCH) {
        return fail(Offered, format!("bundle targets {:?}, this device is {}", m.target.arch, std::env::consts::ARCH));
    }
    if offer.size > MAX_BUNDLE || !is_hex64(&offer.bundle_id) || offer.chunk_size == 0 {
        return fail(Offered, "offer has a bad bundle id, size or chunk size");
    }
    journal("offered");
    ctx.publish_event(Event::InstallAccepted {
        offer_id: offer.offer_id.clone(),
        name: m.name.clone(),
        version: m.version,
    })
    .await;

    // 2. Downloading only what this device lacks, resuming from what is on disk.
    let (plan, forms) = plan_fetch(ctx, offer, m).or_else(|e| fail(Offered, e))?;
    let part = ctx.cfg.data_dir.join("staging").join(plan.staging_name(&offer.bundle_id));
    check_disk_space(ctx, &plan, &forms, &part).or_else(|e| fail(Offered, e))?;
    journal("downloading");
    let mut fetched = false;
    if let Some(url) = &offer.url {
        match fetch::over_http(ctx, offer, &plan, url, &part).await {
            Ok(()) => fetched = true,
            // Both transports write the same staging file, so MQTT resumes where HTTP stopped.
            Err(e) => tracing::warn!(error = %format!("{e:#}"), %url, "HTTP download failed; continuing over MQTT"),
        }
    }
    if !fetched {
        fetch::over_mqtt(ctx, offer, &plan, &part).await.or_else(|e| fail(Downloading, e))?;
    }

    // 3. Verifying: the file is the offered one, its manifest the verified one, artifacts intact.
    journal("verifying");
    let ctx2 = ctx.clone();
    let (part2, manifest_sha) = (part.clone(), verified.manifest_sha256.clone());
    let manifest = m.clone();
    let staged =
        tokio::task::spawn_blocking(move || stage_artifacts(&ctx2, &part2, &plan, &forms, &manifest, &manifest_sha))
            .await
            .map_err(|e| Failure { stage: Verifying, reason: e.to_string() })?;
    let staged = match staged {
        Ok(s) => s,
        Err(e) => {
            // A corrupt download is not worth resuming.
            let _ = std::fs::remove_file(&part);
            return fail(Verifying, e);
        }
    };
    journal("staged");

    // 4. Self-testing, off the async runtime.
    journal("self_testing");
    let ctx2 = ctx.clone();
    let manifest = verified.manifest.clone();
    let (model_blob, golden_blob) = (staged.model_blob.clone(), staged.golden_blob.clone());
    let tested = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let bytes = ctx2.blobs.read(&model_blob).map_err(|e| e.to_string())?;
        let golden = match &golden_blob {
            Some(g) => {
                Some(GoldenSet::decode(&ctx2.blobs.read(g).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        load_and_test(&ctx2.runtimes, &manifest, &bytes, golden.as_ref())
    })
    .await
    .map_err(|e| Failure { stage: SelfTesting, reason: e.to_string() })?;
    let (model, report) = tested.or_else(|e| fail(SelfTesting, format!("self-test failed: {e}")))?;

    // 5. Activating: durable first, then visible.
    let installed = Installed {
        name: m.name.clone(),
        version: m.version,
        head: staged.head,
        model_blob: staged.model_blob,
        golden_blob: staged.golden_blob,
    };
    let now = unix_now();
    ctx.with_state(|s| {
        s.observe_signed_time(m.created)?;
        s.activate(&installed, &offer.offer_id, now)
    })
    .or_else(|e| fail(Activating, e))?;
    let backend = model.backend().to_string();
    let drift = crate::load_drift(ctx, &m.name, m.version, &verified.manifest);
    let elapsed_ms = report.elapsed_ms;
    tracing::info!(name = %m.name, version = m.version, self_test = report.kind.as_str(), median_us = report.median_us, golden_cases = report.cases, "model active");
    ctx.registry.insert(
        ActiveModel::new(m.name.clone(), m.version, verified.manifest.clone(), verified.manifest_sha256.clone(), model)
            .with_self_test(report)
            .with_drift(drift),
    );
    let _ = std::fs::remove_file(&part);
    Ok((backend, elapsed_ms))
}

pub fn verify_head(ctx: &Ctx, head: &[u8]) -> anyhow::Result<VerifiedManifest> {
    let (doc, _) = parse_envelope(head)?;
    let now = ctx.trusted_now()?;
    let trust = ctx.trust.read().expect("trust lock");
    Ok(trust.verify_manifest(&doc, now)?)
}

struct Staged {
    head: Vec<u8>,
    model_blob: String,
    golden_blob: Option<String>,
}

/// For each artifact of the manifest, the stored form to fetch (offsets in the bundle file's
/// data section), or None when its content is already in the blob store (verified when it was
/// imported, so nothing is fetched twice). The plan covers the head and the chosen forms.
fn plan_fetch(ctx: &Ctx, offer: &InstallOffer, m: &Manifest) -> anyhow::Result<(Plan, Vec<Option<Artifact>>)> {
    let (_, data_offset) = parse_envelope(&offer.head)?;
    anyhow::ensure!(data_offset == offer.head.len() as u64, "the offer's head has trailing bytes");
    let mut ranges = vec![(0, data_offset)];
    let mut forms = Vec::with_capacity(m.artifacts.len());
    for a in &m.artifacts {
        let form = if ctx.blobs.contains(&a.sha256) {
            None
        } else if let Some(base) = a.base_sha256() {
            let holds_base = ctx.blobs.contains(base);
            match a.full_form() {
                Some(full) if !(holds_base && offer.delta) => Some(full),
                _ if holds_base => Some(a.clone()),
                _ => anyhow::bail!(
                    "{} is a delta against {base}, which this device does not hold, and the bundle has no full form",
                    a.name
                ),
            }
        } else {
            Some(a.clone())
        };
        if let Some(f) = &form {
            let start =
                data_offset.checked_add(f.offset).ok_or_else(|| anyhow::anyhow!("artifact offset overflows"))?;
            ranges.push((start, f.stored_size));
        }
        forms.push(form);
    }
    Ok((Plan::new(ranges, offer.size)?, forms))
}

/// Refuse before downloading unless the rest of the download, the content it decompresses to and
/// the configured reserve fit on the disk holding the data directory.
fn check_disk_space(ctx: &Ctx, plan: &Plan, forms: &[Option<Artifact>], part: &Path) -> anyhow::Result<()> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0).min(plan.total());
    let content: u64 = forms.iter().flatten().map(|f| f.size).sum();
    let need = (plan.total() - have).saturating_add(content).saturating_add(ctx.cfg.disk_reserve_bytes);
    let free = fetch::available_bytes(&ctx.cfg.data_dir)?;
    anyhow::ensure!(
        free >= need,
        "not enough disk space: the install needs {need} bytes free ({} to download, {content} unpacked, {} reserve), {free} available",
        plan.total() - have,
        ctx.cfg.disk_reserve_bytes
    );
    Ok(())
}

fn stage_artifacts(
    ctx: &Ctx,
    part: &Path,
    plan: &Plan,
    forms: &[Option<Artifact>],
    m: &Manifest,
    manifest_sha256: &str,
) -> anyhow::Result<Staged> {
    // No hash of the whole file: the head is verified below and every fetched byte after it
    // belongs to an artifact whose stored digest is checked before decompression and whose
    // content digest is checked while it is written, so a whole-file pass would add nothing.
    // The head is always the first thing staged; every artifact is then checked against it.
    let mut f = std::fs::File::open(part)?;
    let (_, data_offset) = read_envelope(&mut f)?;
    let mut head = vec![0u8; data_offset as usize];
    f.seek(SeekFrom::Start(0))?;
    std::io::Read::read_exact(&mut f, &mut head)?;
    let verified = verify_head(ctx, &head)?;
    anyhow::ensure!(
        verified.manifest_sha256 == manifest_sha256,
        "the bundle's manifest differs from the one in the offer"
    );
    for (a, form) in m.artifacts.iter().zip(forms) {
        let Some(form) = form else {
            anyhow::ensure!(ctx.blobs.contains(&a.sha256), "artifact {} vanished from the blob store", a.name);
            continue;
        };
        // Where the form's bytes sit in the staging file (the plan packs ranges back to back).
        let pos = plan
            .staged_pos(data_offset + form.offset)
            .filter(|_| form.stored_size > 0)
            .ok_or_else(|| anyhow::anyhow!("artifact {} was not fetched", a.name))?;
        let staged = Artifact { offset: pos - data_offset, ..form.clone() };
        let base = match form.base_sha256() {
            Some(b) => Some(ctx.blobs.read(b)?),
            None => None,
        };
        if a.role == Role::Golden {
            let limit = flotilla_bundle::golden::MAX_GOLDEN_BYTES as u64;
            let bytes = extract_artifact_to_vec(&mut f, data_offset, &staged, base.as_deref(), limit)?;
            GoldenSet::decode(&bytes)?;
            ctx.blobs.import(&a.sha256, |out| Ok(out.write_all(&bytes)?))?;
        } else {
            // extract_artifact checks the content digest of exactly what it writes.
            ctx.blobs.import_checked(&a.sha256, |out| {
                let mut w = std::io::BufWriter::new(out);
                extract_artifact(&mut f, data_offset, &staged, base.as_deref(), &mut w)?;
                w.flush()?;
                Ok(())
            })?;
        }
    }
    let model = m.artifact(Role::Model).expect("checked manifests have a model");
    let golden_blob = m.artifact(Role::Golden).map(|g| g.sha256.clone());
    Ok(Staged { head, model_blob: model.sha256.clone(), golden_blob })
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
