use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use flotilla_proto::tags::Tags;

use super::device_row;
use crate::store::{DeviceRow, DeviceStore, EventRow, HealthRow, HealthUpdate, HelloRecord, StateUpdate};

#[async_trait]
impl DeviceStore for Sqlite {
    async fn device_hello(&self, id: &str, hello: &HelloRecord, tags: &Tags, now: i64) -> anyhow::Result<()> {
        let (hello_json, tags_json) = (serde_json::to_string(hello)?, serde_json::to_string(tags)?);
        self.with(|c| {
            c.execute(
                "INSERT INTO devices (id, online, last_seen, hello, tags) VALUES (?1, 1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET last_seen = ?2, hello = ?3, tags = ?4",
                params![id, now, hello_json, tags_json],
            )
        })?;
        Ok(())
    }

    async fn device_states(&self, updates: &[StateUpdate]) -> anyhow::Result<()> {
        let rows: Vec<(&StateUpdate, Option<String>)> = updates
            .iter()
            .map(|u| Ok((u, u.models.as_ref().map(serde_json::to_string).transpose()?)))
            .collect::<anyhow::Result<_>>()?;
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO devices (id, online, last_seen, models) VALUES (?1, ?2, ?3, COALESCE(?4, '[]'))
                     ON CONFLICT(id) DO UPDATE SET online = ?2, last_seen = ?3, models = COALESCE(?4, devices.models)",
                )?;
                for (u, models) in &rows {
                    st.execute(params![u.device, u.online, u.at, models])?;
                }
            }
            tx.commit()
        })
    }

    async fn device_counts(&self) -> anyhow::Result<(u64, u64)> {
        self.with(|c| {
            c.query_row("SELECT COUNT(*), COALESCE(SUM(online), 0) FROM devices", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
        })
    }

    async fn devices(&self) -> anyhow::Result<Vec<DeviceRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT id, online, last_seen, hello, models, tags, server_tags FROM devices ORDER BY id")?;
            st.query_map([], device_row)?.collect()
        })
    }

    async fn devices_page(&self, after: Option<&str>, limit: u32) -> anyhow::Result<Vec<DeviceRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, online, last_seen, hello, models, tags, server_tags FROM devices
                 WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2",
            )?;
            st.query_map(params![after, limit], device_row)?.collect()
        })
    }

    async fn device(&self, id: &str) -> anyhow::Result<Option<DeviceRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, online, last_seen, hello, models, tags, server_tags FROM devices WHERE id = ?1",
                [id],
                device_row,
            )
            .optional()
        })
    }

    async fn set_server_tags(&self, id: &str, changes: &[(String, Option<String>)]) -> anyhow::Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let cur: Option<String> =
                tx.query_row("SELECT server_tags FROM devices WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            let Some(cur) = cur else { return Ok(false) };
            let mut tags: std::collections::BTreeMap<String, Option<String>> =
                serde_json::from_str(&cur).unwrap_or_default();
            for (k, v) in changes {
                tags.insert(k.clone(), v.clone());
            }
            let json = serde_json::to_string(&tags).unwrap_or_else(|_| "{}".into());
            tx.execute("UPDATE devices SET server_tags = ?2 WHERE id = ?1", params![id, json])?;
            tx.commit()?;
            Ok(true)
        })
    }

    async fn set_health_many(&self, updates: &[HealthUpdate]) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO health (device_id, model, version, inferences, errors, latency_p95_us, accelerator_fallback, backend, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT(device_id, model, version) DO UPDATE SET inferences = ?4, errors = ?5,
                     latency_p95_us = ?6, accelerator_fallback = ?7, backend = ?8, at = ?9",
                )?;
                for u in updates {
                    st.execute(params![
                        u.device,
                        u.model,
                        u.version as i64,
                        u.inferences as i64,
                        u.errors as i64,
                        u.latency_p95_us.map(|v| v as i64),
                        u.accelerator_fallback,
                        u.backend,
                        u.at
                    ])?;
                }
            }
            tx.commit()
        })
    }

    async fn health(&self, model: &str) -> anyhow::Result<Vec<HealthRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, inferences, errors, latency_p95_us, accelerator_fallback FROM health
                 WHERE model = ?1 ORDER BY device_id, version DESC",
            )?;
            st.query_map([model], |r| {
                Ok(HealthRow {
                    device: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    inferences: r.get::<_, i64>(2)? as u64,
                    errors: r.get::<_, i64>(3)? as u64,
                    latency_p95_us: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    accelerator_fallback: r.get(5)?,
                })
            })?
            .collect()
        })
    }

    async fn add_event(
        &self,
        device: &str,
        msg_id: &str,
        at: i64,
        kind: &str,
        body_json: &str,
    ) -> anyhow::Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO events (device_id, msg_id, at, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device, msg_id, at, kind, body_json],
            )
        })?;
        Ok(n == 1)
    }

    async fn events(&self, device: Option<&str>, before: Option<i64>, limit: u32) -> anyhow::Result<Vec<EventRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, device_id, at, kind, body FROM events
                 WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR seq < ?2) ORDER BY seq DESC LIMIT ?3",
            )?;
            st.query_map(params![device, before, limit], |r| {
                Ok(EventRow { seq: r.get(0)?, device: r.get(1)?, at: r.get(2)?, kind: r.get(3)?, body: r.get(4)? })
            })?
            .collect()
        })
    }

    async fn prune_events(&self, at: i64) -> anyhow::Result<u64> {
        Ok(self.with(|c| c.execute("DELETE FROM events WHERE at < ?1", [at]))? as u64)
    }

    async fn set_device_root_version(&self, id: &str, version: u64) -> anyhow::Result<()> {
        self.with(|c| c.execute("UPDATE devices SET root_version = ?2 WHERE id = ?1", params![id, version as i64]))?;
        Ok(())
    }

    async fn device_root_version(&self, id: &str) -> anyhow::Result<Option<u64>> {
        Ok(self
            .with(|c| {
                c.query_row("SELECT root_version FROM devices WHERE id = ?1", [id], |r| r.get::<_, Option<i64>>(0))
                    .optional()
            })?
            .flatten()
            .map(|v| v as u64))
    }
}
