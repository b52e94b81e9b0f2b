//! The PostgreSQL store, for several servers sharing one database: a pool of connections
//! (deadpool, tokio-postgres), the schema from `migrations/postgres/NNNN_*.sql` applied at
//! connect, each migration once. Each area's trait is implemented in its own file, with the
//! same semantics as [`super::sqlite`]; what several replicas could race on is decided by the
//! database (compare-and-swap updates, `ON CONFLICT`, row and advisory locks), never by a
//! read in one statement and a write in another.
//!
//! The URL is libpq's (`postgres://user:pass@host:port/db?connect_timeout=5`). Without
//! `sslmode` (or with `disable`, `allow` or `prefer`) it speaks plain TCP; `sslmode=require`
//! (or `verify-ca`, `verify-full`) speaks TLS through rustls, verifying the server's
//! certificate and name against the platform's roots, or against the PEM file
//! `sslrootcert=PATH` names: always `verify-full`, stricter than libpq's `require`.
//!
//! A store call never waits long: connecting gives up after `connect_timeout` (5 s unless the
//! URL says), a statement after `statement_timeout` (15 s), a wait for a pooled connection
//! after 5 s, and a whole call after [`OP_TIMEOUT`]. When the database is down, calls fail
//! with an error; once it is back, the pool connects anew by itself.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Row;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;

use super::Latency;

mod auth;
mod bundles;
mod certs;
mod devices;
mod drift;
mod leases;
mod retrain;
mod rollouts;
mod rows;
mod samples;
mod trust;

use rows::*;

/// The schema's migrations, in order: (version, SQL). Each is applied once, in one
/// transaction that records it in `schema_migrations`. A new file in `migrations/postgres`
/// goes here too (a test checks that every file is listed).
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "0001_init.sql", include_str!("../../../migrations/postgres/0001_init.sql"))];

/// The advisory lock (one bigint key) held while migrating, so replicas starting together
/// apply each migration once: "flotilla" in ASCII.
const MIGRATION_LOCK: i64 = 0x666c_6f74_696c_6c61;

/// Connections in the pool.
const POOL_SIZE: usize = 16;
/// The longest any store call takes before it fails.
pub const OP_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_WAIT: Duration = Duration::from_secs(5);
const STATEMENT_TIMEOUT_MS: u32 = 15_000;

/// The PostgreSQL store. Cheap to share: every call takes a pooled connection.
pub struct Postgres {
    pool: Pool,
    latency: Histogram,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").field("pool", &self.pool.status()).finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connect to the database at `url` (libpq's URL or key=value form), and bring its schema
    /// up to date.
    pub async fn connect(url: &str) -> anyhow::Result<Postgres> {
        let (url, root_cert) = take_param(url, "sslrootcert");
        let (url, ssl_mode) = take_param(&url, "sslmode");
        let tls_required = match ssl_mode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => false,
            Some("require" | "verify-ca" | "verify-full") => true,
            Some(other) => bail!("sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"),
        };
        let mut config: tokio_postgres::Config = url.parse().context("parsing the PostgreSQL URL")?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        #[cfg(target_os = "linux")]
        if config.get_tcp_user_timeout().is_none() {
            // Unacknowledged writes fail after this long (a dead server or network).
            config.tcp_user_timeout(Duration::from_secs(15));
        }
        if config.get_application_name().is_none() {
            config.application_name("flotilla-server");
        }
        let mut options = config.get_options().unwrap_or_default().to_string();
        if !options.contains("statement_timeout") {
            options.push_str(&format!(" -c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        }
        if !options.contains("idle_in_transaction_session_timeout") {
            options.push_str(" -c idle_in_transaction_session_timeout=60000");
        }
        config.options(options.trim());
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        // libpq's `prefer` (its default) would try TLS without verifying: plain TCP unless required.
        let manager = if tls_required {
            config.ssl_mode(SslMode::Require);
            Manager::from_config(config, tls(root_cert.as_deref())?, manager_config)
        } else {
            config.ssl_mode(SslMode::Disable);
            Manager::from_config(config, tokio_postgres::NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .context("building the PostgreSQL pool")?;
        let store = Postgres { pool, latency: Histogram::default() };
        store.migrate().await?;
        Ok(store)
    }

    /// Apply the migrations the database has not seen, each in its own transaction under
    /// [`MIGRATION_LOCK`] (which every replica takes, so none applies one twice or sees a
    /// half-made schema).
    async fn migrate(&self) -> anyhow::Result<()> {
        let mut c = self.pool.get().await.context("connecting to PostgreSQL")?;
        for &(version, file, sql) in MIGRATIONS {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY, applied BIGINT)")
                .await?;
            let done = tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[&version]).await?;
            if done.is_some() {
                continue; // the transaction rolls back, releasing the lock
            }
            tx.batch_execute(sql).await.with_context(|| format!("applying migration {file}"))?;
            tx.execute("INSERT INTO schema_migrations (version, applied) VALUES ($1, $2)", &[&version, &now_ms()])
                .await?;
            tx.commit().await.with_context(|| format!("committing migration {file}"))?;
            tracing::info!(migration = file, "PostgreSQL schema migrated");
        }
        Ok(())
    }

    /// Run `f` on a pooled connection, timed for the latency histogram, within [`OP_TIMEOUT`].
    async fn with<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(Object) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let start = Instant::now();
        let run = async {
            let c = self.pool.get().await.context("PostgreSQL store")?;
            f(c).await
        };
        let r = match tokio::time::timeout(OP_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("PostgreSQL store: no answer within {OP_TIMEOUT:?}")),
        };
        self.latency.record(start.elapsed());
        r
    }
}

