//! The HTTP API under `/api/v1`, with types from `flotilla-api`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flotilla_api::v1::{
    ApiError, Bundle, CredentialUpdate, Device, DeviceCredential, DeviceModel, DriftAlert, DriftRow, Event, RetrainJob,
    RetrainPolicy, RetrainStart, Rollout, RolloutCreate, RolloutCreated, RolloutDevice, SampleRecord,
    SampleUploadDevice, SamplesPull, SamplesPulled, TagsUpdate, Token, TokenCreate, TrustRootPushed,
};
use flotilla_bundle::TrustedRoot;
use flotilla_proto::tags::{Selector, valid_tag_part};

use crate::api_error::{ApiErrors, json_body, rfc3339};
pub use crate::api_error::{Error, Result};
use crate::bundles::PushError;
use crate::certs;
use crate::store::{BundleRow, DeviceRow};
use crate::{Shared, now_s};

/// Largest bundle accepted over HTTP.
const MAX_BUNDLE: usize = 2 << 30;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/whoami", get(whoami))
        .route("/metrics", get(crate::metrics::render))
        .route("/", get(console_index))
        .route("/console/", get(console_index))
        .route("/console/{file}", get(console_asset))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/tags", axum::routing::post(tag_device))
        .route("/api/v1/devices/{id}/credential", axum::routing::put(enroll_device).delete(unenroll_device))
        .route("/api/v1/devices/{id}/certificate", axum::routing::post(crate::certs::issue_certificate))
        .route("/api/v1/devices/{id}/certificates", get(certs::list_certificates).post(certs::record_certificate))
        .route("/api/v1/devices/{id}/revoke", axum::routing::post(crate::certs::revoke_device))
        .route("/api/v1/claim-tokens", get(crate::certs::list_claim_tokens).post(crate::certs::create_claim_token))
        .route("/api/v1/claim", axum::routing::post(crate::certs::claim))
        .route("/api/v1/drift", get(drift_rows))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/samples", get(list_samples))
        .route("/api/v1/samples/pull", axum::routing::post(pull_samples))
        .route("/api/v1/samples/uploads/{id}", get(sample_upload))
        .route("/api/v1/bundles", get(list_bundles).post(push_bundle))
        .route("/api/v1/bundles/{id}", get(download_bundle))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/rollouts/{id}/{command}", axum::routing::post(command_rollout))
        .route("/api/v1/retrain/policies", get(list_policies))
        .route("/api/v1/retrain/policies/{model}", get(get_policy).put(put_policy).delete(delete_policy))
        .route("/api/v1/retrain/jobs", get(list_jobs).post(start_job))
        .route("/api/v1/retrain/jobs/{id}", get(get_job))
        .route("/api/v1/retrain/jobs/{id}/approve", axum::routing::post(approve_job))
        .route("/api/v1/retrain/jobs/{id}/cancel", axum::routing::post(cancel_job))
        .route("/api/v1/retrain/jobs/{id}/candidate", axum::routing::post(upload_candidate))
        .route("/api/v1/retrain/jobs/{id}/files/{name}", get(job_file))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/trust/root", get(get_root).post(push_root))
        .layer(DefaultBodyLimit::max(MAX_BUNDLE))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), crate::auth::middleware))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(shared)
}

/// The OpenAPI 3 document of `/api/v1`, served at `/api/v1/openapi.json`. Every route of
/// [`router`] is in it (a test reads the router's source and checks).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Flotilla control plane API", description = "Devices, bundles, staged rollouts, drift and retraining. Every call but /api/v1/health needs `Authorization: Bearer TOKEN`."),
    paths(health, whoami, list_devices, get_device, tag_device, enroll_device, unenroll_device, crate::certs::issue_certificate, crate::certs::list_certificates, crate::certs::record_certificate, crate::certs::revoke_device, crate::certs::list_claim_tokens, crate::certs::create_claim_token, crate::certs::claim, drift_rows, list_alerts, list_samples, pull_samples, sample_upload, list_bundles, push_bundle, download_bundle, create_rollout, list_rollouts, get_rollout, command_rollout, list_events, get_root, push_root, list_policies, get_policy, put_policy, delete_policy, list_jobs, get_job, start_job, approve_job, cancel_job, upload_candidate, job_file, list_tokens, create_token, revoke_token, openapi_json),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", summary = "This document", responses((status = 200, description = "OpenAPI 3", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// Every error answer is JSON with a stable `code`: axum's own rejections (a query that does
/// not parse, an unknown route, a wrong method) are plain text, and become
/// `{"code", "message"}` here.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let message = match text {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::RANGE_NOT_SATISFIABLE => "range_not_satisfiable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let hint =
        (status == StatusCode::NOT_FOUND).then(|| "the API's routes are listed at /api/v1/openapi.json".to_string());
    let mut out = (status, Json(ApiError { code: code.into(), message, hint })).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "meta",
    summary = "Liveness (no token needed)",
    responses((status = 200, description = "ok", body = Object))
)]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true, "version": env!("CARGO_PKG_VERSION") }))
}

