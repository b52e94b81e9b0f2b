//! One suite every store implementation passes (SQLite here; PostgreSQL from `tests/`, which
//! starts the database): each check opens stores through `open`, and a second call reaches the
//! same data, as a restart or another replica would.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::*;

/// Opens a store on one database (each call a new connection to the same data).
pub type Opener = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>> + Send + Sync>;
pub type Open<'a> = &'a (dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>> + Sync);

/// Every check, in order, each on a fresh database (`fresh` makes one and returns its opener).
pub async fn all<F, Fut>(fresh: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Opener>,
{
    rollout_progress_is_monotonic_and_survives_reopen(&*fresh().await).await;
    rollout_saves_compare_the_revision(&*fresh().await).await;
    retrain_jobs_open_once_and_save_by_revision(&*fresh().await).await;
    leases_have_one_holder_at_a_time(&*fresh().await).await;
    lists_page_by_key_and_old_rows_are_pruned(&*fresh().await).await;
    one_firing_alert_per_signal(&*fresh().await).await;
    claim_tokens_work_once_and_not_after_expiry(&*fresh().await).await;
    revocation_covers_every_certificate_and_survives_reopening(&*fresh().await).await;
    batches_leave_what_one_by_one_would(&*fresh().await).await;
}

/// States and health reports stored in one batch leave what storing them one by one would: a
/// will keeps a device's models, a later state replaces them, the latest report per device and
/// version wins; devices the batch does not name are untouched.
pub async fn batches_leave_what_one_by_one_would(open: Open<'_>) {
    use crate::store::{HealthUpdate, ModelRecord, StateUpdate, fold_health, fold_states};
    let s = open().await;
    let model = |v: u64| ModelRecord {
        name: "m".into(),
        version: v,
        backend: "tract".into(),
        status: "active".into(),
        model_sha256: None,
        delegated_nodes: None,
        cpu_nodes: None,
        self_test: None,
        self_test_median_us: None,
    };
    let state = |d: &str, online: bool, models: Option<Vec<ModelRecord>>, at: i64| StateUpdate {
        device: d.into(),
        online,
        models,
        at,
    };
    s.device_states(&[state("old", true, Some(vec![model(1)]), 1), state("gone", true, Some(vec![model(1)]), 1)])
        .await
        .unwrap();
    let batch = vec![
        state("a", true, Some(vec![model(1)]), 2),
        state("gone", false, None, 3),             // a will: keeps its models
        state("a", true, Some(vec![model(2)]), 4), // replaces a's models
        state("b", false, None, 5),                // a will of a device never seen: no models
        state("a", false, None, 6),                // then a's will: offline, models kept
    ];
    s.device_states(&fold_states(batch)).await.unwrap();
    let get = |id: &'static str| {
        let s = &s;
        async move { s.device(id).await.unwrap().unwrap() }
    };
    let a = get("a").await;
    assert_eq!((a.online, a.last_seen, a.models.clone()), (false, Some(6), vec![model(2)]));
    let gone = get("gone").await;
    assert_eq!((gone.online, gone.models.clone()), (false, vec![model(1)]));
    let b = get("b").await;
    assert_eq!((b.online, b.models.len()), (false, 0));
    let old = get("old").await;
    assert_eq!((old.online, old.last_seen), (true, Some(1)), "untouched");
    assert_eq!(s.device_counts().await.unwrap(), (4, 1));

    let h = |d: &str, version: u64, inferences: u64| HealthUpdate {
        device: d.into(),
        model: "m".into(),
        version,
        inferences,
        errors: 0,
        latency_p95_us: Some(inferences),
        accelerator_fallback: false,
        backend: "tract".into(),
        at: inferences as i64,
    };
    let reports = vec![h("a", 1, 10), h("a", 2, 5), h("a", 1, 11), h("b", 1, 3), h("a", 2, 7)];
    s.set_health_many(&fold_health(reports)).await.unwrap();
    let rows = s.health("m").await.unwrap();
    let got: Vec<(String, u64, u64)> = rows.iter().map(|r| (r.device.clone(), r.version, r.inferences)).collect();
    assert_eq!(got, vec![("a".into(), 2, 7), ("a".into(), 1, 11), ("b".into(), 1, 3)]);
}

