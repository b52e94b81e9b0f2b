//! The agent's durable state in SQLite (WAL, `synchronous=FULL`): which model version is active
//! and which was before it, the highest version ever accepted per name, the install journal, and
//! the trusted clock.

use std::path::Path;

use anyhow::Context;
use flotilla_proto::InstallOffer;
use rusqlite::{Connection, OptionalExtension, params};

/// What is installed for one model name. Blobs are content addresses in the blob store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub version: u64,
    /// Header + envelope bytes of the bundle (signed manifest and signatures).
    pub head: Vec<u8>,
    pub model_blob: String,
    pub golden_blob: Option<String>,
}

#[derive(Debug)]
pub struct State {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    head BLOB NOT NULL,
    model_blob TEXT NOT NULL,
    golden_blob TEXT,
    prev_version INTEGER,
    prev_head BLOB,
    prev_model_blob TEXT,
    prev_golden_blob TEXT,
    activated_at INTEGER NOT NULL,
    -- Set once the active version passed its bake period (or was the good one rolled back to).
    baked_at INTEGER
);
CREATE TABLE IF NOT EXISTS highest (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS installs (
    offer_id TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    payload BLOB NOT NULL
);
";

/// One message waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub seq: i64,
    pub channel: String,
    pub payload: Vec<u8>,
}

