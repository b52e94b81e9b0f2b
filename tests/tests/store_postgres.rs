//! The PostgreSQL store (`flotilla_server::store::postgres`) against a cluster of the test's own
//! (`start_postgres`): the conformance suite SQLite passes, every call giving what SQLite gives,
//! what only several replicas on one database can show (racing compare-and-swaps, job opens,
//! leases, claims and migrations), and an outage (calls fail quickly while the database is
//! down, and work again after it without reconnecting by hand).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flotilla_server::store::conformance::{self, Opener};
use flotilla_server::store::postgres::Postgres;
use flotilla_server::store::sqlite::Sqlite;
use flotilla_server::store::*;
use flotilla_tests::start_postgres;

async fn connect(url: &str) -> Postgres {
    Postgres::connect(url).await.unwrap_or_else(|e| panic!("connecting to {url}: {e:#}"))
}

/// Every check of the suite, each on a database of its own in one cluster; each `open` is a
/// new store (a new pool) on that database, as a restarted server or another replica would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let n = AtomicU32::new(0);
    let started = Instant::now();
    conformance::all(|| {
        let url = pg.create_database(&format!("conformance_{}", n.fetch_add(1, Ordering::Relaxed)));
        async move {
            let open: Opener = Box::new(move || {
                let url = url.clone();
                Box::pin(async move { Arc::new(connect(&url).await) as Arc<dyn Store> })
            });
            open
        }
    })
    .await;
    eprintln!("conformance: {} checks in {:?}", n.load(Ordering::Relaxed), started.elapsed());
    // One database per check, and every check ran (the suite grows; it had 8 when this was written).
    assert!(n.load(Ordering::Relaxed) >= 8);
}

/// Every call of every store trait, the same sequence on SQLite and on PostgreSQL: the answers
/// are the same (what the conformance suite does not reach: tags, health, drift, alerts,
/// samples, tokens, settings, roots, certificates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_as_sqlite_does() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let sqlite = Sqlite::open(&dir.path().join("fleet.db")).unwrap();
    let postgres = connect(&pg.create_database("differential")).await;
    let (a, b) = (exercise(&sqlite).await, exercise(&postgres).await);
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a, b, "SQLite (left) and PostgreSQL (right) differ");
    }
    assert!(a.len() > 60, "{}", a.len());
    assert_eq!((sqlite.backend(), postgres.backend()), ("sqlite", "postgres"));
    let latency = postgres.latency();
    assert!(latency.count as usize >= a.len(), "{latency:?}");
    assert_eq!(latency.buckets.len(), sqlite.latency().buckets.len());

    // BIGINT is i64: a u64 beyond it is refused, not wrapped.
    let mut huge = bundle("b-huge", "huge", 1);
    huge.size = u64::MAX;
    assert!(postgres.insert_bundle(&huge).await.is_err());
    huge.size = i64::MAX as u64;
    postgres.insert_bundle(&huge).await.unwrap();
    assert_eq!(postgres.bundle("b-huge").await.unwrap().unwrap().size, i64::MAX as u64);
}

fn bundle(id: &str, name: &str, version: u64) -> BundleRow {
    BundleRow {
        id: id.into(),
        name: name.into(),
        version,
        size: 10,
        manifest_sha256: "x".into(),
        signers: vec!["k1".into(), "k2".into()],
        created: 1,
        pushed: 2,
        head: vec![1, 2, 3],
    }
}

