use async_trait::async_trait;

use super::{Postgres, execute, parse, query, query_opt};
use crate::store::{JobRow, RetrainStore};

/// The class of the advisory locks (two int keys: this and `hashtext(model)`) that serialize
/// opening retraining jobs per model across replicas.
const RETRAIN_LOCK_CLASS: i32 = 0x7274; // "rt"

#[async_trait]
impl RetrainStore for Postgres {
    async fn set_retrain_policy(&self, model: &str, policy_json: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO retrain_policies (model, policy, updated) VALUES ($1, $2, $3)
                 ON CONFLICT (model) DO UPDATE SET policy = excluded.policy, updated = excluded.updated",
                &[&model, &policy_json, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn delete_retrain_policy(&self, model: &str) -> anyhow::Result<bool> {
        self.with(
            |c| async move { Ok(execute(&c, "DELETE FROM retrain_policies WHERE model = $1", &[&model]).await? > 0) },
        )
        .await
    }

    async fn retrain_policies(&self) -> anyhow::Result<Vec<String>> {
        self.with(|c| async move {
            parse(query(&c, "SELECT policy FROM retrain_policies ORDER BY model", &[]).await?, |r| Ok(r.try_get(0)?))
        })
        .await
    }

    /// "No active job of the model" cannot be guarded by a row lock (there may be no row to
    /// lock) nor by a partial unique index (the active states are the caller's, not the
    /// schema's), so the check and the insert run in one transaction under a transaction-scoped
    /// advisory lock on the model: a second replica opening a job for the same model waits for
    /// the first to commit, and its INSERT (a new statement, so a new snapshot under READ
    /// COMMITTED) then sees the job the first one opened.
    async fn open_retrain_job(
        &self,
        id: &str,
        model: &str,
        state: &str,
        created: i64,
        job_json: &str,
        active: &[&str],
    ) -> anyhow::Result<bool> {
        let active: Vec<&str> = active.to_vec();
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            execute(&tx, "SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&RETRAIN_LOCK_CLASS, &model]).await?;
            let n = execute(
                &tx,
                "INSERT INTO retrain_jobs (id, model, state, created, job, rev)
                 SELECT $1, $2, $3, $4, $5, 0 WHERE NOT EXISTS
                 (SELECT 1 FROM retrain_jobs WHERE model = $2 AND state = ANY($6::TEXT[]))",
                &[&id, &model, &state, &created, &job_json, &active],
            )
            .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
        .await
    }

    async fn save_retrain_job(&self, id: &str, rev: i64, state: &str, job_json: &str) -> anyhow::Result<bool> {
        self.with(|c| async move {
            let n = execute(
                &c,
                "UPDATE retrain_jobs SET state = $3, job = $4, rev = rev + 1 WHERE id = $1 AND rev = $2",
                &[&id, &rev, &state, &job_json],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn retrain_jobs(&self) -> anyhow::Result<Vec<JobRow>> {
        self.with(|c| async move {
            let rows = query(&c, "SELECT job, rev FROM retrain_jobs ORDER BY created DESC, id DESC", &[]).await?;
            parse(rows, |r| Ok(JobRow { json: r.try_get(0)?, rev: r.try_get(1)? }))
        })
        .await
    }

    async fn retrain_job(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        self.with(|c| async move {
            let row = query_opt(&c, "SELECT job, rev FROM retrain_jobs WHERE id = $1", &[&id]).await?;
            row.map(|r| Ok(JobRow { json: r.try_get(0)?, rev: r.try_get(1)? })).transpose()
        })
        .await
    }
}
