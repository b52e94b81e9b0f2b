//! The chain of trust roots, oldest first.

use async_trait::async_trait;

#[async_trait]
pub trait TrustStore: Send + Sync {
    async fn add_root(&self, version: u64, bytes: &[u8], now: i64) -> anyhow::Result<()>;

    /// Every stored root, oldest first.
    async fn roots(&self) -> anyhow::Result<Vec<(u64, Vec<u8>)>>;
}
