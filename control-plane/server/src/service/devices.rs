//! The device registry: what devices say about themselves (hello, retained state, health), the
//! tags operators set, broker passwords, and the selectors that pick devices by their tags.

use std::collections::BTreeMap;

use flotilla_proto::tags::{Selector, Tags, valid_tag_part};
use flotilla_proto::{HealthReport, Hello, State};

use super::{Error, Fleet, Result};
use crate::store::{DeviceRow, HealthUpdate, HelloRecord, ModelRecord, StateUpdate, fold_health, fold_states};
use crate::util::now_s;

/// A tag selector (`group=lab,arch!=armv7`), or an `Invalid` error that says how to write one.
pub fn selector(text: Option<&str>) -> Result<Selector> {
    Selector::parse(text.unwrap_or("")).map_err(|e| {
        Error::invalid("bad_selector", e).hint(
            "selectors look like `group=lab`, `group!=lab`, `group in (lab,field)`, `group`, `!group`, joined by commas",
        )
    })
}

/// What selectors see of a device: its tags plus the facts rollouts target by (`id`, `arch`).
pub fn facts(d: &DeviceRow) -> Tags {
    let mut tags = d.tags.clone();
    if let Some(arch) = d.hello.as_ref().and_then(|h| h.arch.as_deref()) {
        tags.entry("arch".into()).or_insert_with(|| arch.into());
    }
    tags.insert("id".into(), d.id.clone());
    tags
}

fn no_device(id: &str) -> Error {
    Error::not_found("device_not_found", format!("no device {id:?}")).hint("list devices with `flotilla devices ls`")
}

/// The devices the selector picks, by id.
pub async fn list(f: &Fleet, sel: &Selector) -> Result<Vec<DeviceRow>> {
    Ok(f.store.devices().await?.into_iter().filter(|d| sel.matches(&facts(d))).collect())
}

/// One page of the devices the selector picks, by id: up to `limit` after `after`, and the
/// cursor of the next page (None on the last: a cursor always leads to at least one more). The
/// store is read a page at a time, so a selector that picks few of many devices costs reads but
/// never the whole fleet in memory.
pub async fn page(
    f: &Fleet,
    sel: &Selector,
    after: Option<String>,
    limit: u32,
) -> Result<(Vec<DeviceRow>, Option<String>)> {
    let limit = limit.clamp(1, MAX_PAGE);
    let mut out: Vec<DeviceRow> = Vec::new();
    let mut cursor = after;
    loop {
        // One more than the page holds, to know whether another page follows.
        let rows = f.store.devices_page(cursor.as_deref(), limit + 1).await?;
        let full = rows.len() as u32 == limit + 1;
        for d in rows {
            cursor = Some(d.id.clone());
            if sel.matches(&facts(&d)) {
                if out.len() as u32 == limit {
                    let next = out.last().map(|d| d.id.clone());
                    return Ok((out, next));
                }
                out.push(d);
            }
        }
        if !full {
            return Ok((out, None));
        }
    }
}

/// The most a page holds.
pub const MAX_PAGE: u32 = 10_000;

pub async fn get(f: &Fleet, id: &str) -> Result<DeviceRow> {
    f.store.device(id).await?.ok_or_else(|| no_device(id))
}

/// Set and remove server-side tags (they win over the device's own).
pub async fn tag(f: &Fleet, id: &str, set: BTreeMap<String, String>, remove: Vec<String>) -> Result<DeviceRow> {
    let mut changes = Vec::new();
    for (k, v) in set {
        if !valid_tag_part(&k, true) || !valid_tag_part(&v, false) {
            return Err(Error::invalid("bad_tag", format!("`{k}={v}` is not a valid tag"))
                .hint("keys and values are up to 63 letters, digits, `-`, `_`, `.` or `/`"));
        }
        changes.push((k, Some(v)));
    }
    changes.extend(remove.into_iter().map(|k| (k, None)));
    if !f.store.set_server_tags(id, &changes).await? {
        return Err(no_device(id));
    }
    get(f, id).await
}

/// A device id the control plane may give credentials to.
pub fn check_id(id: &str) -> Result<()> {
    if flotilla_proto::reserved_id(id) {
        return Err(Error::invalid(
            "bad_device_id",
            format!("{id:?} is reserved for the control plane's own MQTT identity"),
        )
        .hint("device ids may not begin with `flotilla-server`"));
    }
    if !flotilla_proto::valid_device_id(id) {
        return Err(Error::invalid("bad_device_id", format!("{id:?} is not a valid device id"))
            .hint("1-64 letters, digits, `.`, `_` or `-`"));
    }
    Ok(())
}

