use async_trait::async_trait;
use rusqlite::params;

use super::Sqlite;
use crate::store::{RolloutDeviceRow, RolloutRow, RolloutStep, RolloutStore};

#[async_trait]
impl RolloutStore for Sqlite {
    async fn create_rollout(
        &self,
        id: &str,
        bundle_id: &str,
        plan_json: &str,
        engine_json: &str,
        now: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO rollouts (id, bundle_id, state, created, plan, engine) VALUES (?1, ?2, 'pending', ?3, ?4, ?5)",
                params![id, bundle_id, now, plan_json, engine_json],
            )
        })?;
        Ok(())
    }

    async fn save_rollout(&self, id: &str, rev: i64, step: &RolloutStep<'_>) -> anyhow::Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE rollouts SET state = ?3, reason = ?4, engine = ?5, rev = rev + 1 WHERE id = ?1 AND rev = ?2",
                params![id, rev, step.state, step.reason, step.engine_json],
            )?;
            if n == 0 {
                return Ok(false);
            }
            for device in step.offers {
                tx.execute(
                    "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, offer_id, state, updated)
                     VALUES (?1, ?2, ?3, 'pending', ?4)",
                    params![id, device, format!("{id}/{device}"), step.now],
                )?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    async fn rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("1 = 1", params![])
    }

    async fn active_rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("state IN ('pending', 'running', 'rolled_back')", params![])
    }

    async fn rollout(&self, id: &str) -> anyhow::Result<Option<RolloutRow>> {
        Ok(self.rollouts_where("id = ?1", params![id])?.pop())
    }

    async fn rollout_devices(&self, rollout_id: &str) -> anyhow::Result<Vec<RolloutDeviceRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT rollout_id, device_id, offer_id, state, reason, offered_at FROM rollout_devices WHERE rollout_id = ?1 ORDER BY device_id",
            )?;
            st
                .query_map([rollout_id], |r| {
                    Ok(RolloutDeviceRow {
                        rollout_id: r.get(0)?,
                        device_id: r.get(1)?,
                        offer_id: r.get(2)?,
                        state: r.get(3)?,
                        reason: r.get(4)?,
                        offered_at: r.get(5)?,
                    })
                })?
                .collect()
        })
    }

    async fn mark_offered_many(&self, offer_ids: &[String], now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "UPDATE rollout_devices SET state = CASE WHEN state = 'pending' THEN 'offered' ELSE state END,
                     offered_at = ?2, updated = ?2 WHERE offer_id = ?1",
                )?;
                for id in offer_ids {
                    st.execute(params![id, now])?;
                }
            }
            tx.commit()
        })
    }

    async fn reoffer_device(&self, device_id: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollout_devices SET offered_at = 0 WHERE device_id = ?1 AND state IN ('offered', 'downloading')
                 AND rollout_id IN (SELECT id FROM rollouts WHERE state = 'running')",
                [device_id],
            )
        })?;
        Ok(())
    }

    async fn offer_progress(&self, offer_id: &str, state: &str, reason: Option<&str>, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollout_devices SET state = ?2, reason = ?3, updated = ?4
                 WHERE offer_id = ?1 AND state NOT IN ('succeeded', 'failed')",
                params![offer_id, state, reason, now],
            )
        })?;
        Ok(())
    }
}

impl Sqlite {
    fn rollouts_where(&self, cond: &str, p: &[&dyn rusqlite::ToSql]) -> anyhow::Result<Vec<RolloutRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT id, bundle_id, state, created, plan, engine, reason, rev FROM rollouts WHERE {cond} ORDER BY created, rowid"
            ))?;
            st.query_map(p, |r| {
                Ok(RolloutRow {
                    id: r.get(0)?,
                    bundle_id: r.get(1)?,
                    state: r.get(2)?,
                    created: r.get(3)?,
                    plan: r.get(4)?,
                    engine: r.get(5)?,
                    reason: r.get(6)?,
                    rev: r.get(7)?,
                })
            })?
            .collect()
        })
    }
}
