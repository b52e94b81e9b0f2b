//! The control plane's store: SQLite (WAL). Devices, bundles, rollouts with per-device progress,
//! and the device event log. All fleet state lives here, so a restarted server resumes.

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

mod certs;
pub use certs::{ClaimTokenRow, DeviceCertRow};

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
CREATE TABLE IF NOT EXISTS retrain_jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created INTEGER NOT NULL,
    job TEXT NOT NULL
);
";

#[derive(Debug, Clone, PartialEq)]
pub struct HealthRow {
    pub device: String,
    pub version: u64,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<u64>,
    pub accelerator_fallback: bool,
}

/// One stored drift report (`signals` is CBOR: `Vec<flotilla_proto::SignalSketch>`).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftReportRow {
    pub device_id: String,
    pub version: u64,
    pub window_start: i64,
    pub window_end: i64,
    pub bucket: i64,
    pub inferences: u64,
    pub signals: Vec<u8>,
    /// The device's cohort (under the server's cohort key) when the report arrived.
    pub cohort: String,
}

/// The newest count window of a cohort: its key, who reported into it and how much.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenDriftWindow {
    pub bucket: i64,
    pub devices: Vec<String>,
    pub inferences: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub id: i64,
    pub model: String,
    pub version: u64,
    pub cohort: String,
    pub signal: String,
    pub metrics: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub windows: u32,
    pub first_window: i64,
    pub last_window: i64,
    pub state: String,
    pub raised: i64,
    pub resolved: Option<i64>,
}

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
    /// `flotilla_rollout::Plan` and `RolloutState` as JSON.
    pub plan: Option<String>,
    pub engine: Option<String>,
    pub reason: Option<String>,
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

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub role: String,
    pub name: String,
    pub created: i64,
    pub last_used: Option<i64>,
}

const TOKEN_COLUMNS: &str = "id, role, name, created, last_used";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow { id: r.get(0)?, role: r.get(1)?, name: r.get(2)?, created: r.get(3)?, last_used: r.get(4)? })
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    latency: Latency,
}