fn device(row: DeviceRow) -> Device {
    let hello: serde_json::Value = row.hello.as_deref().and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
    Device {
        id: row.id,
        online: row.online,
        last_seen: row.last_seen.map(rfc3339),
        agent_version: hello["agent_version"].as_str().map(String::from),
        arch: hello["arch"].as_str().map(String::from),
        runtimes: serde_json::from_value(hello["runtimes"].clone()).unwrap_or_default(),
        delegates: serde_json::from_value(hello["delegates"].clone()).unwrap_or_default(),
        tags: serde_json::from_str(&row.tags).unwrap_or_default(),
        models: serde_json::from_str::<Vec<DeviceModel>>(&row.models).unwrap_or_default(),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DevicesQuery {
    /// Tag selector, e.g. `group=lab,arch!=armv7`.
    selector: Option<String>,
}

fn selector(s: Option<&str>) -> Result<Selector> {
    Selector::parse(s.unwrap_or("")).map_err(|e| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_selector",
            e,
            Some("selectors look like `group=lab`, `group!=lab`, `group in (lab,field)`, `group`, `!group`, joined by commas"),
        )
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    summary = "List devices",
    params(DevicesQuery),
    responses((status = 200, description = "ok", body = Vec<Device>), ApiErrors)
)]
async fn list_devices(State(s): State<Arc<Shared>>, Query(q): Query<DevicesQuery>) -> Result<Json<Vec<Device>>> {
    let sel = selector(q.selector.as_deref())?;
    // Selectors see the tags plus the facts rollouts target by (`id`, `arch`).
    let rows = s.store.devices()?.into_iter().filter(|d| sel.matches(&crate::driver::device_view(d, None).tags));
    Ok(Json(rows.map(device).collect()))
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
async fn tag_device(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<TagsUpdate>, JsonRejection>,
) -> Result<Json<Device>> {
    let u = json_body(body, Some("send {\"set\": {\"key\": \"value\"}, \"remove\": [\"key\"]}"))?;
    let mut changes = Vec::new();
    for (k, v) in u.set {
        if !valid_tag_part(&k, true) || !valid_tag_part(&v, false) {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                "bad_tag",
                format!("`{k}={v}` is not a valid tag"),
                Some("keys and values are up to 63 letters, digits, `-`, `_`, `.` or `/`"),
            ));
        }
        changes.push((k, Some(v)));
    }
    for k in u.remove {
        changes.push((k, None));
    }
    if !s.store.set_server_tags(&id, &changes)? {
        return Err(Error::new(
            StatusCode::NOT_FOUND,
            "device_not_found",
            format!("no device {id:?}"),
            Some("list devices with `flotilla devices ls`"),
        ));
    }
    get_device(State(s), Path(id)).await
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
async fn enroll_device(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CredentialUpdate>, JsonRejection>,
) -> Result<Json<DeviceCredential>> {
    let hint =
        "send {\"password_sha256\": \"<64 hex digits>\"}, as in the enroll.csv flotilla-image personalise writes";
    let u = json_body(body, Some(hint))?;
    if flotilla_proto::reserved_id(&id) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "bad_device_id",
            format!("{id:?} is reserved for the control plane's own MQTT identity"),
            Some("device ids may not begin with `flotilla-server`"),
        ));
    }
    if !flotilla_proto::valid_device_id(&id) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "bad_device_id",
            format!("{id:?} is not a valid device id"),
            Some("1-64 letters, digits, `.`, `_` or `-`"),
        ));
    }
    let hash = u.password_sha256.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "bad_credential",
            "password_sha256 must be 64 hex digits (the SHA-256 of the password, not the password)",
            Some(hint),
        ));
    }
    let now = now_s();
    s.store.set_device_credential(&id, &hash, now)?;
    if let Some(auth) = &s.broker_auth {
        auth.set_device_password(&id, hash);
    }
    tracing::info!(device = %id, "device credential enrolled");
    Ok(Json(DeviceCredential { device_id: id, created: rfc3339(now), enforced: s.broker_auth.is_some() }))
}

#[utoipa::path(
    delete,
    path = "/api/v1/devices/{id}/credential",
    tag = "devices",
    summary = "Forget a device's broker password",
    params(("id" = String, Path, description = "device id")),
    responses((status = 204, description = "forgotten"), ApiErrors)
)]
async fn unenroll_device(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<StatusCode> {
    if !s.store.delete_device_credential(&id)? {
        return Err(Error::new(
            StatusCode::NOT_FOUND,
            "credential_not_found",
            format!("device {id:?} has no enrolled credential"),
            None,
        ));
    }
    if let Some(auth) = &s.broker_auth {
        auth.remove_device_password(&id);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DriftQuery {
    model: Option<String>,
    version: Option<u64>,
    selector: Option<String>,
    /// Tag whose values are the cohorts (default: the server's cohort key); `none` merges all.
    by: Option<String>,
    /// Only the latest this many windows.
    last: Option<u32>,
    /// Include each row's baseline and live histograms.
    #[serde(default)]
    histograms: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/drift",
    tag = "drift",
    summary = "Drift per cohort, signal and window",
    params(DriftQuery),
    responses((status = 200, description = "ok", body = Vec<DriftRow>), ApiErrors)
)]
async fn drift_rows(State(s): State<Arc<Shared>>, Query(q): Query<DriftQuery>) -> Result<Json<Vec<DriftRow>>> {
    let Some(model) = q.model else {
        let known: Vec<String> = s.store.drift_models()?.into_iter().map(|(m, v)| format!("{m}@{v}")).collect();
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "model_required",
            format!(
                "say which model (models with drift reports: {})",
                if known.is_empty() { "none yet".into() } else { known.join(", ") }
            ),
            Some("flotilla drift show --model NAME"),
        ));
    };
    let selector = selector(q.selector.as_deref())?;
    let by = match q.by.as_deref() {
        Some("none") | Some("") => None,
        Some(k) => Some(k.to_string()),
        None => Some(s.drift_cohort_key.clone()),
    };
    let since = match (q.last, q.version) {
        (Some(n), Some(v)) if n > 0 => s.store.drift_bucket_back(&model, v, n - 1)?.unwrap_or(0),
        _ => 0,
    };
    let s2 = s.clone();
    let query = crate::drift::Query { model, version: q.version, selector, by, since, histograms: q.histograms };
    let rows = tokio::task::spawn_blocking(move || crate::drift::rows(&s2, &query))
        .await
        .map_err(|e| anyhow::anyhow!(e))??;
    let mut rows: Vec<DriftRow> = rows.into_iter().map(|(_, r)| r).collect();
    if let (Some(n), None) = (q.last, q.version) {
        // Per version: keep its latest n windows.
        let mut ends: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>> = Default::default();
        for r in &rows {
            ends.entry(r.version).or_default().insert(r.window_end.clone());
        }
        rows.retain(|r| ends[&r.version].iter().rev().take(n as usize).any(|e| e == &r.window_end));
    }
    Ok(Json(rows))
}

