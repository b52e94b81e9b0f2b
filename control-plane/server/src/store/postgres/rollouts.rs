use async_trait::async_trait;
use tokio_postgres::Row;

use super::{Params, Postgres, execute, parse, query};
use crate::store::{RolloutDeviceRow, RolloutRow, RolloutStep, RolloutStore};

#[async_trait]
impl RolloutStore for Postgres {
    async fn create_rollout(
        &self,
        id: &str,
        bundle_id: &str,
        plan_json: &str,
        engine_json: &str,
        now: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO rollouts (id, bundle_id, state, created, plan, engine) VALUES ($1, $2, 'pending', $3, $4, $5)",
                &[&id, &bundle_id, &now, &plan_json, &engine_json],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// The UPDATE compares the revision: racing saves at the same revision queue on the row's
    /// lock, and each one after the first re-reads the committed row, finds the revision moved
    /// on and updates nothing. The offers go in with the winning update, in its transaction.
    async fn save_rollout(&self, id: &str, rev: i64, step: &RolloutStep<'_>) -> anyhow::Result<bool> {
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            let n = execute(
                &tx,
                "UPDATE rollouts SET state = $3, reason = $4, engine = $5, rev = rev + 1 WHERE id = $1 AND rev = $2",
                &[&id, &rev, &step.state, &step.reason, &step.engine_json],
            )
            .await?;
            if n == 0 {
                return Ok(false); // dropping the transaction rolls it back
            }
            if !step.offers.is_empty() {
                execute(
                    &tx,
                    "INSERT INTO rollout_devices (rollout_id, device_id, offer_id, state, updated)
                     SELECT $1, d, $1 || '/' || d, 'pending', $2 FROM unnest($3::TEXT[]) AS d
                     ON CONFLICT DO NOTHING",
                    &[&id, &step.now, &step.offers],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("TRUE", &[]).await
    }

    async fn active_rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("state IN ('pending', 'running', 'rolled_back')", &[]).await
    }

    async fn rollout(&self, id: &str) -> anyhow::Result<Option<RolloutRow>> {
        Ok(self.rollouts_where("id = $1", &[&id]).await?.pop())
    }

    async fn rollout_devices(&self, rollout_id: &str) -> anyhow::Result<Vec<RolloutDeviceRow>> {
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT rollout_id, device_id, offer_id, state, reason, offered_at FROM rollout_devices
                 WHERE rollout_id = $1 ORDER BY device_id",
                &[&rollout_id],
            )
            .await?;
            parse(rows, |r| {
                Ok(RolloutDeviceRow {
                    rollout_id: r.try_get(0)?,
                    device_id: r.try_get(1)?,
                    offer_id: r.try_get(2)?,
                    state: r.try_get(3)?,
                    reason: r.try_get(4)?,
                    offered_at: r.try_get(5)?,
                })
            })
        })
        .await
    }

    async fn mark_offered_many(&self, offer_ids: &[String], now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "UPDATE rollout_devices SET state = CASE WHEN state = 'pending' THEN 'offered' ELSE state END,
                 offered_at = $2, updated = $2 WHERE offer_id = ANY($1)",
                &[&offer_ids, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn reoffer_device(&self, device_id: &str) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "UPDATE rollout_devices SET offered_at = 0 WHERE device_id = $1 AND state IN ('offered', 'downloading')
                 AND rollout_id IN (SELECT id FROM rollouts WHERE state = 'running')",
                &[&device_id],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// One UPDATE whose WHERE leaves final states alone (judged on the committed row, also
    /// when two reports about one offer race).
    async fn offer_progress(&self, offer_id: &str, state: &str, reason: Option<&str>, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "UPDATE rollout_devices SET state = $2, reason = $3, updated = $4
                 WHERE offer_id = $1 AND state NOT IN ('succeeded', 'failed')",
                &[&offer_id, &state, &reason, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }
}

impl Postgres {
    async fn rollouts_where(&self, cond: &str, p: &Params<'_>) -> anyhow::Result<Vec<RolloutRow>> {
        let sql = format!(
            "SELECT id, bundle_id, state, created, plan, engine, reason, rev FROM rollouts WHERE {cond}
             ORDER BY created, id"
        );
        self.with(|c| async move { parse(query(&c, &sql, p).await?, rollout_row) }).await
    }
}

fn rollout_row(r: &Row) -> anyhow::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.try_get(0)?,
        bundle_id: r.try_get(1)?,
        state: r.try_get(2)?,
        created: r.try_get(3)?,
        plan: r.try_get(4)?,
        engine: r.try_get(5)?,
        reason: r.try_get(6)?,
        rev: r.try_get(7)?,
    })
}
