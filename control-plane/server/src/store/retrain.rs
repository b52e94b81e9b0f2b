//! Retraining policies and jobs, each a JSON document.

use async_trait::async_trait;

/// A stored job document and its revision (bumped by every save).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub json: String,
    pub rev: i64,
}

#[async_trait]
pub trait RetrainStore: Send + Sync {
    async fn set_retrain_policy(&self, model: &str, policy_json: &str, now: i64) -> anyhow::Result<()>;

    async fn delete_retrain_policy(&self, model: &str) -> anyhow::Result<bool>;

    async fn retrain_policies(&self) -> anyhow::Result<Vec<String>>;

    /// Add a job for `model` unless one of its jobs is in an `active` state. False when one is.
    async fn open_retrain_job(
        &self,
        id: &str,
        model: &str,
        state: &str,
        created: i64,
        job_json: &str,
        active: &[&str],
    ) -> anyhow::Result<bool>;

    /// Save a job if it is still at revision `rev`; false, with nothing written, when it is not.
    async fn save_retrain_job(&self, id: &str, rev: i64, state: &str, job_json: &str) -> anyhow::Result<bool>;

    /// Every job, newest first.
    async fn retrain_jobs(&self) -> anyhow::Result<Vec<JobRow>>;

    async fn retrain_job(&self, id: &str) -> anyhow::Result<Option<JobRow>>;
}