#[utoipa::path(
    post,
    path = "/api/v1/samples/pull",
    tag = "drift",
    summary = "Ask devices for their reservoir samples",
    request_body = SamplesPull,
    responses((status = 200, description = "ok", body = SamplesPulled), ApiErrors)
)]
async fn pull_samples(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<SamplesPull>, JsonRejection>,
) -> Result<Json<SamplesPulled>> {
    let req = json_body(body, None)?;
    let (upload_id, devices) = request_samples(&s, &req.model, req.version, req.selector.as_deref()).await?;
    Ok(Json(SamplesPulled { upload_id, devices }))
}

/// Ask every online device that the selector picks and that runs the model (that version) for
/// its reservoir sample; returns the upload id and the devices asked.
pub async fn request_samples(
    s: &Shared,
    model: &str,
    version: Option<u64>,
    selector_text: Option<&str>,
) -> Result<(String, Vec<String>)> {
    let sel = selector(selector_text)?;
    let upload_id = format!("u-{}", crate::new_id());
    let mut devices = Vec::new();
    for d in s.store.devices()?.into_iter().map(device) {
        let runs = d.models.iter().any(|m| m.name == model && version.is_none_or(|v| v == m.version));
        if d.online && runs && sel.matches(&d.tags) {
            s.store.add_sample_upload(&upload_id, &d.id, model, now_s())?;
            let cmd = flotilla_proto::Command::UploadSamples(flotilla_proto::SampleRequest {
                upload_id: upload_id.clone(),
                model: model.into(),
                version,
            });
            let payload = flotilla_proto::encode(&flotilla_proto::Msg::new(crate::new_id(), crate::now_ms(), cmd));
            s.mqtt
                .publish(
                    s.topics.device(&d.id, flotilla_proto::Channel::Cmd),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .map_err(|e| anyhow::anyhow!("asking {} for samples: {e}", d.id))?;
            devices.push(d.id);
        }
    }
    if devices.is_empty() {
        return Err(Error::new(
            StatusCode::NOT_FOUND,
            "no_devices",
            format!("no online device matching the selector runs {model}"),
            Some("see `flotilla devices ls` for what runs where"),
        ));
    }
    Ok((upload_id, devices))
}

#[utoipa::path(
    get,
    path = "/api/v1/samples/uploads/{id}",
    tag = "drift",
    summary = "Progress of a sample upload",
    params(("id" = String, Path, description = "upload id")),
    responses((status = 200, description = "ok", body = Vec<SampleUploadDevice>), ApiErrors)
)]
async fn sample_upload(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Vec<SampleUploadDevice>>> {
    let rows = s.store.sample_upload(&id)?;
    if rows.is_empty() {
        return Err(Error::new(StatusCode::NOT_FOUND, "upload_not_found", format!("no sample upload {id:?}"), None));
    }
    Ok(Json(
        rows.into_iter()
            .map(|(device, parts, samples, done)| SampleUploadDevice { device, parts, samples, done })
            .collect(),
    ))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SamplesQuery {
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
async fn list_samples(State(s): State<Arc<Shared>>, Query(q): Query<SamplesQuery>) -> Result<Json<Vec<SampleRecord>>> {
    let sel = selector(q.selector.as_deref())?;
    let tags: std::collections::HashMap<String, std::collections::BTreeMap<String, String>> =
        s.store.devices()?.into_iter().map(device).map(|d| (d.id, d.tags)).collect();
    let none = Default::default();
    let mut out = Vec::new();
    for (dev, version, body) in s.store.samples(&q.model, q.version)? {
        if sel.matches(tags.get(&dev).unwrap_or(&none)) {
            out.push(crate::drift::sample_record(dev, version, &q.model, &body)?);
        }
    }
    Ok(Json(out))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AlertsQuery {
    /// Include resolved alerts.
    #[serde(default)]
    all: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "drift",
    summary = "Drift alerts",
    params(AlertsQuery),
    responses((status = 200, description = "ok", body = Vec<DriftAlert>), ApiErrors)
)]
async fn list_alerts(State(s): State<Arc<Shared>>, Query(q): Query<AlertsQuery>) -> Result<Json<Vec<DriftAlert>>> {
    Ok(Json(s.store.alerts(q.all)?.into_iter().map(crate::drift::alert).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    summary = "One device",
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "ok", body = Device), ApiErrors)
)]
async fn get_device(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Device>> {
    s.store.device(&id)?.map(|d| Json(device(d))).ok_or_else(|| {
        Error::new(
            StatusCode::NOT_FOUND,
            "device_not_found",
            format!("no device {id:?}"),
            Some("list devices with `flotilla devices ls`"),
        )
    })
}

fn bundle(b: BundleRow) -> Bundle {
    Bundle {
        id: b.id,
        name: b.name,
        version: b.version,
        size: b.size,
        manifest_sha256: b.manifest_sha256,
        signers: b.signers,
        created: rfc3339(b.created),
        pushed: rfc3339(b.pushed),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/bundles",
    tag = "bundles",
    summary = "List pushed bundles",
    responses((status = 200, description = "ok", body = Vec<Bundle>), ApiErrors)
)]
async fn list_bundles(State(s): State<Arc<Shared>>) -> Result<Json<Vec<Bundle>>> {
    Ok(Json(s.store.bundles()?.into_iter().map(bundle).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/bundles",
    tag = "bundles",
    summary = "Push a signed bundle file",
    request_body(content = Vec<u8>, content_type = "application/vnd.flotilla.bundle"),
    responses((status = 201, description = "ok", body = Bundle), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError), (status = 422, description = "error", body = ApiError))
)]
async fn push_bundle(State(s): State<Arc<Shared>>, body: Bytes) -> Result<(StatusCode, Json<Bundle>)> {
    let s2 = s.clone();
    let res = tokio::task::spawn_blocking(move || {
        let trust = s2.trust.read().expect("trust lock").clone();
        s2.files.push(&s2.store, &body, trust.as_ref(), now_s())
    })
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    match res {
        Ok(row) => Ok((StatusCode::CREATED, Json(bundle(row)))),
        Err(PushError::Invalid(m)) => Err(Error::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_bundle",
            m,
            Some("check it locally with `flotilla bundle verify B.flb --trust-root ROOT`"),
        )),
        Err(PushError::Conflict(m)) => Err(Error::new(StatusCode::CONFLICT, "bundle_exists", m, None)),
        Err(PushError::Internal(e)) => Err(e.into()),
    }
}

/// Serve a bundle file, honouring `Range: bytes=START-[END]` so downloads resume.
#[utoipa::path(
    get,
    path = "/api/v1/bundles/{id}",
    tag = "bundles",
    summary = "Download a bundle file (Range supported; devices use the capability in their offer)",
    params(("id" = String, Path, description = "bundle id (sha256 of the file)")),
    responses((status = 200, description = "ok", body = Vec<u8>, content_type = "application/vnd.flotilla.bundle"), ApiErrors)
)]
async fn download_bundle(State(s): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let not_found = || Error::new(StatusCode::NOT_FOUND, "bundle_not_found", format!("no bundle {id:?}"), None);
    s.store.bundle(&id)?.ok_or_else(not_found)?;
    let path = s.files.path(&id).ok_or_else(not_found)?;
    let mut file =
        tokio::fs::File::open(&path).await.map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let total = file.metadata().await.map_err(|e| anyhow::anyhow!(e))?.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| parse_range(r, total));
    let (start, end, status) = match range {
        None => (0, total, StatusCode::OK),
        Some(Some((a, b))) => (a, b, StatusCode::PARTIAL_CONTENT),
        Some(None) => {
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{total}"))])
                .into_response());
        }
    };
    file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| anyhow::anyhow!(e))?;
    let len = end - start;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    let stream = Counted { inner: Box::pin(stream), shared: s.clone() };
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, "application/vnd.flotilla.bundle".parse().expect("static header"));
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("static header"));
    h.insert(header::CONTENT_LENGTH, len.into());
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", end.saturating_sub(1)).parse().expect("ascii"),
        );
    }
    Ok(resp)
}

