//! Device certificates the fleet CA issued, revocations, and claim tokens.

use rusqlite::{OptionalExtension, params};

use super::Store;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS device_certs (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    how TEXT NOT NULL,
    revoked INTEGER
);
CREATE INDEX IF NOT EXISTS device_certs_by_device ON device_certs (device_id);
CREATE TABLE IF NOT EXISTS revoked_devices (
    device_id TEXT PRIMARY KEY,
    revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS claim_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    device_id TEXT,
    expires INTEGER NOT NULL,
    created INTEGER NOT NULL,
    used INTEGER,
    used_by TEXT
);
";

/// A certificate the fleet CA issued to a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCertRow {
    pub serial: String,
    pub device_id: String,
    pub sha256: String,
    pub not_after: i64,
    pub issued: i64,
    /// `issued` (made with its key off the device), `claim`, `renewal`, `enrolled` (a CSV).
    pub how: String,
    pub revoked: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimTokenRow {
    pub id: String,
    pub device_id: Option<String>,
    pub expires: i64,
    pub created: i64,
    pub used: Option<i64>,
    pub used_by: Option<String>,
}

impl Store {
    pub fn add_device_cert(&self, row: &DeviceCertRow) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO device_certs (serial, device_id, sha256, not_after, issued, how, revoked)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.serial, row.device_id, row.sha256, row.not_after, row.issued, row.how, row.revoked],
            )
            .map(|_| ())
        })
    }

    /// A device's certificates, newest first.
    pub fn device_certs(&self, device: &str) -> anyhow::Result<Vec<DeviceCertRow>> {
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

    /// Revoke a device: its every certificate, and any other naming it, until it is enrolled
    /// again. Returns how many certificates were revoked one by one.
    pub fn revoke_device(&self, device: &str, now: i64) -> anyhow::Result<usize> {
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

    /// Admit a revoked device again (new certificates only: the revoked ones stay revoked).
    pub fn unrevoke_device(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| c.execute("DELETE FROM revoked_devices WHERE device_id = ?1", [device]).map(|n| n > 0))
    }

    pub fn device_revoked(&self, device: &str) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row("SELECT revoked FROM revoked_devices WHERE device_id = ?1", [device], |r| r.get(0)).optional()
        })
    }

    /// (revoked device ids, revoked certificate serials), for the broker at start.
    pub fn revocations(&self) -> anyhow::Result<(Vec<String>, Vec<String>)> {
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

    pub fn add_claim_token(
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

    /// Use a claim token once: the token's row if it was unused and unexpired at `now` (and is
    /// now used by `device`), else None. One statement, so two claims cannot both win.
    pub fn use_claim_token(&self, hash: &str, device: &str, now: i64) -> anyhow::Result<Option<ClaimTokenRow>> {
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

    /// Why a claim token cannot be used (for the error the device gets), if it exists at all.
    pub fn claim_token(&self, hash: &str) -> anyhow::Result<Option<ClaimTokenRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, device_id, expires, created, used, used_by FROM claim_tokens WHERE hash = ?1",
                [hash],
                claim_row,
            )
            .optional()
        })
    }

    pub fn claim_tokens(&self) -> anyhow::Result<Vec<ClaimTokenRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, device_id, expires, created, used, used_by FROM claim_tokens ORDER BY created DESC",
            )?;
            let rows = st.query_map([], claim_row)?;
            rows.collect()
        })
    }
}

fn claim_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimTokenRow> {
    Ok(ClaimTokenRow {
        id: r.get(0)?,
        device_id: r.get(1)?,
        expires: r.get(2)?,
        created: r.get(3)?,
        used: r.get(4)?,
        used_by: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_tokens_work_once_and_not_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("fleet.db")).unwrap();
        s.add_claim_token("c-1", "h1", None, 1000, 0).unwrap();
        s.add_claim_token("c-2", "h2", Some("rpi-2"), 1000, 0).unwrap();
        assert!(s.use_claim_token("h1", "rpi-1", 1000).unwrap().is_none(), "expired at 1000");
        assert_eq!(s.use_claim_token("h1", "rpi-1", 999).unwrap().unwrap().used_by.as_deref(), Some("rpi-1"));
        assert!(s.use_claim_token("h1", "rpi-1", 999).unwrap().is_none(), "used");
        assert!(s.use_claim_token("h2", "rpi-1", 5).unwrap().is_none(), "bound to rpi-2");
        assert!(s.use_claim_token("h2", "rpi-2", 5).unwrap().is_some());
        assert!(s.use_claim_token("nope", "rpi-2", 5).unwrap().is_none());
    }

    #[test]
    fn revocation_covers_every_certificate_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let s = Store::open(&path).unwrap();
        let cert = |serial: &str, device: &str| DeviceCertRow {
            serial: serial.into(),
            device_id: device.into(),
            sha256: "00".into(),
            not_after: 10,
            issued: 1,
            how: "issued".into(),
            revoked: None,
        };
        s.add_device_cert(&cert("01", "a")).unwrap();
        s.add_device_cert(&cert("02", "a")).unwrap();
        s.add_device_cert(&cert("03", "b")).unwrap();
        assert_eq!(s.revoke_device("a", 5).unwrap(), 2);
        drop(s);
        let s = Store::open(&path).unwrap();
        let (devices, mut serials) = s.revocations().unwrap();
        serials.sort();
        assert_eq!((devices, serials), (vec!["a".to_string()], vec!["01".to_string(), "02".to_string()]));
        assert_eq!(s.device_revoked("a").unwrap(), Some(5));
        assert!(s.unrevoke_device("a").unwrap());
        assert_eq!(s.revocations().unwrap().0, Vec::<String>::new());
    }
}
