use async_trait::async_trait;

use super::{Postgres, big, execute, parse, query, query_opt, unsigned, unsigned32};
use crate::store::SampleStore;

#[async_trait]
impl SampleStore for Postgres {
    async fn add_sample_upload(&self, upload_id: &str, device: &str, model: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO sample_uploads (upload_id, device_id, model, requested) VALUES ($1, $2, $3, $4)
                 ON CONFLICT DO NOTHING",
                &[&upload_id, &device, &model, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

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
    ) -> anyhow::Result<bool> {
        let version = big(version)?;
        let count = i64::try_from(samples.len())?;
        let done = i64::from(last);
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            // Lock the upload's row: parts of one upload arriving at two replicas count once each.
            let known = query_opt(
                &tx,
                "SELECT 1 FROM sample_uploads WHERE upload_id = $1 AND device_id = $2 AND model = $3 FOR UPDATE",
                &[&upload_id, &device, &model],
            )
            .await?;
            if known.is_none() {
                return Ok(false);
            }
            for (id, ts, body) in samples {
                execute(
                    &tx,
                    "INSERT INTO samples (device_id, model, version, sample_id, upload_id, ts, body, received)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (device_id, model, version, sample_id) DO UPDATE SET upload_id = excluded.upload_id,
                     ts = excluded.ts, body = excluded.body, received = excluded.received",
                    &[&device, &model, &version, id, &upload_id, ts, body, &now],
                )
                .await?;
            }
            execute(
                &tx,
                "UPDATE sample_uploads SET parts = parts + 1, samples = samples + $3, done = GREATEST(done, $4)
                 WHERE upload_id = $1 AND device_id = $2",
                &[&upload_id, &device, &count, &done],
            )
            .await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    async fn sample_upload(&self, upload_id: &str) -> anyhow::Result<Vec<(String, u32, u64, bool)>> {
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT device_id, parts, samples, done FROM sample_uploads WHERE upload_id = $1 ORDER BY device_id",
                &[&upload_id],
            )
            .await?;
            parse(rows, |r| {
                Ok((r.try_get(0)?, unsigned32(r.try_get(1)?)?, unsigned(r.try_get(2)?)?, r.try_get::<_, i64>(3)? != 0))
            })
        })
        .await
    }

    async fn samples(&self, model: &str, version: Option<u64>) -> anyhow::Result<Vec<(String, u64, Vec<u8>)>> {
        let version = version.map(big).transpose()?;
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT device_id, version, body FROM samples WHERE model = $1 AND ($2::BIGINT IS NULL OR version = $2)
                 ORDER BY ts, device_id, sample_id",
                &[&model, &version],
            )
            .await?;
            parse(rows, |r| Ok((r.try_get(0)?, unsigned(r.try_get(1)?)?, r.try_get(2)?)))
        })
        .await
    }

    async fn prune_samples(&self, at: i64) -> anyhow::Result<u64> {
        self.with(|c| async move { execute(&c, "DELETE FROM samples WHERE received < $1", &[&at]).await }).await
    }
}