/// A body stream that counts the bundle bytes it serves.
struct Counted<S> {
    inner: std::pin::Pin<Box<S>>,
    shared: Arc<Shared>,
}

impl<S: futures_core::Stream<Item = std::io::Result<Bytes>>> futures_core::Stream for Counted<S> {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let r = this.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(b))) = &r {
            this.shared.served_http.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

/// `bytes=START-` or `bytes=START-END` (inclusive) → the half-open range, or None if unsatisfiable.
fn parse_range(h: &str, total: u64) -> Option<(u64, u64)> {
    let spec = h.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => total,
        e => e.parse::<u64>().ok()?.saturating_add(1).min(total),
    };
    (start < end).then_some((start, end))
}

fn parse_ref(r: &str) -> Option<(&str, u64)> {
    let (n, v) = r.split_once('@')?;
    Some((n, v.parse().ok()?))
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    summary = "Start a rollout",
    request_body = RolloutCreate,
    responses((status = 201, description = "ok", body = RolloutCreated), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]
async fn create_rollout(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<RolloutCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<RolloutCreated>)> {
    let req = json_body(body, None)?;
    let (name, version) = parse_ref(&req.bundle).ok_or_else(|| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_bundle_ref",
            format!("{:?} is not NAME@VERSION", req.bundle),
            Some("e.g. --bundle digits@3"),
        )
    })?;
    let b = s.store.bundle_by_name(name, version)?.ok_or_else(|| {
        Error::new(
            StatusCode::NOT_FOUND,
            "bundle_not_found",
            format!("no bundle {}", req.bundle),
            Some("push it first with `flotilla bundle push B.flb`"),
        )
    })?;
    for d in &req.devices {
        if s.store.device(d)?.is_none() {
            return Err(Error::new(StatusCode::NOT_FOUND, "device_not_found", format!("no device {d:?}"), None));
        }
    }
    let id = start_rollout(&s, &b, req.plan, &req.devices)?;
    Ok((StatusCode::CREATED, Json(RolloutCreated { id })))
}

