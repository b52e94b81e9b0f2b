//! The rollout driver: steps the pure engine (`flotilla-rollout`) for every active rollout,
//! persists its state after every step, and carries its actions out (install offers, rollback
//! commands). Everything it knows is in the store, so a restarted server resumes the same wave
//! without offering anyone twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Command, InstallOffer, Msg};
use flotilla_rollout::{Action, DeviceView, GateMetric, Observations, Outcome, Phase, Plan, RolloutState};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

use crate::store::{BundleRow, DeviceRow, RolloutDeviceRow, RolloutRow};
use crate::{Shared, now_s};

/// An offer not answered for this long is sent again (it is idempotent on the device).
const REOFFER_AFTER_S: i64 = 60;

pub async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        if let Err(e) = step(&shared).await {
            tracing::warn!(error = %format!("{e:#}"), "rollout driver step failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// A rollout's plan and engine state (rows from before the engine get a one-wave plan over the
/// devices they listed).
pub fn engine_of(r: &RolloutRow, rds: &[RolloutDeviceRow]) -> anyhow::Result<(Plan, RolloutState)> {
    let plan = match &r.plan {
        Some(p) => serde_json::from_str(p)?,
        None => {
            let ids: Vec<&str> = rds.iter().map(|d| d.device_id.as_str()).collect();
            Plan { target: format!("id in ({})", ids.join(",")), ..Plan::all_at_once() }
        }
    };
    let state = match &r.engine {
        Some(e) => serde_json::from_str(e)?,
        None => RolloutState::new(&plan),
    };
    Ok((plan, state))
}

/// The engine's view of a device: its tags plus facts (`id`, `arch`) and this rollout's outcome.
pub fn device_view(d: &DeviceRow, rd: Option<&RolloutDeviceRow>) -> DeviceView {
    let mut tags: BTreeMap<String, String> = serde_json::from_str(&d.tags).unwrap_or_default();
    let hello: serde_json::Value = d.hello.as_deref().and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
    if let Some(arch) = hello["arch"].as_str() {
        tags.entry("arch".into()).or_insert_with(|| arch.into());
    }
    tags.insert("id".into(), d.id.clone());
    let outcome = match rd.map(|r| r.state.as_str()) {
        Some("succeeded") => Outcome::Succeeded,
        Some("failed") => {
            let reason = rd.and_then(|r| r.reason.clone()).unwrap_or_default();
            Outcome::Failed { self_test: reason.starts_with("self_testing"), reason }
        }
        Some("downloading") => Outcome::Installing,
        _ => Outcome::None,
    };
    DeviceView { id: d.id.clone(), tags, online: d.online, outcome }
}

/// What the server measured for the bundle's version: each device's latest health report on it
/// (with its p95 on the newest older version, for relative latency gates), and the worst drift
/// signal of its latest scored window, per metric.
fn observations(s: &Shared, bundle: &BundleRow) -> anyhow::Result<Observations> {
    let mut obs = Observations::default();
    let rows = s.store.health(&bundle.name)?;
    for h in rows.iter().filter(|h| h.version == bundle.version) {
        let prev =
            rows.iter().find(|r| r.device == h.device && r.version < bundle.version).and_then(|r| r.latency_p95_us);
        obs.health.push(flotilla_rollout::Health {
            device: h.device.clone(),
            inferences: h.inferences,
            errors: h.errors,
            latency_p95_us: h.latency_p95_us.map(|v| v as f64),
            prev_latency_p95_us: prev.map(|v| v as f64),
            accelerator_fallback: h.accelerator_fallback,
        });
    }
    let since = s.store.drift_bucket_back(&bundle.name, bundle.version, 0)?.unwrap_or(i64::MAX);
    let q = crate::drift::Query {
        model: bundle.name.clone(),
        version: Some(bundle.version),
        selector: Default::default(),
        by: None,
        since,
        histograms: false,
    };
    for (_, r) in crate::drift::rows(s, &q)? {
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

async fn step(s: &Shared) -> anyhow::Result<()> {
    let now = now_s();
    let devices = s.store.devices()?;
    for rollout in s.store.active_rollouts()? {
        let Some(bundle) = s.store.bundle(&rollout.bundle_id)? else { continue };
        let rds = s.store.rollout_devices(&rollout.id)?;
        let (plan, state) = engine_of(&rollout, &rds)?;
        let views: Vec<DeviceView> =
            devices.iter().map(|d| device_view(d, rds.iter().find(|r| r.device_id == d.id))).collect();
        let obs = observations(s, &bundle)?;
        let (next, actions) = flotilla_rollout::step(&rollout.id, &plan, &state, &views, &obs, now as u64);
        // Durable first: an action the store does not remember could be taken twice.
        for a in &actions {
            if let Action::Offer { device } = a {
                s.store.add_rollout_device(&rollout.id, device, now)?;
            }
        }
        s.store.save_rollout(
            &rollout.id,
            next.phase.as_str(),
            next.reason.as_deref(),
            &serde_json::to_string(&next)?,
        )?;
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
                let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), cmd));
                s.mqtt.publish(s.topics.device(&device, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
                tracing::warn!(rollout = %rollout.id, device, "rollback sent");
            }
        }
        if next.phase == Phase::Running {
            send_offers(s, &rollout.id, &bundle, now).await?;
        }
    }
    Ok(())
}

/// Offers (and re-offers, when unanswered) the bundle to the rollout's devices.
async fn send_offers(s: &Shared, rollout_id: &str, bundle: &BundleRow, now: i64) -> anyhow::Result<()> {
    let delta_bases = delta_bases(&bundle.head);
    for rd in s.store.rollout_devices(rollout_id)? {
        if matches!(rd.state.as_str(), "succeeded" | "failed") {
            continue;
        }
        let due = rd.state == "pending" || now - rd.offered_at >= REOFFER_AFTER_S;
        if !due {
            continue;
        }
        let Some(device) = s.store.device(&rd.device_id)?.filter(|d| d.online) else { continue };
        // Offer the patches only to a device that reported holding every base they need.
        let held: Vec<flotilla_api::v1::DeviceModel> = serde_json::from_str(&device.models).unwrap_or_default();
        let delta = !delta_bases.is_empty()
            && delta_bases.iter().all(|b| held.iter().any(|m| m.model_sha256.as_deref() == Some(b)));
        let offer = InstallOffer {
            offer_id: rd.offer_id.clone(),
            rollout_id: Some(rollout_id.to_string()),
            bundle_id: bundle.id.clone(),
            name: bundle.name.clone(),
            version: bundle.version,
            size: bundle.size,
            head: bundle.head.clone(),
            chunk_size: s.chunk_size,
            url: s.public_url.as_ref().map(|u| {
                let cap = crate::auth::capability(&s.capability_key, "bundle", &bundle.id);
                format!("{u}/api/v1/bundles/{}?token={cap}", bundle.id)
            }),
            delta,
        };
        let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), Command::Install(offer)));
        s.mqtt.publish(s.topics.device(&rd.device_id, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
        s.store.mark_offered(&rd.offer_id, now)?;
        tracing::info!(rollout = %rollout_id, device = %rd.device_id, bundle = %format!("{}@{}", bundle.name, bundle.version), delta, "offered");
    }
    Ok(())
}

/// The base content digests a bundle's delta artifacts were made against (empty: not a delta).
/// The head was checked when the bundle was pushed.
fn delta_bases(head: &[u8]) -> Vec<String> {
    let Ok((doc, _)) = flotilla_bundle::format::parse_envelope(head) else { return vec![] };
    let Ok(m) = flotilla_bundle::verify::decode_manifest(&doc.signed) else { return vec![] };
    m.artifacts.iter().filter_map(|a| a.base_sha256().map(String::from)).collect()
}
