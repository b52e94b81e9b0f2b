//! Device certificates the fleet CA issued, revocations, and claim tokens.

use async_trait::async_trait;

/// A certificate the fleet CA issued to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCertRow {
    pub serial: String,
    pub device_id: String,
    pub sha256: String,
    pub not_after: i64,
    pub issued: i64,
    /// `issued` (made with its key off the device), `claim`, `renewal`, `enrolled` (a CSV).
    pub how: String,
    pub revoked: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimTokenRow {
    pub id: String,
    pub device_id: Option<String>,
    pub expires: i64,
    pub created: i64,
    pub used: Option<i64>,
    pub used_by: Option<String>,
}

#[async_trait]
pub trait CertStore: Send + Sync {
    async fn add_device_cert(&self, row: &DeviceCertRow) -> anyhow::Result<()>;

    /// A device's certificates, newest first.
    async fn device_certs(&self, device: &str) -> anyhow::Result<Vec<DeviceCertRow>>;

    /// Revoke a device: its every certificate, and any other naming it, until it is enrolled
    /// again. Returns how many certificates were revoked one by one.
    async fn revoke_device(&self, device: &str, now: i64) -> anyhow::Result<usize>;

    /// Admit a revoked device again (new certificates only: the revoked ones stay revoked).
    async fn unrevoke_device(&self, device: &str) -> anyhow::Result<bool>;

    async fn device_revoked(&self, device: &str) -> anyhow::Result<Option<i64>>;

    /// (revoked device ids, revoked certificate serials), for the broker at start.
    async fn revocations(&self) -> anyhow::Result<(Vec<String>, Vec<String>)>;

    async fn add_claim_token(
        &self,
        id: &str,
        hash: &str,
        device: Option<&str>,
        expires: i64,
        now: i64,
    ) -> anyhow::Result<()>;

    /// Use a claim token once: the token's row if it was unused and unexpired at `now` (and is
    /// now used by `device`), else None. One statement, so two claims cannot both win.
    async fn use_claim_token(&self, hash: &str, device: &str, now: i64) -> anyhow::Result<Option<ClaimTokenRow>>;

    /// Why a claim token cannot be used (for the error the device gets), if it exists at all.
    async fn claim_token(&self, hash: &str) -> anyhow::Result<Option<ClaimTokenRow>>;

    async fn claim_tokens(&self) -> anyhow::Result<Vec<ClaimTokenRow>>;
}
