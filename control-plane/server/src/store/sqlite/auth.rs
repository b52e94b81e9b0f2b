use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{Sqlite, TOKEN_COLUMNS, token_row};
use crate::store::{AuthStore, TokenRow};

#[async_trait]
impl AuthStore for Sqlite {
    async fn add_token(&self, id: &str, hash: &str, role: &str, name: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, hash, role, name, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, hash, role, name, now],
            )
        })?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str, now: i64) -> anyhow::Result<Option<TokenRow>> {
        self.with(|c| {
            let found = c
                .query_row(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"), [hash], token_row)
                .optional()?;
            if let Some(t) = &found {
                c.execute("UPDATE tokens SET last_used = ?2 WHERE id = ?1", params![t.id, now])?;
            }
            Ok(found)
        })
    }

    async fn tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"))?;
            st.query_map([], token_row)?.collect()
        })
    }

    async fn delete_token(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.with(|c| c.execute("DELETE FROM tokens WHERE id = ?1", [id]))? > 0)
    }

    async fn set_device_credential(&self, device: &str, password_sha256: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO device_credentials (device_id, password_sha256, created) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET password_sha256 = ?2, created = ?3",
                params![device, password_sha256, now],
            )
            .map(|_| ())
        })
    }

    async fn delete_device_credential(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| c.execute("DELETE FROM device_credentials WHERE device_id = ?1", [device]).map(|n| n > 0))
    }

    async fn device_credentials(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT device_id, password_sha256, created FROM device_credentials")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    async fn setting(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional())
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        self.with(|c| {
            c.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0))
        })
    }
}
