//! Open Inference Protocol (KServe v2) REST types, as served by the agent on the device.

use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferTensor {
    pub name: String,
    pub shape: Vec<u64>,
    /// `FP32`, `INT64`, ...
    pub datatype: String,
    /// Row-major elements, flat or nested.
    pub data: serde_json::Value,
}

impl InferTensor {
    /// The elements, flattening nested arrays. Booleans read as 0/1.
    pub fn flat_numbers(&self) -> Result<Vec<f64>, String> {
        fn walk(v: &serde_json::Value, out: &mut Vec<f64>) -> Result<(), String> {
            match v {
                serde_json::Value::Array(items) => items.iter().try_for_each(|i| walk(i, out)),
                serde_json::Value::Number(n) => {
                    out.push(n.as_f64().ok_or("number out of range")?);
                    Ok(())
                }
                serde_json::Value::Bool(b) => {
                    out.push(*b as u8 as f64);
                    Ok(())
                }
                other => Err(format!("expected numbers, found {other}")),
            }
        }
        let mut out = Vec::new();
        walk(&self.data, &mut out)?;
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: Vec<InferTensor>,
}

/// Ground truth for an earlier inference (Flotilla's extension): `POST
/// /v2/models/{name}/feedback` with one of these or an array of them. `id` is the id of the infer
/// request (or the one the agent gave in its response); `label` is the true class for a
/// single-sample request, `labels` one per sample of a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeedbackBody {
    One(Feedback),
    Many(Vec<Feedback>),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackResponse {
    /// Labelled samples matched to a prediction.
    pub matched: u64,
    /// Of those, the ones the model had right.
    pub correct: u64,
    /// Request ids the agent no longer (or never) knew.
    pub unknown: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<InferTensor>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    /// -1 for a dimension resolved per request.
    pub shape: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    /// The backend that actually runs the model (`tract-onnx`, ...).
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
    /// Flotilla's extension: the self-test this version passed on the device before it served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<SelfTestReport>,
}

/// How a model was tested on the device before it went active.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTestReport {
    /// `golden` (the bundle's golden cases, outputs compared within its tolerance) or `smoke`
    /// (inputs made from the signature; outputs checked for declared shapes and finite values).
    pub kind: String,
    /// Golden cases checked (0 for smoke).
    pub cases: u64,
    /// Timed runs after the warm-up; `median_us` is their median.
    pub runs: u64,
    pub median_us: u64,
    /// The latency budget it was judged against, if the bundle has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_budget_us: Option<u64>,
}

/// `{"error": "..."}`, as the protocol specifies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
