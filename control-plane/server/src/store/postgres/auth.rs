use async_trait::async_trait;

use super::{Postgres, TOKEN_COLUMNS, execute, parse, query, query_opt, token_row};
use crate::store::{AuthStore, TokenRow};

#[async_trait]
impl AuthStore for Postgres {
    async fn add_token(&self, id: &str, hash: &str, role: &str, name: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO tokens (id, hash, role, name, created) VALUES ($1, $2, $3, $4, $5)",
                &[&id, &hash, &role, &name, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str, now: i64) -> anyhow::Result<Option<TokenRow>> {
        // One statement: the row as it was (last_used before this use), marked used.
        self.with(|c| async move {
            let row = query_opt(
                &c,
                "UPDATE tokens t SET last_used = $2
                 FROM (SELECT id, last_used FROM tokens WHERE hash = $1 FOR UPDATE) old
                 WHERE t.id = old.id
                 RETURNING t.id, t.role, t.name, t.created, old.last_used",
                &[&hash, &now],
            )
            .await?;
            row.as_ref().map(token_row).transpose()
        })
        .await
    }

    async fn tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        self.with(|c| async move {
            parse(query(&c, &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"), &[]).await?, token_row)
        })
        .await
    }

    async fn delete_token(&self, id: &str) -> anyhow::Result<bool> {
        self.with(|c| async move { Ok(execute(&c, "DELETE FROM tokens WHERE id = $1", &[&id]).await? > 0) }).await
    }

    async fn set_device_credential(&self, device: &str, password_sha256: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO device_credentials (device_id, password_sha256, created) VALUES ($1, $2, $3)
                 ON CONFLICT (device_id) DO UPDATE SET password_sha256 = excluded.password_sha256,
                 created = excluded.created",
                &[&device, &password_sha256, &now],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn delete_device_credential(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| async move {
            Ok(execute(&c, "DELETE FROM device_credentials WHERE device_id = $1", &[&device]).await? > 0)
        })
        .await
    }

    async fn device_credentials(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.with(|c| async move {
            let rows = query(&c, "SELECT device_id, password_sha256, created FROM device_credentials", &[]).await?;
            parse(rows, |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        })
        .await
    }

    async fn setting(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| async move {
            let row = query_opt(&c, "SELECT value FROM settings WHERE key = $1", &[&key]).await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
        .await
    }

    async fn setting_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        // DO UPDATE (to the value it has) rather than DO NOTHING: it returns the stored row
        // even when another server inserted it after this statement's snapshot was taken.
        self.with(|c| async move {
            let row = query_opt(
                &c,
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = settings.value RETURNING value",
                &[&key, &value],
            )
            .await?;
            let row = row.ok_or_else(|| anyhow::anyhow!("setting {key}: no row returned"))?;
            Ok(row.try_get(0)?)
        })
        .await
    }
}
