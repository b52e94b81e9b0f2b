//! The bundle registry (the files are in [`crate::bundles::BundleFiles`]).

use async_trait::async_trait;

#[derive(Debug, Clone, PartialEq)]
pub struct BundleRow {
    pub id: String,
    pub name: String,
    pub version: u64,
    pub size: u64,
    pub manifest_sha256: String,
    pub signers: Vec<String>,
    pub created: i64,
    pub pushed: i64,
    pub head: Vec<u8>,
}

#[async_trait]
pub trait BundleStore: Send + Sync {
    async fn insert_bundle(&self, b: &BundleRow) -> anyhow::Result<()>;

    async fn bundles(&self) -> anyhow::Result<Vec<BundleRow>>;

    async fn bundle(&self, id: &str) -> anyhow::Result<Option<BundleRow>>;

    async fn bundle_by_name(&self, name: &str, version: u64) -> anyhow::Result<Option<BundleRow>>;
}
