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
    /// Device ids to target; empty means every registered device.
    #[serde(default)]
    pub devices: Vec<String>,
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
    /// `running`, `completed`, or `failed` (some device failed, the rest finished).
    pub state: String,
    pub created: String,
    pub total: u64,
    pub pending: u64,
    pub offered: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub devices: Vec<RolloutDevice>,
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
