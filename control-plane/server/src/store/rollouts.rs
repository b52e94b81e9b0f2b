//! Rollouts: the engine's plan and state, and per-device progress of each offer.

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub id: String,
    pub bundle_id: String,
    pub state: String,
    pub created: i64,
    /// `flotilla_rollout::Plan` and `RolloutState` as JSON.
    pub plan: Option<String>,
    pub engine: Option<String>,
    pub reason: Option<String>,
    /// Bumped by every save: what [`RolloutStore::save_rollout`] compares.
    pub rev: i64,
}

/// One step of the engine, as saved.
#[derive(Debug, Clone, Copy)]
pub struct RolloutStep<'a> {
    pub state: &'a str,
    pub reason: Option<&'a str>,
    /// `flotilla_rollout::RolloutState` as JSON.
    pub engine_json: &'a str,
    /// Devices to add as pending offers.
    pub offers: &'a [String],
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutDeviceRow {
    pub rollout_id: String,
    pub device_id: String,
    pub offer_id: String,
    pub state: String,
    pub reason: Option<String>,
    pub offered_at: i64,
}

#[async_trait]
pub trait RolloutStore: Send + Sync {
    /// Create a rollout with its target devices, all pending, in one transaction.
    async fn create_rollout(
        &self,
        id: &str,
        bundle_id: &str,
        plan_json: &str,
        engine_json: &str,
        now: i64,
    ) -> anyhow::Result<()>;

    /// Persist a step of the engine, if the rollout is still at revision `rev` (nobody else —
    /// an operator's pause, another replica's driver — saved it since it was read): its new
    /// state, and the devices it decided to offer the bundle to (pending; idempotent), in one
    /// transaction. False, with nothing written, when the revision moved on.
    async fn save_rollout(&self, id: &str, rev: i64, step: &RolloutStep<'_>) -> anyhow::Result<bool>;

    async fn rollouts(&self) -> anyhow::Result<Vec<RolloutRow>>;

    /// Rollouts the driver steps: not yet finished, and rolled back ones (devices that come back
    /// online still get the previous version).
    async fn active_rollouts(&self) -> anyhow::Result<Vec<RolloutRow>>;

    async fn rollout(&self, id: &str) -> anyhow::Result<Option<RolloutRow>>;

    async fn rollout_devices(&self, rollout_id: &str) -> anyhow::Result<Vec<RolloutDeviceRow>>;

    async fn mark_offered(&self, offer_id: &str, now: i64) -> anyhow::Result<()> {
        self.mark_offered_many(&[offer_id.to_string()], now).await
    }

    /// [`RolloutStore::mark_offered`] for many offers, in one transaction.
    async fn mark_offered_many(&self, offer_ids: &[String], now: i64) -> anyhow::Result<()>;

    /// Re-offer soon: the device reconnected, so an offer it may have missed is sent again.
    async fn reoffer_device(&self, device_id: &str) -> anyhow::Result<()>;

    /// Apply a device's report about an offer. Final states are never left.
    async fn offer_progress(&self, offer_id: &str, state: &str, reason: Option<&str>, now: i64) -> anyhow::Result<()>;
}
