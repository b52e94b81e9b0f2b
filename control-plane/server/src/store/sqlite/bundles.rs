use async_trait::async_trait;
use rusqlite::params;

use super::Sqlite;
use crate::store::{BundleRow, BundleStore};

#[async_trait]
impl BundleStore for Sqlite {
    async fn insert_bundle(&self, b: &BundleRow) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO bundles (id, name, version, size, manifest_sha256, signers, created, pushed, head)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    b.id,
                    b.name,
                    b.version as i64,
                    b.size as i64,
                    b.manifest_sha256,
                    serde_json::to_string(&b.signers).unwrap_or_default(),
                    b.created,
                    b.pushed,
                    b.head
                ],
            )
        })?;
        Ok(())
    }

    async fn bundles(&self) -> anyhow::Result<Vec<BundleRow>> {
        self.bundles_where("1 = 1", params![])
    }

    async fn bundle(&self, id: &str) -> anyhow::Result<Option<BundleRow>> {
        Ok(self.bundles_where("id = ?1", params![id])?.pop())
    }

    async fn bundle_by_name(&self, name: &str, version: u64) -> anyhow::Result<Option<BundleRow>> {
        Ok(self.bundles_where("name = ?1 AND version = ?2", params![name, version as i64])?.pop())
    }
}

impl Sqlite {
    fn bundles_where(&self, cond: &str, p: &[&dyn rusqlite::ToSql]) -> anyhow::Result<Vec<BundleRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT id, name, version, size, manifest_sha256, signers, created, pushed, head FROM bundles WHERE {cond} ORDER BY name, version"
            ))?;
            st
                .query_map(p, |r| {
                    Ok(BundleRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        version: r.get::<_, i64>(2)? as u64,
                        size: r.get::<_, i64>(3)? as u64,
                        manifest_sha256: r.get(4)?,
                        signers: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                        created: r.get(6)?,
                        pushed: r.get(7)?,
                        head: r.get(8)?,
                    })
                })?
                .collect()
        })
    }
}