/// Call everything once (or more), recording each answer.
async fn exercise(s: &dyn Store) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    macro_rules! rec {
        ($e:expr) => {
            out.push(format!("{}: {:?}", stringify!($e), $e.await.unwrap()))
        };
    }
    // Devices, tags, health, events.
    let hello = HelloRecord {
        agent_version: Some("1.2".into()),
        arch: Some("aarch64".into()),
        cores: Some(4),
        memory_bytes: Some(1 << 33),
        runtimes: vec!["tract".into()],
        ..Default::default()
    };
    let tags: flotilla_proto::tags::Tags = [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into();
    rec!(s.device_hello("d1", &hello, &tags, 1));
    rec!(s.device_hello("d2", &HelloRecord::default(), &Default::default(), 2));
    let models = vec![ModelRecord {
        name: "m".into(),
        version: 3,
        backend: "tract".into(),
        status: "active".into(),
        model_sha256: Some("ab".into()),
        delegated_nodes: None,
        cpu_nodes: Some(7),
        self_test: None,
        self_test_median_us: Some(u64::from(u32::MAX) + 1),
    }];
    rec!(s.device_state("d1", true, Some(&models), 5));
    rec!(s.device_state("d1", false, None, 6));
    rec!(s.device_state("d3", false, None, 7));
    rec!(s.set_server_tags("d1", &[("b".into(), None), ("c".into(), Some("3".into()))]));
    rec!(s.set_server_tags("d1", &[("c".into(), Some("4".into()))]));
    rec!(s.set_server_tags("nope", &[("c".into(), Some("4".into()))]));
    rec!(s.devices());
    rec!(s.devices_page(None, 2));
    rec!(s.devices_page(Some("d1"), 2));
    rec!(s.devices_page(Some("d3"), 2));
    rec!(s.device("d1"));
    rec!(s.device("zz"));
    rec!(s.set_health("d1", "m", 3, 100, 2, Some(900), true, "tract", 10));
    rec!(s.set_health("d1", "m", 3, 150, 3, None, false, "tract", 11));
    rec!(s.set_health("d1", "m", 2, 5, 0, Some(1), false, "tract", 11));
    rec!(s.set_health("d2", "m", 3, 7, 0, Some(2), false, "tract", 12));
    rec!(s.health("m"));
    rec!(s.health("other"));
    rec!(s.add_event("d1", "e1", 100, "boot", "{\"x\":1}"));
    rec!(s.add_event("d1", "e1", 100, "boot", "{\"x\":1}"));
    rec!(s.add_event("d2", "e1", 101, "boot", "{}"));
    rec!(s.add_event("d1", "e2", 102, "crash", "{}"));
    rec!(s.events(Some("d1"), None, 10));
    rec!(s.events(None, None, 2));
    rec!(s.prune_events(101));
    rec!(s.events(None, None, 10));
    rec!(s.set_device_root_version("d1", 4));
    rec!(s.device_root_version("d1"));
    rec!(s.device_root_version("d2"));
    rec!(s.device_root_version("zz"));

    // Drift reports and alerts.
    let report = |device: &str, version: u64, bucket: i64, inferences: u64, cohort: &str| DriftReportRow {
        device_id: device.into(),
        version,
        window_start: bucket - 10,
        window_end: bucket,
        bucket,
        inferences,
        signals: vec![0xa0, bucket as u8],
        cohort: cohort.into(),
    };
    rec!(s.add_drift_report("d1", "r1", "m", &report("d1", 3, 1000, 50, "eu"), 1));
    rec!(s.add_drift_report("d1", "r1", "m", &report("d1", 3, 1000, 50, "eu"), 1));
    rec!(s.add_drift_report("d1", "r2", "m", &report("d1", 3, 2000, 60, "eu"), 2));
    rec!(s.add_drift_report("d1", "r3", "m", &report("d1", 3, 2000, 5, "eu"), 2));
    rec!(s.add_drift_report("d2", "r1", "m", &report("d2", 3, 2000, 70, "eu"), 3));
    rec!(s.add_drift_report("d2", "r2", "m", &report("d2", 3, 3000, 80, "us"), 4));
    rec!(s.add_drift_report("d2", "r3", "m", &report("d2", 2, 3000, 1, "us"), 5));
    rec!(s.drift_reports("m", None, 0));
    rec!(s.drift_reports("m", Some(3), 2000));
    rec!(s.drift_open_window("m", 3, "eu"));
    rec!(s.drift_open_window("m", 3, "asia"));
    rec!(s.drift_cohort_bucket_back("m", 3, "eu", 0));
    rec!(s.drift_cohort_bucket_back("m", 3, "eu", 1));
    rec!(s.drift_cohort_bucket_back("m", 3, "eu", 2));
    rec!(s.drift_bucket_back("m", 3, 0));
    rec!(s.drift_bucket_back("m", 3, 2));
    rec!(s.drift_models());
    let alert = AlertRow {
        id: 0,
        model: "m".into(),
        version: 3,
        cohort: "eu".into(),
        signal: "input0".into(),
        metrics: "{\"psi\":0.4}".into(),
        value: Some(0.4),
        threshold: Some(0.2),
        windows: 1,
        first_window: 1000,
        last_window: 1000,
        state: "firing".into(),
        raised: 9,
        resolved: None,
    };
    rec!(s.raise_alert(&alert));
    rec!(s.raise_alert(&AlertRow { cohort: "us".into(), value: None, ..alert.clone() }));
    rec!(s.firing_alert("m", 3, "eu", "input0"));
    rec!(s.extend_alert(1, 2, 2000, Some(0.5)));
    rec!(s.resolve_alert(2, 20));
    rec!(s.alerts(false));
    rec!(s.alerts(true));
    rec!(s.firing_alert("m", 3, "us", "input0"));
    rec!(s.prune_drift_reports(3));
    rec!(s.drift_reports("m", None, 0));

    // Tokens, credentials, settings.
    rec!(s.add_token("t1", "h1", "admin", "ops", 5));
    rec!(s.add_token("t2", "h2", "read", "ci", 6));
    rec!(s.token_by_hash("h1", 7));
    rec!(s.token_by_hash("h1", 8));
    rec!(s.token_by_hash("nope", 8));
    rec!(s.tokens());
    rec!(s.delete_token("t2"));
    rec!(s.delete_token("t2"));
    rec!(s.set_device_credential("d1", "p1", 1));
    rec!(s.set_device_credential("d1", "p2", 2));
    rec!(s.set_device_credential("d2", "p3", 3));
    let mut creds = s.device_credentials().await.unwrap();
    creds.sort();
    out.push(format!("{creds:?}"));
    rec!(s.delete_device_credential("d2"));
    rec!(s.delete_device_credential("d2"));
    rec!(s.setting("k"));
    rec!(s.setting_or_insert("k", "v1"));
    rec!(s.setting_or_insert("k", "v2"));
    rec!(s.setting("k"));

    // Retraining.
    rec!(s.set_retrain_policy("m", "{\"p\":1}", 1));
    rec!(s.set_retrain_policy("m", "{\"p\":2}", 2));
    rec!(s.set_retrain_policy("a", "{\"p\":3}", 2));
    rec!(s.retrain_policies());
    rec!(s.delete_retrain_policy("a"));
    rec!(s.delete_retrain_policy("a"));
    rec!(s.open_retrain_job("j1", "m", "collecting", 1, "{}", &["collecting"]));
    rec!(s.open_retrain_job("j2", "n", "collecting", 1, "{}", &[]));
    rec!(s.retrain_jobs());

    // Samples.
    rec!(s.add_sample_upload("u1", "d1", "m", 1));
    rec!(s.add_sample_upload("u1", "d1", "m", 2));
    rec!(s.add_sample_upload("u1", "d2", "m", 2));
    let part = vec![("s1".to_string(), 10, vec![1u8]), ("s2".to_string(), 11, vec![2u8])];
    rec!(s.add_sample_part("d1", "u1", "m", 3, &part, false, 5));
    rec!(s.add_sample_part("d1", "u1", "m", 3, &[("s1".to_string(), 9, vec![9u8])], true, 6));
    rec!(s.add_sample_part("d9", "u1", "m", 3, &part, true, 6));
    rec!(s.add_sample_part("d2", "u1", "other", 3, &part, true, 6));
    rec!(s.sample_upload("u1"));
    rec!(s.samples("m", None));
    rec!(s.samples("m", Some(2)));
    rec!(s.prune_samples(6));
    rec!(s.samples("m", None));

    // Bundles and roots.
    rec!(s.insert_bundle(&bundle("b1", "m", 1)));
    rec!(s.insert_bundle(&bundle("b2", "m", 2)));
    rec!(s.insert_bundle(&bundle("b0", "a", i64::MAX as u64)));
    out.push(format!("duplicate bundle refused: {}", s.insert_bundle(&bundle("b1", "m", 1)).await.is_err()));
    rec!(s.bundles());
    rec!(s.bundle("b2"));
    rec!(s.bundle("zz"));
    rec!(s.bundle_by_name("a", i64::MAX as u64));
    rec!(s.add_root(2, b"two", 1));
    rec!(s.add_root(1, b"one", 2));
    rec!(s.roots());

    // Certificates and claims.
    let cert = DeviceCertRow {
        serial: "0a".into(),
        device_id: "d1".into(),
        sha256: "aa".into(),
        not_after: 100,
        issued: 1,
        how: "claim".into(),
        revoked: None,
    };
    rec!(s.add_device_cert(&cert));
    rec!(s.add_device_cert(&DeviceCertRow { sha256: "bb".into(), ..cert.clone() }));
    rec!(s.add_device_cert(&DeviceCertRow { serial: "0b".into(), issued: 2, ..cert.clone() }));
    rec!(s.device_certs("d1"));
    rec!(s.device_revoked("d1"));
    rec!(s.revoke_device("d1", 50));
    rec!(s.revoke_device("d1", 60));
    rec!(s.device_revoked("d1"));
    rec!(s.device_certs("d1"));
    rec!(s.unrevoke_device("d1"));
    rec!(s.unrevoke_device("d1"));
    rec!(s.add_claim_token("c1", "ch1", Some("d1"), 100, 1));
    rec!(s.add_claim_token("c2", "ch2", None, 100, 2));
    rec!(s.use_claim_token("ch1", "d1", 5));
    rec!(s.claim_token("ch1"));
    rec!(s.claim_token("nope"));
    rec!(s.claim_tokens());

    // Rollouts.
    rec!(s.create_rollout("r1", "b1", "{\"plan\":1}", "{}", 3));
    rec!(s.create_rollout("r2", "b2", "{}", "{}", 4));
    let offers = vec!["d1".to_string(), "d2".to_string()];
    let step = RolloutStep { state: "running", reason: None, engine_json: "{\"e\":1}", offers: &offers, now: 5 };
    rec!(s.save_rollout("r1", 0, &step));
    rec!(s.save_rollout("r2", 0, &RolloutStep { state: "failed", reason: Some("no"), offers: &[], ..step }));
    rec!(s.rollouts());
    rec!(s.active_rollouts());
    rec!(s.mark_offered("r1/d1", 6));
    rec!(s.offer_progress("r1/d1", "downloading", None, 7));
    rec!(s.reoffer_device("d1"));
    rec!(s.offer_progress("r1/d2", "failed", Some("disk"), 8));
    rec!(s.offer_progress("r1/d2", "downloading", None, 9));
    rec!(s.rollout_devices("r1"));
    rec!(s.lease("none"));
    out
}

