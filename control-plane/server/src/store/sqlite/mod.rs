//! The SQLite store (WAL), the embedded default: one file, `DATA_DIR/fleet.db`, one connection
//! behind a mutex. Each area's trait is implemented in its own file.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::Connection;

use super::{AlertRow, ClaimTokenRow, DeviceRow, Latency, TokenRow};

mod auth;
mod bundles;
mod certs;
mod devices;
mod drift;
mod leases;
mod retrain;
mod rollouts;
mod samples;
mod trust;

const CERT_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS device_certs (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued INTEGER NOT NULL,
    how TEXT NOT NULL,
    revoked INTEGER
);
CREATE INDEX IF NOT EXISTS device_certs_by_device ON device_certs (device_id);
CREATE TABLE IF NOT EXISTS revoked_devices (
    device_id TEXT PRIMARY KEY,
    revoked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS claim_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    device_id TEXT,
    expires INTEGER NOT NULL,
    created INTEGER NOT NULL,
    used INTEGER,
    used_by TEXT
);
";

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
CREATE TABLE IF NOT EXISTS drift_reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    window_end INTEGER NOT NULL,
    -- The aggregation window (ms) the report counts in: a time window's aligned end, or the
    -- opening time of the cohort's count window it joined.
    bucket INTEGER NOT NULL,
    inferences INTEGER NOT NULL,
    signals BLOB NOT NULL,
    received INTEGER NOT NULL,
    UNIQUE (device_id, msg_id)
);
CREATE INDEX IF NOT EXISTS drift_reports_by_model ON drift_reports (model, version, bucket);
CREATE TABLE IF NOT EXISTS samples (
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    sample_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    -- CBOR: flotilla_proto::Sample
    body BLOB NOT NULL,
    received INTEGER NOT NULL,
    PRIMARY KEY (device_id, model, version, sample_id)
);
CREATE TABLE IF NOT EXISTS sample_uploads (
    upload_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requested INTEGER NOT NULL,
    parts INTEGER NOT NULL DEFAULT 0,
    samples INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (upload_id, device_id)
);
CREATE TABLE IF NOT EXISTS health (
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    latency_p95_us INTEGER,
    accelerator_fallback INTEGER NOT NULL,
    backend TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (device_id, model, version)
);
CREATE TABLE IF NOT EXISTS drift_alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    cohort TEXT NOT NULL,
    signal TEXT NOT NULL,
    metrics TEXT NOT NULL,
    value REAL,
    threshold REAL,
    windows INTEGER NOT NULL,
    first_window INTEGER NOT NULL,
    last_window INTEGER NOT NULL,
    state TEXT NOT NULL,
    raised INTEGER NOT NULL,
    resolved INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_used INTEGER
);
CREATE TABLE IF NOT EXISTS device_credentials (
    device_id TEXT PRIMARY KEY,
    password_sha256 TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retrain_policies (
    model TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS retrain_jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created INTEGER NOT NULL,
    job TEXT NOT NULL
);
";

pub(super) const TOKEN_COLUMNS: &str = "id, role, name, created, last_used";

pub(super) fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow { id: r.get(0)?, role: r.get(1)?, name: r.get(2)?, created: r.get(3)?, last_used: r.get(4)? })
}

#[derive(Debug)]
pub struct Sqlite {
    conn: Mutex<Connection>,
    latency: Histogram,
}

/// Upper bounds (seconds) of the store latency histogram's buckets.
const LATENCY_BOUNDS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// How long store operations take (lock wait included), for `/metrics`.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [std::sync::atomic::AtomicU64; 9],
    count: std::sync::atomic::AtomicU64,
    sum_ns: std::sync::atomic::AtomicU64,
}

impl Sqlite {
    pub fn open(path: &Path) -> anyhow::Result<Sqlite> {
        let conn = Connection::open(path).with_context(|| format!("opening store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(CERT_SCHEMA)?;
        add_column(&conn, "devices", "root_version", "INTEGER")?;
        // Tags set on the server (`flotilla devices tag`); they win over the device's own.
        add_column(&conn, "devices", "server_tags", "TEXT NOT NULL DEFAULT '{}'")?;
        // The rollout engine's plan and state (JSON), persisted after every step.
        add_column(&conn, "rollouts", "plan", "TEXT")?;
        add_column(&conn, "rollouts", "engine", "TEXT")?;
        add_column(&conn, "rollouts", "reason", "TEXT")?;
        // Bumped by every save of a rollout, which compares it (compare-and-swap).
        add_column(&conn, "rollouts", "rev", "INTEGER NOT NULL DEFAULT 0")?;
        add_column(&conn, "retrain_jobs", "rev", "INTEGER NOT NULL DEFAULT 0")?;
        // The reporting device's cohort when the report arrived (count windows form per cohort).
        add_column(&conn, "drift_reports", "cohort", "TEXT")?;
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS drift_reports_by_cohort ON drift_reports (model, version, cohort, bucket);
             -- One firing alert per model, version, cohort and signal.
             CREATE UNIQUE INDEX IF NOT EXISTS drift_alerts_one_firing ON drift_alerts (model, version, cohort, signal)
                 WHERE state = 'firing';",
        )?;
        Ok(Sqlite { conn: Mutex::new(conn), latency: Histogram::default() })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> anyhow::Result<T> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = std::time::Instant::now();
        let r = f(&mut self.conn.lock().expect("store lock"));
        let took = start.elapsed();
        if let Some(i) = LATENCY_BOUNDS.iter().position(|&b| took.as_secs_f64() <= b) {
            self.latency.buckets[i].fetch_add(1, Relaxed);
        }
        self.latency.count.fetch_add(1, Relaxed);
        self.latency.sum_ns.fetch_add(took.as_nanos() as u64, Relaxed);
        Ok(r?)
    }
}

#[async_trait::async_trait]
impl super::Store for Sqlite {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())))
    }

    fn latency(&self) -> Latency {
        use std::sync::atomic::Ordering::Relaxed;
        let buckets = LATENCY_BOUNDS.iter().zip(&self.latency.buckets).map(|(&le, n)| (le, n.load(Relaxed))).collect();
        Latency {
            buckets,
            count: self.latency.count.load(Relaxed),
            seconds: self.latency.sum_ns.load(Relaxed) as f64 / 1e9,
        }
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

pub(super) fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    let (hello, models, own, server): (Option<String>, String, String, String) =
        (r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
    Ok(DeviceRow::from_stored(r.get(0)?, r.get(1)?, r.get(2)?, hello.as_deref(), &models, &own, &server))
}

pub(super) fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AlertRow> {
    Ok(AlertRow {
        id: r.get(0)?,
        model: r.get(1)?,
        version: r.get::<_, i64>(2)? as u64,
        cohort: r.get(3)?,
        signal: r.get(4)?,
        metrics: r.get(5)?,
        value: r.get(6)?,
        threshold: r.get(7)?,
        windows: r.get(8)?,
        first_window: r.get(9)?,
        last_window: r.get(10)?,
        state: r.get(11)?,
        raised: r.get(12)?,
        resolved: r.get(13)?,
    })
}

pub(super) const ALERT_COLUMNS: &str = "id, model, version, cohort, signal, metrics, value, threshold, windows, first_window, \
     last_window, state, raised, resolved";

pub(super) fn claim_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClaimTokenRow> {
    Ok(ClaimTokenRow {
        id: r.get(0)?,
        device_id: r.get(1)?,
        expires: r.get(2)?,
        created: r.get(3)?,
        used: r.get(4)?,
        used_by: r.get(5)?,
    })
}
