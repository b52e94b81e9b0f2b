use async_trait::async_trait;
use rusqlite::params;

use super::Sqlite;
use crate::store::TrustStore;

#[async_trait]
impl TrustStore for Sqlite {
    async fn add_root(&self, version: u64, bytes: &[u8], now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO roots (version, bytes, added) VALUES (?1, ?2, ?3)",
                params![version as i64, bytes, now],
            )
        })?;
        Ok(())
    }

    async fn roots(&self) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        self.with(|c| {
            c.prepare("SELECT version, bytes FROM roots ORDER BY version")?
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect()
        })
    }
}
