use async_trait::async_trait;

use super::{Postgres, big, execute, parse, query, unsigned};
use crate::store::TrustStore;

#[async_trait]
impl TrustStore for Postgres {
    async fn add_root(&self, version: u64, bytes: &[u8], now: i64) -> anyhow::Result<()> {
        let version = big(version)?;
        self.with(|c| async move {
            execute(&c, "INSERT INTO roots (version, bytes, added) VALUES ($1, $2, $3)", &[&version, &bytes, &now])
                .await?;
            Ok(())
        })
        .await
    }

    async fn roots(&self) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        self.with(|c| async move {
            let rows = query(&c, "SELECT version, bytes FROM roots ORDER BY version", &[]).await?;
            parse(rows, |r| Ok((unsigned(r.try_get(0)?)?, r.try_get(1)?)))
        })
        .await
    }
}
