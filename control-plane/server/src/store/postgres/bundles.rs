use async_trait::async_trait;
use tokio_postgres::Row;

use super::{Params, Postgres, big, execute, parse, query, unsigned};
use crate::store::{BundleRow, BundleStore};

#[async_trait]
impl BundleStore for Postgres {
    async fn insert_bundle(&self, b: &BundleRow) -> anyhow::Result<()> {
        let (version, size) = (big(b.version)?, big(b.size)?);
        let signers = serde_json::to_string(&b.signers)?;
        self.with(|c| async move {
            execute(
                &c,
                "INSERT INTO bundles (id, name, version, size, manifest_sha256, signers, created, pushed, head)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[&b.id, &b.name, &version, &size, &b.manifest_sha256, &signers, &b.created, &b.pushed, &b.head],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn bundles(&self) -> anyhow::Result<Vec<BundleRow>> {
        self.bundles_where("TRUE", &[]).await
    }

    async fn bundle(&self, id: &str) -> anyhow::Result<Option<BundleRow>> {
        Ok(self.bundles_where("id = $1", &[&id]).await?.pop())
    }

    async fn bundle_by_name(&self, name: &str, version: u64) -> anyhow::Result<Option<BundleRow>> {
        let version = big(version)?;
        Ok(self.bundles_where("name = $1 AND version = $2", &[&name, &version]).await?.pop())
    }
}

impl Postgres {
    async fn bundles_where(&self, cond: &str, p: &Params<'_>) -> anyhow::Result<Vec<BundleRow>> {
        let sql = format!(
            "SELECT id, name, version, size, manifest_sha256, signers, created, pushed, head FROM bundles
             WHERE {cond} ORDER BY name, version"
        );
        self.with(|c| async move { parse(query(&c, &sql, p).await?, bundle_row) }).await
    }
}

fn bundle_row(r: &Row) -> anyhow::Result<BundleRow> {
    Ok(BundleRow {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        version: unsigned(r.try_get(2)?)?,
        size: unsigned(r.try_get(3)?)?,
        manifest_sha256: r.try_get(4)?,
        signers: serde_json::from_str(r.try_get::<_, &str>(5)?).unwrap_or_default(),
        created: r.try_get(6)?,
        pushed: r.try_get(7)?,
        head: r.try_get(8)?,
    })
}