/// A second store on the database, as another replica.
async fn replicas(url: &str) -> [Arc<Postgres>; 2] {
    [Arc::new(connect(url).await), Arc::new(connect(url).await)]
}

/// `n` calls at once, alternating between the replicas; their answers.
async fn race<T, F, Fut>(stores: &[Arc<Postgres>; 2], n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Arc<Postgres>, usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (fut, barrier) = (f(stores[i % 2].clone(), i), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}

/// Two replicas on one database: racing writers, one winner each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_racing_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let url = pg.create_database("race");
    let stores = replicas(&url).await;
    let s = stores[0].clone();

    // (a) 50 saves of one rollout at the same revision: one wins, with its offer alone.
    s.insert_bundle(&bundle("b1", "m", 1)).await.unwrap();
    s.create_rollout("r1", "b1", "{}", "{}", 1).await.unwrap();
    let t = Instant::now();
    let won = race(&stores, 50, |s, i| async move {
        let offers = vec![format!("d{i}")];
        let step = RolloutStep { state: "running", reason: None, engine_json: "{}", offers: &offers, now: 2 };
        s.save_rollout("r1", 0, &step).await.map(|won| won.then_some(i))
    })
    .await;
    let winners: Vec<usize> = won.into_iter().flatten().collect();
    eprintln!("50 racing save_rollout: {:?}", t.elapsed());
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(s.rollout("r1").await.unwrap().unwrap().rev, 1);
    let offered: Vec<String> = s.rollout_devices("r1").await.unwrap().into_iter().map(|d| d.device_id).collect();
    assert_eq!(offered, [format!("d{}", winners[0])], "only the winner's offers are stored");

    // (b) 20 opens of a retraining job for one model: one opens.
    let t = Instant::now();
    let opened = race(&stores, 20, |s, i| async move {
        s.open_retrain_job(&format!("j{i}"), "m", "collecting", i as i64, "{}", &["collecting", "training"]).await
    })
    .await;
    eprintln!("20 racing open_retrain_job: {:?}", t.elapsed());
    assert_eq!(opened.iter().filter(|&&o| o).count(), 1, "{opened:?}");
    assert_eq!(s.retrain_jobs().await.unwrap().len(), 1);

    // (c) 20 holders after one lease: one holds it, at epoch 1.
    let t = Instant::now();
    let held = race(&stores, 20, |s, i| async move {
        s.acquire_lease("leader", &format!("h{i}"), 10_000, 1_000).await.map(|e| e.map(|e| (i, e)))
    })
    .await;
    eprintln!("20 racing acquire_lease: {:?}", t.elapsed());
    let holders: Vec<(usize, i64)> = held.into_iter().flatten().collect();
    assert_eq!(holders.len(), 1, "{holders:?}");
    let lease = s.lease("leader").await.unwrap().unwrap();
    assert_eq!((lease.holder, lease.epoch), (format!("h{}", holders[0].0), 1));
    // And once it has expired, 20 again: one takes it over, at epoch 2.
    let held =
        race(&stores, 20, |s, i| async move { s.acquire_lease("leader", &format!("x{i}"), 10_000, 11_000).await })
            .await;
    assert_eq!(held.iter().flatten().collect::<Vec<_>>(), [&2]);

    // A claim token used once; a setting inserted once, everyone reading the same value.
    s.add_claim_token("c1", "h1", None, 100, 0).await.unwrap();
    let claimed = race(&stores, 20, |s, i| async move { s.use_claim_token("h1", &format!("d{i}"), 5).await }).await;
    assert_eq!(claimed.iter().flatten().count(), 1);
    let values = race(&stores, 20, |s, i| async move { s.setting_or_insert("secret", &format!("v{i}")).await }).await;
    assert!(values.iter().all(|v| *v == values[0]), "{values:?}");
    // Tag changes by two operators at once both stay.
    s.device_hello("d1", &HelloRecord::default(), &Default::default(), 1).await.unwrap();
    race(
        &stores,
        20,
        |s, i| async move { s.set_server_tags("d1", &[(format!("t{i:02}"), Some(i.to_string()))]).await },
    )
    .await;
    assert_eq!(s.device("d1").await.unwrap().unwrap().tags.len(), 20);

    // (d) 4 servers starting at once on an empty database: each connects, the schema is made once.
    let url = pg.create_database("fresh");
    let t = Instant::now();
    let connects: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn({
                let url = url.clone();
                async move { Postgres::connect(&url).await }
            })
        })
        .collect();
    for c in connects {
        let store = c.await.unwrap().unwrap_or_else(|e| panic!("a concurrent connect failed: {e:#}"));
        assert!(store.devices().await.unwrap().is_empty());
    }
    eprintln!("4 concurrent connects to an empty database: {:?}", t.elapsed());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> =
        client.query("SELECT version FROM schema_migrations", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, [1]);
}