/// Enroll a device's broker password (its SHA-256). Returns when it was stored and whether the
/// broker enforces it (only the embedded one does).
pub async fn enroll(f: &Fleet, id: &str, password_sha256: &str) -> Result<(i64, bool)> {
    check_id(id)?;
    let hash = password_sha256.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "bad_credential",
            "password_sha256 must be 64 hex digits (the SHA-256 of the password, not the password)",
        )
        .hint(
            "send {\"password_sha256\": \"<64 hex digits>\"}, as in the enroll.csv flotilla-image personalise writes",
        ));
    }
    let now = now_s();
    f.store.set_device_credential(id, &hash, now).await?;
    let gate = f.bus.gate();
    if let Some(g) = gate {
        g.set_device_password(id, hash);
    }
    tracing::info!(device = %id, "device credential enrolled");
    Ok((now, gate.is_some()))
}

pub async fn unenroll(f: &Fleet, id: &str) -> Result<()> {
    if !f.store.delete_device_credential(id).await? {
        return Err(Error::not_found("credential_not_found", format!("device {id:?} has no enrolled credential")));
    }
    if let Some(g) = f.bus.gate() {
        g.remove_device_password(id);
    }
    Ok(())
}

/// A device connected and said who it is: register it, send it the trust roots it lacks, and
/// offer it again what it may have missed while away.
pub async fn hello(f: &Fleet, device: &str, h: &Hello) -> anyhow::Result<()> {
    let record = HelloRecord {
        agent_version: Some(h.agent_version.clone()),
        arch: Some(h.arch.clone()),
        os: Some(h.os.clone()),
        cores: Some(h.cores),
        memory_bytes: Some(h.memory_bytes),
        runtimes: h.runtimes.clone(),
        delegates: h.delegates.clone(),
    };
    f.store.device_hello(device, &record, &h.tags, now_s()).await?;
    if let Some(v) = h.root_version {
        f.store.set_device_root_version(device, v).await?;
    }
    let latest = f.trust().await?.map(|t| t.root().version);
    if let Some(latest) = latest
        && h.root_version.is_some_and(|v| v < latest)
    {
        super::trust::send_roots(f, device, h.root_version).await?;
    }
    f.store.reoffer_device(device).await?;
    f.wake.notify_one();
    tracing::debug!(device, "hello");
    Ok(())
}

/// A device's retained state (or its last will, which leaves the models as they were).
pub async fn state(f: &Fleet, device: &str, st: &State) -> anyhow::Result<()> {
    states(f, &[state_update(device, st, now_s())]).await
}

/// State messages in the order they arrived, recorded in one transaction.
pub async fn states(f: &Fleet, updates: &[StateUpdate]) -> anyhow::Result<()> {
    f.store.device_states(&fold_states(updates.to_vec())).await
}

/// What the store records of a state message.
pub fn state_update(device: &str, st: &State, at: i64) -> StateUpdate {
    let models: Option<Vec<ModelRecord>> = st.models.as_ref().map(|ms| {
        ms.iter()
            .map(|m| ModelRecord {
                name: m.name.clone(),
                version: m.version,
                backend: m.backend.clone(),
                status: m.status.clone(),
                model_sha256: m.model_sha256.clone(),
                delegated_nodes: m.delegated_nodes,
                cpu_nodes: m.cpu_nodes,
                self_test: m.self_test.clone(),
                self_test_median_us: m.self_test_median_us,
            })
            .collect()
    });
    StateUpdate { device: device.into(), online: st.online, models, at }
}

/// A device's health report on one model version (the rollout gates read them).
pub async fn health(f: &Fleet, device: &str, h: &HealthReport) -> anyhow::Result<()> {
    health_many(f, &[health_update(device, h, now_s())]).await
}

/// Health reports recorded in one transaction (the latest per device and model version), then
/// the workers woken: they judge from what is stored.
pub async fn health_many(f: &Fleet, updates: &[HealthUpdate]) -> anyhow::Result<()> {
    f.store.set_health_many(&fold_health(updates.to_vec())).await?;
    f.wake.notify_one();
    Ok(())
}

pub fn health_update(device: &str, h: &HealthReport, at: i64) -> HealthUpdate {
    HealthUpdate {
        device: device.into(),
        model: h.model.clone(),
        version: h.version,
        inferences: h.inferences,
        errors: h.errors,
        latency_p95_us: h.latency_p95_us,
        accelerator_fallback: h.accelerator_fallback,
        backend: h.backend.clone(),
        at,
    }
}
