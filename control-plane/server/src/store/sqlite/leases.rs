use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::Sqlite;
use crate::store::{LeaseRow, LeaseStore};

#[async_trait]
impl LeaseStore for Sqlite {
    async fn acquire_lease(&self, name: &str, holder: &str, ttl_ms: i64, now_ms: i64) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            let tx = c.transaction()?;
            let cur: Option<(String, i64, i64)> = tx
                .query_row("SELECT holder, epoch, expires FROM leases WHERE name = ?1", [name], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let epoch = match cur {
                None => 1,
                Some((h, e, _)) if h == holder => e,
                Some((_, e, expires)) if expires <= now_ms => e + 1,
                Some(_) => return Ok(None),
            };
            tx.execute(
                "INSERT INTO leases (name, holder, epoch, expires) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET holder = ?2, epoch = ?3, expires = ?4",
                params![name, holder, epoch, now_ms + ttl_ms],
            )?;
            tx.commit()?;
            Ok(Some(epoch))
        })
    }

    async fn release_lease(&self, name: &str, holder: &str, epoch: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE leases SET expires = 0 WHERE name = ?1 AND holder = ?2 AND epoch = ?3",
                params![name, holder, epoch],
            )
        })?;
        Ok(())
    }

    async fn lease(&self, name: &str) -> anyhow::Result<Option<LeaseRow>> {
        self.with(|c| {
            c.query_row("SELECT name, holder, epoch, expires FROM leases WHERE name = ?1", [name], |r| {
                Ok(LeaseRow { name: r.get(0)?, holder: r.get(1)?, epoch: r.get(2)?, expires: r.get(3)? })
            })
            .optional()
        })
    }
}
