//! The local inference API: Open Inference Protocol (KServe v2 REST) for apps on the device.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_api::v2::{
    ErrorResponse, FeedbackBody, FeedbackResponse, InferRequest, InferResponse, InferTensor, ModelMetadata,
    SelfTestReport, TensorMetadata,
};
use flotilla_bundle::manifest::{DType, Dim, TensorSpec};
use flotilla_runtime::{RuntimeError, Tensor, TensorData};

use crate::Ctx;
use crate::models::ActiveModel;

/// Largest request body (a batch of images fits; a runaway client does not).
const MAX_BODY: usize = 64 << 20;

pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/healthz", get(live))
        .route("/v2/models", get(list_models))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/feedback", post(feedback))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { error: self.1 })).into_response()
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("model {name:?} is not installed on this device"))
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({ "name": "flotilla-agent", "version": crate::AGENT_VERSION, "extensions": ["model_repository"] }),
    )
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "live": true }))
}

async fn ready() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ready": true }))
}

async fn list_models(State(ctx): State<Arc<Ctx>>) -> Json<Vec<ModelMetadata>> {
    Json(ctx.registry.all().iter().map(|m| metadata(m)).collect())
}

async fn model_metadata(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    ctx.registry.get(&name).map(|m| Json(metadata(&m))).ok_or_else(|| not_found(&name))
}

async fn model_metadata_version(
    State(ctx): State<Arc<Ctx>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let m = versioned(&ctx, &name, &version)?;
    Ok(Json(metadata(&m)))
}

async fn model_ready(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    ctx.registry
        .get(&name)
        .map(|_| Json(serde_json::json!({ "name": name, "ready": true })))
        .ok_or_else(|| not_found(&name))
}

fn versioned(ctx: &Ctx, name: &str, version: &str) -> Result<Arc<ActiveModel>, ApiError> {
    let m = ctx.registry.get(name).ok_or_else(|| not_found(name))?;
    if m.version.to_string() != version {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("model {name:?} version {version} is not active here (version {} is)", m.version),
        ));
    }
    Ok(m)
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    let text = ctx.metrics.render(&ctx);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn infer(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<InferResponse>, ApiError> {
    let m = ctx.registry.get(&name).ok_or_else(|| not_found(&name))?;
    run(&ctx, m, body).await
}

async fn infer_version(
    State(ctx): State<Arc<Ctx>>,
    Path((name, version)): Path<(String, String)>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<InferResponse>, ApiError> {
    let m = versioned(&ctx, &name, &version)?;
    run(&ctx, m, body).await
}

async fn run(
    ctx: &Ctx,
    m: Arc<ActiveModel>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<InferResponse>, ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid request body: {}", e.body_text())))?;
    let inputs = req.inputs.iter().map(to_tensor).collect::<Result<Vec<_>, _>>()?;
    // Every response carries an id, so a caller can send feedback on it later.
    let id = req.id.clone().unwrap_or_else(crate::new_id);
    let m2 = m.clone();
    let t0 = std::time::Instant::now();
    let id2 = id.clone();
    let result = tokio::task::spawn_blocking(move || m2.infer_request(inputs, Some(&id2)))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // The caller's bad input is not the model's failure.
    if !matches!(result, Err(RuntimeError::BadInput(_))) {
        ctx.metrics.record(&m.name, m.version, m.backend(), result.is_ok(), t0.elapsed().as_micros() as u64);
    }
    let outputs = result.map_err(|e| match e {
        RuntimeError::BadInput(msg) => ApiError(StatusCode::BAD_REQUEST, msg),
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    Ok(Json(InferResponse {
        model_name: m.name.clone(),
        model_version: m.version.to_string(),
        id: Some(id),
        outputs: outputs.iter().map(from_tensor).collect(),
    }))
}

async fn feedback(
    State(ctx): State<Arc<Ctx>>,
    Path(name): Path<String>,
    body: Result<Json<FeedbackBody>, JsonRejection>,
) -> Result<Json<FeedbackResponse>, ApiError> {
    let m = ctx.registry.get(&name).ok_or_else(|| not_found(&name))?;
    let Json(body) = body.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid feedback: {} (expected {{\"id\": \"...\", \"label\": 3}} or a list of them)",
                e.body_text()
            ),
        )
    })?;
    let Some(drift) = &m.drift else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("model {name:?} version {} has no drift baseline, so feedback has nowhere to go", m.version),
        ));
    };
    let items = match body {
        FeedbackBody::One(f) => vec![f],
        FeedbackBody::Many(v) => v,
    };
    let mut out = FeedbackResponse::default();
    for f in items {
        let labels = match (f.label, f.labels) {
            (Some(l), None) => vec![l],
            (None, Some(ls)) => ls,
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("feedback for {:?}: give either `label` or `labels`", f.id),
                ));
            }
        };
        match drift.feedback(&f.id, &labels) {
            Some(o) => {
                out.matched += o.matched;
                out.correct += o.correct;
            }
            None => out.unknown.push(f.id),
        }
    }
    if out.matched == 0 && !out.unknown.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no recent prediction of {name:?} has the id(s) {:?} (the agent keeps the last {})",
                out.unknown,
                crate::drift::RECENT
            ),
        ));
    }
    Ok(Json(out))
}

fn to_tensor(t: &InferTensor) -> Result<Tensor, ApiError> {
    let bad = |msg: String| ApiError(StatusCode::BAD_REQUEST, msg);
    let dtype = DType::parse(&t.datatype)
        .ok_or_else(|| bad(format!("input {:?}: unknown datatype {:?}", t.name, t.datatype)))?;
    let values = t.flat_numbers().map_err(|e| bad(format!("input {:?}: {e}", t.name)))?;
    let data = TensorData::from_f64(dtype, &values).map_err(|e| bad(format!("input {:?}: {e}", t.name)))?;
    Tensor::new(t.name.clone(), t.shape.iter().map(|&d| d as usize).collect(), data).map_err(|e| bad(e.to_string()))
}

fn from_tensor(t: &Tensor) -> InferTensor {
    let data = match &t.data {
        TensorData::F32(v) => serde_json::json!(v),
        TensorData::F64(v) => serde_json::json!(v),
        TensorData::I64(v) => serde_json::json!(v),
        TensorData::I32(v) => serde_json::json!(v),
        TensorData::I16(v) => serde_json::json!(v),
        TensorData::I8(v) => serde_json::json!(v),
        TensorData::U8(v) => serde_json::json!(v),
        TensorData::Bool(v) => serde_json::json!(v),
    };
    InferTensor {
        name: t.name.clone(),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        datatype: t.data.dtype().as_str().into(),
        data,
    }
}

fn metadata(m: &ActiveModel) -> ModelMetadata {
    let spec = |s: &TensorSpec| TensorMetadata {
        name: s.name.clone(),
        datatype: s.dtype.as_str().into(),
        shape: s
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n as i64,
                Dim::Symbolic(_) => -1,
            })
            .collect(),
    };
    ModelMetadata {
        name: m.name.clone(),
        versions: vec![m.version.to_string()],
        platform: m.backend().to_string(),
        inputs: m.manifest.model.inputs.iter().map(spec).collect(),
        outputs: m.manifest.model.outputs.iter().map(spec).collect(),
        self_test: m.self_test.as_ref().map(|t| SelfTestReport {
            kind: t.kind.as_str().into(),
            cases: t.cases as u64,
            runs: t.runs as u64,
            median_us: t.median_us,
            latency_budget_us: m.manifest.health.latency_budget_us,
        }),
    }
}
