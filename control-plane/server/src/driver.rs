//! The rollout driver: sends install offers to the devices of running rollouts and closes
//! rollouts when every device has answered. Its state is the store's; a restart resumes.
//!
//! This rollouts are one wave over every targeted device; waves, gates and automatic
//! rollback arrive with the pure `flotilla-rollout` engine.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Command, InstallOffer, Msg};
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

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

async fn step(s: &Shared) -> anyhow::Result<()> {
    let now = now_s();
    for rollout in s.store.running_rollouts()? {
        let Some(bundle) = s.store.bundle(&rollout.bundle_id)? else { continue };
        let delta_bases = delta_bases(&bundle.head);
        let devices = s.store.rollout_devices(&rollout.id)?;
        let mut open = 0;
        for rd in &devices {
            match rd.state.as_str() {
                "succeeded" | "failed" => continue,
                _ => open += 1,
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
                rollout_id: Some(rollout.id.clone()),
                bundle_id: bundle.id.clone(),
                name: bundle.name.clone(),
                version: bundle.version,
                size: bundle.size,
                head: bundle.head.clone(),
                chunk_size: s.chunk_size,
                url: s.public_url.as_ref().map(|u| format!("{u}/api/v1/bundles/{}", bundle.id)),
                delta,
            };
            let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), Command::Install(offer)));
            s.mqtt.publish(s.topics.device(&rd.device_id, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
            s.store.mark_offered(&rd.offer_id, now)?;
            tracing::info!(rollout = %rollout.id, device = %rd.device_id, bundle = %format!("{}@{}", bundle.name, bundle.version), delta, "offered");
        }
        if open == 0 {
            let failed = devices.iter().filter(|d| d.state == "failed").count();
            let state = if failed == 0 { "completed" } else { "failed" };
            s.store.set_rollout_state(&rollout.id, state)?;
            tracing::info!(rollout = %rollout.id, state, failed, total = devices.len(), "rollout finished");
        }
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
