//! Control-plane API under `/api/v1`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every error body: a stable machine code, a human message and, where it helps, what to do.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The self-test the device ran before the model served: `golden` (the bundle's golden
    /// cases) or `smoke` (inputs made from the signature), and its median latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test_median_us: Option<u64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutCreated {
    pub id: String,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutGate {
    /// As written, e.g. `latency_p95<=1.2x`.
    pub name: String,
    /// None while there is not enough evidence.
    pub value: Option<f64>,
    pub threshold: f64,
    pub passed: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutDevice {
    pub device: String,
    /// `pending`, `offered`, `downloading`, `succeeded`, `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: String,
    pub at: String,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// The answer to `POST /api/v1/trust/root`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustRootPushed {
    pub version: u64,
    /// Devices the new root (chain) was sent to.
    pub devices: u64,
}

/// `POST /api/v1/devices/{id}/tags`: server-side tags (they win over the device's own).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TagsUpdate {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove (also the device's own tag of that key).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `PUT /api/v1/devices/{id}/credential`: the SHA-256 (hex) of the broker password a device was
/// flashed with (`flotilla-image personalise` writes the password into the device's image and
/// only its hash into `enroll.csv`; the server never sees the password).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CredentialUpdate {
    pub password_sha256: String,
}

/// A device's enrolled broker credential (never the password or its hash).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceCredential {
    pub device_id: String,
    /// RFC 3339 time of enrollment.
    pub created: String,
    /// Whether the broker checks it: true with the embedded broker; an external broker keeps
    /// its own password file.
    pub enforced: bool,
}

/// One row of `GET /api/v1/drift`: a signal of a model version, merged over a cohort's devices
/// for one aggregation window, scored against the bundle's baseline.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// With `histograms=true`: the baseline's and this window's histogram of the signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<DriftHistogram>,
}

/// A signal's histogram on the baseline's bins: `edges` between bins (so `edges.len() + 1`
/// counts: below the first edge, between edges, at or above the last), baseline and live counts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftHistogram {
    pub edges: Vec<f64>,
    pub baseline: Vec<u64>,
    pub live: Vec<u64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplesPull {
    pub model: String,
    #[serde(default)]
    pub version: Option<u64>,
    /// Tag selector of the devices to ask (default: every online device running the model).
    #[serde(default)]
    pub selector: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplesPulled {
    pub upload_id: String,
    pub devices: Vec<String>,
}

/// `GET /api/v1/samples/uploads/{id}`: how an upload is going, per device asked.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleUploadDevice {
    pub device: String,
    pub parts: u32,
    pub samples: u64,
    pub done: bool,
}

/// A stored reservoir sample (`GET /api/v1/samples`): one inference's inputs as v2 tensors,
/// so a list of them reads as golden or baseline data, or as a trainer's input.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// A model's retraining policy (`flotilla retrain policy set`): when a job starts, what data it
/// trains on, which trainer runs, how the candidate must compare with the current model, and how
/// it rolls out. Everything but `model` and `trainer` has a default.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainPolicy {
    pub model: String,
    #[serde(default)]
    pub trigger: RetrainTrigger,
    #[serde(default)]
    pub data: RetrainData,
    pub trainer: RetrainTrainer,
    #[serde(default)]
    pub evaluation: RetrainEvaluation,
    #[serde(default)]
    pub rollout: RetrainRollout,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainTrigger {
    /// Start a job when a drift alert on the model has lasted `windows` windows.
    #[serde(default = "yes")]
    pub on_alert: bool,
    /// Windows in a row over a threshold (default: the alert's own, the bundle's `consecutive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<u32>,
    /// No new automatic job for this long after the last one started.
    #[serde(default = "hour")]
    pub cooldown_secs: u64,
}

