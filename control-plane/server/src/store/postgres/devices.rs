use async_trait::async_trait;
use flotilla_proto::tags::Tags;

use super::{DEVICE_COLUMNS, Postgres, big, device_row, execute, parse, query, query_opt, unsigned};
use crate::store::{DeviceRow, DeviceStore, EventRow, HealthRow, HelloRecord, ModelRecord};

#[async_trait]
impl DeviceStore for Postgres {
    async fn device_hello(&self, id: &str, hello: &HelloRecord, tags: &Tags, now: i64) -> anyhow::Result<()> {
        let (hello_json, tags_json) = (serde_json::to_string(hello)?, serde_json::to_string(tags)?);
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO devices (id, online, last_seen, hello, tags) VALUES ($1, 1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen,
                 hello = excluded.hello, tags = excluded.tags",
                &[&id, &now, &hello_json, &tags_json],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn device_state(
        &self,
        id: &str,
        online: bool,
        models: Option<&[ModelRecord]>,
        now: i64,
    ) -> anyhow::Result<()> {
        let models_json = models.map(serde_json::to_string).transpose()?;
        let online = i64::from(online);
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO devices (id, online, last_seen, models) VALUES ($1, $2, $3, COALESCE($4::TEXT, '[]'))
                 ON CONFLICT (id) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen,
                 models = COALESCE($4::TEXT, devices.models)",
                &[&id, &online, &now, &models_json],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn devices(&self) -> anyhow::Result<Vec<DeviceRow>> {
        self.with(|c| async move {
            parse(query(&c, &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"), &[]).await?, device_row)
        })
        .await
    }

    async fn devices_page(&self, after: Option<&str>, limit: u32) -> anyhow::Result<Vec<DeviceRow>> {
        let limit = i64::from(limit);
        self.with(|c| async move {
            let rows = query(
                &c,
                &format!(
                    "SELECT {DEVICE_COLUMNS} FROM devices WHERE ($1::TEXT IS NULL OR id > $1) ORDER BY id LIMIT $2"
                ),
                &[&after, &limit],
            )
            .await?;
            parse(rows, device_row)
        })
        .await
    }

    async fn device(&self, id: &str) -> anyhow::Result<Option<DeviceRow>> {
        self.with(|c| async move {
            let row = query_opt(&c, &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"), &[&id]).await?;
            row.as_ref().map(device_row).transpose()
        })
        .await
    }

    /// Read, merge and write under the row's lock (FOR UPDATE), so two operators tagging the
    /// same device at once both keep their change.
    async fn set_server_tags(&self, id: &str, changes: &[(String, Option<String>)]) -> anyhow::Result<bool> {
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            let Some(row) = query_opt(&tx, "SELECT server_tags FROM devices WHERE id = $1 FOR UPDATE", &[&id]).await?
            else {
                return Ok(false);
            };
            let cur: String = row.try_get(0)?;
            let mut tags: std::collections::BTreeMap<String, Option<String>> =
                serde_json::from_str(&cur).unwrap_or_default();
            for (k, v) in changes {
                tags.insert(k.clone(), v.clone());
            }
            let json = serde_json::to_string(&tags)?;
            execute(&tx, "UPDATE devices SET server_tags = $2 WHERE id = $1", &[&id, &json]).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn set_health(
        &self,
        device: &str,
        model: &str,
        version: u64,
        inferences: u64,
        errors: u64,
        latency_p95_us: Option<u64>,
        accelerator_fallback: bool,
        backend: &str,
        at: i64,
    ) -> anyhow::Result<()> {
        let (version, inferences, errors) = (big(version)?, big(inferences)?, big(errors)?);
        let latency = latency_p95_us.map(big).transpose()?;
        let fallback = i64::from(accelerator_fallback);
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO health (device_id, model, version, inferences, errors, latency_p95_us,
                 accelerator_fallback, backend, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (device_id, model, version) DO UPDATE SET inferences = excluded.inferences,
                 errors = excluded.errors, latency_p95_us = excluded.latency_p95_us,
                 accelerator_fallback = excluded.accelerator_fallback, backend = excluded.backend, at = excluded.at",
                &[&device, &model, &version, &inferences, &errors, &latency, &fallback, &backend, &at],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn health(&self, model: &str) -> anyhow::Result<Vec<HealthRow>> {
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT device_id, version, inferences, errors, latency_p95_us, accelerator_fallback FROM health
                 WHERE model = $1 ORDER BY device_id, version DESC",
                &[&model],
            )
            .await?;
            parse(rows, |r| {
                Ok(HealthRow {
                    device: r.try_get(0)?,
                    version: unsigned(r.try_get(1)?)?,
                    inferences: unsigned(r.try_get(2)?)?,
                    errors: unsigned(r.try_get(3)?)?,
                    latency_p95_us: r.try_get::<_, Option<i64>>(4)?.map(unsigned).transpose()?,
                    accelerator_fallback: r.try_get::<_, i64>(5)? != 0,
                })
            })
        })
        .await
    }

    async fn add_event(
        &self,
        device: &str,
        msg_id: &str,
        at: i64,
        kind: &str,
        body_json: &str,
    ) -> anyhow::Result<bool> {
        self.with(|c| async move {
            let n = execute(
                &c,
                "INSERT INTO events (device_id, msg_id, at, kind, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (device_id, msg_id) DO NOTHING",
                &[&device, &msg_id, &at, &kind, &body_json],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn events(&self, device: Option<&str>, before: Option<i64>, limit: u32) -> anyhow::Result<Vec<EventRow>> {
        let limit = i64::from(limit);
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT seq, device_id, at, kind, body FROM events
                 WHERE ($1::TEXT IS NULL OR device_id = $1) AND ($2::BIGINT IS NULL OR seq < $2)
                 ORDER BY seq DESC LIMIT $3",
                &[&device, &before, &limit],
            )
            .await?;
            parse(rows, |r| {
                Ok(EventRow {
                    seq: r.try_get(0)?,
                    device: r.try_get(1)?,
                    at: r.try_get(2)?,
                    kind: r.try_get(3)?,
                    body: r.try_get(4)?,
                })
            })
        })
        .await
    }

    async fn prune_events(&self, at: i64) -> anyhow::Result<u64> {
        self.with(|c| async move { execute(&c, "DELETE FROM events WHERE at < $1", &[&at]).await }).await
    }

    async fn set_device_root_version(&self, id: &str, version: u64) -> anyhow::Result<()> {
        let version = big(version)?;
        self.with(|c| async move {
            execute(&c, "UPDATE devices SET root_version = $2 WHERE id = $1", &[&id, &version]).await?;
            Ok(())
        })
        .await
    }

    async fn device_root_version(&self, id: &str) -> anyhow::Result<Option<u64>> {
        self.with(|c| async move {
            let row = query_opt(&c, "SELECT root_version FROM devices WHERE id = $1", &[&id]).await?;
            let version: Option<i64> = row.map(|r| r.try_get(0)).transpose()?.flatten();
            version.map(unsigned).transpose()
        })
        .await
    }
}
