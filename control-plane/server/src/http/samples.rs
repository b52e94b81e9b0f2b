//! `/api/v1/samples`: asking devices for their reservoir samples, the uploads' progress, and the
//! stored samples as v2 requests.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use flotilla_api::v1::{SampleRecord, SampleUploadDevice, SamplesPull, SamplesPulled};

use super::{ApiErrors, Result, json_body};
use crate::service::{Fleet, devices, samples};
use crate::util::rfc3339_ms;

#[utoipa::path(
    post,
    path = "/api/v1/samples/pull",
    tag = "drift",
    summary = "Ask devices for their reservoir samples",
    request_body = SamplesPull,
    responses((status = 200, description = "ok", body = SamplesPulled), ApiErrors)
)]

pub(super) async fn pull_samples(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<SamplesPull>, JsonRejection>,
) -> Result<Json<SamplesPulled>> {
    let req = json_body(body, None)?;
    let sel = devices::selector(req.selector.as_deref())?;
    let (upload_id, devices) = samples::request(&f, &req.model, req.version, &sel).await?;
    Ok(Json(SamplesPulled { upload_id, devices }))
}

#[utoipa::path(
    get,
    path = "/api/v1/samples/uploads/{id}",
    tag = "drift",
    summary = "Progress of a sample upload",
    params(("id" = String, Path, description = "upload id")),
    responses((status = 200, description = "ok", body = Vec<SampleUploadDevice>), ApiErrors)
)]

pub(super) async fn sample_upload(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<SampleUploadDevice>>> {
    Ok(Json(
        samples::upload(&f, &id)
            .await?
            .into_iter()
            .map(|(device, parts, samples, done)| SampleUploadDevice { device, parts, samples, done })
            .collect(),
    ))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SamplesQuery {
    model: String,
    version: Option<u64>,
    selector: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/samples",
    tag = "drift",
    summary = "Stored reservoir samples as v2 requests",
    params(SamplesQuery),
    responses((status = 200, description = "ok", body = Vec<SampleRecord>), ApiErrors)
)]

pub(super) async fn list_samples(
    State(f): State<Arc<Fleet>>,
    Query(q): Query<SamplesQuery>,
) -> Result<Json<Vec<SampleRecord>>> {
    let sel = devices::selector(q.selector.as_deref())?;
    Ok(Json(samples::list(&f, &q.model, q.version, &sel).await?.into_iter().map(record).collect()))
}

pub(super) fn record(r: samples::Record) -> SampleRecord {
    SampleRecord {
        device: r.device,
        model: r.model,
        version: r.version,
        id: r.id,
        ts: rfc3339_ms(r.ts),
        inputs: r.inputs,
        predicted: r.predicted,
        labels: r.labels,
    }
}
