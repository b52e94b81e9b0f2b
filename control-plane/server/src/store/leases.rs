//! Leases: which replica acts on a piece of shared work (a rollout, a retraining job) for now.
//! A lease has a holder, an expiry and an epoch that grows each time it changes hands, so a
//! replica that was paused past its expiry can tell it lost the lease.

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRow {
    pub name: String,
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds since the epoch.
    pub expires: i64,
}

#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Take the lease `name` for `holder` until `now + ttl_ms`, or renew it if `holder` has it.
    /// Taken when nobody holds it or its holder let it expire (the epoch then grows by one).
    /// Returns the epoch held, or None when another holder's lease is still running.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now_ms: i64) -> anyhow::Result<Option<i64>>;

    /// Give the lease up now (if `holder` still has it at `epoch`).
    async fn release_lease(&self, name: &str, holder: &str, epoch: i64) -> anyhow::Result<()>;

    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseRow>>;
}