/// Validate a plan (default: one wave gated on every install succeeding), narrow its target to
/// `devices` when given, and store the new rollout for the driver.
pub fn start_rollout(s: &Shared, b: &BundleRow, plan: Option<serde_json::Value>, devices: &[String]) -> Result<String> {
    let bad_plan = |e: String| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_plan",
            e,
            Some("e.g. --waves 5%,25%,100% --bake 10m --gate 'latency_p95<=1.2x' --gate 'psi<=0.2'"),
        )
    };
    let mut plan: flotilla_rollout::Plan = match plan {
        Some(v) => serde_json::from_value(v).map_err(|e| bad_plan(e.to_string()))?,
        None => flotilla_rollout::Plan {
            gates: vec![flotilla_rollout::Gate::parse("install_success>=1").expect("a valid gate")],
            ..flotilla_rollout::Plan::all_at_once()
        },
    };
    if !devices.is_empty() {
        let ids = format!("id in ({})", devices.join(","));
        plan.target = if plan.target.trim().is_empty() { ids } else { format!("{},{ids}", plan.target) };
    }
    plan.validate().map_err(|e| bad_plan(e.to_string()))?;
    let target = Selector::parse(&plan.target).map_err(bad_plan)?;
    let matching =
        s.store.devices()?.iter().filter(|d| target.matches(&crate::driver::device_view(d, None).tags)).count();
    if matching == 0 {
        return Err(Error::new(
            StatusCode::CONFLICT,
            "no_devices",
            "no registered device matches the rollout's target, so it would target nothing",
            Some(
                "start an agent against this server's broker first, or check the target with `flotilla devices ls -l`",
            ),
        ));
    }
    let id = format!("r-{}", crate::new_id());
    let engine = flotilla_rollout::RolloutState::new(&plan);
    let (plan_json, engine_json) = (
        serde_json::to_string(&plan).map_err(anyhow::Error::from)?,
        serde_json::to_string(&engine).map_err(anyhow::Error::from)?,
    );
    s.store.create_rollout(&id, &b.id, &plan_json, &engine_json, now_s())?;
    s.wake.notify_one();
    tracing::info!(rollout = %id, bundle = %format!("{}@{}", b.name, b.version), devices = matching, waves = plan.waves.len(), "rollout started");
    Ok(id)
}

fn rollout_view(s: &Shared, id: &str) -> anyhow::Result<Option<Rollout>> {
    let Some(r) = s.store.rollout(id)? else { return Ok(None) };
    let b = s.store.bundle(&r.bundle_id)?;
    let devices = s.store.rollout_devices(id)?;
    let count = |st: &[&str]| devices.iter().filter(|d| st.contains(&d.state.as_str())).count() as u64;
    let (plan, engine) = crate::driver::engine_of(&r, &devices)?;
    let views: Vec<flotilla_rollout::DeviceView> = s
        .store
        .devices()?
        .iter()
        .map(|d| crate::driver::device_view(d, devices.iter().find(|r| r.device_id == d.id)))
        .collect();
    let stats = flotilla_rollout::wave_stats(&engine, &views);
    let waves = plan
        .waves
        .iter()
        .enumerate()
        .map(|(k, w)| {
            let rec = engine.waves.get(k).cloned().unwrap_or_default();
            let st = stats.get(k).cloned().unwrap_or_default();
            let status = if rec.passed.is_some() {
                "passed"
            } else if rec.settled.is_some() {
                "baking"
            } else if rec.started.is_some() {
                "installing"
            } else {
                "waiting"
            };
            flotilla_api::v1::RolloutWave {
                spec: w.to_string(),
                size: st.size,
                offered: st.offered,
                succeeded: st.succeeded,
                failed: st.failed,
                status: status.into(),
                gates: if rec.gates.is_empty() {
                    plan.gates
                        .iter()
                        .map(|g| flotilla_api::v1::RolloutGate {
                            name: g.name(),
                            value: None,
                            threshold: g.threshold,
                            passed: false,
                        })
                        .collect()
                } else {
                    rec.gates
                        .into_iter()
                        .map(|g| flotilla_api::v1::RolloutGate {
                            name: g.name,
                            value: g.value,
                            threshold: g.threshold,
                            passed: g.passed,
                        })
                        .collect()
                },
            }
        })
        .collect();
    Ok(Some(Rollout {
        id: r.id.clone(),
        bundle: b.map(|b| format!("{}@{}", b.name, b.version)).unwrap_or_default(),
        bundle_id: r.bundle_id.clone(),
        state: r.state.clone(),
        reason: r.reason.clone(),
        current_wave: engine.current_wave as u32 + 1,
        waves,
        created: rfc3339(r.created),
        total: devices.len() as u64,
        pending: count(&["pending"]),
        offered: count(&["offered", "downloading"]),
        succeeded: count(&["succeeded"]),
        failed: count(&["failed"]),
        devices: devices
            .into_iter()
            .map(|d| RolloutDevice { device: d.device_id, state: d.state, reason: d.reason })
            .collect(),
    }))
}

/// `pause`, `resume`, `abort`, `promote`, `rollback`.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/{command}",
    tag = "rollouts",
    summary = "pause, resume, abort, promote or rollback",
    params(("id" = String, Path, description = "rollout id"), ("command" = String, Path, description = "pause | resume | abort | promote | rollback")),
    responses((status = 200, description = "ok", body = Rollout), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]