impl Default for RetrainTrigger {
    fn default() -> Self {
        RetrainTrigger { on_alert: true, windows: None, cooldown_secs: 3600 }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainData {
    /// Devices whose samples are collected (default: the alerting cohort, e.g. `group=field`;
    /// for a manual job every device running the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The original training data, handed to the trainer as `FLOTILLA_TRAINING_DATA` (a path or
    /// a URL; the server does not read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<String>,
    /// Fewer labelled samples than this and the job fails (labels come from
    /// `POST /v2/models/{name}/feedback` on the devices).
    #[serde(default = "fifty")]
    pub min_labelled: u64,
    /// How long to wait for the devices' sample uploads.
    #[serde(default = "two_minutes")]
    pub collect_secs: u64,
    /// Share of the labelled samples kept out of training for the `samples` evaluation set.
    #[serde(default = "three_tenths")]
    pub holdout: f64,
}

impl Default for RetrainData {
    fn default() -> Self {
        RetrainData { selector: None, training_data: None, min_labelled: 50, collect_secs: 120, holdout: 0.3 }
    }
}

/// Exactly one of `command` and `webhook`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainTrainer {
    /// Program and arguments, run in the job's directory with `FLOTILLA_BASE_MODEL`,
    /// `FLOTILLA_SAMPLES`, `FLOTILLA_TRAINING_DATA`, `FLOTILLA_OUTPUT`, `FLOTILLA_WORK_DIR`,
    /// `FLOTILLA_JOB_ID`, `FLOTILLA_MODEL_NAME` and `FLOTILLA_BASE_VERSION` set. It writes the
    /// candidate model to `FLOTILLA_OUTPUT` and exits 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// URL of an external pipeline: the server POSTs the job (with URLs of the base model and the
    /// samples) and waits for the model at the job's `upload_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default = "hour")]
    pub timeout_secs: u64,
    /// More environment for the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainEvaluation {
    /// `accuracy` (top class against the label, computed by the server) or any name the
    /// `evaluator` prints.
    #[serde(default = "accuracy")]
    pub metric: String,
    #[serde(default = "yes")]
    pub higher_is_better: bool,
    /// The set the candidate must match or beat the current model on: `samples` (the held-out
    /// share of the collected samples) or a path on the server to labelled v2 requests (JSON).
    #[serde(default = "samples")]
    pub heldout: String,
    /// By how much it must beat it there (0: matching is enough).
    #[serde(default)]
    pub min_improvement: f64,
    /// More sets on which the candidate may not lose more than `max_regression`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guard: Vec<String>,
    #[serde(default = "two_hundredths")]
    pub max_regression: f64,
    /// Program and arguments that score a model: run with `FLOTILLA_MODEL`, `FLOTILLA_HELDOUT`
    /// and `FLOTILLA_METRIC`, it prints a JSON object holding the metric (e.g.
    /// `flotilla-trainer eval`). Default: the server computes accuracy itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evaluator: Vec<String>,
}

impl Default for RetrainEvaluation {
    fn default() -> Self {
        RetrainEvaluation {
            metric: accuracy(),
            higher_is_better: true,
            heldout: samples(),
            min_improvement: 0.0,
            guard: vec![],
            max_regression: 0.02,
            evaluator: vec![],
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainRollout {
    /// `auto` starts the rollout as soon as the bundle is built and signed; `manual` waits for
    /// `flotilla retrain approve`.
    #[serde(default = "auto")]
    pub approval: String,
    /// A rollout plan (as `rollout start --plan`); its `target` defaults to the data selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Value>,
    /// Drift baseline of the new bundle: `samples` (what the devices see now) or `previous`
    /// (the current bundle's reference, kept as it is).
    #[serde(default = "samples")]
    pub baseline: String,
}

impl Default for RetrainRollout {
    fn default() -> Self {
        RetrainRollout { approval: auto(), plan: None, baseline: samples() }
    }
}

fn yes() -> bool {
    true
}
fn hour() -> u64 {
    3600
}
fn fifty() -> u64 {
    50
}
fn two_minutes() -> u64 {
    120
}
fn three_tenths() -> f64 {
    0.3
}
fn two_hundredths() -> f64 {
    0.02
}
fn accuracy() -> String {
    "accuracy".into()
}
fn samples() -> String {
    "samples".into()
}
fn auto() -> String {
    "auto".into()
}

/// `POST /api/v1/retrain/jobs`: start a job by hand.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrainStart {
    pub model: String,
    /// Devices whose samples to use (default: the policy's, else every device running it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// One evaluation of the current model and the candidate on a set.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrainScore {
    pub set: String,
    pub metric: String,
    pub samples: u64,
    pub current: f64,
    pub candidate: f64,
    /// `beat` (the held-out set) or `guard`.
    pub role: String,
    pub passed: bool,
}

/// A retraining job. `state`: `collecting`, `training`, `evaluating`, `building`,
/// `awaiting_approval`, `rolling_out`, then `completed`, `rejected` (the candidate did not
/// beat the current model), `failed` or `cancelled`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrainJob {
    pub id: String,
    pub model: String,
    pub state: String,
    /// `manual`, or the alert that started it.
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<i64>,
    /// Devices whose samples were used.
    pub selector: String,
    pub base_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Labelled samples: used for training and held out.
    pub samples_train: u64,
    pub samples_heldout: u64,
    pub evaluation: Vec<RetrainScore>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// Key ids that signed the candidate bundle.
    #[serde(default)]
    pub signers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// Why it waits, failed or was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339.
    pub created: String,
    pub updated: String,
    /// What happened, oldest first (`[time] state: detail`).
    #[serde(default)]
    pub history: Vec<String>,
}

/// `POST /api/v1/tokens` (admin).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenCreate {
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    #[serde(default)]
    pub name: String,
}

/// An API token. `token` is only ever in the answer that made it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub role: String,
    pub name: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `POST /api/v1/claim-tokens`: a single-use token a device trades, with a CSR, for its
/// certificate on first boot.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimTokenCreate {
    /// Only this device may use it (None: any device id not already holding a certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Seconds it stays usable (default 3600, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimToken {
    pub id: String,
    /// The secret, shown once (when made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    pub device_id: Option<String>,
    /// RFC 3339.
    pub expires: String,
    pub created: String,
    /// RFC 3339 time it was used, and by which device.
    pub used: Option<String>,
    pub used_by: Option<String>,
}

