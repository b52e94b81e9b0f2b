use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Sqlite, claim_row};
use crate::store::{CertStore, ClaimTokenRow, DeviceCertRow};

#[async_trait]
impl CertStore for Sqlite {
    async fn add_device_cert(&self, row: &DeviceCertRow) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO device_certs (serial, device_id, sha256, not_after, issued, how, revoked)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.serial, row.device_id, row.sha256, row.not_after, row.issued, row.how, row.revoked],
            )
            .map(|_| ())
        })
    }

    async fn device_certs(&self, device: &str) -> anyhow::Result<Vec<DeviceCertRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT serial, device_id, sha256, not_after, issued, how, revoked FROM device_certs
                 WHERE device_id = ?1 ORDER BY issued DESC, rowid DESC",
            )?;
            let rows = st.query_map([device], |r| {
                Ok(DeviceCertRow {
                    serial: r.get(0)?,
                    device_id: r.get(1)?,
                    sha256: r.get(2)?,
                    not_after: r.get(3)?,
                    issued: r.get(4)?,
                    how: r.get(5)?,
                    revoked: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    async fn revoke_device(&self, device: &str, now: i64) -> anyhow::Result<usize> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO revoked_devices (device_id, revoked) VALUES (?1, ?2) ON CONFLICT(device_id) DO NOTHING",
                params![device, now],
            )?;
            let n = tx.execute(
                "UPDATE device_certs SET revoked = ?2 WHERE device_id = ?1 AND revoked IS NULL",
                params![device, now],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }

    async fn unrevoke_device(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| c.execute("DELETE FROM revoked_devices WHERE device_id = ?1", [device]).map(|n| n > 0))
    }

    async fn device_revoked(&self, device: &str) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row("SELECT revoked FROM revoked_devices WHERE device_id = ?1", [device], |r| r.get(0)).optional()
        })
    }

    async fn revocations(&self) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        self.with(|c| {
            let devices = c
                .prepare("SELECT device_id FROM revoked_devices")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let serials = c
                .prepare("SELECT serial FROM device_certs WHERE revoked IS NOT NULL")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok((devices, serials))
        })
    }

    async fn add_claim_token(
        &self,
        id: &str,
        hash: &str,
        device: Option<&str>,
        expires: i64,
        now: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO claim_tokens (id, hash, device_id, expires, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, hash, device, expires, now],
            )
            .map(|_| ())
        })
    }

    async fn use_claim_token(&self, hash: &str, device: &str, now: i64) -> anyhow::Result<Option<ClaimTokenRow>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE claim_tokens SET used = ?3, used_by = ?2
                 WHERE hash = ?1 AND used IS NULL AND expires > ?3 AND (device_id IS NULL OR device_id = ?2)",
                params![hash, device, now],
            )?;
            let row = if n == 1 {
                tx.query_row(
                    "SELECT id, device_id, expires, created, used, used_by FROM claim_tokens WHERE hash = ?1",
                    [hash],
                    claim_row,
                )
                .optional()?
            } else {
                None
            };
            tx.commit()?;
            Ok(row)
        })
    }

    async fn claim_token(&self, hash: &str) -> anyhow::Result<Option<ClaimTokenRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, device_id, expires, created, used, used_by FROM claim_tokens WHERE hash = ?1",
                [hash],
                claim_row,
            )
            .optional()
        })
    }

    async fn claim_tokens(&self) -> anyhow::Result<Vec<ClaimTokenRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, device_id, expires, created, used, used_by FROM claim_tokens ORDER BY created DESC",
            )?;
            let rows = st.query_map([], claim_row)?;
            rows.collect()
        })
    }
}