async fn command_rollout(
    State(s): State<Arc<Shared>>,
    Path((id, command)): Path<(String, String)>,
) -> Result<Json<Rollout>> {
    use flotilla_rollout::Command as C;
    let cmd = match command.as_str() {
        "pause" => C::Pause,
        "resume" => C::Resume,
        "abort" => C::Abort,
        "promote" => C::Promote,
        "rollback" => C::Rollback,
        other => {
            return Err(Error::new(
                StatusCode::NOT_FOUND,
                "unknown_command",
                format!("{other:?} is not a rollout command"),
                Some("pause, resume, abort, promote or rollback"),
            ));
        }
    };
    let not_found = || Error::new(StatusCode::NOT_FOUND, "rollout_not_found", format!("no rollout {id:?}"), None);
    let r = s.store.rollout(&id)?.ok_or_else(not_found)?;
    let rds = s.store.rollout_devices(&id)?;
    let (plan, engine) = crate::driver::engine_of(&r, &rds)?;
    let next = flotilla_rollout::apply(&plan, &engine, cmd, now_s() as u64).map_err(|e| {
        Error::new(StatusCode::CONFLICT, "bad_state", e.to_string(), Some("see `flotilla rollout status ID`"))
    })?;
    s.store.save_rollout(
        &id,
        next.phase.as_str(),
        next.reason.as_deref(),
        &serde_json::to_string(&next).map_err(anyhow::Error::from)?,
    )?;
    tracing::info!(rollout = %id, command, state = next.phase.as_str(), "rollout command");
    s.wake.notify_one();
    rollout_view(&s, &id)?.map(Json).ok_or_else(not_found)
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    summary = "List rollouts",
    responses((status = 200, description = "ok", body = Vec<Rollout>), ApiErrors)
)]
async fn list_rollouts(State(s): State<Arc<Shared>>) -> Result<Json<Vec<Rollout>>> {
    let mut out = Vec::new();
    for r in s.store.rollouts()? {
        out.extend(rollout_view(&s, &r.id)?);
    }
    Ok(Json(out))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    tag = "rollouts",
    summary = "One rollout with its waves and gates",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, description = "ok", body = Rollout), ApiErrors)
)]
async fn get_rollout(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Rollout>> {
    rollout_view(&s, &id)?
        .map(Json)
        .ok_or_else(|| Error::new(StatusCode::NOT_FOUND, "rollout_not_found", format!("no rollout {id:?}"), None))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    device: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "devices",
    summary = "Device events, newest first",
    params(EventQuery),
    responses((status = 200, description = "ok", body = Vec<Event>), ApiErrors)
)]
async fn list_events(State(s): State<Arc<Shared>>, Query(q): Query<EventQuery>) -> Result<Json<Vec<Event>>> {
    let rows = s.store.events(q.device.as_deref(), q.limit.unwrap_or(100).min(10_000))?;
    Ok(Json(
        rows.into_iter()
            .map(|(device, at, kind, body)| Event {
                device,
                at: rfc3339(at),
                kind,
                detail: serde_json::from_str(&body).unwrap_or_default(),
            })
            .collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/api/v1/trust/root",
    tag = "trust",
    summary = "The current trust root (CBOR)",
    responses((status = 200, description = "ok", body = Vec<u8>, content_type = "application/cbor"), ApiErrors)
)]
async fn get_root(State(s): State<Arc<Shared>>) -> Result<Response> {
    let t = s.trust.read().expect("trust lock").clone();
    let t = t.ok_or_else(|| {
        Error::new(
            StatusCode::NOT_FOUND,
            "no_trust_root",
            "this server has no trust root",
            Some("push one with `flotilla trust push ROOT`"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "application/vnd.flotilla.root+cbor")], t.to_bytes()).into_response())
}

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
async fn push_root(State(s): State<Arc<Shared>>, body: Bytes) -> Result<(StatusCode, Json<TrustRootPushed>)> {
    let now = now_s();
    let invalid = |e: flotilla_bundle::Error| {
        Error::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_root",
            e.to_string(),
            Some("check it with `flotilla trust verify ROOT --from CURRENT`"),
        )
    };
    let current = s.trust.read().expect("trust lock").clone();
    let next = match &current {
        None => TrustedRoot::anchor(&body, now as u64).map_err(invalid)?,
        Some(cur) => {
            let (root, _) = flotilla_bundle::root::decode_untrusted(&body).map_err(invalid)?;
            if root.version <= cur.root().version {
                let same = s.store.roots()?.iter().any(|(v, b)| *v == root.version && b.as_slice() == body.as_ref());
                if same {
                    return Ok((StatusCode::OK, Json(TrustRootPushed { version: root.version, devices: 0 })));
                }
                return Err(Error::new(
                    StatusCode::CONFLICT,
                    "root_not_newer",
                    format!(
                        "root version {} is not newer than the current version {}",
                        root.version,
                        cur.root().version
                    ),
                    Some("rotate with `flotilla trust rotate --from CURRENT`"),
                ));
            }
            cur.rotate(&body, now as u64).map_err(invalid)?
        }
    };
    let version = next.root().version;
    s.store.add_root(version, &next.to_bytes(), now)?;
    *s.trust.write().expect("trust lock") = Some(next);
    let mut sent = 0;
    for d in s.store.devices()? {
        let have = s.store.device_root_version(&d.id)?;
        if crate::fleet::send_roots(&s, &d.id, have).await? {
            sent += 1;
        }
    }
    tracing::info!(version, devices = sent, "trust root updated");
    Ok((StatusCode::CREATED, Json(TrustRootPushed { version, devices: sent })))
}

// ---- retraining ----

fn no_policy(model: &str) -> Error {
    Error::new(
        StatusCode::NOT_FOUND,
        "policy_not_found",
        format!("no retraining policy for {model:?}"),
        Some("set one with `flotilla retrain policy set --model NAME --trainer-command '...'` or `--file policy.toml`"),
    )
}

