//! Control-plane API under `/api/v1`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every error body: a stable machine code, a human message and, where it helps, what to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub online: bool,
    /// RFC 3339.
    pub last_seen: Option<String>,
    pub agent_version: Option<String>,
    pub arch: Option<String>,
    pub runtimes: Vec<String>,
    /// TFLite delegates the device offers (`xnnpack`, an NPU's).
    #[serde(default)]
    pub delegates: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub models: Vec<DeviceModel>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceModel {
    pub name: String,
    pub version: u64,
    pub backend: String,
    pub status: String,
    /// Hex SHA-256 of the model content (the base a delta bundle needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// With a delegate: graph nodes it runs, and nodes left on the CPU kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated_nodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_nodes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// Hex SHA-256 of the bundle file.
    pub id: String,
    pub name: String,
    pub version: u64,
    pub size: u64,
    pub manifest_sha256: String,
    pub signers: Vec<String>,
    pub created: String,
    pub pushed: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutCreate {
    /// `NAME@VERSION`.
    pub bundle: String,
    /// Device ids to target; empty means every device the plan's target selects.
    #[serde(default)]
    pub devices: Vec<String>,
    /// A `flotilla_rollout::Plan` (waves, bake, gates, on_failure, target). Default: one wave
    /// of every device, gated on `install_success>=1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutCreated {
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub bundle: String,
    pub bundle_id: String,
    /// `pending`, `running`, `paused`, `completed`, `aborted` or `rolled_back`.
    pub state: String,
    /// Why it paused, stopped or rolled back.
    pub reason: Option<String>,
    /// 1 for the first wave.
    pub current_wave: u32,
    pub waves: Vec<RolloutWave>,
    pub created: String,
    pub total: u64,
    pub pending: u64,
    pub offered: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub devices: Vec<RolloutDevice>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutWave {
    /// As planned: `5%`, `10` (devices) or a selector.
    pub spec: String,
    /// Devices in the wave so far.
    pub size: u64,
    pub offered: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// `waiting`, `installing`, `baking`, `passed`.
    pub status: String,
    pub gates: Vec<RolloutGate>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutGate {
    /// As written, e.g. `latency_p95<=1.2x`.
    pub name: String,
    /// None while there is not enough evidence.
    pub value: Option<f64>,
    pub threshold: f64,
    pub passed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutDevice {
    pub device: String,
    /// `pending`, `offered`, `downloading`, `succeeded`, `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: String,
    pub at: String,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// The answer to `POST /api/v1/trust/root`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustRootPushed {
    pub version: u64,
    /// Devices the new root (chain) was sent to.
    pub devices: u64,
}

/// `POST /api/v1/devices/{id}/tags`: server-side tags (they win over the device's own).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TagsUpdate {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove (also the device's own tag of that key).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// One row of `GET /api/v1/drift`: a signal of a model version, merged over a cohort's devices
/// for one aggregation window, scored against the bundle's baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftRow {
    pub model: String,
    pub version: u64,
    /// The tag selector of the devices merged (e.g. `group=lab`; `!group` for devices without
    /// that tag; empty for all devices).
    pub cohort: String,
    pub signal: String,
    /// RFC 3339.
    pub window_start: String,
    pub window_end: String,
    /// Values counted for this signal.
    pub count: u64,
    pub inferences: u64,
    pub devices: u64,
    pub psi: Option<f64>,
    pub js: Option<f64>,
    pub ks: Option<f64>,
    pub wasserstein: Option<f64>,
    /// Mean of the live values (for accuracy: the share of correct predictions).
    pub mean: Option<f64>,
    /// Metrics over their thresholds in this window.
    pub exceeded: Vec<String>,
    /// This window completes `consecutive` windows in a row over a threshold.
    pub alert: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftAlert {
    pub id: i64,
    pub model: String,
    pub version: u64,
    pub cohort: String,
    pub signal: String,
    /// Metrics over their thresholds when it was raised, e.g. `psi`.
    pub metrics: Vec<String>,
    /// The first metric's value in the latest window over the threshold, and that threshold.
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// Windows in a row over a threshold so far.
    pub windows: u32,
    pub first_window: String,
    pub last_window: String,
    /// `firing` or `resolved`.
    pub state: String,
    pub raised: String,
    pub resolved: Option<String>,
}

/// `POST /api/v1/samples/pull`: ask devices for the reservoir sample of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplesPull {
    pub model: String,
    #[serde(default)]
    pub version: Option<u64>,
    /// Tag selector of the devices to ask (default: every online device running the model).
    #[serde(default)]
    pub selector: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplesPulled {
    pub upload_id: String,
    pub devices: Vec<String>,
}

/// `GET /api/v1/samples/uploads/{id}`: how an upload is going, per device asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleUploadDevice {
    pub device: String,
    pub parts: u32,
    pub samples: u64,
    pub done: bool,
}

/// A stored reservoir sample (`GET /api/v1/samples`): one inference's inputs as v2 tensors,
/// so a list of them reads as golden or baseline data, or as a trainer's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub device: String,
    pub model: String,
    pub version: u64,
    pub id: String,
    pub ts: String,
    pub inputs: Vec<crate::v2::InferTensor>,
    pub predicted: Vec<u32>,
    pub labels: Option<Vec<u32>>,
}