/// Upper bounds (seconds) of the store latency histogram's buckets.
const LATENCY_BOUNDS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// How long store operations take (lock wait included), for `/metrics`.
#[derive(Debug, Default)]
struct Latency {
    buckets: [std::sync::atomic::AtomicU64; 9],
    count: std::sync::atomic::AtomicU64,
    sum_ns: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path).with_context(|| format!("opening store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(certs::SCHEMA)?;
        add_column(&conn, "devices", "root_version", "INTEGER")?;
        // Tags set on the server (`flotilla devices tag`); they win over the device's own.
        add_column(&conn, "devices", "server_tags", "TEXT NOT NULL DEFAULT '{}'")?;
        // The rollout engine's plan and state (JSON), persisted after every step.
        add_column(&conn, "rollouts", "plan", "TEXT")?;
        add_column(&conn, "rollouts", "engine", "TEXT")?;
        add_column(&conn, "rollouts", "reason", "TEXT")?;
        // The reporting device's cohort when the report arrived (count windows form per cohort).
        add_column(&conn, "drift_reports", "cohort", "TEXT")?;
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS drift_reports_by_cohort ON drift_reports (model, version, cohort, bucket)",
        )?;
        Ok(Store { conn: Mutex::new(conn), latency: Latency::default() })
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

    /// The latency histogram: (upper bound, operations in that bucket alone), the count of all
    /// operations and their total seconds.
    pub fn latency(&self) -> (Vec<(f64, u64)>, u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let b = LATENCY_BOUNDS.iter().zip(&self.latency.buckets).map(|(&le, n)| (le, n.load(Relaxed))).collect();
        (b, self.latency.count.load(Relaxed), self.latency.sum_ns.load(Relaxed) as f64 / 1e9)
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
            let mut st =
                c.prepare("SELECT id, online, last_seen, hello, models, tags, server_tags FROM devices ORDER BY id")?;
            st.query_map([], device_row)?.collect()
        })
    }

    pub fn device(&self, id: &str) -> anyhow::Result<Option<DeviceRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT id, online, last_seen, hello, models, tags, server_tags FROM devices WHERE id = ?1",
                [id],
                device_row,
            )
            .optional()
        })
    }

    /// Set (`Some`) or remove (`None`) server-side tags of a device; false if it is unknown.
    pub fn set_server_tags(&self, id: &str, changes: &[(String, Option<String>)]) -> anyhow::Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let cur: Option<String> =
                tx.query_row("SELECT server_tags FROM devices WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            let Some(cur) = cur else { return Ok(false) };
            let mut tags: std::collections::BTreeMap<String, Option<String>> =
                serde_json::from_str(&cur).unwrap_or_default();
            for (k, v) in changes {
                tags.insert(k.clone(), v.clone());
            }
            let json = serde_json::to_string(&tags).unwrap_or_else(|_| "{}".into());
            tx.execute("UPDATE devices SET server_tags = ?2 WHERE id = ?1", params![id, json])?;
            tx.commit()?;
            Ok(true)
        })
    }

    // ---- drift ----

    /// Store a report once (false when this message was stored before).
    pub fn add_drift_report(
        &self,
        device: &str,
        msg_id: &str,
        model: &str,
        r: &DriftReportRow,
        now: i64,
    ) -> anyhow::Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO drift_reports (device_id, msg_id, model, version, window_start, window_end,
                 bucket, inferences, signals, received, cohort) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    device,
                    msg_id,
                    model,
                    r.version as i64,
                    r.window_start,
                    r.window_end,
                    r.bucket,
                    r.inferences as i64,
                    r.signals,
                    now,
                    r.cohort
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// Reports of a model (one version or all), from `since_bucket` on, oldest first.
    pub fn drift_reports(
        &self,
        model: &str,
        version: Option<u64>,
        since_bucket: i64,
    ) -> anyhow::Result<Vec<DriftReportRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, window_start, window_end, bucket, inferences, signals, cohort
                 FROM drift_reports WHERE model = ?1 AND (?2 IS NULL OR version = ?2) AND bucket >= ?3
                 ORDER BY bucket, seq",
            )?;
            st.query_map(params![model, version.map(|v| v as i64), since_bucket], |r| {
                Ok(DriftReportRow {
                    device_id: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    window_start: r.get(2)?,
                    window_end: r.get(3)?,
                    bucket: r.get(4)?,
                    inferences: r.get::<_, i64>(5)? as u64,
                    signals: r.get(6)?,
                    cohort: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                })
            })?
            .collect()
        })
    }

    /// The newest count window of a cohort of a model version, if it has one.
    pub fn drift_open_window(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
    ) -> anyhow::Result<Option<OpenDriftWindow>> {
        self.with(|c| {
            let Some(bucket) = c.query_row(
                "SELECT MAX(bucket) FROM drift_reports WHERE model = ?1 AND version = ?2 AND cohort = ?3",
                params![model, version as i64, cohort],
                |r| r.get::<_, Option<i64>>(0),
            )?
            else {
                return Ok(None);
            };
            let mut st = c.prepare(
                "SELECT device_id, SUM(inferences) FROM drift_reports
                 WHERE model = ?1 AND version = ?2 AND cohort = ?3 AND bucket = ?4 GROUP BY device_id",
            )?;
            let mut w = OpenDriftWindow { bucket, devices: Vec::new(), inferences: 0 };
            for row in st.query_map(params![model, version as i64, cohort, bucket], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })? {
                let (device, n) = row?;
                w.devices.push(device);
                w.inferences += n as u64;
            }
            Ok(Some(w))
        })
    }

    /// The `n`-th most recent bucket of one cohort's reports of a model version (0 = the latest).
    pub fn drift_cohort_bucket_back(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        n: u32,
    ) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = ?1 AND version = ?2 AND cohort = ?3
                 ORDER BY bucket DESC LIMIT 1 OFFSET ?4",
                params![model, version as i64, cohort, n],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// The `n`-th most recent bucket with reports of a model version (0 = the latest).
    pub fn drift_bucket_back(&self, model: &str, version: u64, n: u32) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = ?1 AND version = ?2
                 ORDER BY bucket DESC LIMIT 1 OFFSET ?3",
                params![model, version as i64, n],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Models (name, version) with drift reports.
    pub fn drift_models(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT DISTINCT model, version FROM drift_reports ORDER BY model, version")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect()
        })
    }

    pub fn firing_alert(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        signal: &str,
    ) -> anyhow::Result<Option<AlertRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE model = ?1 AND version = ?2 AND cohort = ?3
                     AND signal = ?4 AND state = 'firing'"
                ),
                params![model, version as i64, cohort, signal],
                alert_row,
            )
            .optional()
        })
    }

    pub fn raise_alert(&self, a: &AlertRow) -> anyhow::Result<i64> {
        self.with(|c| {
            c.execute(
                "INSERT INTO drift_alerts (model, version, cohort, signal, metrics, value, threshold, windows,
                 first_window, last_window, state, raised) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'firing', ?11)",
                params![
                    a.model,
                    a.version as i64,
                    a.cohort,
                    a.signal,
                    a.metrics,
                    a.value,
                    a.threshold,
                    a.windows,
                    a.first_window,
                    a.last_window,
                    a.raised
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// A firing alert saw another window over its threshold.
    pub fn extend_alert(&self, id: i64, windows: u32, last_window: i64, value: Option<f64>) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE drift_alerts SET windows = ?2, last_window = ?3, value = ?4 WHERE id = ?1",
                params![id, windows, last_window, value],
            )
        })?;
        Ok(())
    }

    pub fn resolve_alert(&self, id: i64, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute("UPDATE drift_alerts SET state = 'resolved', resolved = ?2 WHERE id = ?1", params![id, now])
        })?;
        Ok(())
    }

    /// Alerts, newest first; only firing ones unless `all`.
    pub fn alerts(&self, all: bool) -> anyhow::Result<Vec<AlertRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE ?1 OR state = 'firing' ORDER BY id DESC"
            ))?;
            st.query_map([all], alert_row)?.collect()
        })
    }

    // ---- API tokens and settings ----

    pub fn add_token(&self, id: &str, hash: &str, role: &str, name: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, hash, role, name, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, hash, role, name, now],
            )
        })?;
        Ok(())
    }

    /// The token with this hash (its secret is not kept), marking it used.
    pub fn token_by_hash(&self, hash: &str, now: i64) -> anyhow::Result<Option<TokenRow>> {
        self.with(|c| {
            let found = c
                .query_row(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1"), [hash], token_row)
                .optional()?;
            if let Some(t) = &found {
                c.execute("UPDATE tokens SET last_used = ?2 WHERE id = ?1", params![t.id, now])?;
            }
            Ok(found)
        })
    }

    /// Every token (never the secret, which is not kept).
    pub fn tokens(&self) -> anyhow::Result<Vec<TokenRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created, id"))?;
            st.query_map([], token_row)?.collect()
        })
    }

    pub fn delete_token(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.with(|c| c.execute("DELETE FROM tokens WHERE id = ?1", [id]))? > 0)
    }

    // ---- device credentials ----

    /// Enroll (or re-enroll) a device's broker password hash; returns the enrollment time.
    pub fn set_device_credential(&self, device: &str, password_sha256: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO device_credentials (device_id, password_sha256, created) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET password_sha256 = ?2, created = ?3",
                params![device, password_sha256, now],
            )
            .map(|_| ())
        })
    }

    /// Forget a device's credential; false when it had none.
    pub fn delete_device_credential(&self, device: &str) -> anyhow::Result<bool> {
        self.with(|c| c.execute("DELETE FROM device_credentials WHERE device_id = ?1", [device]).map(|n| n > 0))
    }

    /// Every enrolled device: (id, password SHA-256 hex, created).
    pub fn device_credentials(&self) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT device_id, password_sha256, created FROM device_credentials")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    pub fn setting(&self, key: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional())
    }

    /// Store `value` unless the key has one; returns the stored value either way.
    pub fn setting_or_insert(&self, key: &str, value: &str) -> anyhow::Result<String> {
        self.with(|c| {
            c.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?1, ?2)", params![key, value])?;
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0))
        })
    }

    // ---- retraining ----

    pub fn set_retrain_policy(&self, model: &str, policy_json: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO retrain_policies (model, policy, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT (model) DO UPDATE SET policy = ?2, updated = ?3",
                params![model, policy_json, now],
            )
        })?;
        Ok(())
    }

    pub fn delete_retrain_policy(&self, model: &str) -> anyhow::Result<bool> {
        Ok(self.with(|c| c.execute("DELETE FROM retrain_policies WHERE model = ?1", [model]))? > 0)
    }

    /// Every policy as JSON, by model.
    pub fn retrain_policies(&self) -> anyhow::Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT policy FROM retrain_policies ORDER BY model")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
    }

    /// Insert or replace a job (its JSON document, with the columns queries use).
    pub fn save_retrain_job(
        &self,
        id: &str,
        model: &str,
        state: &str,
        created: i64,
        job_json: &str,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO retrain_jobs (id, model, state, created, job) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET state = ?3, job = ?5",
                params![id, model, state, created, job_json],
            )
        })?;
        Ok(())
    }

    /// Jobs as JSON, newest first.
    pub fn retrain_jobs(&self) -> anyhow::Result<Vec<String>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT job FROM retrain_jobs ORDER BY created DESC, rowid DESC")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
    }

    pub fn retrain_job(&self, id: &str) -> anyhow::Result<Option<String>> {
        self.with(|c| c.query_row("SELECT job FROM retrain_jobs WHERE id = ?1", [id], |r| r.get(0)).optional())
    }

    // ---- health ----

    /// The latest health report of a device for a model version (older ones are replaced).
    #[allow(clippy::too_many_arguments)]
    pub fn set_health(
        &self,
        device: &str,
        model: &str,
        version: u64,
        inferences: u64,
        errors: u64,
        latency_p95_us: Option<u64>,
        accelerator_fallback: bool,
        backend: &str,
        at: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO health (device_id, model, version, inferences, errors, latency_p95_us, accelerator_fallback, backend, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(device_id, model, version) DO UPDATE SET inferences = ?4, errors = ?5,
                 latency_p95_us = ?6, accelerator_fallback = ?7, backend = ?8, at = ?9",
                params![
                    device,
                    model,
                    version as i64,
                    inferences as i64,
                    errors as i64,
                    latency_p95_us.map(|v| v as i64),
                    accelerator_fallback,
                    backend,
                    at
                ],
            )
        })?;
        Ok(())
    }

    /// Every device's latest health for each version of a model, newest version first per device.
    pub fn health(&self, model: &str) -> anyhow::Result<Vec<HealthRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, inferences, errors, latency_p95_us, accelerator_fallback FROM health
                 WHERE model = ?1 ORDER BY device_id, version DESC",
            )?;
            st.query_map([model], |r| {
                Ok(HealthRow {
                    device: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    inferences: r.get::<_, i64>(2)? as u64,
                    errors: r.get::<_, i64>(3)? as u64,
                    latency_p95_us: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                    accelerator_fallback: r.get(5)?,
                })
            })?
            .collect()
        })
    }

    // ---- reservoir samples ----

    pub fn add_sample_upload(&self, upload_id: &str, device: &str, model: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO sample_uploads (upload_id, device_id, model, requested) VALUES (?1, ?2, ?3, ?4)",
                params![upload_id, device, model, now],
            )
        })?;
        Ok(())
    }

    /// Store one part of an upload (samples replace earlier copies: feedback labels may have
    /// arrived since). Parts of unknown uploads are refused (false).
    #[allow(clippy::too_many_arguments)]
    pub fn add_sample_part(
        &self,
        device: &str,
        upload_id: &str,
        model: &str,
        version: u64,
        samples: &[(String, i64, Vec<u8>)],
        last: bool,
        now: i64,
    ) -> anyhow::Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let known = tx
                .query_row(
                    "SELECT 1 FROM sample_uploads WHERE upload_id = ?1 AND device_id = ?2 AND model = ?3",
                    params![upload_id, device, model],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !known {
                return Ok(false);
            }
            for (id, ts, body) in samples {
                tx.execute(
                    "INSERT OR REPLACE INTO samples (device_id, model, version, sample_id, upload_id, ts, body, received)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![device, model, version as i64, id, upload_id, ts, body, now],
                )?;
            }
            tx.execute(
                "UPDATE sample_uploads SET parts = parts + 1, samples = samples + ?3, done = done OR ?4
                 WHERE upload_id = ?1 AND device_id = ?2",
                params![upload_id, device, samples.len() as i64, last],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// (device, parts, samples, done) per device asked in an upload.
    pub fn sample_upload(&self, upload_id: &str) -> anyhow::Result<Vec<(String, u32, u64, bool)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, parts, samples, done FROM sample_uploads WHERE upload_id = ?1 ORDER BY device_id",
            )?;
            st.query_map([upload_id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?)))?.collect()
        })
    }

    /// (device, version, body) of a model's stored samples, oldest first.
    pub fn samples(&self, model: &str, version: Option<u64>) -> anyhow::Result<Vec<(String, u64, Vec<u8>)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, body FROM samples WHERE model = ?1 AND (?2 IS NULL OR version = ?2)
                 ORDER BY ts, device_id, sample_id",
            )?;
            st.query_map(params![model, version.map(|v| v as i64)], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?
            .collect()
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
    pub fn create_rollout(
        &self,
        id: &str,
        bundle_id: &str,
        plan_json: &str,
        engine_json: &str,
        now: i64,
    ) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO rollouts (id, bundle_id, state, created, plan, engine) VALUES (?1, ?2, 'pending', ?3, ?4, ?5)",
                params![id, bundle_id, now, plan_json, engine_json],
            )
        })?;
        Ok(())
    }

    /// The engine decided to offer the bundle to a device (idempotent).
    pub fn add_rollout_device(&self, rollout_id: &str, device: &str, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO rollout_devices (rollout_id, device_id, offer_id, state, updated)
                 VALUES (?1, ?2, ?3, 'pending', ?4)",
                params![rollout_id, device, format!("{rollout_id}/{device}"), now],
            )
        })?;
        Ok(())
    }

    /// Persist a step of the engine.
    pub fn save_rollout(&self, id: &str, state: &str, reason: Option<&str>, engine_json: &str) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE rollouts SET state = ?2, reason = ?3, engine = ?4 WHERE id = ?1",
                params![id, state, reason, engine_json],
            )
        })?;
        Ok(())
    }

    pub fn rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("1 = 1", params![])
    }

    /// Rollouts the driver steps: not yet finished, and rolled back ones (devices that come back
    /// online still get the previous version).
    pub fn active_rollouts(&self) -> anyhow::Result<Vec<RolloutRow>> {
        self.rollouts_where("state IN ('pending', 'running', 'rolled_back')", params![])
    }

    pub fn rollout(&self, id: &str) -> anyhow::Result<Option<RolloutRow>> {
        Ok(self.rollouts_where("id = ?1", params![id])?.pop())
    }

    fn rollouts_where(&self, cond: &str, p: &[&dyn rusqlite::ToSql]) -> anyhow::Result<Vec<RolloutRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT id, bundle_id, state, created, plan, engine, reason FROM rollouts WHERE {cond} ORDER BY created, rowid"
            ))?;
            st.query_map(p, |r| {
                Ok(RolloutRow {
                    id: r.get(0)?,
                    bundle_id: r.get(1)?,
                    state: r.get(2)?,
                    created: r.get(3)?,
                    plan: r.get(4)?,
                    engine: r.get(5)?,
                    reason: r.get(6)?,
                })
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

/// The device's own tags with the server's on top (a server value of "" removes a tag).
fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    let own: String = r.get(5)?;
    let server: String = r.get(6)?;
    let mut tags: std::collections::BTreeMap<String, String> = serde_json::from_str(&own).unwrap_or_default();
    let over: std::collections::BTreeMap<String, Option<String>> = serde_json::from_str(&server).unwrap_or_default();
    for (k, v) in over {
        match v {
            Some(v) => tags.insert(k, v),
            None => tags.remove(&k),
        };
    }
    Ok(DeviceRow {
        id: r.get(0)?,
        online: r.get(1)?,
        last_seen: r.get(2)?,
        hello: r.get(3)?,
        models: r.get(4)?,
        tags: serde_json::to_string(&tags).unwrap_or_else(|_| "{}".into()),
    })
}

fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AlertRow> {
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

const ALERT_COLUMNS: &str = "id, model, version, cohort, signal, metrics, value, threshold, windows, first_window, \
     last_window, state, raised, resolved";

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
        s.create_rollout("r1", "b1", "{}", "{}", 3).unwrap();
        s.add_rollout_device("r1", "a", 3).unwrap();
        s.add_rollout_device("r1", "a", 4).unwrap();
        s.mark_offered("r1/a", 4).unwrap();
        s.offer_progress("r1/a", "succeeded", None, 5).unwrap();
        s.offer_progress("r1/a", "downloading", None, 6).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let rd = s.rollout_devices("r1").unwrap();
        assert_eq!((rd.len(), rd[0].state.as_str()), (1, "succeeded"));
        s.save_rollout("r1", "paused", Some("why"), "{\"x\":1}").unwrap();
        let r = s.rollout("r1").unwrap().unwrap();
        assert_eq!(
            (r.state.as_str(), r.reason.as_deref(), r.engine.as_deref()),
            ("paused", Some("why"), Some("{\"x\":1}"))
        );
        assert!(s.active_rollouts().unwrap().is_empty());
        assert_eq!(s.bundle_by_name("m", 1).unwrap().unwrap().signers, vec!["k".to_string()]);
        assert!(s.add_event("a", "m1", 1, "k", "{}").unwrap());
        assert!(!s.add_event("a", "m1", 1, "k", "{}").unwrap());
    }
}
