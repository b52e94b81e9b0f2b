//! The device event log: every event a device reports, once per message id, and the install
//! progress it carries into the rollouts.

use flotilla_proto::{Event, Msg};

use super::Fleet;
use crate::store::EventRow;
use crate::util::now_s;

/// A device's event: logged once per message id; install events move its offer on.
pub async fn record(f: &Fleet, device: &str, msg: &Msg<Event>) -> anyhow::Result<()> {
    let body = serde_json::to_string(&detail(&msg.body))?;
    let at = (msg.ts / 1000) as i64;
    // A repeat (sent again, or retried after the store failed between the log and the offer)
    // applies its effects again: they are idempotent, and the first try may not have reached
    // them. Only the log lines are said once.
    let new = f.store.add_event(device, &msg.id, at, kind(&msg.body), &body).await?;
    let (offer, state, reason) = match &msg.body {
        Event::InstallAccepted { offer_id, .. } | Event::InstallProgress { offer_id, .. } => {
            (offer_id, "downloading", None)
        }
        Event::InstallSucceeded { offer_id, .. } => (offer_id, "succeeded", None),
        Event::InstallFailed { offer_id, stage, reason, .. } => {
            (offer_id, "failed", Some(format!("{}: {reason}", stage.as_str())))
        }
        Event::TrustRootAccepted { version } => {
            f.store.set_device_root_version(device, *version).await?;
            return Ok(());
        }
        _ if !new => return Ok(()),
        Event::TrustRootRefused { version, reason } => {
            tracing::warn!(device, version, reason, "device refused a trust root");
            return Ok(());
        }
        Event::ModelRolledBack { name, from_version, to_version, reason } => {
            tracing::warn!(device, name, from_version, to_version, reason, "device rolled a model back");
            return Ok(());
        }
        Event::TelemetryDropped { total } => {
            tracing::warn!(device, total, "device dropped telemetry while offline");
            return Ok(());
        }
        Event::CertificateRenewed { serial, not_after, how } => {
            tracing::info!(device, serial, not_after, how, "device holds a new certificate");
            return Ok(());
        }
        Event::CertificateExpired { serial, not_after } => {
            tracing::warn!(device, serial, not_after, "device reports its certificate ended before it could renew it");
            return Ok(());
        }
        Event::CertificateRefused { reason } => {
            tracing::warn!(device, reason, "device refused the certificate it was sent");
            return Ok(());
        }
    };
    // The offer id names its device; a device cannot report on another's offer.
    if offer.ends_with(&format!("/{device}")) {
        f.store.offer_progress(offer, state, reason.as_deref(), now_s()).await?;
        f.wake.notify_one();
    }
    Ok(())
}

/// The event log's `kind` of an event.
pub fn kind(e: &Event) -> &'static str {
    match e {
        Event::InstallAccepted { .. } => "install_accepted",
        Event::InstallProgress { .. } => "install_progress",
        Event::InstallSucceeded { .. } => "install_succeeded",
        Event::InstallFailed { .. } => "install_failed",
        Event::TrustRootAccepted { .. } => "trust_root_accepted",
        Event::TrustRootRefused { .. } => "trust_root_refused",
        Event::ModelRolledBack { .. } => "model_rolled_back",
        Event::TelemetryDropped { .. } => "telemetry_dropped",
        Event::CertificateRenewed { .. } => "certificate_renewed",
        Event::CertificateExpired { .. } => "certificate_expired",
        Event::CertificateRefused { .. } => "certificate_refused",
    }
}

/// The event log's `detail` of an event.
pub fn detail(e: &Event) -> serde_json::Value {
    match e {
        Event::InstallAccepted { offer_id, name, version } => {
            serde_json::json!({"offer_id": offer_id, "name": name, "version": version})
        }
        Event::InstallProgress { offer_id, received, total } => {
            serde_json::json!({"offer_id": offer_id, "received": received, "total": total})
        }
        Event::InstallSucceeded { offer_id, name, version, backend, self_test_ms } => serde_json::json!({
            "offer_id": offer_id, "name": name, "version": version, "backend": backend, "self_test_ms": self_test_ms
        }),
        Event::InstallFailed { offer_id, name, version, stage, reason } => serde_json::json!({
            "offer_id": offer_id, "name": name, "version": version, "stage": stage.as_str(), "reason": reason
        }),
        Event::TrustRootAccepted { version } => serde_json::json!({"version": version}),
        Event::TrustRootRefused { version, reason } => serde_json::json!({"version": version, "reason": reason}),
        Event::ModelRolledBack { name, from_version, to_version, reason } => serde_json::json!({
            "name": name, "from_version": from_version, "to_version": to_version, "reason": reason
        }),
        Event::TelemetryDropped { total } => serde_json::json!({"total": total}),
        Event::CertificateRenewed { serial, not_after, how } => {
            serde_json::json!({"serial": serial, "not_after": not_after, "how": how})
        }
        Event::CertificateExpired { serial, not_after } => {
            serde_json::json!({"serial": serial, "not_after": not_after})
        }
        Event::CertificateRefused { reason } => serde_json::json!({"reason": reason}),
    }
}

/// The newest `limit` events (of one device, or all) before event `before`, newest first.
pub async fn list(f: &Fleet, device: Option<&str>, before: Option<i64>, limit: u32) -> anyhow::Result<Vec<EventRow>> {
    f.store.events(device, before, limit).await
}
