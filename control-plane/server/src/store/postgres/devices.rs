use async_trait::async_trait;
use flotilla_proto::tags::Tags;

use super::{DEVICE_COLUMNS, Postgres, big, device_row, execute, parse, query, query_opt, unsigned};
use crate::store::{
    DeviceRow, DeviceStore, EventRow, HealthRow, HealthUpdate, HelloRecord, StateUpdate, fold_health, fold_states,
};

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

    async fn device_states(&self, updates: &[StateUpdate]) -> anyhow::Result<()> {
        // Two statements for the batch, in one transaction: devices whose models the batch
        // sets, and devices it only marks (a last will keeps their models). A row may be
        // affected once per statement, hence one update per device.
        #[derive(Default)]
        struct Cols {
            ids: Vec<String>,
            online: Vec<i64>,
            at: Vec<i64>,
            models: Vec<String>,
        }
        let (mut set, mut keep) = (Cols::default(), Cols::default());
        for u in fold_states(updates.to_vec()) {
            let c = if u.models.is_some() { &mut set } else { &mut keep };
            c.ids.push(u.device);
            c.online.push(i64::from(u.online));
            c.at.push(u.at);
            c.models.push(serde_json::to_string(u.models.as_deref().unwrap_or_default())?);
        }
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            const ROWS: &str = "INSERT INTO devices (id, online, last_seen, models)
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[])
                 ON CONFLICT (id) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen";
            if !set.ids.is_empty() {
                let sql = format!("{ROWS}, models = excluded.models");
                tx.execute(&sql, &[&set.ids, &set.online, &set.at, &set.models]).await?;
            }
            if !keep.ids.is_empty() {
                tx.execute(ROWS, &[&keep.ids, &keep.online, &keep.at, &keep.models]).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    async fn device_counts(&self) -> anyhow::Result<(u64, u64)> {
        self.with(|c| async move {
            let row =
                c.query_one("SELECT COUNT(*)::BIGINT, COALESCE(SUM(online), 0)::BIGINT FROM devices", &[]).await?;
            Ok((unsigned(row.get(0))?, unsigned(row.get(1))?))
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

    async fn set_health_many(&self, updates: &[HealthUpdate]) -> anyhow::Result<()> {
        let updates = fold_health(updates.to_vec());
        let n = updates.len();
        let (mut device, mut model, mut version) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut inferences, mut errors, mut latency) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut fallback, mut backend, mut at) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for u in updates {
            device.push(u.device);
            model.push(u.model);
            version.push(big(u.version)?);
            inferences.push(big(u.inferences)?);
            errors.push(big(u.errors)?);
            latency.push(u.latency_p95_us.map(big).transpose()?);
            fallback.push(i64::from(u.accelerator_fallback));
            backend.push(u.backend);
            at.push(u.at);
        }
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO health (device_id, model, version, inferences, errors, latency_p95_us,
                 accelerator_fallback, backend, at)
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[],
                 $7::BIGINT[], $8::TEXT[], $9::BIGINT[])
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
