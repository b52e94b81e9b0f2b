//! The HTTP adapter: the API under `/api/v1` (one file per resource), `/metrics` and the
//! console. The only code that knows `flotilla-api` types and HTTP status codes: handlers decode
//! requests, call [`crate::service`], and encode what it returns (its errors through
//! [`error`]).

mod auth;
mod bundles;
mod certs;
mod console;
mod devices;
mod drift;
mod error;
mod metrics;
mod retrain;
mod rollouts;
mod samples;
mod tokens;
mod trust;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use flotilla_api::v1::ApiError;

use crate::service::Fleet;
pub use error::{ApiErrors, Error, Result, json_body};

/// Largest bundle accepted over HTTP.
const MAX_BUNDLE: usize = 2 << 30;

pub fn router(shared: Arc<Fleet>) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/whoami", get(tokens::whoami))
        .route("/metrics", get(metrics::render))
        .route("/", get(console::index))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .route("/api/v1/devices", get(devices::list_devices))
        .route("/api/v1/devices/{id}", get(devices::get_device))
        .route("/api/v1/devices/{id}/tags", post(devices::tag_device))
        .route("/api/v1/devices/{id}/credential", put(devices::enroll_device).delete(devices::unenroll_device))
        .route("/api/v1/devices/{id}/certificate", post(certs::issue_certificate))
        .route("/api/v1/devices/{id}/certificates", get(certs::list_certificates).post(certs::record_certificate))
        .route("/api/v1/devices/{id}/revoke", post(certs::revoke_device))
        .route("/api/v1/claim-tokens", get(certs::list_claim_tokens).post(certs::create_claim_token))
        .route("/api/v1/claim", post(certs::claim))
        .route("/api/v1/drift", get(drift::drift_rows))
        .route("/api/v1/alerts", get(drift::list_alerts))
        .route("/api/v1/samples", get(samples::list_samples))
        .route("/api/v1/samples/pull", post(samples::pull_samples))
        .route("/api/v1/samples/uploads/{id}", get(samples::sample_upload))
        .route("/api/v1/bundles", get(bundles::list_bundles).post(bundles::push_bundle))
        .route("/api/v1/bundles/{id}", get(bundles::download_bundle))
        .route("/api/v1/rollouts", get(rollouts::list_rollouts).post(rollouts::create_rollout))
        .route("/api/v1/rollouts/{id}", get(rollouts::get_rollout))
        .route("/api/v1/rollouts/{id}/{command}", post(rollouts::command_rollout))
        .route("/api/v1/retrain/policies", get(retrain::list_policies))
        .route(
            "/api/v1/retrain/policies/{model}",
            get(retrain::get_policy).put(retrain::put_policy).delete(retrain::delete_policy),
        )
        .route("/api/v1/retrain/jobs", get(retrain::list_jobs).post(retrain::start_job))
        .route("/api/v1/retrain/jobs/{id}", get(retrain::get_job))
        .route("/api/v1/retrain/jobs/{id}/approve", post(retrain::approve_job))
        .route("/api/v1/retrain/jobs/{id}/cancel", post(retrain::cancel_job))
        .route("/api/v1/retrain/jobs/{id}/candidate", post(retrain::upload_candidate))
        .route("/api/v1/retrain/jobs/{id}/files/{name}", get(retrain::job_file))
        .route("/api/v1/tokens", get(tokens::list_tokens).post(tokens::create_token))
        .route("/api/v1/tokens/{id}", delete(tokens::revoke_token))
        .route("/api/v1/events", get(devices::list_events))
        .route("/api/v1/trust/root", get(trust::get_root).post(trust::push_root))
        .layer(DefaultBodyLimit::max(MAX_BUNDLE))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), auth::middleware))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(shared)
}

/// The OpenAPI 3 document of `/api/v1`, served at `/api/v1/openapi.json`. Every route of
/// [`router`] is in it (a test reads the router's source and checks).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Flotilla control plane API", description = "Devices, bundles, staged rollouts, drift and retraining. Every call but /api/v1/health needs `Authorization: Bearer TOKEN`."),
    paths(health, tokens::whoami, devices::list_devices, devices::get_device, devices::tag_device, devices::enroll_device, devices::unenroll_device, certs::issue_certificate, certs::list_certificates, certs::record_certificate, certs::revoke_device, certs::list_claim_tokens, certs::create_claim_token, certs::claim, drift::drift_rows, drift::list_alerts, samples::list_samples, samples::pull_samples, samples::sample_upload, bundles::list_bundles, bundles::push_bundle, bundles::download_bundle, rollouts::create_rollout, rollouts::list_rollouts, rollouts::get_rollout, rollouts::command_rollout, devices::list_events, trust::get_root, trust::push_root, retrain::list_policies, retrain::get_policy, retrain::put_policy, retrain::delete_policy, retrain::list_jobs, retrain::get_job, retrain::start_job, retrain::approve_job, retrain::cancel_job, retrain::upload_candidate, retrain::job_file, tokens::list_tokens, tokens::create_token, tokens::revoke_token, openapi_json),
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
    summary = "Health (no token needed): 503 while this replica cannot reach its store",
    responses((status = 200, description = "ok", body = Object), (status = 503, description = "the store does not answer", body = Object))
)]
async fn health(axum::extract::State(f): axum::extract::State<Arc<Fleet>>) -> Response {
    // A replica that cannot reach its store decides nothing: it says so, and a load balancer
    // sends the API's callers to the others.
    let store = tokio::time::timeout(std::time::Duration::from_secs(3), f.store.ping()).await;
    let problem = match store {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("no answer within 3 s".to_string()),
    };
    let body = serde_json::json!({
        "ok": problem.is_none(),
        "version": env!("CARGO_PKG_VERSION"),
        "replica": f.settings.replica,
        "store": { "backend": f.store.backend(), "ok": problem.is_none(), "error": problem },
    });
    let status = if problem.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    /// The OpenAPI document and the router cannot drift apart: every `.route(...)` of
    /// [`super::router`] (read from this file) is in the document with each of its methods, and
    /// the document has no path the router lacks.
    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc = serde_json::to_value(<super::ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let src = include_str!("mod.rs");
        let router = &src[src.find("pub fn router(").unwrap()..];
        let router = &router[..router.find("\n}\n").unwrap()];
        let mut routes = std::collections::BTreeSet::new();
        // Each `.route(` call, however rustfmt wrapped it, up to the next one.
        let calls: Vec<String> = router.split(".route(").skip(1).map(|c| c.split_whitespace().collect()).collect();
        for line in calls.iter().filter(|c| c.starts_with("\"/api/")) {
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
}
