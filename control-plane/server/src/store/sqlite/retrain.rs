use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use crate::store::{JobRow, RetrainStore};

#[async_trait]
impl RetrainStore for Sqlite {
    async fn set_retrain_policy(&self, model: &str, policy_json: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO retrain_policies (model, policy, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT (model) DO UPDATE SET policy = ?2, updated = ?3",
                params![model, policy_json, now],
            )
        })?;
        Ok(())
    }

    async fn delete_retrain_policy(&self, model: &str) -> anyhow::Result<bool> {
        Ok(self.with(|c| c.execute("DELETE FROM retrain_policies WHERE model = ?1", [model]))? > 0)
    }

    async fn retrain_policies(&self) -> anyhow::Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT policy FROM retrain_policies ORDER BY model")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
    }

    async fn open_retrain_job(
        &self,
        id: &str,
        model: &str,
        state: &str,
        created: i64,
        job_json: &str,
        active: &[&str],
    ) -> anyhow::Result<bool> {
        let active = serde_json::to_string(active)?;
        let n = self.with(|c| {
            c.execute(
                "INSERT INTO retrain_jobs (id, model, state, created, job, rev)
                 SELECT ?1, ?2, ?3, ?4, ?5, 0 WHERE NOT EXISTS (SELECT 1 FROM retrain_jobs
                 WHERE model = ?2 AND state IN (SELECT value FROM json_each(?6)))",
                params![id, model, state, created, job_json, active],
            )
        })?;
        Ok(n == 1)
    }

    async fn save_retrain_job(&self, id: &str, rev: i64, state: &str, job_json: &str) -> anyhow::Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE retrain_jobs SET state = ?3, job = ?4, rev = rev + 1 WHERE id = ?1 AND rev = ?2",
                params![id, rev, state, job_json],
            )
        })?;
        Ok(n == 1)
    }

    async fn retrain_jobs(&self) -> anyhow::Result<Vec<JobRow>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT job, rev FROM retrain_jobs ORDER BY created DESC, rowid DESC")?;
            st.query_map([], |r| Ok(JobRow { json: r.get(0)?, rev: r.get(1)? }))?.collect()
        })
    }

    async fn retrain_job(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        self.with(|c| {
            c.query_row("SELECT job, rev FROM retrain_jobs WHERE id = ?1", [id], |r| {
                Ok(JobRow { json: r.get(0)?, rev: r.get(1)? })
            })
            .optional()
        })
    }
}
