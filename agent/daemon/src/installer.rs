//! The install pipeline: offered → downloading → verifying → staged → self-testing → active,
//! or failed with the previous model still active.
//!
//! Nothing the offer or the bundle says is used before the signatures over it verified; the
//! model only reaches the blob store after its digests matched, and only becomes active after
//! the self-test passed. The journal in SQLite records each step.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_bundle::format::{extract_artifact, extract_artifact_to_vec, parse_envelope, read_envelope};
use flotilla_bundle::golden::GoldenSet;
use flotilla_bundle::manifest::Role;
use flotilla_bundle::verify::VerifiedManifest;
use flotilla_proto::{Channel, Chunk, Event, FetchRequest, InstallOffer, InstallStage};
use tokio::sync::mpsc;

use crate::blobs::hash_file;
use crate::models::{ActiveModel, load_and_test};
use crate::state::Installed;
use crate::{Ctx, unix_now};

/// Chunk requests kept in flight.
const WINDOW: u64 = 4;
/// With no chunk arriving for this long, the missing ones are asked for again.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
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

    // 2. Downloading (resumes from what is on disk).
    journal("downloading");
    let part = ctx.cfg.data_dir.join("staging").join(format!("{}.part", offer.bundle_id));
    let mut fetched = false;
    if let Some(url) = &offer.url {
        match fetch_over_http(ctx, offer, url, &part).await {
            Ok(()) => fetched = true,
            // Both transports write the same .part file, so MQTT resumes where HTTP stopped.
            Err(e) => tracing::warn!(error = %format!("{e:#}"), %url, "HTTP download failed; continuing over MQTT"),
        }
    }
    if !fetched {
        fetch_over_mqtt(ctx, offer, &part).await.or_else(|e| fail(Downloading, e))?;
    }

    // 3. Verifying: the file is the offered one, its manifest the verified one, artifacts intact.
    journal("verifying");
    let ctx2 = ctx.clone();
    let (part2, bundle_id, manifest_sha) = (part.clone(), offer.bundle_id.clone(), verified.manifest_sha256.clone());
    let staged = tokio::task::spawn_blocking(move || stage_artifacts(&ctx2, &part2, &bundle_id, &manifest_sha))
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
    ctx.registry.insert(ActiveModel {
        name: m.name.clone(),
        version: m.version,
        manifest: verified.manifest.clone(),
        manifest_sha256: verified.manifest_sha256.clone(),
        model,
    });
    let _ = std::fs::remove_file(&part);
    tracing::info!(name = %m.name, version = m.version, median_us = report.median_us, golden_cases = report.cases, "model active");
    Ok((backend, report.elapsed_ms))
}

pub fn verify_head(ctx: &Ctx, head: &[u8]) -> anyhow::Result<VerifiedManifest> {
    let (doc, _) = parse_envelope(head)?;
    let now = ctx.with_state(|s| s.trusted_now(unix_now()))?;
    let trust = ctx.trust.read().expect("trust lock");
    Ok(trust.verify_manifest(&doc, now)?)
}

struct Staged {
    head: Vec<u8>,
    model_blob: String,
    golden_blob: Option<String>,
}

