use async_trait::async_trait;

use super::{Postgres, execute, query_opt};
use crate::store::{LeaseRow, LeaseStore};

#[async_trait]
impl LeaseStore for Postgres {
    /// One statement: the row is inserted, or locked and taken over only when its holder is
    /// this one or it has expired (the WHERE is judged on the latest committed row, after
    /// waiting for any other replica's statement on it), so two replicas never both get it.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now_ms: i64) -> anyhow::Result<Option<i64>> {
        let expires = now_ms.checked_add(ttl_ms).ok_or_else(|| anyhow::anyhow!("lease {name}: expiry overflows"))?;
        self.with(|c| async move {
            let row = query_opt(
                &c,
                "INSERT INTO leases (name, holder, epoch, expires) VALUES ($1, $2, 1, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires,
                     epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END
                 WHERE leases.holder = excluded.holder OR leases.expires <= $4
                 RETURNING epoch",
                &[&name, &holder, &expires, &now_ms],
            )
            .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str, epoch: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(
                &c,
                "UPDATE leases SET expires = 0 WHERE name = $1 AND holder = $2 AND epoch = $3",
                &[&name, &holder, &epoch],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseRow>> {
        self.with(|c| async move {
            let row =
                query_opt(&c, "SELECT name, holder, epoch, expires FROM leases WHERE name = $1", &[&name]).await?;
            row.map(|r| {
                Ok(LeaseRow {
                    name: r.try_get(0)?,
                    holder: r.try_get(1)?,
                    epoch: r.try_get(2)?,
                    expires: r.try_get(3)?,
                })
            })
            .transpose()
        })
        .await
    }
}
