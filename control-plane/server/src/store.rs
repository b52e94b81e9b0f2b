//! The control plane's store: SQLite (WAL). Devices, bundles, rollouts with per-device progress,
//! and the device event log. All fleet state lives here, so a restarted server resumes.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER,
    hello TEXT,
    models TEXT NOT NULL DEFAULT '[]',
    tags TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS bundles (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    signers TEXT NOT NULL,
    created INTEGER NOT NULL,
    pushed INTEGER NOT NULL,
    head BLOB NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL REFERENCES bundles(id),
    state TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL,
    offer_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT,
    offered_at INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS roots (
    version INTEGER PRIMARY KEY,
    bytes BLOB NOT NULL,
    added INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (device_id, msg_id)
);
";

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub id: String,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub hello: Option<String>,
    pub models: String,
    pub tags: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BundleRow {
    pub id: String,
    pub name: String,
    pub version: u64,
    pub size: u64,
    pub manifest_sha256: String,
    pub signers: Vec<String>,
    pub created: i64,
    pub pushed: i64,
    pub head: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub id: String,
    pub bundle_id: String,
    pub state: String,
    pub created: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutDeviceRow {
    pub rollout_id: String,
    pub device_id: String,
    pub offer_id: String,
    pub state: String,
    pub reason: Option<String>,
    pub offered_at: i64,
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path).with_context(|| format!("opening store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        add_column(&conn, "devices", "root_version", "INTEGER")?;
        Ok(Store { conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        Ok(f(&mut self.conn.lock().expect("store lock"))?)
    }

    // ---- devices ----

    pub fn device_hello(&self, id: &str, hello_json: &str, tags_json: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO devices (id, online, last_seen, hello, tags) VALUES (?1, 1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET online = 1, last_seen = ?2, hello = ?3, tags = ?4",
                params![id, now, hello_json, tags_json],
            )
        })?;
        Ok(())
    }

    /// Record a state message. `models_json` None keeps the models as they were (last will).
    pub fn device_state(&self, id: &str, online: bool, models_json: Option<&str>, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO devices (id, online, last_seen, models) VALUES (?1, ?2, ?3, COALESCE(?4, '[]'))
                 ON CONFLICT(id) DO UPDATE SET online = ?2, last_seen = ?3, models = COALESCE(?4, devices.models)",
                params![id, online, now, models_json],
            )
        })?;
        Ok(())
    }

    pub fn devices(&self) -> anyhow::Result<Vec<DeviceRow>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, online, last_seen, hello, models, tags FROM devices ORDER BY id")?;
            st.query_map([], device_row)?.collect()
        })
    }

    pub fn device(&self, id: &str) -> anyhow::Result<Option<DeviceRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, online, last_seen, hello, models, tags FROM devices WHERE id = ?1",
                [id],
                device_row,
            )
            .optional()
        })
    }

    // ---- bundles ----

    pub fn insert_bundle(&self, b: &BundleRow) -> anyhow::Result<()> {
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

    pub fn bundles(&self) -> anyhow::Result<Vec<BundleRow>> {
        self.bundles_where("1 = 1", params![])
    }

    pub fn bundle(&self, id: &str) -> anyhow::Result<Option<BundleRow>> {
        Ok(self.bundles_where("id = ?1", params![id])?.pop())
    }

    pub fn bundle_by_name(&self, name: &str, version: u64) -> anyhow::Result<Option<BundleRow>> {
        Ok(self.bundles_where("name = ?1 AND version = ?2", params![name, version as i64])?.pop())
    }

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

    // ---- rollouts ----

    /// Create a rollout with its target devices, all pending, in one transaction.
    pub fn create_rollout(&self, id: &str, bundle_id: &str, devices: &[String], now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO rollouts (id, bundle_id, state, created) VALUES (?1, ?2, 'running', ?3)",
                params![id, bundle_id, now],
            )?;
            for d in devices {
                tx.execute(
                    "INSERT INTO rollout_devices (rollout_id, device_id, offer_id, state, updated) VALUES (?1, ?2, ?3, 'pending', ?4)",
                    params![id, d, format!("{id}/{d}"), now],
                )?;
            }
            tx.commit()
        })
    }

    pub fn rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("1 = 1", params![])
    }

    pub fn running_rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("state = 'running'", params![])
    }

    pub fn rollout(&self, id: &str) -> anyhow::Result<Option<RolloutRow>> {
        Ok(self.rollouts_where("id = ?1", params![id])?.pop())
    }

    fn rollouts_where(&self, cond: &str, p: &[&dyn rusqlite::ToSql]) -> anyhow::Result<Vec<RolloutRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT id, bundle_id, state, created FROM rollouts WHERE {cond} ORDER BY created, id"
            ))?;
            st.query_map(p, |r| {
                Ok(RolloutRow { id: r.get(0)?, bundle_id: r.get(1)?, state: r.get(2)?, created: r.get(3)? })
            })?
            .collect()
        })
    }

    pub fn set_rollout_state(&self, id: &str, state: &str) -> anyhow::Result<()> {
        self.with(|c| c.execute("UPDATE rollouts SET state = ?2 WHERE id = ?1", params![id, state]))?;
        Ok(())
    }

    pub fn rollout_devices(&self, rollout_id: &str) -> anyhow::Result<Vec<RolloutDeviceRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT rollout_id, device_id, offer_id, state, reason, offered_at FROM rollout_devices WHERE rollout_id = ?1 ORDER BY device_id",
            )?;
            st
                .query_map([rollout_id], |r| {
                    Ok(RolloutDeviceRow {
                        rollout_id: r.get(0)?,
                        device_id: r.get(1)?,
                        offer_id: r.get(2)?,
                        state: r.get(3)?,
                        reason: r.get(4)?,
                        offered_at: r.get(5)?,
                    })
                })?
                .collect()
        })
    }

    pub fn mark_offered(&self, offer_id: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollout_devices SET state = CASE WHEN state = 'pending' THEN 'offered' ELSE state END,
                 offered_at = ?2, updated = ?2 WHERE offer_id = ?1",
                params![offer_id, now],
            )
        })?;
        Ok(())
    }

    /// Re-offer soon: the device reconnected, so an offer it may have missed is sent again.
    pub fn reoffer_device(&self, device_id: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollout_devices SET offered_at = 0 WHERE device_id = ?1 AND state IN ('offered', 'downloading')
                 AND rollout_id IN (SELECT id FROM rollouts WHERE state = 'running')",
                [device_id],
            )
        })?;
        Ok(())
    }

    /// Apply a device's report about an offer. Final states are never left.
    pub fn offer_progress(&self, offer_id: &str, state: &str, reason: Option<&str>, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollout_devices SET state = ?2, reason = ?3, updated = ?4
                 WHERE offer_id = ?1 AND state NOT IN ('succeeded', 'failed')",
                params![offer_id, state, reason, now],
            )
        })?;
        Ok(())
    }

    // ---- trust roots ----

    pub fn add_root(&self, version: u64, bytes: &[u8], now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO roots (version, bytes, added) VALUES (?1, ?2, ?3)",
                params![version as i64, bytes, now],
            )
        })?;
        Ok(())
    }

    /// Every stored root, oldest first.
    pub fn roots(&self) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        self.with(|c| {
            c.prepare("SELECT version, bytes FROM roots ORDER BY version")?
                .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect()
        })
    }

    pub fn set_device_root_version(&self, id: &str, version: u64) -> anyhow::Result<()> {
        self.with(|c| c.execute("UPDATE devices SET root_version = ?2 WHERE id = ?1", params![id, version as i64]))?;
        Ok(())
    }

    pub fn device_root_version(&self, id: &str) -> anyhow::Result<Option<u64>> {
        Ok(self
            .with(|c| {
                c.query_row("SELECT root_version FROM devices WHERE id = ?1", [id], |r| r.get::<_, Option<i64>>(0))
                    .optional()
            })?
            .flatten()
            .map(|v| v as u64))
    }

    // ---- events ----

    /// Append an event; a repeated (device, message id) is ignored. Returns whether it was new.
    pub fn add_event(&self, device: &str, msg_id: &str, at: i64, kind: &str, body_json: &str) -> anyhow::Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO events (device_id, msg_id, at, kind, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![device, msg_id, at, kind, body_json],
            )
        })?;
        Ok(n == 1)
    }

    pub fn events(&self, device: Option<&str>, limit: u32) -> anyhow::Result<Vec<(String, i64, String, String)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, at, kind, body FROM events WHERE (?1 IS NULL OR device_id = ?1) ORDER BY seq DESC LIMIT ?2",
            )?;
            st.query_map(params![device, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect()
        })
    }
}