fn stage_artifacts(ctx: &Ctx, part: &Path, bundle_id: &str, manifest_sha256: &str) -> anyhow::Result<Staged> {
    let actual = hash_file(part)?;
    anyhow::ensure!(actual == bundle_id, "downloaded bundle hashes to {actual}, the offer said {bundle_id}");
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
    let m = &verified.manifest;
    let model = m.artifact(Role::Model).expect("checked manifests have a model");
    let base = match &model.encoding {
        flotilla_bundle::manifest::Encoding::ZstdPatch { base_sha256 } => Some(ctx.blobs.read(base_sha256)?),
        _ => None,
    };
    // Every artifact is checked against the signed manifest, even when its content is already in
    // the blob store (a corrupt bundle is refused, not silently deduplicated).
    if ctx.blobs.contains(&model.sha256) {
        extract_artifact(&mut f, data_offset, model, base.as_deref(), std::io::sink())?;
    }
    ctx.blobs.import(&model.sha256, |out| {
        let mut w = std::io::BufWriter::new(out);
        extract_artifact(&mut f, data_offset, model, base.as_deref(), &mut w)?;
        w.flush()?;
        Ok(())
    })?;
    let golden_blob = match m.artifact(Role::Golden) {
        Some(g) => {
            let bytes = extract_artifact_to_vec(
                &mut f,
                data_offset,
                g,
                None,
                flotilla_bundle::golden::MAX_GOLDEN_BYTES as u64,
            )?;
            GoldenSet::decode(&bytes)?;
            ctx.blobs.import(&g.sha256, |out| Ok(out.write_all(&bytes)?))?;
            Some(g.sha256.clone())
        }
        None => None,
    };
    Ok(Staged { head, model_blob: model.sha256.clone(), golden_blob })
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Report download progress each time another tenth of the bundle arrived, and at the end.
/// Both transports report through here, so the control plane sees one cadence.
async fn report_progress(ctx: &Ctx, offer: &InstallOffer, have: u64, last: &mut u64) {
    let tenth = |n: u64| n * 10 / offer.size.max(1);
    if tenth(have) > tenth(*last) || (have == offer.size && *last != have) {
        *last = have;
        ctx.publish_event(Event::InstallProgress {
            offer_id: offer.offer_id.clone(),
            received: have,
            total: offer.size,
        })
        .await;
    }
}

/// Open the staging file for appending; a file longer than the bundle is garbage and starts over.
fn open_part(part: &Path, size: u64) -> anyhow::Result<(std::fs::File, u64)> {
    std::fs::create_dir_all(part.parent().expect("staging dir"))?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(part)?;
    let mut have = file.metadata()?.len();
    if have > size {
        file.set_len(0)?;
        have = 0;
    }
    Ok((file, have))
}

/// Download over HTTP with `Range`, resuming from the bytes already in `part`.
async fn fetch_over_http(ctx: &Arc<Ctx>, offer: &InstallOffer, url: &str, part: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(url.starts_with("http://") || url.starts_with("https://"), "unsupported URL scheme in {url:?}");
    let (mut file, mut have) = open_part(part, offer.size)?;
    if have == offer.size {
        return Ok(());
    }
    let client =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).read_timeout(CHUNK_TIMEOUT).build()?;
    let mut resp = client.get(url).header(reqwest::header::RANGE, format!("bytes={have}-")).send().await?;
    match resp.status().as_u16() {
        206 => {
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            anyhow::ensure!(start == Some(have), "server answered a range starting at {start:?}, asked for {have}");
        }
        200 => {
            // The server ignored the range: start over.
            file.set_len(0)?;
            have = 0;
        }
        s => anyhow::bail!("HTTP {s} from {url}"),
    }
    let mut last_progress = have;
    while let Some(bytes) = resp.chunk().await? {
        anyhow::ensure!(
            have + bytes.len() as u64 <= offer.size,
            "server sent more than the offered {} bytes",
            offer.size
        );
        file.write_all(&bytes)?;
        have += bytes.len() as u64;
        report_progress(ctx, offer, have, &mut last_progress).await;
    }
    anyhow::ensure!(have == offer.size, "download ended at {have} of {} bytes", offer.size);
    file.sync_all()?;
    Ok(())
}

/// Download the bundle in chunks over MQTT into `part`, resuming from its length.
async fn fetch_over_mqtt(ctx: &Arc<Ctx>, offer: &InstallOffer, part: &Path) -> anyhow::Result<()> {
    let (mut file, mut have) = open_part(part, offer.size)?;
    let (tx, mut rx) = mpsc::channel::<Chunk>(64);
    ctx.chunk_routes.lock().expect("routes lock").insert(offer.bundle_id.clone(), tx);
    let _route = RouteGuard { ctx: ctx.clone(), bundle_id: offer.bundle_id.clone() };
    let chunk = offer.chunk_size as u64;
    let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut requested_to = have;
    let mut last_progress = 0u64;
    let mut stalls = 0u32;
    while have < offer.size {
        // Keep the window full.
        while requested_to < offer.size && requested_to < have + WINDOW * chunk {
            let len = chunk.min(offer.size - requested_to) as u32;
            ctx.publish(
                Channel::Fetch,
                FetchRequest { bundle_id: offer.bundle_id.clone(), offset: requested_to, len },
                false,
            )
            .await;
            requested_to += len as u64;
        }
        match tokio::time::timeout(CHUNK_TIMEOUT, rx.recv()).await {
            Ok(Some(c)) => {
                if let Some(err) = c.error {
                    anyhow::bail!("server refused the chunk at {}: {err}", c.offset);
                }
                if c.total != offer.size || c.offset + c.data.len() as u64 > offer.size {
                    anyhow::bail!("chunk at {} does not fit the offered size {}", c.offset, offer.size);
                }
                if c.offset > have {
                    early.insert(c.offset, c.data);
                } else if c.offset == have {
                    file.write_all(&c.data)?;
                    have += c.data.len() as u64;
                }
                while let Some(data) = early.remove(&have) {
                    file.write_all(&data)?;
                    have += data.len() as u64;
                }
                early.retain(|&off, _| off > have);
                stalls = 0;
                report_progress(ctx, offer, have, &mut last_progress).await;
            }
            Ok(None) => anyhow::bail!("agent shutting down"),
            Err(_) => {
                stalls += 1;
                if stalls > 30 {
                    anyhow::bail!("no chunk for {} s; giving up (a new offer resumes from byte {have})", stalls * 10);
                }
                tracing::debug!(have, "chunk timeout; asking again");
                requested_to = have;
                early.clear();
            }
        }
    }
    file.sync_all()?;
    Ok(())
}

struct RouteGuard {
    ctx: Arc<Ctx>,
    bundle_id: String,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.ctx.chunk_routes.lock().expect("routes lock").remove(&self.bundle_id);
    }
}
