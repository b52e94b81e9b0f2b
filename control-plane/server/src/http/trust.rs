//! `/api/v1/trust/root`: the current trust root, and pushing the next one.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::v1::{ApiError, TrustRootPushed};

use super::{ApiErrors, Result};
use crate::service::{Fleet, trust};

#[utoipa::path(
    get,
    path = "/api/v1/trust/root",
    tag = "trust",
    summary = "The current trust root (CBOR)",
    responses((status = 200, description = "ok", body = Vec<u8>, content_type = "application/cbor"), ApiErrors)
)]

pub(super) async fn get_root(State(f): State<Arc<Fleet>>) -> Result<Response> {
    let t = trust::current(&f).await?;
    Ok(([(header::CONTENT_TYPE, "application/vnd.flotilla.root+cbor")], t.to_bytes()).into_response())
}

/// The first root anchors the server; after that only the next version, signed by a threshold
/// of the current root's keys and of its own. Then it is sent to every device.
/// Accept a new trust root: the first one anchors the server; after that only the next version,
/// signed by a threshold of the current root's keys and of its own. Then send it to every device.
#[utoipa::path(
    post,
    path = "/api/v1/trust/root",
    tag = "trust",
    summary = "Push the next trust root (admin)",
    request_body(content = Vec<u8>, content_type = "application/cbor"),
    responses((status = 201, description = "ok", body = TrustRootPushed), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError), (status = 422, description = "error", body = ApiError))
)]

pub(super) async fn push_root(State(f): State<Arc<Fleet>>, body: Bytes) -> Result<(StatusCode, Json<TrustRootPushed>)> {
    let p = trust::push(&f, &body).await?;
    let status = if p.devices.is_some() { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(TrustRootPushed { version: p.version, devices: p.devices.unwrap_or(0) })))
}
