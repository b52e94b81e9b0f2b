//! `/api/v1/devices` and `/api/v1/events`: the registry, tags, broker passwords, the event log.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_api::v1::{CredentialUpdate, Device, DeviceCredential, DeviceModel, Event, TagsUpdate};

use super::{ApiErrors, Result, json_body};
use crate::service::{Fleet, devices};
use crate::store::DeviceRow;
use crate::util::rfc3339;

pub(super) fn device(row: DeviceRow) -> Device {
    let hello = row.hello.unwrap_or_default();
    Device {
        id: row.id,
        online: row.online,
        last_seen: row.last_seen.map(rfc3339),
        agent_version: hello.agent_version,
        arch: hello.arch,
        runtimes: hello.runtimes,
        delegates: hello.delegates,
        tags: row.tags,
        models: row
            .models
            .into_iter()
            .map(|m| DeviceModel {
                name: m.name,
                version: m.version,
                backend: m.backend,
                status: m.status,
                model_sha256: m.model_sha256,
                delegated_nodes: m.delegated_nodes,
                cpu_nodes: m.cpu_nodes,
                self_test: m.self_test,
                self_test_median_us: m.self_test_median_us,
            })
            .collect(),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DevicesQuery {
    /// Tag selector, e.g. `group=lab,arch!=armv7`.
    selector: Option<String>,
    /// At most this many devices (at most 10000); without it, every device. The answer's
    /// `Flotilla-Next` header carries the cursor of the next page, absent on the last.
    limit: Option<u32>,
    /// The page after this cursor (a device id: `Flotilla-Next` of the page before).
    after: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    summary = "List devices",
    params(DevicesQuery),
    responses((status = 200, description = "ok", body = Vec<Device>, headers(("flotilla-next" = String, description = "with `limit`: the `after` of the next page, absent on the last"))), ApiErrors)
)]
pub(super) async fn list_devices(State(f): State<Arc<Fleet>>, Query(q): Query<DevicesQuery>) -> Result<Response> {
    let sel = devices::selector(q.selector.as_deref())?;
    if q.limit.is_none() && q.after.is_none() {
        return Ok(Json(devices::list(&f, &sel).await?.into_iter().map(device).collect::<Vec<_>>()).into_response());
    }
    let (rows, next) = devices::page(&f, &sel, q.after, q.limit.unwrap_or(devices::MAX_PAGE)).await?;
    Ok(paged(rows.into_iter().map(device).collect::<Vec<_>>(), next))
}

/// A page of a list: the items, and the next page's cursor in `Flotilla-Next`.
pub(super) fn paged<T: serde::Serialize>(items: Vec<T>, next: Option<String>) -> Response {
    let mut r = Json(items).into_response();
    if let Some(n) = next.and_then(|n| axum::http::HeaderValue::from_str(&n).ok()) {
        r.headers_mut().insert(NEXT, n);
    }
    r
}

/// The header that carries the next page's cursor.
pub(super) const NEXT: &str = "flotilla-next";

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    summary = "One device",
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "ok", body = Device), ApiErrors)
)]
pub(super) async fn get_device(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<Json<Device>> {
    Ok(Json(device(devices::get(&f, &id).await?)))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/tags",
    tag = "devices",
    summary = "Set or remove server-side tags",
    params(("id" = String, Path, description = "device id")),
    request_body = TagsUpdate,
    responses((status = 200, description = "ok", body = Device), ApiErrors)
)]
pub(super) async fn tag_device(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<TagsUpdate>, JsonRejection>,
) -> Result<Json<Device>> {
    let u = json_body(body, Some("send {\"set\": {\"key\": \"value\"}, \"remove\": [\"key\"]}"))?;
    Ok(Json(device(devices::tag(&f, &id, u.set, u.remove).await?)))
}

#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/credential",
    tag = "devices",
    summary = "Enroll a device's broker password (its SHA-256, from flotilla-image personalise)",
    params(("id" = String, Path, description = "device id; it need not have connected yet")),
    request_body = CredentialUpdate,
    responses((status = 200, description = "ok", body = DeviceCredential), ApiErrors)
)]
pub(super) async fn enroll_device(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CredentialUpdate>, JsonRejection>,
) -> Result<Json<DeviceCredential>> {
    let hint =
        "send {\"password_sha256\": \"<64 hex digits>\"}, as in the enroll.csv flotilla-image personalise writes";
    let u = json_body(body, Some(hint))?;
    let (created, enforced) = devices::enroll(&f, &id, &u.password_sha256).await?;
    Ok(Json(DeviceCredential { device_id: id, created: rfc3339(created), enforced }))
}

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}/credential",
    tag = "devices",
    summary = "Forget a device's broker password",
    params(("id" = String, Path, description = "device id")),
    responses((status = 204, description = "forgotten"), ApiErrors)
)]
pub(super) async fn unenroll_device(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<StatusCode> {
    devices::unenroll(&f, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventQuery {
    device: Option<String>,
    /// At most this many (default 100, at most 10000), newest first; `Flotilla-Next` carries the
    /// cursor of the older ones.
    limit: Option<u32>,
    /// Events older than this cursor.
    before: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "devices",
    summary = "Device events, newest first",
    params(EventQuery),
    responses((status = 200, description = "ok", body = Vec<Event>, headers(("flotilla-next" = String, description = "the `before` of the next (older) page, absent on the last"))), ApiErrors)
)]
pub(super) async fn list_events(State(f): State<Arc<Fleet>>, Query(q): Query<EventQuery>) -> Result<Response> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    // One more than the page holds, to know whether an older page follows.
    let mut rows = crate::service::events::list(&f, q.device.as_deref(), q.before, limit + 1).await?;
    let more = rows.len() as u32 > limit;
    rows.truncate(limit as usize);
    let next = more.then(|| rows.last().map(|e| e.seq.to_string())).flatten();
    let events: Vec<Event> = rows
        .into_iter()
        .map(|e| Event {
            device: e.device,
            at: rfc3339(e.at),
            kind: e.kind,
            detail: serde_json::from_str(&e.body).unwrap_or_default(),
        })
        .collect();
    Ok(paged(events, next))
}