#[async_trait::async_trait]
impl super::Store for Postgres {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.with(|c| async move {
            c.simple_query("SELECT 1").await?;
            Ok(())
        })
        .await
    }

    fn latency(&self) -> Latency {
        self.latency.snapshot()
    }
}

/// Remove `key=value` from a URL's query string (or a key=value connection string), for the
/// parameters tokio-postgres does not know; returns the rest and the value.
fn take_param(url: &str, key: &str) -> (String, Option<String>) {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None) };
        let mut value = None;
        let rest: Vec<&str> = query
            .split('&')
            .filter(|p| match p.split_once('=') {
                Some((k, v)) if k == key => {
                    value = Some(v.to_string());
                    false
                }
                _ => true,
            })
            .collect();
        let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
        (url, value)
    } else {
        let mut value = None;
        let rest: Vec<&str> = url
            .split_whitespace()
            .filter(|p| match p.split_once('=') {
                Some((k, v)) if k == key => {
                    value = Some(v.to_string());
                    false
                }
                _ => true,
            })
            .collect();
        (rest.join(" "), value)
    }
}

/// rustls on ring, verifying the server against `root_cert` (a PEM file) or the platform's roots.
fn tls(root_cert: Option<&str>) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading sslrootcert {path}"))? {
                roots.add(cert.with_context(|| format!("parsing sslrootcert {path}"))?)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        bail!("sslmode=require: no root certificates to verify the server with (set sslrootcert=PATH)");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Upper bounds (seconds) of the store latency histogram's buckets (as SQLite's).
const LATENCY_BOUNDS: [f64; 9] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// How long store operations take (pool wait included), for `/metrics`.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; 9],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn record(&self, took: Duration) {
        if let Some(i) = LATENCY_BOUNDS.iter().position(|&b| took.as_secs_f64() <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    fn snapshot(&self) -> Latency {
        let buckets = LATENCY_BOUNDS.iter().zip(&self.buckets).map(|(&le, n)| (le, n.load(Relaxed))).collect();
        Latency { buckets, count: self.count.load(Relaxed), seconds: self.sum_ns.load(Relaxed) as f64 / 1e9 }
    }
}

// Statements through each connection's statement cache (parsed and planned once per connection).

pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

pub(super) async fn execute(c: &impl GenericClient, sql: &str, p: &Params<'_>) -> anyhow::Result<u64> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, p).await?)
}

pub(super) async fn query(c: &impl GenericClient, sql: &str, p: &Params<'_>) -> anyhow::Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, p).await?)
}

pub(super) async fn query_opt(c: &impl GenericClient, sql: &str, p: &Params<'_>) -> anyhow::Result<Option<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, p).await?)
}

/// Rows through a parser.
pub(super) fn parse<T>(rows: Vec<Row>, f: impl Fn(&Row) -> anyhow::Result<T>) -> anyhow::Result<Vec<T>> {
    rows.iter().map(f).collect()
}

// BIGINT is i64: the rows' u64s and u32s convert with a check, not a wrap.

pub(super) fn big(v: u64) -> anyhow::Result<i64> {
    i64::try_from(v).map_err(|_| anyhow!("{v} is too large for PostgreSQL's BIGINT"))
}

pub(super) fn unsigned(v: i64) -> anyhow::Result<u64> {
    u64::try_from(v).map_err(|_| anyhow!("stored value {v} is negative where a count or version was expected"))
}

pub(super) fn unsigned32(v: i64) -> anyhow::Result<u32> {
    u32::try_from(v).map_err(|_| anyhow!("stored value {v} does not fit a u32"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in migrations/postgres is embedded, in order, numbered as its name says.
    #[test]
    fn every_migration_file_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.1.to_string()).collect();
        assert_eq!(files, listed);
        for (i, (version, file, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(file.starts_with(&format!("{version:04}_")), "{file}");
            assert_eq!(*sql, std::fs::read_to_string(dir.join(file)).unwrap());
        }
    }

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        assert_eq!(
            take_param("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem", "sslrootcert"),
            ("postgres://u@h/db?sslmode=require".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(
            take_param("postgres://u@h/db?sslrootcert=x", "sslrootcert"),
            ("postgres://u@h/db".into(), Some("x".into()))
        );
        assert_eq!(take_param("postgres://u@h/db", "sslrootcert"), ("postgres://u@h/db".into(), None));
        assert_eq!(
            take_param("host=h sslrootcert=/ca.pem dbname=x", "sslrootcert"),
            ("host=h dbname=x".into(), Some("/ca.pem".into()))
        );
    }

    #[test]
    fn integers_convert_with_a_check() {
        assert_eq!(big(i64::MAX as u64).unwrap(), i64::MAX);
        assert!(big(u64::MAX).is_err());
        assert!(unsigned(-1).is_err());
        assert_eq!(unsigned32(7).unwrap(), 7);
        assert!(unsigned32(1 << 40).is_err());
    }
}
