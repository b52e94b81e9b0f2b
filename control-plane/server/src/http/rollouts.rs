//! `/api/v1/rollouts`: starting rollouts, operators' commands, and their waves and gates.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use flotilla_api::v1::{ApiError, Rollout, RolloutCreate, RolloutCreated, RolloutDevice, RolloutGate, RolloutWave};

use super::{ApiErrors, Result, json_body};
use crate::service::{Fleet, bundles, rollouts};
use crate::util::rfc3339;

#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    summary = "Start a rollout",
    request_body = RolloutCreate,
    responses((status = 201, description = "ok", body = RolloutCreated), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]

pub(super) async fn create_rollout(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<RolloutCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<RolloutCreated>)> {
    let req = json_body(body, None)?;
    let b = bundles::by_ref(&f, &req.bundle).await?;
    let id = rollouts::start(&f, &b, req.plan, &req.devices).await?;
    Ok((StatusCode::CREATED, Json(RolloutCreated { id })))
}

/// The API's view of a rollout.
fn view(s: rollouts::Status) -> Rollout {
    let count = |st: &[&str]| s.devices.iter().filter(|d| st.contains(&d.state.as_str())).count() as u64;
    let (pending, offered, succeeded, failed) =
        (count(&["pending"]), count(&["offered", "downloading"]), count(&["succeeded"]), count(&["failed"]));
    let waves = s
        .plan
        .waves
        .iter()
        .enumerate()
        .map(|(k, w)| {
            let rec = s.engine.waves.get(k).cloned().unwrap_or_default();
            let st = s.waves.get(k).cloned().unwrap_or_default();
            let status = if rec.passed.is_some() {
                "passed"
            } else if rec.settled.is_some() {
                "baking"
            } else if rec.started.is_some() {
                "installing"
            } else {
                "waiting"
            };
            let gates = if rec.gates.is_empty() {
                s.plan
                    .gates
                    .iter()
                    .map(|g| RolloutGate { name: g.name(), value: None, threshold: g.threshold, passed: false })
                    .collect()
            } else {
                rec.gates
                    .into_iter()
                    .map(|g| RolloutGate { name: g.name, value: g.value, threshold: g.threshold, passed: g.passed })
                    .collect()
            };
            RolloutWave {
                spec: w.to_string(),
                size: st.size,
                offered: st.offered,
                succeeded: st.succeeded,
                failed: st.failed,
                status: status.into(),
                gates,
            }
        })
        .collect();
    Rollout {
        id: s.row.id,
        bundle: s.bundle.map(|b| format!("{}@{}", b.name, b.version)).unwrap_or_default(),
        bundle_id: s.row.bundle_id,
        state: s.row.state,
        reason: s.row.reason,
        current_wave: s.engine.current_wave as u32 + 1,
        waves,
        created: rfc3339(s.row.created),
        total: s.devices.len() as u64,
        pending,
        offered,
        succeeded,
        failed,
        devices: s
            .devices
            .into_iter()
            .map(|d| RolloutDevice { device: d.device_id, state: d.state, reason: d.reason })
            .collect(),
    }
}

/// `pause`, `resume`, `abort`, `promote`, `rollback`.
/// `pause`, `resume`, `abort`, `promote`, `rollback`.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/{command}",
    tag = "rollouts",
    summary = "pause, resume, abort, promote or rollback",
    params(("id" = String, Path, description = "rollout id"), ("command" = String, Path, description = "pause | resume | abort | promote | rollback")),
    responses((status = 200, description = "ok", body = Rollout), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]

pub(super) async fn command_rollout(
    State(f): State<Arc<Fleet>>,
    Path((id, command)): Path<(String, String)>,
) -> Result<Json<Rollout>> {
    Ok(Json(view(rollouts::command(&f, &id, &command).await?)))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    summary = "List rollouts",
    responses((status = 200, description = "ok", body = Vec<Rollout>), ApiErrors)
)]

pub(super) async fn list_rollouts(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<Rollout>>> {
    Ok(Json(rollouts::list(&f).await?.into_iter().map(view).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    tag = "rollouts",
    summary = "One rollout with its waves and gates",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, description = "ok", body = Rollout), ApiErrors)
)]

pub(super) async fn get_rollout(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<Json<Rollout>> {
    Ok(Json(view(rollouts::status(&f, &id).await?)))
}
