use async_trait::async_trait;

use super::{CLAIM_COLUMNS, Postgres, claim_row, execute, parse, query, query_opt};
use crate::store::{CertStore, ClaimTokenRow, DeviceCertRow};

#[async_trait]
impl CertStore for Postgres {
    async fn add_device_cert(&self, row: &DeviceCertRow) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO device_certs (serial, device_id, sha256, not_after, issued, how, revoked)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (serial) DO UPDATE SET device_id = excluded.device_id, sha256 = excluded.sha256,
                 not_after = excluded.not_after, issued = excluded.issued, how = excluded.how,
                 revoked = excluded.revoked",
                &[&row.serial, &row.device_id, &row.sha256, &row.not_after, &row.issued, &row.how, &row.revoked],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn device_certs(&self, device: &str) -> anyhow::Result<Vec<DeviceCertRow>> {
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT serial, device_id, sha256, not_after, issued, how, revoked FROM device_certs
                 WHERE device_id = $1 ORDER BY issued DESC, serial DESC",
                &[&device],
            )
            .await?;
            parse(rows, |r| {
                Ok(DeviceCertRow {
                    serial: r.try_get(0)?,
                    device_id: r.try_get(1)?,
                    sha256: r.try_get(2)?,
                    not_after: r.try_get(3)?,
                    issued: r.try_get(4)?,
                    how: r.try_get(5)?,
                    revoked: r.try_get(6)?,
                })
            })
        })
        .await
    }

    async fn revoke_device(&self, device: &str, now: i64) -> anyhow::Result<usize> {
        self.with(|mut c| async move {
            let tx = c.transaction().await?;
            execute(
                &tx,
                "INSERT INTO revoked_devices (device_id, revoked) VALUES ($1, $2) ON CONFLICT (device_id) DO NOTHING",
                &[&device, &now],
            )
            .await?;
            let n = execute(
                &tx,
                "UPDATE device_certs SET revoked = $2 WHERE device_id = $1 AND revoked IS NULL",
                &[&device, &now],
            )
            .await?;
            tx.commit().await?;
            Ok(n as usize)
        })
        .await
    }

    async fn unrevoke_device(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| async move {
            Ok(execute(&c, "DELETE FROM revoked_devices WHERE device_id = $1", &[&device]).await? > 0)
        })
        .await
    }

    async fn device_revoked(&self, device: &str) -> anyhow::Result<Option<i64>> {
        self.with(|c| async move {
            let row = query_opt(&c, "SELECT revoked FROM revoked_devices WHERE device_id = $1", &[&device]).await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
        .await
    }

    async fn revocations(&self) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        self.with(|c| async move {
            // One snapshot for both lists.
            let rows = query(
                &c,
                "SELECT 'd', device_id FROM revoked_devices
                 UNION ALL SELECT 's', serial FROM device_certs WHERE revoked IS NOT NULL",
                &[],
            )
            .await?;
            let (mut devices, mut serials) = (Vec::new(), Vec::new());
            for r in rows {
                let (kind, value): (&str, String) = (r.try_get(0)?, r.try_get(1)?);
                if kind == "d" { devices.push(value) } else { serials.push(value) }
            }
            Ok((devices, serials))
        })
        .await
    }

    async fn add_claim_token(
        &self,
        id: &str,
        hash: &str,
        device: Option<&str>,
        expires: i64,
        now: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO claim_tokens (id, hash, device_id, expires, created) VALUES ($1, $2, $3, $4, $5)",
                &[&id, &hash, &device, &expires, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// One UPDATE: a second claim racing this one waits for its row lock, then finds `used` set.
    async fn use_claim_token(&self, hash: &str, device: &str, now: i64) -> anyhow::Result<Option<ClaimTokenRow>> {
        self.with(|c| async move {
            let row = query_opt(
                &c,
                &format!(
                    "UPDATE claim_tokens SET used = $3, used_by = $2
                     WHERE hash = $1 AND used IS NULL AND expires > $3 AND (device_id IS NULL OR device_id = $2)
                     RETURNING {CLAIM_COLUMNS}"
                ),
                &[&hash, &device, &now],
            )
            .await?;
            row.as_ref().map(claim_row).transpose()
        })
        .await
    }

    async fn claim_token(&self, hash: &str) -> anyhow::Result<Option<ClaimTokenRow>> {
        self.with(|c| async move {
            let row =
                query_opt(&c, &format!("SELECT {CLAIM_COLUMNS} FROM claim_tokens WHERE hash = $1"), &[&hash]).await?;
            row.as_ref().map(claim_row).transpose()
        })
        .await
    }

    async fn claim_tokens(&self) -> anyhow::Result<Vec<ClaimTokenRow>> {
        self.with(|c| async move {
            let rows =
                query(&c, &format!("SELECT {CLAIM_COLUMNS} FROM claim_tokens ORDER BY created DESC, id DESC"), &[])
                    .await?;
            parse(rows, claim_row)
        })
        .await
    }
}