/// The database stops for about 5 s: every call fails within a few seconds (no panic, no hang),
/// and the same store works again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_calls_quickly_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut pg = start_postgres(dir.path());
    let url = pg.create_database("outage");
    let s = Arc::new(connect(&url).await);
    s.device_hello("d1", &HelloRecord::default(), &Default::default(), 1).await.unwrap();
    // Fill the pool with a few connections, which the outage breaks.
    let _ = race(&[s.clone(), s.clone()], 4, |s, _| async move { s.devices().await }).await;

    let t = Instant::now();
    pg.stop();
    let down = Instant::now();
    eprintln!("stopped in {:?}", t.elapsed());
    let mut failures = 0;
    let mut slowest = Duration::ZERO;
    while down.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        let r = s.device("d1").await;
        let w = s.add_event("d1", &format!("m{failures}"), 1, "k", "{}").await;
        slowest = slowest.max(t.elapsed());
        assert!(r.is_err() && w.is_err(), "a call succeeded while the database was down");
        failures += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = s.device("d1").await.unwrap_err();
    eprintln!("{failures} rounds of failed calls while down, slowest {slowest:?}; e.g. {err:#}");
    assert!(slowest < Duration::from_secs(3), "a call took {slowest:?} to fail");

    let t = Instant::now();
    pg.start();
    eprintln!("started again in {:?}", t.elapsed());
    let t = Instant::now();
    let device = loop {
        match s.device("d1").await {
            Ok(d) => break d,
            Err(e) if t.elapsed() < Duration::from_secs(5) => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover within 5 s: {e:#}"),
        }
    };
    eprintln!("first successful call {:?} after the restart", t.elapsed());
    assert_eq!(device.unwrap().id, "d1");
    // Every pooled connection works again (the broken ones were replaced).
    let ok =
        race(
            &[s.clone(), s.clone()],
            16,
            |s, i| async move { s.add_event("d1", &format!("after{i}"), 2, "k", "{}").await },
        )
        .await;
    assert!(ok.iter().all(|&new| new));
    assert_eq!(s.events(Some("d1"), None, 100).await.unwrap().len(), 16);
}