fn step<'a>(state: &'a str, offers: &'a [String], now: i64) -> RolloutStep<'a> {
    RolloutStep { state, reason: None, engine_json: "{}", offers, now }
}

pub async fn rollout_progress_is_monotonic_and_survives_reopen(open: Open<'_>) {
    let s = open().await;
    s.device_hello("a", &HelloRecord::default(), &Default::default(), 1).await.unwrap();
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
    .await
    .unwrap();
    s.create_rollout("r1", "b1", "{}", "{}", 3).await.unwrap();
    let a = vec!["a".to_string()];
    assert!(s.save_rollout("r1", 0, &step("running", &a, 3)).await.unwrap());
    assert!(s.save_rollout("r1", 1, &step("running", &a, 4)).await.unwrap(), "offers are idempotent");
    s.mark_offered("r1/a", 4).await.unwrap();
    s.offer_progress("r1/a", "succeeded", None, 5).await.unwrap();
    s.offer_progress("r1/a", "downloading", None, 6).await.unwrap();
    drop(s);
    let s = open().await;
    let rd = s.rollout_devices("r1").await.unwrap();
    assert_eq!((rd.len(), rd[0].state.as_str()), (1, "succeeded"));
    let r = s.rollout("r1").await.unwrap().unwrap();
    assert_eq!(r.rev, 2);
    let paused = RolloutStep { state: "paused", reason: Some("why"), engine_json: "{\"x\":1}", offers: &[], now: 7 };
    assert!(s.save_rollout("r1", 2, &paused).await.unwrap());
    let r = s.rollout("r1").await.unwrap().unwrap();
    assert_eq!(
        (r.state.as_str(), r.reason.as_deref(), r.engine.as_deref()),
        ("paused", Some("why"), Some("{\"x\":1}"))
    );
    assert!(s.active_rollouts().await.unwrap().is_empty());
    assert_eq!(s.bundle_by_name("m", 1).await.unwrap().unwrap().signers, vec!["k".to_string()]);
    assert!(s.add_event("a", "m1", 1, "k", "{}").await.unwrap());
    assert!(!s.add_event("a", "m1", 1, "k", "{}").await.unwrap());
}

/// A save that read older state loses, with nothing written (its offers neither): an operator's
/// pause is never overwritten by a driver step that read the rollout before it.
pub async fn rollout_saves_compare_the_revision(open: Open<'_>) {
    let s = open().await;
    s.insert_bundle(&BundleRow {
        id: "b1".into(),
        name: "m".into(),
        version: 1,
        size: 1,
        manifest_sha256: "x".into(),
        signers: vec![],
        created: 1,
        pushed: 1,
        head: vec![],
    })
    .await
    .unwrap();
    s.create_rollout("r1", "b1", "{}", "{}", 1).await.unwrap();
    let read_by_driver = s.rollout("r1").await.unwrap().unwrap().rev;
    let read_by_operator = s.rollout("r1").await.unwrap().unwrap().rev;
    assert!(s.save_rollout("r1", read_by_operator, &step("paused", &[], 2)).await.unwrap());
    let b = vec!["b".to_string()];
    assert!(!s.save_rollout("r1", read_by_driver, &step("running", &b, 2)).await.unwrap());
    let r = s.rollout("r1").await.unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.rev), ("paused", read_by_operator + 1));
    assert!(s.rollout_devices("r1").await.unwrap().is_empty(), "the losing step's offers are not stored");
    assert!(!s.save_rollout("nope", 0, &step("paused", &[], 2)).await.unwrap());
}