/// `POST /api/v1/claim` (no bearer token: the claim token is the credential).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub device_id: String,
    pub token: String,
    /// PEM certificate signing request whose subject CN is `device_id`.
    pub csr: String,
}

/// A device certificate the fleet CA issued.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceCertificate {
    pub device_id: String,
    /// PEM (leaf first). Absent in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The private key (PEM), only when the server made it (`POST .../certificate` without a
    /// CSR, for images personalised off the device); shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub serial: String,
    /// SHA-256 of the DER, hex: what `flotilla-image personalise` lists in its CSV.
    pub sha256: String,
    pub not_after: String,
    /// `issued`, `claim`, `renewal`.
    pub how: String,
    pub revoked: Option<String>,
}

/// `POST /api/v1/devices/{id}/certificate`: a certificate for a device (with its CSR, or with a
/// key the server makes when `csr` is absent). Admits a revoked device again.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CertificateCreate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// `POST /api/v1/devices/{id}/revoke`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceRevoked {
    pub device_id: String,
    pub revoked: String,
    /// Certificates on record that are now refused (any other naming the device is too).
    pub certificates: u64,
    /// Live broker connections cut.
    pub disconnected: u64,
}

/// `POST /api/v1/devices/{id}/certificates`: put a certificate issued outside the server (by
/// `flotilla-image personalise --fleet-ca`, or an operator's own CA) on record, so that it can be
/// revoked by serial and renewed through an external broker.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// SHA-256 of the certificate's DER, hex.
    pub sha256: String,
    /// Serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}
