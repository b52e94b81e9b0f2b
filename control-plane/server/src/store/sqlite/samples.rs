use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use crate::store::SampleStore;

#[async_trait]
impl SampleStore for Sqlite {
    async fn add_sample_upload(&self, upload_id: &str, device: &str, model: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO sample_uploads (upload_id, device_id, model, requested) VALUES (?1, ?2, ?3, ?4)",
                params![upload_id, device, model, now],
            )
        })?;
        Ok(())
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
        self.with(|c| {
            let tx = c.transaction()?;
            let known = tx
                .query_row(
                    "SELECT 1 FROM sample_uploads WHERE upload_id = ?1 AND device_id = ?2 AND model = ?3",
                    params![upload_id, device, model],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !known {
                return Ok(false);
            }
            for (id, ts, body) in samples {
                tx.execute(
                    "INSERT OR REPLACE INTO samples (device_id, model, version, sample_id, upload_id, ts, body, received)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![device, model, version as i64, id, upload_id, ts, body, now],
                )?;
            }
            tx.execute(
                "UPDATE sample_uploads SET parts = parts + 1, samples = samples + ?3, done = done OR ?4
                 WHERE upload_id = ?1 AND device_id = ?2",
                params![upload_id, device, samples.len() as i64, last],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    async fn sample_upload(&self, upload_id: &str) -> anyhow::Result<Vec<(String, u32, u64, bool)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, parts, samples, done FROM sample_uploads WHERE upload_id = ?1 ORDER BY device_id",
            )?;
            st.query_map([upload_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?)))?.collect()
        })
    }

    async fn samples(&self, model: &str, version: Option<u64>) -> anyhow::Result<Vec<(String, u64, Vec<u8>)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, body FROM samples WHERE model = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY ts, device_id, sample_id",
            )?;
            st.query_map(params![model, version.map(|v| v as i64)], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect()
        })
    }

    async fn prune_samples(&self, at: i64) -> anyhow::Result<u64> {
        Ok(self.with(|c| c.execute("DELETE FROM samples WHERE received < ?1", [at]))? as u64)
    }
}
