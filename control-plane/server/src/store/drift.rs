//! Drift reports per device and window, and the alerts judged from them.

use async_trait::async_trait;

/// One stored drift report (`signals` is CBOR: `Vec<flotilla_proto::SignalSketch>`).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftReportRow {
    pub device_id: String,
    pub version: u64,
    pub window_start: i64,
    pub window_end: i64,
    pub bucket: i64,
    pub inferences: u64,
    pub signals: Vec<u8>,
    /// The device's cohort (under the server's cohort key) when the report arrived.
    pub cohort: String,
}

/// The newest count window of a cohort: its key, who reported into it and how much.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenDriftWindow {
    pub bucket: i64,
    pub devices: Vec<String>,
    pub inferences: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub id: i64,
    pub model: String,
    pub version: u64,
    pub cohort: String,
    pub signal: String,
    pub metrics: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub windows: u32,
    pub first_window: i64,
    pub last_window: i64,
    pub state: String,
    pub raised: i64,
    pub resolved: Option<i64>,
}

#[async_trait]
pub trait DriftStore: Send + Sync {
    /// Store a report once (false when this message was stored before).
    async fn add_drift_report(
        &self,
        device: &str,
        msg_id: &str,
        model: &str,
        r: &DriftReportRow,
        now: i64,
    ) -> anyhow::Result<bool>;

    /// Reports of a model (one version or all), from `since_bucket` on, oldest first.
    async fn drift_reports(
        &self,
        model: &str,
        version: Option<u64>,
        since_bucket: i64,
    ) -> anyhow::Result<Vec<DriftReportRow>>;

    /// The newest count window of a cohort of a model version, if it has one.
    async fn drift_open_window(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
    ) -> anyhow::Result<Option<OpenDriftWindow>>;

    /// The `n`-th most recent bucket of one cohort's reports of a model version (0 = the latest).
    async fn drift_cohort_bucket_back(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        n: u32,
    ) -> anyhow::Result<Option<i64>>;

    /// The `n`-th most recent bucket with reports of a model version (0 = the latest).
    async fn drift_bucket_back(&self, model: &str, version: u64, n: u32) -> anyhow::Result<Option<i64>>;

    /// Models (name, version) with drift reports.
    async fn drift_models(&self) -> anyhow::Result<Vec<(String, u64)>>;

    async fn firing_alert(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        signal: &str,
    ) -> anyhow::Result<Option<AlertRow>>;

    /// Raise an alert, unless one of the same model, version, cohort and signal is firing
    /// already (one firing alert each, however many replicas judge at once): its id, or None.
    async fn raise_alert(&self, a: &AlertRow) -> anyhow::Result<Option<i64>>;

    /// A firing alert saw another window over its threshold.
    async fn extend_alert(&self, id: i64, windows: u32, last_window: i64, value: Option<f64>) -> anyhow::Result<()>;

    async fn resolve_alert(&self, id: i64, now: i64) -> anyhow::Result<()>;

    /// Alerts, newest first; only firing ones unless `all`.
    async fn alerts(&self, all: bool) -> anyhow::Result<Vec<AlertRow>>;

    /// Forget reports received before `at` (seconds); how many.
    async fn prune_drift_reports(&self, at: i64) -> anyhow::Result<u64>;
}
