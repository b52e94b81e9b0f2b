//! The control plane's store: every piece of fleet state, so a restarted server (or another
//! replica) carries on from it. One trait per area ([`DeviceStore`], [`RolloutStore`], …), each
//! with typed rows; [`Store`] is all of them. The services take `&dyn Store` and never see SQL.
//!
//! Implementations: [`sqlite::Sqlite`] (the embedded default, `DATA_DIR/fleet.db`) and
//! [`postgres::Postgres`] (one database shared by several servers).

mod auth;
mod bundles;
mod certs;
mod devices;
mod drift;
mod leases;
pub mod postgres;
mod retrain;
mod rollouts;
mod samples;
pub mod sqlite;
mod trust;

pub mod conformance;

pub use auth::{AuthStore, TokenRow};
pub use bundles::{BundleRow, BundleStore};
pub use certs::{CertStore, ClaimTokenRow, DeviceCertRow};
pub use devices::{
    DeviceRow, DeviceStore, EventRow, HealthRow, HealthUpdate, HelloRecord, ModelRecord, StateUpdate, fold_health,
    fold_states,
};
pub use drift::{AlertRow, DriftReportRow, DriftStore, OpenDriftWindow};
pub use leases::{LeaseRow, LeaseStore};
pub use retrain::{JobRow, RetrainStore};
pub use rollouts::{RolloutDeviceRow, RolloutRow, RolloutStep, RolloutStore};
pub use samples::SampleStore;
pub use trust::TrustStore;

/// Every area of the store, behind one object.
#[async_trait::async_trait]
pub trait Store:
    DeviceStore
    + DriftStore
    + AuthStore
    + RetrainStore
    + SampleStore
    + BundleStore
    + RolloutStore
    + TrustStore
    + CertStore
    + LeaseStore
{
    /// `sqlite` or `postgres`, for `/metrics` and the logs.
    fn backend(&self) -> &'static str;
    /// How long store operations have taken so far.
    fn latency(&self) -> Latency;
    /// Whether the store answers now (`/api/v1/health`).
    async fn ping(&self) -> anyhow::Result<()>;
}

/// A latency histogram: (upper bound in seconds, operations in that bucket alone), the count of
/// all operations and their total seconds.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub seconds: f64,
}