/// One active job per model, decided in the store; job saves compare the revision.
pub async fn retrain_jobs_open_once_and_save_by_revision(open: Open<'_>) {
    let s = open().await;
    let active = ["collecting", "training"];
    assert!(s.open_retrain_job("j1", "m", "collecting", 1, "{\"n\":1}", &active).await.unwrap());
    assert!(!s.open_retrain_job("j2", "m", "collecting", 2, "{}", &active).await.unwrap(), "m has an active job");
    assert!(s.open_retrain_job("j3", "other", "collecting", 3, "{}", &active).await.unwrap());
    let j1 = s.retrain_job("j1").await.unwrap().unwrap();
    assert_eq!((j1.json.as_str(), j1.rev), ("{\"n\":1}", 0));
    assert!(s.save_retrain_job("j1", 0, "failed", "{\"n\":2}").await.unwrap());
    assert!(!s.save_retrain_job("j1", 0, "training", "{\"n\":3}").await.unwrap(), "stale revision");
    assert_eq!(s.retrain_job("j1").await.unwrap().unwrap(), JobRow { json: "{\"n\":2}".into(), rev: 1 });
    assert!(s.open_retrain_job("j4", "m", "collecting", 4, "{}", &active).await.unwrap(), "j1 is no longer active");
    let ids: Vec<i64> = s.retrain_jobs().await.unwrap().iter().map(|j| j.rev).collect();
    assert_eq!(ids.len(), 3);
}

/// One holder at a time; renewing keeps the epoch; taking over an expired lease bumps it.
pub async fn leases_have_one_holder_at_a_time(open: Open<'_>) {
    let s = open().await;
    assert_eq!(s.acquire_lease("rollout/r1", "a", 1000, 0).await.unwrap(), Some(1));
    assert_eq!(s.acquire_lease("rollout/r1", "b", 1000, 500).await.unwrap(), None, "a holds it");
    assert_eq!(s.acquire_lease("rollout/r1", "a", 1000, 900).await.unwrap(), Some(1), "renewed");
    assert_eq!(s.acquire_lease("rollout/r1", "b", 1000, 1899).await.unwrap(), None, "renewed until 1900");
    assert_eq!(s.acquire_lease("rollout/r1", "b", 1000, 1900).await.unwrap(), Some(2), "expired: b takes it");
    assert_eq!(s.acquire_lease("rollout/r1", "a", 1000, 1901).await.unwrap(), None, "a lost it");
    let l = s.lease("rollout/r1").await.unwrap().unwrap();
    assert_eq!((l.holder.as_str(), l.epoch, l.expires), ("b", 2, 2900));
    s.release_lease("rollout/r1", "a", 1).await.unwrap();
    assert_eq!(s.lease("rollout/r1").await.unwrap().unwrap().expires, 2900, "a cannot release b's lease");
    s.release_lease("rollout/r1", "b", 2).await.unwrap();
    assert_eq!(s.acquire_lease("rollout/r1", "a", 1000, 2000).await.unwrap(), Some(3), "released: a takes it");
    assert_eq!(s.acquire_lease("job/j1", "b", 1000, 2000).await.unwrap(), Some(1), "leases are per name");
}

/// Devices page by id and events by sequence, newest first; retention deletes by age.
pub async fn lists_page_by_key_and_old_rows_are_pruned(open: Open<'_>) {
    let s = open().await;
    for i in 0..25 {
        s.device_hello(&format!("d{i:02}"), &HelloRecord::default(), &Default::default(), i).await.unwrap();
        s.add_event(&format!("d{i:02}"), "m", i, "k", "{}").await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.devices_page(after.as_deref(), 10).await.unwrap();
        seen.extend(page.iter().map(|d| d.id.clone()));
        if page.len() < 10 {
            break;
        }
        after = page.last().map(|d| d.id.clone());
    }
    let all: Vec<String> = (0..25).map(|i| format!("d{i:02}")).collect();
    assert_eq!(seen, all, "every device once, in id order");
    let first = s.events(None, None, 10).await.unwrap();
    assert_eq!((first.len(), first[0].at, first[9].at), (10, 24, 15), "newest first");
    let next = s.events(None, Some(first[9].seq), 10).await.unwrap();
    assert_eq!(next[0].at, 14);
    assert_eq!(s.events(Some("d03"), None, 10).await.unwrap().len(), 1);
    assert_eq!(s.prune_events(20).await.unwrap(), 20);
    assert_eq!(s.events(None, None, 100).await.unwrap().len(), 5);
    assert_eq!(s.prune_drift_reports(i64::MAX).await.unwrap(), 0);
    assert_eq!(s.prune_samples(i64::MAX).await.unwrap(), 0);
}