/// `sslmode=require`: TLS through rustls, the server verified against `sslrootcert` (here a CA
/// of the test's own that issued the cluster's certificate for 127.0.0.1); a store that cannot
/// verify the server does not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_is_verified() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let ca = flotilla_pki::Ca::generate("database CA", now - 60, 3600).unwrap();
    let server = ca.server(&["127.0.0.1".to_string()], now - 60, 3600).unwrap();
    // The server's files belong to the cluster's OS user, the key readable by it alone.
    let owner = std::fs::metadata(&pg.data).unwrap();
    for (name, pem) in [("server.crt", &server.cert_pem), ("server.key", &server.key_pem)] {
        let path = pg.data.join(name);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    pg.psql("ALTER SYSTEM SET ssl = on");
    pg.psql("SELECT pg_reload_conf()");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let url = pg.create_database("tls");

    let tls_url = format!("{url}?sslmode=require&sslrootcert={}", ca_file.display());
    let t = Instant::now();
    let s = loop {
        match Postgres::connect(&tls_url).await {
            Ok(s) => break s,
            // The reload is asynchronous.
            Err(e) if t.elapsed() < Duration::from_secs(5) => {
                eprintln!("not yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connecting with TLS: {e:#}"),
        }
    };
    s.device_hello("d1", &HelloRecord::default(), &Default::default(), 1).await.unwrap();
    assert_eq!(s.devices().await.unwrap().len(), 1);
    let encrypted = pg.psql(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'flotilla-server'",
    );
    let (tls, all) = encrypted.trim().split_once('|').unwrap();
    assert!(all != "0" && tls == all, "TLS connections | all: {encrypted}");

    // Another CA's certificate, or none, does not pass.
    let other = flotilla_pki::Ca::generate("another CA", now - 60, 3600).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    let err = Postgres::connect(&format!("{url}?sslmode=require&sslrootcert={}", other_file.display()))
        .await
        .expect_err("connected to a server whose certificate the given CA did not issue");
    eprintln!("with another CA: {err:#}");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    // Without sslmode the same URL speaks plain TCP.
    connect(&url).await;
}
