//! `/api/v1/retrain`: retraining policies and jobs, approving and cancelling them, a pipeline's
//! candidate upload and the job's files.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::v1::{ApiError, RetrainJob, RetrainPolicy, RetrainStart};

use super::{ApiErrors, Error, Result, json_body};
use crate::service::{Fleet, retrain};

#[utoipa::path(
    get,
    path = "/api/v1/retrain/policies",
    tag = "retrain",
    summary = "Retraining policies",
    responses((status = 200, description = "ok", body = Vec<RetrainPolicy>), ApiErrors)
)]

pub(super) async fn list_policies(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<RetrainPolicy>>> {
    Ok(Json(retrain::policies(&f).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/policies/{model}",
    tag = "retrain",
    summary = "A model's retraining policy",
    params(("model" = String, Path, description = "model name")),
    responses((status = 200, description = "ok", body = RetrainPolicy), ApiErrors)
)]

pub(super) async fn get_policy(State(f): State<Arc<Fleet>>, Path(model): Path<String>) -> Result<Json<RetrainPolicy>> {
    Ok(Json(retrain::get_policy(&f, &model).await?))
}

#[utoipa::path(
    put,
    path = "/api/v1/retrain/policies/{model}",
    tag = "retrain",
    summary = "Create or replace a retraining policy",
    params(("model" = String, Path, description = "model name")),
    request_body = RetrainPolicy,
    responses((status = 200, description = "ok", body = RetrainPolicy), ApiErrors)
)]

pub(super) async fn put_policy(
    State(f): State<Arc<Fleet>>,
    Path(model): Path<String>,
    body: std::result::Result<Json<RetrainPolicy>, JsonRejection>,
) -> Result<Json<RetrainPolicy>> {
    let Json(p) = body.map_err(|e| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_policy",
            e.body_text(),
            Some("see `flotilla retrain policy set --help` for the fields"),
        )
    })?;
    retrain::set_policy(&f, &model, &p).await?;
    Ok(Json(p))
}

#[utoipa::path(
    delete,
    path = "/api/v1/retrain/policies/{model}",
    tag = "retrain",
    summary = "Remove a retraining policy",
    params(("model" = String, Path, description = "model name")),
    responses((status = 204, description = "ok"), ApiErrors)
)]

pub(super) async fn delete_policy(State(f): State<Arc<Fleet>>, Path(model): Path<String>) -> Result<StatusCode> {
    retrain::delete_policy(&f, &model).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/jobs",
    tag = "retrain",
    summary = "Retraining jobs, newest first",
    responses((status = 200, description = "ok", body = Vec<RetrainJob>), ApiErrors)
)]

pub(super) async fn list_jobs(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<RetrainJob>>> {
    Ok(Json(retrain::jobs(&f).await?.into_iter().map(|d| d.job).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/jobs/{id}",
    tag = "retrain",
    summary = "One retraining job",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "ok", body = RetrainJob), ApiErrors)
)]

pub(super) async fn get_job(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<Json<RetrainJob>> {
    Ok(Json(retrain::get(&f, &id).await?.job))
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs",
    tag = "retrain",
    summary = "Start a retraining job by hand",
    request_body = RetrainStart,
    responses((status = 201, description = "ok", body = RetrainJob), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]

pub(super) async fn start_job(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<RetrainStart>, JsonRejection>,
) -> Result<(StatusCode, Json<RetrainJob>)> {
    let req = json_body(body, None)?;
    let d = retrain::start_manual(&f, &req.model, req.selector).await?;
    Ok((StatusCode::CREATED, Json(d.job)))
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs/{id}/approve",
    tag = "retrain",
    summary = "Start a waiting job's rollout; the body may be the candidate bundle with another signature",
    params(("id" = String, Path, description = "job id")),
    request_body(content = Vec<u8>, content_type = "application/vnd.flotilla.bundle"),
    responses((status = 200, description = "ok", body = RetrainJob), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]

pub(super) async fn approve_job(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<RetrainJob>> {
    let signed = (!body.is_empty()).then_some(body);
    Ok(Json(retrain::approve(&f, &id, signed).await?.job))
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs/{id}/cancel",
    tag = "retrain",
    summary = "Cancel a job",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "ok", body = RetrainJob), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]

pub(super) async fn cancel_job(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<Json<RetrainJob>> {
    Ok(Json(retrain::cancel(&f, &id).await?.job))
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs/{id}/candidate",
    tag = "retrain",
    summary = "A training pipeline delivers its model (capability in the webhook's upload_url)",
    params(("id" = String, Path, description = "job id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "ok", body = RetrainJob), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError), (status = 422, description = "error", body = ApiError))
)]

pub(super) async fn upload_candidate(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<RetrainJob>> {
    Ok(Json(retrain::accept_candidate(&f, &id, &body).await?.job))
}

/// The job's files a pipeline or an operator may fetch.
const JOB_FILES: [(&str, &str); 8] = [
    ("base-model", "application/octet-stream"),
    ("candidate-model", "application/octet-stream"),
    ("samples.json", "application/json"),
    ("heldout.json", "application/json"),
    ("reference.json", "application/json"),
    ("candidate.flb", "application/vnd.flotilla.bundle"),
    ("trainer.log", "text/plain; charset=utf-8"),
    ("evaluator.log", "text/plain; charset=utf-8"),
];

#[utoipa::path(
    get,
    path = "/api/v1/retrain/jobs/{id}/files/{name}",
    tag = "retrain",
    summary = "A job's file: base-model, candidate-model, samples.json, heldout.json, reference.json, candidate.flb, trainer.log, evaluator.log",
    params(("id" = String, Path, description = "job id"), ("name" = String, Path, description = "file name")),
    responses((status = 200, description = "ok", body = Vec<u8>, content_type = "application/octet-stream"), ApiErrors)
)]
pub(super) async fn job_file(
    State(s): State<Arc<Fleet>>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response> {
    retrain::get(&s, &id).await?;
    let Some((_, media)) = JOB_FILES.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = JOB_FILES.iter().map(|(n, _)| *n).collect();
        return Err(Error::new(
            StatusCode::NOT_FOUND,
            "file_not_found",
            format!("a job has no file {name:?} (it has {})", names.join(", ")),
            None,
        ));
    };
    match tokio::fs::read(s.retrain.job_dir(&id).join(&name)).await {
        Ok(bytes) => Ok(([(header::CONTENT_TYPE, *media)], bytes).into_response()),
        Err(_) => Err(Error::new(StatusCode::NOT_FOUND, "file_not_found", format!("job {id} has no {name} yet"), None)),
    }
}