impl State {
    pub fn open(path: &Path) -> anyhow::Result<State> {
        let conn = Connection::open(path).with_context(|| format!("opening state database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Data directories made before a column existed get it added.
        let has_baked: bool =
            conn.query_row("SELECT COUNT(*) FROM pragma_table_info('models') WHERE name = 'baked_at'", [], |r| {
                r.get(0)
            })?;
        if !has_baked {
            conn.execute_batch("ALTER TABLE models ADD COLUMN baked_at INTEGER")?;
        }
        Ok(State { conn })
    }

    pub fn installed(&self) -> anyhow::Result<Vec<Installed>> {
        let mut st =
            self.conn.prepare("SELECT name, version, head, model_blob, golden_blob FROM models ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Installed {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                head: r.get(2)?,
                model_blob: r.get(3)?,
                golden_blob: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn previous(&self, name: &str) -> anyhow::Result<Option<Installed>> {
        Ok(self
            .conn
            .query_row(
                "SELECT prev_version, prev_head, prev_model_blob, prev_golden_blob FROM models WHERE name = ?1 AND prev_version IS NOT NULL",
                [name],
                |r| {
                    Ok(Installed {
                        name: name.into(),
                        version: r.get::<_, i64>(0)? as u64,
                        head: r.get(1)?,
                        model_blob: r.get(2)?,
                        golden_blob: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn highest(&self, name: &str) -> anyhow::Result<Option<u64>> {
        Ok(self
            .conn
            .query_row("SELECT version FROM highest WHERE name = ?1", [name], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    /// Make `m` the active version in one transaction: the old active becomes previous, the
    /// highest accepted version is raised, and the install is journaled as active.
    pub fn activate(&mut self, m: &Installed, offer_id: &str, now: u64) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO models (name, version, head, model_blob, golden_blob, activated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET
                prev_version = models.version, prev_head = models.head,
                prev_model_blob = models.model_blob, prev_golden_blob = models.golden_blob,
                version = excluded.version, head = excluded.head, model_blob = excluded.model_blob,
                golden_blob = excluded.golden_blob, activated_at = excluded.activated_at, baked_at = NULL",
            params![m.name, m.version as i64, m.head, m.model_blob, m.golden_blob, now as i64],
        )?;
        tx.execute(
            "INSERT INTO highest (name, version) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET version = MAX(version, excluded.version)",
            params![m.name, m.version as i64],
        )?;
        tx.execute(
            "UPDATE installs SET state = 'active', reason = NULL, updated = ?2 WHERE offer_id = ?1",
            params![offer_id, now as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Journal an install step. The first call for an offer creates its row.
    pub fn journal(&self, offer: &InstallOffer, state: &str, reason: Option<&str>, now: u64) -> anyhow::Result<()> {
        let (offer_id, bundle_id, name, version) = (&offer.offer_id, &offer.bundle_id, &offer.name, offer.version);
        self.conn.execute(
            "INSERT INTO installs (offer_id, bundle_id, name, version, state, reason, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(offer_id) DO UPDATE SET state = excluded.state, reason = excluded.reason, updated = excluded.updated",
            params![offer_id, bundle_id, name, version as i64, state, reason, now as i64],
        )?;
        Ok(())
    }

    /// The journaled state of an offer and its failure reason, if any.
    pub fn install_state(&self, offer_id: &str) -> anyhow::Result<Option<(String, Option<String>)>> {
        Ok(self
            .conn
            .query_row("SELECT state, reason FROM installs WHERE offer_id = ?1", [offer_id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?)
    }

    /// Roll a model back to its previous version (the broken one is forgotten; the highest
    /// accepted version stays, so it cannot come back except as a newer version).
    pub fn roll_back(&mut self, name: &str, now: u64) -> anyhow::Result<()> {
        let n = self.conn.execute(
            "UPDATE models SET version = prev_version, head = prev_head, model_blob = prev_model_blob,
                golden_blob = prev_golden_blob, prev_version = NULL, prev_head = NULL,
                prev_model_blob = NULL, prev_golden_blob = NULL, activated_at = ?2, baked_at = ?2
             WHERE name = ?1 AND prev_version IS NOT NULL",
            params![name, now as i64],
        )?;
        anyhow::ensure!(n == 1, "{name} has no previous version to roll back to");
        Ok(())
    }

    /// Append a message to the outbox; while the outbox holds more than `max_bytes` of payload,
    /// the oldest messages are dropped and counted (`outbox_dropped`). Returns how many were
    /// dropped now.
    pub fn outbox_push(&mut self, channel: &str, payload: &[u8], max_bytes: u64) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        tx.execute("INSERT INTO outbox (channel, payload) VALUES (?1, ?2)", params![channel, payload])?;
        let mut dropped = 0u64;
        loop {
            let bytes: i64 = tx.query_row("SELECT COALESCE(SUM(length(payload)), 0) FROM outbox", [], |r| r.get(0))?;
            if bytes as u64 <= max_bytes {
                break;
            }
            let n = tx.execute("DELETE FROM outbox WHERE seq = (SELECT MIN(seq) FROM outbox)", [])?;
            if n == 0 {
                break;
            }
            dropped += 1;
        }
        if dropped > 0 {
            tx.execute(
                "INSERT INTO kv (k, v) VALUES ('outbox_dropped', ?1)
                 ON CONFLICT(k) DO UPDATE SET v = CAST(v AS INTEGER) + ?1",
                params![dropped as i64],
            )?;
        }
        tx.commit()?;
        Ok(dropped)
    }

    /// Up to `limit` queued messages after `seq`, oldest first.
    pub fn outbox_after(&self, seq: i64, limit: u32) -> anyhow::Result<Vec<Queued>> {
        let mut st =
            self.conn.prepare("SELECT seq, channel, payload FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = st.query_map(params![seq, limit], |r| {
            Ok(Queued { seq: r.get(0)?, channel: r.get(1)?, payload: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The broker acknowledged it.
    pub fn outbox_remove(&self, seq: i64) -> anyhow::Result<()> {
        self.conn.execute("DELETE FROM outbox WHERE seq = ?1", [seq])?;
        Ok(())
    }

    /// (messages queued, their payload bytes, messages dropped since the device was set up).
    pub fn outbox_stats(&self) -> anyhow::Result<(u64, u64, u64)> {
        let (n, bytes): (i64, i64) =
            self.conn.query_row("SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let dropped = self.get("outbox_dropped")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((n as u64, bytes as u64, dropped))
    }

    /// The active version of `name` passed its bake period.
    pub fn mark_baked(&self, name: &str, version: u64, now: u64) -> anyhow::Result<()> {
        self.conn.execute(
            "UPDATE models SET baked_at = ?3 WHERE name = ?1 AND version = ?2 AND baked_at IS NULL",
            params![name, version as i64, now as i64],
        )?;
        Ok(())
    }

    pub fn is_baked(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT baked_at IS NOT NULL FROM models WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    /// Every blob the active and previous versions of all models need.
    pub fn referenced_blobs(&self) -> anyhow::Result<std::collections::HashSet<String>> {
        let mut st = self.conn.prepare(
            "SELECT model_blob, golden_blob, prev_model_blob, prev_golden_blob, head, prev_head FROM models",
        )?;
        let mut keep = std::collections::HashSet::new();
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            for i in 0..4 {
                if let Some(b) = r.get::<_, Option<String>>(i)? {
                    keep.insert(b);
                }
            }
            // Every other artifact of both versions too (e.g. the drift baseline).
            for i in 4..6 {
                if let Some(head) = r.get::<_, Option<Vec<u8>>>(i)?
                    && let Ok((doc, _)) = flotilla_bundle::format::parse_envelope(&head)
                    && let Ok(m) = flotilla_bundle::verify::decode_manifest(&doc.signed)
                {
                    keep.extend(m.artifacts.iter().map(|a| a.sha256.clone()));
                }
            }
        }
        Ok(keep)
    }

    pub fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self.conn.query_row("SELECT v FROM kv WHERE k = ?1", [key], |r| r.get(0)).optional()?)
    }

    pub fn set(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.conn.execute(
            "INSERT INTO kv (k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![key, value],
        )?;
        Ok(())
    }

    /// The trusted clock: never behind any signed time or wall-clock time seen before.
    pub fn trusted_now(&self, system_now: u64) -> anyhow::Result<u64> {
        let stored = self.get("trusted_time")?.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let now = stored.max(system_now);
        if now > stored {
            self.set("trusted_time", &now.to_string())?;
        }
        Ok(now)
    }

    /// Advance the trusted clock to a signed time (e.g. a verified manifest's `created`).
    pub fn observe_signed_time(&self, t: u64) -> anyhow::Result<()> {
        let stored = self.get("trusted_time")?.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if t > stored {
            self.set("trusted_time", &t.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(v: u64) -> Installed {
        Installed {
            name: "m".into(),
            version: v,
            head: vec![v as u8],
            model_blob: format!("{v:064}"),
            golden_blob: None,
        }
    }

    #[test]
    fn activation_keeps_previous_and_highest() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(&d.path().join("state.db")).unwrap();
        let offer = InstallOffer {
            offer_id: "o1".into(),
            rollout_id: None,
            bundle_id: "b".into(),
            name: "m".into(),
            version: 1,
            size: 1,
            head: vec![],
            chunk_size: 1,
            url: None,
            delta: false,
        };
        s.journal(&offer, "downloading", None, 1).unwrap();
        s.activate(&inst(1), "o1", 2).unwrap();
        s.activate(&inst(3), "o2", 3).unwrap();
        assert_eq!(s.installed().unwrap(), vec![inst(3)]);
        assert_eq!(s.previous("m").unwrap(), Some(inst(1)));
        assert_eq!(s.highest("m").unwrap(), Some(3));
        assert_eq!(s.install_state("o1").unwrap(), Some(("active".into(), None)));
        drop(s);
        let s = State::open(&d.path().join("state.db")).unwrap();
        assert_eq!(s.installed().unwrap(), vec![inst(3)]);
    }

    #[test]
    fn trusted_clock_never_goes_back() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(&d.path().join("state.db")).unwrap();
        assert_eq!(s.trusted_now(1000).unwrap(), 1000);
        s.observe_signed_time(5000).unwrap();
        // A device booting at 1970 still knows it is at least 5000.
        assert_eq!(s.trusted_now(0).unwrap(), 5000);
        assert_eq!(s.trusted_now(6000).unwrap(), 6000);
        assert_eq!(s.trusted_now(10).unwrap(), 6000);
    }

    #[test]
    fn outbox_keeps_order_bounds_bytes_counts_drops_and_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.db");
        {
            let mut s = State::open(&path).unwrap();
            for i in 0..10u8 {
                assert_eq!(s.outbox_push("events", &[i; 100], 1000).unwrap(), 0);
            }
            // The eleventh pushes the total over 1000 bytes: the oldest goes, and is counted.
            assert_eq!(s.outbox_push("events", &[10; 100], 1000).unwrap(), 1);
            assert_eq!(s.outbox_stats().unwrap(), (10, 1000, 1));
        }
        let s = State::open(&path).unwrap();
        let q = s.outbox_after(0, 100).unwrap();
        assert_eq!(q.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), (1..=10).collect::<Vec<u8>>());
        assert!(q.windows(2).all(|w| w[0].seq < w[1].seq));
        s.outbox_remove(q[0].seq).unwrap();
        let rest = s.outbox_after(q[0].seq, 3).unwrap();
        assert_eq!(rest.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(s.outbox_stats().unwrap(), (9, 900, 1));
    }

    #[test]
    fn roll_back_restores_the_previous_version_and_keeps_highest() {
        let d = tempfile::tempdir().unwrap();
        let mut s = State::open(&d.path().join("state.db")).unwrap();
        s.activate(&inst(1), "o1", 1).unwrap();
        s.activate(&inst(2), "o2", 2).unwrap();
        s.roll_back("m", 3).unwrap();
        assert_eq!(s.installed().unwrap(), vec![inst(1)]);
        assert_eq!(s.previous("m").unwrap(), None);
        assert_eq!(s.highest("m").unwrap(), Some(2));
        assert!(s.roll_back("m", 4).is_err(), "nothing left to roll back to");
    }
}