/// However many judges raise it, one alert fires per model, version, cohort and signal; once
/// resolved, the next can fire.
pub async fn one_firing_alert_per_signal(open: Open<'_>) {
    let s = open().await;
    let alert = |signal: &str| AlertRow {
        id: 0,
        model: "m".into(),
        version: 1,
        cohort: "group=lab".into(),
        signal: signal.into(),
        metrics: "psi".into(),
        value: Some(0.5),
        threshold: Some(0.2),
        windows: 3,
        first_window: 10,
        last_window: 30,
        state: "firing".into(),
        raised: 100,
        resolved: None,
    };
    let first = s.raise_alert(&alert("input")).await.unwrap().expect("raised");
    assert_eq!(s.raise_alert(&alert("input")).await.unwrap(), None, "one firing already");
    assert!(s.raise_alert(&alert("output")).await.unwrap().is_some(), "another signal");
    let firing = s.firing_alert("m", 1, "group=lab", "input").await.unwrap().unwrap();
    assert_eq!((firing.id, firing.windows, firing.value), (first, 3, Some(0.5)));
    s.resolve_alert(first, 200).await.unwrap();
    assert!(s.raise_alert(&alert("input")).await.unwrap().is_some(), "resolved: it may fire again");
    assert_eq!(s.alerts(false).await.unwrap().len(), 2);
    assert_eq!(s.alerts(true).await.unwrap().len(), 3);
}

pub async fn claim_tokens_work_once_and_not_after_expiry(open: Open<'_>) {
    let s = open().await;
    s.add_claim_token("c-1", "h1", None, 1000, 0).await.unwrap();
    s.add_claim_token("c-2", "h2", Some("rpi-2"), 1000, 0).await.unwrap();
    assert!(s.use_claim_token("h1", "rpi-1", 1000).await.unwrap().is_none(), "expired at 1000");
    assert_eq!(s.use_claim_token("h1", "rpi-1", 999).await.unwrap().unwrap().used_by.as_deref(), Some("rpi-1"));
    assert!(s.use_claim_token("h1", "rpi-1", 999).await.unwrap().is_none(), "used");
    assert!(s.use_claim_token("h2", "rpi-1", 5).await.unwrap().is_none(), "bound to rpi-2");
    assert!(s.use_claim_token("h2", "rpi-2", 5).await.unwrap().is_some());
    assert!(s.use_claim_token("nope", "rpi-2", 5).await.unwrap().is_none());
}

pub async fn revocation_covers_every_certificate_and_survives_reopening(open: Open<'_>) {
    let s = open().await;
    let cert = |serial: &str, device: &str| DeviceCertRow {
        serial: serial.into(),
        device_id: device.into(),
        sha256: "00".into(),
        not_after: 10,
        issued: 1,
        how: "issued".into(),
        revoked: None,
    };
    s.add_device_cert(&cert("01", "a")).await.unwrap();
    s.add_device_cert(&cert("02", "a")).await.unwrap();
    s.add_device_cert(&cert("03", "b")).await.unwrap();
    assert_eq!(s.revoke_device("a", 5).await.unwrap(), 2);
    drop(s);
    let s = open().await;
    let (devices, mut serials) = s.revocations().await.unwrap();
    serials.sort();
    assert_eq!((devices, serials), (vec!["a".to_string()], vec!["01".to_string(), "02".to_string()]));
    assert_eq!(s.device_revoked("a").await.unwrap(), Some(5));
    assert!(s.unrevoke_device("a").await.unwrap());
    assert_eq!(s.revocations().await.unwrap().0, Vec::<String>::new());
}

#[cfg(test)]
#[tokio::test]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    let root = dir.path().to_path_buf();
    all(|| {
        let path = root.join(format!("fleet-{}.db", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        async move {
            let open: Opener = Box::new(move || {
                let path = path.clone();
                Box::pin(async move { Arc::new(sqlite::Sqlite::open(&path).unwrap()) as Arc<dyn Store> })
            });
            open
        }
    })
    .await;
}