fn no_job(id: &str) -> Error {
    Error::new(
        StatusCode::NOT_FOUND,
        "job_not_found",
        format!("no retraining job {id:?}"),
        Some("list jobs with `flotilla retrain ls`"),
    )
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/policies",
    tag = "retrain",
    summary = "Retraining policies",
    responses((status = 200, description = "ok", body = Vec<RetrainPolicy>), ApiErrors)
)]
async fn list_policies(State(s): State<Arc<Shared>>) -> Result<Json<Vec<RetrainPolicy>>> {
    Ok(Json(crate::retrain::policies(&s)?))
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/policies/{model}",
    tag = "retrain",
    summary = "A model's retraining policy",
    params(("model" = String, Path, description = "model name")),
    responses((status = 200, description = "ok", body = RetrainPolicy), ApiErrors)
)]
async fn get_policy(State(s): State<Arc<Shared>>, Path(model): Path<String>) -> Result<Json<RetrainPolicy>> {
    crate::retrain::policy(&s, &model)?.map(Json).ok_or_else(|| no_policy(&model))
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
async fn put_policy(
    State(s): State<Arc<Shared>>,
    Path(model): Path<String>,
    body: std::result::Result<Json<RetrainPolicy>, JsonRejection>,
) -> Result<Json<RetrainPolicy>> {
    let bad = |m: String| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_policy",
            m,
            Some("see `flotilla retrain policy set --help` for the fields"),
        )
    };
    let Json(p) = body.map_err(|e| bad(e.body_text()))?;
    if p.model != model {
        return Err(bad(format!("the policy is for {:?} but was sent to {model:?}", p.model)));
    }
    crate::retrain::validate(&p).map_err(bad)?;
    s.store.set_retrain_policy(&model, &serde_json::to_string(&p).map_err(anyhow::Error::from)?, now_s())?;
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
async fn delete_policy(State(s): State<Arc<Shared>>, Path(model): Path<String>) -> Result<StatusCode> {
    if s.store.delete_retrain_policy(&model)? { Ok(StatusCode::NO_CONTENT) } else { Err(no_policy(&model)) }
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/jobs",
    tag = "retrain",
    summary = "Retraining jobs, newest first",
    responses((status = 200, description = "ok", body = Vec<RetrainJob>), ApiErrors)
)]
async fn list_jobs(State(s): State<Arc<Shared>>) -> Result<Json<Vec<RetrainJob>>> {
    Ok(Json(crate::retrain::jobs(&s)?.into_iter().map(|d| d.job).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/retrain/jobs/{id}",
    tag = "retrain",
    summary = "One retraining job",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "ok", body = RetrainJob), ApiErrors)
)]
async fn get_job(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<RetrainJob>> {
    crate::retrain::job(&s, &id)?.map(|d| Json(d.job)).ok_or_else(|| no_job(&id))
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs",
    tag = "retrain",
    summary = "Start a retraining job by hand",
    request_body = RetrainStart,
    responses((status = 201, description = "ok", body = RetrainJob), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]
async fn start_job(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<RetrainStart>, JsonRejection>,
) -> Result<(StatusCode, Json<RetrainJob>)> {
    let req = json_body(body, None)?;
    let p = crate::retrain::policy(&s, &req.model)?.ok_or_else(|| no_policy(&req.model))?;
    let sel_text = req.selector.clone().or_else(|| p.data.selector.clone()).unwrap_or_default();
    let sel = selector(Some(&sel_text))?;
    if let Some(j) = crate::retrain::jobs(&s)?
        .into_iter()
        .find(|j| j.job.model == req.model && crate::retrain::ACTIVE.contains(&j.job.state.as_str()))
    {
        return Err(Error::new(
            StatusCode::CONFLICT,
            "job_running",
            format!("job {} for {} is still {}", j.job.id, req.model, j.job.state),
            Some("wait for it, or stop it with `flotilla retrain cancel ID`"),
        ));
    }
    // The version the selected devices run most (ties: the newest).
    let mut counts: std::collections::BTreeMap<u64, u32> = Default::default();
    for d in s.store.devices()?.into_iter().map(device).filter(|d| sel.matches(&d.tags)) {
        for m in d.models.iter().filter(|m| m.name == req.model) {
            *counts.entry(m.version).or_default() += 1;
        }
    }
    let Some(version) = counts.iter().max_by_key(|(v, n)| (**n, **v)).map(|(v, _)| *v) else {
        return Err(Error::new(
            StatusCode::CONFLICT,
            "no_devices",
            format!("no device matching {sel_text:?} runs {}", req.model),
            Some("see `flotilla devices ls` for what runs where"),
        ));
    };
    let shown = if sel_text.is_empty() { "every device".to_string() } else { sel_text.clone() };
    let d = crate::retrain::open(&s, &p, version, sel_text, format!("manual, samples from {shown}"), None)?;
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
async fn approve_job(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: Bytes) -> Result<Json<RetrainJob>> {
    crate::retrain::job(&s, &id)?.ok_or_else(|| no_job(&id))?;
    let s2 = s.clone();
    let res =
        tokio::task::spawn_blocking(move || crate::retrain::approve(&s2, &id, (!body.is_empty()).then_some(&body[..])))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    res.map(|d| Json(d.job)).map_err(|m| {
        Error::new(StatusCode::CONFLICT, "cannot_approve", m, Some("see the job with `flotilla retrain status ID`"))
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/retrain/jobs/{id}/cancel",
    tag = "retrain",
    summary = "Cancel a job",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "ok", body = RetrainJob), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 404, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError))
)]
async fn cancel_job(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<RetrainJob>> {
    crate::retrain::job(&s, &id)?.ok_or_else(|| no_job(&id))?;
    crate::retrain::cancel(&s, &id)
        .map(|d| Json(d.job))
        .map_err(|m| Error::new(StatusCode::CONFLICT, "cannot_cancel", m, None))
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
async fn upload_candidate(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<RetrainJob>> {
    let d = crate::retrain::job(&s, &id)?.ok_or_else(|| no_job(&id))?;
    let accepted = crate::retrain::accept_candidate(&s, &id, &body)
        .map_err(|e| Error::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_model", format!("{e:#}"), None))?;
    if !accepted {
        return Err(Error::new(
            StatusCode::CONFLICT,
            "not_training",
            format!("job {id} is {}, not waiting for a model", d.job.state),
            None,
        ));
    }
    crate::retrain::job(&s, &id)?.map(|d| Json(d.job)).ok_or_else(|| no_job(&id))
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
async fn job_file(State(s): State<Arc<Shared>>, Path((id, name)): Path<(String, String)>) -> Result<Response> {
    crate::retrain::job(&s, &id)?.ok_or_else(|| no_job(&id))?;
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

// ---- the console (static, embedded) ----

const CONSOLE: [(&str, &str, &str); 3] = [
    ("index.html", "text/html; charset=utf-8", include_str!("../console/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../console/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../console/style.css")),
];

async fn console_index() -> Response {
    console_asset(Path("index.html".into())).await
}

async fn console_asset(Path(file): Path<String>) -> Response {
    match CONSOLE.iter().find(|(name, _, _)| *name == file) {
        Some((_, media, body)) => {
            ([(header::CONTENT_TYPE, *media), (header::CACHE_CONTROL, "no-cache")], *body).into_response()
        }
        None => {
            Error::new(StatusCode::NOT_FOUND, "not_found", format!("no console file {file:?}"), None).into_response()
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/whoami",
    tag = "tokens",
    summary = "The calling token's id, name and role",
    responses((status = 200, description = "ok", body = Token), (status = 401, description = "error", body = ApiError))
)]
async fn whoami(axum::Extension(c): axum::Extension<crate::auth::Caller>) -> Json<Token> {
    Json(Token {
        id: c.id,
        role: c.role.as_str().into(),
        name: c.name,
        created: String::new(),
        last_used: None,
        token: None,
    })
}

// ---- tokens ----

fn token_view(t: crate::store::TokenRow) -> Token {
    Token {
        id: t.id,
        role: t.role,
        name: t.name,
        created: rfc3339(t.created),
        last_used: t.last_used.map(rfc3339),
        token: None,
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "tokens",
    summary = "API tokens (admin; never the secrets)",
    responses((status = 200, description = "ok", body = Vec<Token>), ApiErrors)
)]
async fn list_tokens(State(s): State<Arc<Shared>>) -> Result<Json<Vec<Token>>> {
    Ok(Json(s.store.tokens()?.into_iter().map(token_view).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "tokens",
    summary = "Make a token (admin); the secret is in this answer only",
    request_body = TokenCreate,
    responses((status = 201, description = "ok", body = Token), ApiErrors)
)]
async fn create_token(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<TokenCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<Token>)> {
    let req = json_body(body, None)?;
    let role = crate::auth::Role::parse(&req.role).ok_or_else(|| {
        Error::new(
            StatusCode::BAD_REQUEST,
            "bad_role",
            format!("no role {:?}", req.role),
            Some("roles are viewer (read), operator (rollouts, retraining, devices) and admin (tokens, trust root)"),
        )
    })?;
    let (id, token) = crate::auth::create_token(&s.store, role, &req.name)?;
    let now = rfc3339(now_s());
    Ok((
        StatusCode::CREATED,
        Json(Token {
            id,
            role: role.as_str().into(),
            name: req.name,
            created: now,
            last_used: None,
            token: Some(token),
        }),
    ))
}

#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "tokens",
    summary = "Revoke a token (admin)",
    params(("id" = String, Path, description = "token id")),
    responses((status = 204, description = "ok"), ApiErrors)
)]
async fn revoke_token(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<StatusCode> {
    if s.store.delete_token(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::new(StatusCode::NOT_FOUND, "token_not_found", format!("no token {id:?}"), None))
    }
}

#[cfg(test)]
mod tests {
    /// The OpenAPI document and the router cannot drift apart: every `.route(...)` of
    /// [`super::router`] (read from this file) is in the document with each of its methods, and
    /// the document has no path the router lacks.
    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc = serde_json::to_value(<super::ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let src = include_str!("http.rs");
        let router = &src[src.find("pub fn router(").unwrap()..];
        let router = &router[..router.find("\n}\n").unwrap()];
        let mut routes = std::collections::BTreeSet::new();
        for line in router.lines().filter(|l| l.trim_start().starts_with(".route(\"/api/")) {
            let path = line.split('"').nth(1).unwrap();
            let handlers = &line[line.find("\",").unwrap()..];
            let mut methods = 0;
            for m in ["get", "post", "put", "delete"] {
                if handlers.contains(&format!("{m}(")) {
                    methods += 1;
                    let op = &doc["paths"][path][m];
                    assert!(op.is_object(), "{m} {path} is routed but not in the OpenAPI document");
                    assert!(op["responses"].is_object() && op["summary"].is_string(), "{m} {path}: {op}");
                }
            }
            assert!(methods > 0, "no method found in {line:?}");
            routes.insert(path.to_string());
        }
        assert!(routes.len() >= 27, "{routes:?}");
        let documented: std::collections::BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(documented, routes, "documented paths vs routed paths");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }

    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 10)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=4-5", 10), Some((4, 6)));
        assert_eq!(parse_range("bytes=4-100", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
