//! The rollout driver: steps the pure engine (`flotilla-rollout`) for every active rollout,
//! persists its state after every step, and carries its actions out (install offers, rollback
//! commands). Everything it knows is in the store, so a restarted server resumes the same wave
//! without offering anyone twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Command, InstallOffer};
use flotilla_rollout::{Action, DeviceView, GateMetric, Observations, Phase};
use tokio_util::sync::CancellationToken;

use crate::service::rollouts::{device_view, engine_of};
use crate::service::{Fleet, drift, tokens};
use crate::store::{BundleRow, DeviceRow, RolloutStep};
use crate::util::now_s;

/// An offer not answered for this long is sent again (it is idempotent on the device).
const REOFFER_AFTER_S: i64 = 60;

pub async fn run(shared: Arc<Fleet>, cancel: CancellationToken) {
    loop {
        let started = std::time::Instant::now();
        if let Err(e) = step(&shared).await {
            tracing::warn!(error = %format!("{e:#}"), "rollout driver step failed");
        }
        // Wake-ups come with every health report and event; on a large fleet a step reads the
        // whole registry, so steps are spaced by at least their own length (at most half of a
        // core), however often they are woken.
        let took = started.elapsed();
        if took > Duration::from_millis(20) {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(took) => {}
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// What the server measured for the bundle's version: each device's latest health report on it
/// (with its p95 on the newest older version, for relative latency gates), and the worst drift
/// signal of its latest scored window, per metric.
async fn observations(s: &Fleet, bundle: &BundleRow) -> anyhow::Result<Observations> {
    let mut obs = Observations::default();
    let rows = s.store.health(&bundle.name).await?;
    // Each device's p95 on its newest older version (rows come newest version first per device).
    let mut older: HashMap<&str, Option<u64>> = HashMap::new();
    for r in rows.iter().filter(|r| r.version < bundle.version) {
        older.entry(r.device.as_str()).or_insert(r.latency_p95_us);
    }
    for h in rows.iter().filter(|h| h.version == bundle.version) {
        let prev = older.get(h.device.as_str()).copied().flatten();
        obs.health.push(flotilla_rollout::Health {
            device: h.device.clone(),
            inferences: h.inferences,
            errors: h.errors,
            latency_p95_us: h.latency_p95_us.map(|v| v as f64),
            prev_latency_p95_us: prev.map(|v| v as f64),
            accelerator_fallback: h.accelerator_fallback,
        });
    }
    let since = s.store.drift_bucket_back(&bundle.name, bundle.version, 0).await?.unwrap_or(i64::MAX);
    let q = drift::Query {
        model: bundle.name.clone(),
        version: Some(bundle.version),
        selector: Default::default(),
        by: None,
        since,
        histograms: false,
    };
    for r in drift::rows(s, &q).await? {
        for (m, v) in [
            (GateMetric::Psi, r.psi),
            (GateMetric::Js, r.js),
            (GateMetric::Ks, r.ks),
            (GateMetric::Wasserstein, r.wasserstein),
        ] {
            if let Some(v) = v {
                let e = obs.drift.entry(m).or_insert(v);
                *e = e.max(v);
            }
        }
    }
    Ok(obs)
}

async fn step(s: &Fleet) -> anyhow::Result<()> {
    let now = now_s();
    let rollouts = s.store.active_rollouts().await?;
    if rollouts.is_empty() {
        return Ok(());
    }
    let devices = s.store.devices().await?;
    let by_id: HashMap<&str, &DeviceRow> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    for rollout in rollouts {
        // One replica at a time drives a rollout; the others leave it alone while its lease runs.
        if !s.lease(&format!("rollout/{}", rollout.id)).await? {
            continue;
        }
        let Some(bundle) = s.store.bundle(&rollout.bundle_id).await? else { continue };
        let rds = s.store.rollout_devices(&rollout.id).await?;
        let (plan, state) = engine_of(&rollout, &rds)?;
        let by_device: HashMap<&str, _> = rds.iter().map(|r| (r.device_id.as_str(), r)).collect();
        let views: Vec<DeviceView> =
            devices.iter().map(|d| device_view(d, by_device.get(d.id.as_str()).copied())).collect();
        let obs = observations(s, &bundle).await?;
        let (next, actions) = flotilla_rollout::step(&rollout.id, &plan, &state, &views, &obs, now as u64);
        // Durable first, and only if nobody saved the rollout since it was read (an operator's
        // pause wins over this step): an action the store does not remember could be taken
        // twice, and one decided on older state must not be taken at all.
        let offers: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Offer { device } => Some(device.clone()),
                _ => None,
            })
            .collect();
        let engine_json = serde_json::to_string(&next)?;
        let saved = RolloutStep {
            state: next.phase.as_str(),
            reason: next.reason.as_deref(),
            engine_json: &engine_json,
            offers: &offers,
            now,
        };
        if !s.store.save_rollout(&rollout.id, rollout.rev, &saved).await? {
            tracing::debug!(rollout = %rollout.id, "rollout changed while stepping; stepping again");
            s.wake.notify_one();
            continue;
        }
        if next.phase != state.phase || next.current_wave != state.current_wave {
            tracing::info!(rollout = %rollout.id, state = next.phase.as_str(), wave = next.current_wave + 1, reason = next.reason.as_deref().unwrap_or(""), "rollout moved");
        }
        for a in actions {
            if let Action::Rollback { device } = a {
                let cmd = Command::Rollback(flotilla_proto::RollbackCommand {
                    model: bundle.name.clone(),
                    from_version: bundle.version,
                    reason: next.reason.clone().unwrap_or_else(|| format!("rollout {} rolled back", rollout.id)),
                });
                s.bus.send(&device, cmd).await?;
                tracing::warn!(rollout = %rollout.id, device, "rollback sent");
            }
        }
        if next.phase == Phase::Running {
            send_offers(s, &rollout.id, &bundle, &by_id, now).await?;
        }
    }
    Ok(())
}

/// Offers (and re-offers, when unanswered) the bundle to the rollout's devices.
/// The devices' registry rows are those the step read.
async fn send_offers(
    s: &Fleet,
    rollout_id: &str,
    bundle: &BundleRow,
    devices: &HashMap<&str, &DeviceRow>,
    now: i64,
) -> anyhow::Result<()> {
    let delta_bases = delta_bases(&bundle.head);
    let mut offered = Vec::new();
    let sent = async {
        for rd in s.store.rollout_devices(rollout_id).await? {
        if matches!(rd.state.as_str(), "succeeded" | "failed") {
            continue;
        }
        let due = rd.state == "pending" || now - rd.offered_at >= REOFFER_AFTER_S;
        if !due {
            continue;
        }
        let Some(device) = devices.get(rd.device_id.as_str()).filter(|d| d.online) else { continue };
        // Offer the patches only to a device that reported holding every base they need.
        let delta = !delta_bases.is_empty()
            && delta_bases.iter().all(|b| device.models.iter().any(|m| m.model_sha256.as_deref() == Some(b)));
        let offer = InstallOffer {
            offer_id: rd.offer_id.clone(),
            rollout_id: Some(rollout_id.to_string()),
            bundle_id: bundle.id.clone(),
            name: bundle.name.clone(),
            version: bundle.version,
            size: bundle.size,
            head: bundle.head.clone(),
            chunk_size: s.settings.chunk_size,
            url: s.settings.public_url.as_ref().map(|u| {
                let cap = tokens::capability(&s.settings.capability_key, "bundle", &bundle.id);
                format!("{u}/api/v1/bundles/{}?token={cap}", bundle.id)
            }),
            delta,
        };
        s.bus.send(&rd.device_id, Command::Install(offer)).await?;
        offered.push(rd.offer_id.clone());
        tracing::debug!(rollout = %rollout_id, device = %rd.device_id, bundle = %format!("{}@{}", bundle.name, bundle.version), delta, "offered");
    }
    anyhow::Ok(())
    }
    .await;
    // What was sent is recorded even when a later send failed (one transaction for the lot).
    if !offered.is_empty() {
        s.store.mark_offered_many(&offered, now).await?;
        tracing::info!(rollout = %rollout_id, offers = offered.len(), "offered");
    }
    sent
}

/// The base content digests a bundle's delta artifacts were made against (empty: not a delta).
/// The head was checked when the bundle was pushed.
fn delta_bases(head: &[u8]) -> Vec<String> {
    let Ok((doc, _)) = flotilla_bundle::format::parse_envelope(head) else { return vec![] };
    let Ok(m) = flotilla_bundle::verify::decode_manifest(&doc.signed) else { return vec![] };
    m.artifacts.iter().filter_map(|a| a.base_sha256().map(String::from)).collect()
}