/// Schema evolution for stores made by older builds: add a column if it is missing.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> anyhow::Result<()> {
    let exists = conn
        .prepare(&format!("PRAGMA table_info({table})"))?
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .iter()
        .any(|c| c == column);
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        id: r.get(0)?,
        online: r.get(1)?,
        last_seen: r.get(2)?,
        hello: r.get(3)?,
        models: r.get(4)?,
        tags: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_progress_is_monotonic_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("fleet.db");
        let s = Store::open(&path).unwrap();
        s.device_hello("a", "{}", "{}", 1).unwrap();
        s.insert_bundle(&BundleRow {
            id: "b1".into(),
            name: "m".into(),
            version: 1,
            size: 10,
            manifest_sha256: "x".into(),
            signers: vec!["k".into()],
            created: 1,
            pushed: 2,
            head: vec![1],
        })
        .unwrap();
        s.create_rollout("r1", "b1", &["a".into()], 3).unwrap();
        s.mark_offered("r1/a", 4).unwrap();
        s.offer_progress("r1/a", "succeeded", None, 5).unwrap();
        s.offer_progress("r1/a", "downloading", None, 6).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let rd = s.rollout_devices("r1").unwrap();
        assert_eq!(rd[0].state, "succeeded");
        assert_eq!(s.bundle_by_name("m", 1).unwrap().unwrap().signers, vec!["k".to_string()]);
        assert!(s.add_event("a", "m1", 1, "k", "{}").unwrap());
        assert!(!s.add_event("a", "m1", 1, "k", "{}").unwrap());
    }
}
