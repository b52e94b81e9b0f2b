//! Reservoir samples devices upload, and the uploads that asked for them.

use async_trait::async_trait;

#[async_trait]
pub trait SampleStore: Send + Sync {
    async fn add_sample_upload(&self, upload_id: &str, device: &str, model: &str, now: i64) -> anyhow::Result<()>;

    #[allow(clippy::too_many_arguments)]
    async fn add_sample_part(
        &self,
        device: &str,
        upload_id: &str,
        model: &str,
        version: u64,
        samples: &[(String, i64, Vec<u8>)],
        last: bool,
        now: i64,
    ) -> anyhow::Result<bool>;

    /// (device, parts, samples, done) per device asked in an upload.
    async fn sample_upload(&self, upload_id: &str) -> anyhow::Result<Vec<(String, u32, u64, bool)>>;

    /// (device, version, body) of a model's stored samples, oldest first.
    async fn samples(&self, model: &str, version: Option<u64>) -> anyhow::Result<Vec<(String, u64, Vec<u8>)>>;

    /// Forget samples received before `at` (seconds); how many.
    async fn prune_samples(&self, at: i64) -> anyhow::Result<u64>;
}
