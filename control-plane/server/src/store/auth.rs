//! API tokens, device broker passwords and server settings.

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub role: String,
    pub name: String,
    pub created: i64,
    pub last_used: Option<i64>,
}

#[async_trait]
pub trait AuthStore: Send + Sync {
    async fn add_token(&self, id: &str, hash: &str, role: &str, name: &str, now: i64) -> anyhow::Result<()>;

    /// The token with this hash (its secret is not kept), marking it used.
    async fn token_by_hash(&self, hash: &str, now: i64) -> anyhow::Result<Option<TokenRow>>;

    /// Every token (never the secret, which is not kept).
    async fn tokens(&self) -> anyhow::Result<Vec<TokenRow>>;

    async fn delete_token(&self, id: &str) -> anyhow::Result<bool>;

    /// Enroll (or re-enroll) a device's broker password hash; returns the enrollment time.
    async fn set_device_credential(&self, device: &str, password_sha256: &str, now: i64) -> anyhow::Result<()>;

    /// Forget a device's credential; false when it had none.
    async fn delete_device_credential(&self, device: &str) -> anyhow::Result<bool>;

    /// Every enrolled device: (id, password SHA-256 hex, created).
    async fn device_credentials(&self) -> anyhow::Result<Vec<(String, String, i64)>>;

    async fn setting(&self, key: &str) -> anyhow::Result<Option<String>>;

    /// Store `value` unless the key has one; returns the stored value either way.
    async fn setting_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String>;
}
